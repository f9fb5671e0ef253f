//! The metric families, registered once per process when metrics are turned on.
//!
//! Label values come from configuration only (broker, stream, consumer and trigger names, the
//! provider) or from a fixed set (`outcome`); nothing a message or a payload carries becomes a
//! label, so the series count is bounded by the config, not by traffic.
//!
//! Hot paths never touch a family's map: call sites hold handles ([`TriggerTelemetry`],
//! [`PublishTelemetry`]) whose counters are resolved once, so recording is one atomic add.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BrokerLabels {
    pub broker: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PublishLabels {
    pub broker: String,
    pub provider: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConsumerLabels {
    pub broker: String,
    pub provider: String,
    pub stream: String,
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TriggerLabels {
    pub broker: String,
    pub provider: String,
    pub stream: String,
    pub consumer: String,
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub broker: String,
    pub provider: String,
    pub stream: String,
    pub consumer: String,
    pub trigger: String,
    pub outcome: String,
}

impl TriggerLabels {
    fn with(&self, outcome: &str) -> OutcomeLabels {
        OutcomeLabels {
            broker: self.broker.clone(),
            provider: self.provider.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            trigger: self.trigger.clone(),
            outcome: outcome.to_string(),
        }
    }
}

type HistogramCtor = fn() -> Histogram;

/// Pipeline run durations: 5 ms .. ~80 s in powers of two.
fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.005, 2.0, 15,
    ))
}

pub(crate) struct Metrics {
    pub registry: Registry,
    pub publish: Family<PublishLabels, Counter>,
    pub publish_bulk: Family<PublishLabels, Counter>,
    pub deliveries: Family<TriggerLabels, Counter>,
    pub redeliveries: Family<TriggerLabels, Counter>,
    pub settlements: Family<OutcomeLabels, Counter>,
    pub settle_failures: Family<OutcomeLabels, Counter>,
    pub dead_letters: Family<TriggerLabels, Counter>,
    pub dead_letter_failures: Family<TriggerLabels, Counter>,
    pub pipeline_duration: Family<OutcomeLabels, Histogram, HistogramCtor>,
    pub in_flight: Family<TriggerLabels, Gauge>,
    pub connected: Family<BrokerLabels, Gauge>,
    pub reconnects: Family<BrokerLabels, Counter>,
    pub pending: Family<ConsumerLabels, Gauge>,
    pub ack_pending: Family<ConsumerLabels, Gauge>,
    pub lag_errors: Family<ConsumerLabels, Counter>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The registry, when metrics are on (an endpoint was configured); `None` costs one load.
pub(crate) fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// Turns metrics on for the rest of the process (idempotent).
pub(crate) fn enable() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("eventbus");
        let m = Metrics {
            publish: Family::default(),
            publish_bulk: Family::default(),
            deliveries: Family::default(),
            redeliveries: Family::default(),
            settlements: Family::default(),
            settle_failures: Family::default(),
            dead_letters: Family::default(),
            dead_letter_failures: Family::default(),
            pipeline_duration: Family::new_with_constructor(duration_histogram as HistogramCtor),
            in_flight: Family::default(),
            connected: Family::default(),
            reconnects: Family::default(),
            pending: Family::default(),
            ack_pending: Family::default(),
            lag_errors: Family::default(),
            registry: Registry::default(),
        };
        // Counter names go in without `_total`: the encoder appends it.
        r.register(
            "published",
            "Messages published by step.eventbus.publish (one message per call), by outcome: ok, duplicate (de-duplicated by message id) or error",
            m.publish.clone(),
        );
        r.register(
            "bulk_published",
            "Messages of bulk publishes (step.eventbus.publish with messages), by outcome: ok, duplicate or error",
            m.publish_bulk.clone(),
        );
        r.register(
            "deliveries",
            "Messages handed to pipelines, by the trigger (trigger label) or step.eventbus.consume (empty trigger label)",
            m.deliveries.clone(),
        );
        r.register(
            "redeliveries",
            "Deliveries of messages delivered before (delivery count above 1)",
            m.redeliveries.clone(),
        );
        r.register(
            "settlements",
            "Confirmed settlements, by outcome: ack, nak, term or progress",
            m.settlements.clone(),
        );
        r.register(
            "settle_failures",
            "Settlements that could not be confirmed (the message will be redelivered), by outcome: ack, nak, term or progress",
            m.settle_failures.clone(),
        );
        r.register(
            "dead_letters",
            "Messages published to the trigger's dead-letter subject on their last delivery",
            m.dead_letters.clone(),
        );
        r.register(
            "dead_letter_failures",
            "Failed dead-letter publish attempts (each is retried while the message is kept)",
            m.dead_letter_failures.clone(),
        );
        r.register(
            "pipeline_duration_seconds",
            "Pipeline run time per trigger delivery (message or batch), by outcome: ok or error",
            m.pipeline_duration.clone(),
        );
        r.register(
            "trigger_in_flight",
            "Pipeline runs the trigger has in flight",
            m.in_flight.clone(),
        );
        r.register(
            "broker_connected",
            "1 while the broker connection is up, 0 while it is down or reconnecting",
            m.connected.clone(),
        );
        r.register(
            "broker_reconnects",
            "Times the broker connection came back after being lost",
            m.reconnects.clone(),
        );
        r.register(
            "consumer_pending",
            "Messages waiting for the consumer: NATS num_pending; pgchannel events past the consumer's position that are neither settled nor leased (counted up to a cap); kafka records past the group's committed offsets",
            m.pending.clone(),
        );
        r.register(
            "consumer_ack_pending",
            "Messages delivered and not yet settled: NATS num_ack_pending; pgchannel leased rows; kafka records this process holds unsettled",
            m.ack_pending.clone(),
        );
        r.register(
            "consumer_lag_errors",
            "Lag refreshes that failed (the lag gauges keep their last value)",
            m.lag_errors.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The text exposition (Prometheus 0.0.4, `# HELP`/`# TYPE` per family).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

// ---------------------------------------------------------------- handles

/// Handles of one trigger (or one consume step's consumer), resolved on first use after
/// metrics are on; before that (and forever when they are off) every call is one load.
pub struct TriggerTelemetry {
    labels: TriggerLabels,
    cell: OnceLock<TriggerHandles>,
}

struct TriggerHandles {
    deliveries: Counter,
    redeliveries: Counter,
    /// ack, nak, term, progress
    settled: [Counter; 4],
    settle_failed: [Counter; 4],
    dead_letters: Counter,
    dead_letter_failures: Counter,
    run_ok: Histogram,
    run_err: Histogram,
    in_flight: Gauge,
}

/// What a settlement did, for the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Nak,
    Term,
    Progress,
}

const SETTLE_NAMES: [&str; 4] = ["ack", "nak", "term", "progress"];

impl Settle {
    fn index(self) -> usize {
        match self {
            Settle::Ack => 0,
            Settle::Nak => 1,
            Settle::Term => 2,
            Settle::Progress => 3,
        }
    }
}

impl From<crate::nats::ack::AckKind> for Settle {
    fn from(k: crate::nats::ack::AckKind) -> Settle {
        use crate::nats::ack::AckKind;
        match k {
            AckKind::Ack => Settle::Ack,
            AckKind::Nak(_) => Settle::Nak,
            AckKind::Term => Settle::Term,
            AckKind::Progress => Settle::Progress,
        }
    }
}

impl TriggerTelemetry {
    pub fn new(broker: &str, provider: &str, stream: &str, consumer: &str, trigger: &str) -> Self {
        TriggerTelemetry {
            labels: TriggerLabels {
                broker: broker.into(),
                provider: provider.into(),
                stream: stream.into(),
                consumer: consumer.into(),
                trigger: trigger.into(),
            },
            cell: OnceLock::new(),
        }
    }

    /// The handles of a trigger on `broker`.
    pub fn for_trigger(
        broker: &impl super::trace::BrokerId,
        stream: &str,
        consumer: &str,
        trigger: &str,
    ) -> Self {
        Self::new(
            broker.broker_name(),
            broker.provider_name(),
            stream,
            consumer,
            trigger,
        )
    }

    fn h(&self) -> Option<&TriggerHandles> {
        if let Some(h) = self.cell.get() {
            return Some(h);
        }
        let m = get()?;
        Some(self.cell.get_or_init(|| {
            let l = &self.labels;
            let settle = |f: &Family<OutcomeLabels, Counter>| {
                SETTLE_NAMES.map(|o| f.get_or_create_owned(&l.with(o)))
            };
            TriggerHandles {
                deliveries: m.deliveries.get_or_create_owned(l),
                redeliveries: m.redeliveries.get_or_create_owned(l),
                settled: settle(&m.settlements),
                settle_failed: settle(&m.settle_failures),
                dead_letters: m.dead_letters.get_or_create_owned(l),
                dead_letter_failures: m.dead_letter_failures.get_or_create_owned(l),
                run_ok: m.pipeline_duration.get_or_create_owned(&l.with("ok")),
                run_err: m.pipeline_duration.get_or_create_owned(&l.with("error")),
                in_flight: m.in_flight.get_or_create_owned(l),
            }
        }))
    }

    /// A message is handed to a pipeline: counted, its `deliver` span started and its trace
    /// context put in `m.trace_headers`. End the returned delivery when the pipeline returns
    /// (dropping it ends the span too).
    pub fn deliver(&self, m: &mut crate::pb::eventbus::Message) -> super::trace::Delivery {
        if let Some(h) = self.h() {
            h.deliveries.inc();
            if m.delivery_count > 1 {
                h.redeliveries.inc();
            }
        }
        let l = &self.labels;
        super::trace::deliver(m, &l.broker, &l.provider, &l.trigger)
    }

    pub fn settled(&self, kind: impl Into<Settle>, confirmed: bool) {
        if let Some(h) = self.h() {
            let i = kind.into().index();
            if confirmed {
                h.settled[i].inc();
            } else {
                h.settle_failed[i].inc();
            }
        }
    }

    /// A dead-letter publish attempt and whether it landed.
    pub fn dead_lettered(&self, ok: bool) {
        if let Some(h) = self.h() {
            if ok {
                h.dead_letters.inc();
            } else {
                h.dead_letter_failures.inc();
            }
        }
    }

    /// A pipeline run starts: in flight until [`Run::finish`] (or drop, counted as an error).
    pub fn run(&self) -> Run<'_> {
        let h = self.h();
        if let Some(h) = h {
            h.in_flight.inc();
        }
        Run {
            h,
            started: h.map(|_| Instant::now()),
        }
    }
}

/// One pipeline run in flight.
pub struct Run<'a> {
    h: Option<&'a TriggerHandles>,
    started: Option<Instant>,
}

impl Run<'_> {
    pub fn finish(mut self, ok: bool) {
        self.end(ok);
    }

    fn end(&mut self, ok: bool) {
        if let (Some(h), Some(t)) = (self.h.take(), self.started.take()) {
            h.in_flight.dec();
            let d = t.elapsed().as_secs_f64();
            if ok {
                h.run_ok.observe(d);
            } else {
                h.run_err.observe(d);
            }
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        self.end(false);
    }
}

/// Publish outcome handles of one broker, resolved per call (publishes are per broker, not per
/// long-lived task); a family lookup under a read lock, only when metrics are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Ok,
    Duplicate,
    Error,
}

impl Published {
    fn name(self) -> &'static str {
        match self {
            Published::Ok => "ok",
            Published::Duplicate => "duplicate",
            Published::Error => "error",
        }
    }
}

fn publish_labels(broker: &str, provider: &str, outcome: Published) -> PublishLabels {
    PublishLabels {
        broker: broker.into(),
        provider: provider.into(),
        outcome: outcome.name().into(),
    }
}

/// One single publish's outcome.
pub fn published(broker: &str, provider: &str, outcome: Published) {
    if let Some(m) = get() {
        m.publish
            .get_or_create(&publish_labels(broker, provider, outcome))
            .inc();
    }
}

/// A bulk publish's outcomes: counts of ok, duplicate and error messages.
pub fn bulk_published(broker: &str, provider: &str, ok: u64, duplicate: u64, error: u64) {
    if let Some(m) = get() {
        for (o, n) in [
            (Published::Ok, ok),
            (Published::Duplicate, duplicate),
            (Published::Error, error),
        ] {
            if n > 0 {
                m.publish_bulk
                    .get_or_create(&publish_labels(broker, provider, o))
                    .inc_by(n);
            }
        }
    }
}

fn broker_labels(broker: &str, provider: &str) -> BrokerLabels {
    BrokerLabels {
        broker: broker.into(),
        provider: provider.into(),
    }
}

/// The broker connection went up (`true`) or down.
pub fn connection(broker: &str, provider: &str, up: bool) {
    if let Some(m) = get() {
        m.connected
            .get_or_create(&broker_labels(broker, provider))
            .set(i64::from(up));
    }
}

pub fn reconnected(broker: &str, provider: &str) {
    if let Some(m) = get() {
        m.reconnects
            .get_or_create(&broker_labels(broker, provider))
            .inc();
    }
}

/// Settlements by step.eventbus.ack (empty stream, consumer and trigger labels: the token
/// names them, but the token comes from pipeline state).
pub(crate) fn step_settled(broker: &str, provider: &str, kind: Settle, ok: u64, failed: u64) {
    if let Some(m) = get() {
        let l = TriggerLabels {
            broker: broker.into(),
            provider: provider.into(),
            stream: String::new(),
            consumer: String::new(),
            trigger: String::new(),
        }
        .with(SETTLE_NAMES[kind.index()]);
        if ok > 0 {
            m.settlements.get_or_create(&l).inc_by(ok);
        }
        if failed > 0 {
            m.settle_failures.get_or_create(&l).inc_by(failed);
        }
    }
}

/// Messages returned by step.eventbus.consume.
pub(crate) fn consumed(
    broker: &str,
    provider: &str,
    stream: &str,
    consumer: &str,
    n: u64,
    redelivered: u64,
) {
    if let Some(m) = get() {
        let l = TriggerLabels {
            broker: broker.into(),
            provider: provider.into(),
            stream: stream.into(),
            consumer: consumer.into(),
            trigger: String::new(),
        };
        m.deliveries.get_or_create(&l).inc_by(n);
        if redelivered > 0 {
            m.redeliveries.get_or_create(&l).inc_by(redelivered);
        }
    }
}

/// The lag gauges of one consumer (called by the lag refresher).
pub(crate) fn set_lag(l: &ConsumerLabels, pending: u64, ack_pending: u64) {
    if let Some(m) = get() {
        m.pending
            .get_or_create(l)
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        m.ack_pending
            .get_or_create(l)
            .set(i64::try_from(ack_pending).unwrap_or(i64::MAX));
    }
}

pub(crate) fn lag_failed(l: &ConsumerLabels) {
    if let Some(m) = get() {
        m.lag_errors.get_or_create(l).inc();
    }
}
