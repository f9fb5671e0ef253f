//! Consumer lag: `eventbus_consumer_pending` and `eventbus_consumer_ack_pending`, refreshed by
//! one task per process on an interval (`EVENTBUS_METRICS_LAG_INTERVAL`, a Go duration, default
//! 15s), consumer after consumer, never two reads at once.
//!
//! Cost per consumer and refresh: NATS, one `$JS.API.CONSUMER.INFO` request (the server answers
//! from memory); pgchannel, one read of the consumer row and one read-only statement whose two
//! counts stop at [`PG_CAP`] rows each (index range scans on the events and deliveries keys);
//! kafka, one OffsetFetch for the group and a watermark query per partition of the topic, over
//! one client the source keeps.
//! Each read is bounded by [`READ_TIMEOUT`]; a failed or timed-out read keeps the last values
//! and counts `eventbus_consumer_lag_errors_total`.
//!
//! Sources register when a declared consumer module is ensured or a trigger binds (keyed by
//! broker, stream and consumer, so a re-bind replaces its entry) and leave when their broker
//! module stops.

use super::metrics::{self, ConsumerLabels};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const INTERVAL_ENV: &str = "EVENTBUS_METRICS_LAG_INTERVAL";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// pgchannel counts stop here: a backlog deeper than this reads as this many.
pub const PG_CAP: i64 = 100_000;

/// (pending, ack pending), or why not; `Ok(None)` when the consumer no longer exists.
type Reading = Result<Option<(u64, u64)>, String>;
type Source = Arc<dyn Fn() -> BoxFuture<'static, Reading> + Send + Sync>;

fn sources() -> &'static Mutex<HashMap<ConsumerLabels, Source>> {
    static S: OnceLock<Mutex<HashMap<ConsumerLabels, Source>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

fn register(broker: &str, provider: &str, stream: &str, consumer: &str, source: Source) {
    let l = ConsumerLabels {
        broker: broker.into(),
        provider: provider.into(),
        stream: stream.into(),
        consumer: consumer.into(),
    };
    sources()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(l, source);
}

/// A NATS consumer's lag from its consumer info (num_pending, num_ack_pending).
pub fn watch_nats(broker: &str, js: &async_nats::jetstream::Context, stream: &str, consumer: &str) {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    let js = js.clone();
    let (s, c) = (stream.to_string(), consumer.to_string());
    register(
        broker,
        "nats",
        stream,
        consumer,
        Arc::new(move || {
            let (js, s, c) = (js.clone(), s.clone(), c.clone());
            Box::pin(async move {
                let stream = js.get_stream_no_info(&s).await.map_err(|e| e.to_string())?;
                match stream.consumer_info(&c).await {
                    Ok(i) => Ok(Some((i.num_pending, i.num_ack_pending as u64))),
                    Err(e)
                        if matches!(
                            e.kind(),
                            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
        }),
    );
}

/// A pgchannel consumer's lag: events past its position and leased rows (see `pg::Lag`).
pub fn watch_pg(broker: &str, bus: &crate::pg::PgBus, stream: &str, consumer: &str) {
    let bus = bus.clone();
    let (s, c) = (stream.to_string(), consumer.to_string());
    register(
        broker,
        "pgchannel",
        stream,
        consumer,
        Arc::new(move || {
            let (bus, s, c) = (bus.clone(), s.clone(), c.clone());
            Box::pin(async move {
                bus.lag(&s, &c, PG_CAP)
                    .await
                    .map(|l| l.map(|l| (l.pending, l.leased)))
                    .map_err(|e| e.to_string())
            })
        }),
    );
}

/// A kafka consumer group's lag: records past its committed offsets, summed over the topic's
/// partitions (per refresh: one OffsetFetch for the group and a watermark query per partition,
/// over one client kept by the source), and `unsettled()`: what this process's member holds.
pub fn watch_kafka(
    broker: &str,
    settings: &crate::kafka::KafkaSettings,
    topic: &str,
    group: &str,
    unsettled: impl Fn() -> u64 + Send + Sync + 'static,
) {
    use crate::kafka::admin::{group_lag, RdOffsets};
    let settings = settings.clone();
    let (t, g) = (topic.to_string(), group.to_string());
    let client: Arc<Mutex<Option<RdOffsets>>> = Arc::default();
    let unsettled = Arc::new(unsettled);
    register(
        broker,
        "kafka",
        topic,
        group,
        Arc::new(move || {
            let (settings, t, g) = (settings.clone(), t.clone(), g.clone());
            let (client, unsettled) = (client.clone(), unsettled.clone());
            Box::pin(async move {
                let pending = tokio::task::spawn_blocking(move || {
                    let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
                    if c.is_none() {
                        *c = Some(
                            RdOffsets::new(&settings, &g, READ_TIMEOUT)
                                .map_err(|e| e.to_string())?,
                        );
                    }
                    let Some(o) = c.as_ref() else {
                        return Ok(None);
                    };
                    let parts = group_lag(o, &t).map_err(|e| e.to_string())?;
                    Ok::<_, String>((!parts.is_empty()).then(|| {
                        parts
                            .iter()
                            .map(|p| u64::try_from(p.lag).unwrap_or(0))
                            .sum::<u64>()
                    }))
                })
                .await
                .map_err(|e| e.to_string())??;
                Ok(pending.map(|p| (p, unsettled())))
            })
        }),
    );
}

/// A broker module stopped: its consumers are no longer read.
pub fn forget_broker(broker: &str) {
    sources()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|l, _| l.broker != broker);
}

fn interval() -> Duration {
    match std::env::var(INTERVAL_ENV) {
        Ok(v) if !v.trim().is_empty() => match crate::pg::parse_go_duration(&v) {
            Ok(d) if d >= Duration::from_millis(100) => d,
            _ => {
                tracing::warn!(value = %v, "{INTERVAL_ENV} is not a duration of at least 100ms such as \"15s\"; using {DEFAULT_INTERVAL:?}");
                DEFAULT_INTERVAL
            }
        },
        _ => DEFAULT_INTERVAL,
    }
}

/// Starts the refresher (once per process; called when metrics are turned on).
pub(crate) fn spawn_refresher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return;
    }
    let every = interval();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            refresh_once().await;
        }
    });
}

/// Reads every registered consumer once, one after the other.
pub async fn refresh_once() {
    let list: Vec<(ConsumerLabels, Source)> = sources()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(l, s)| (l.clone(), s.clone()))
        .collect();
    for (l, source) in list {
        match tokio::time::timeout(READ_TIMEOUT, source()).await {
            Ok(Ok(Some((pending, ack_pending)))) => metrics::set_lag(&l, pending, ack_pending),
            Ok(Ok(None)) => metrics::set_lag(&l, 0, 0),
            Ok(Err(e)) => {
                tracing::debug!(stream = %l.stream, consumer = %l.consumer, error = %e, "consumer lag read failed");
                metrics::lag_failed(&l);
            }
            Err(_) => {
                tracing::debug!(stream = %l.stream, consumer = %l.consumer, "consumer lag read timed out");
                metrics::lag_failed(&l);
            }
        }
    }
}
