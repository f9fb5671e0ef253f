//! The trigger worker on a pgchannel broker. Same contract as the NATS worker (run.rs): at most
//! `max_in_flight` pipelines at once, each message settled on its own (ack after success in
//! auto mode, nak with a growing delay on failure, dead-letter + term on its last delivery),
//! in-progress acks while a pipeline runs, and no error ever ends the worker: it logs
//! (rate-limited), backs off and subscribes again, so a Postgres restart heals by itself.
//!
//! `PgBus::subscribe` holds the consumer's advisory lock on its own connection: one active
//! subscriber per consumer across processes; the others wait for the lock and take over when
//! the holder dies (its session ends, the lock goes with it, and its leased rows come back
//! when their lease runs out). With `max_in_flight: 1` each batch is one row, the lowest
//! deliverable id, so pipelines see a consumer's events in id order.

use super::run::{nak_delay, RateLimitedLog};
use super::{payload, AckMode, Launcher, TriggerCall, TriggerSpec};
use crate::config::broker::DEFAULT_REQUEST_TIMEOUT;
use crate::nats::ack::AckKind;
use crate::pg::{
    AckPolicy, AckToken, ConsumerDef, DeliverFrom, Delivery, Outgoing, PgBus, SubOpts,
};
use crate::runtime::modules::broker::{BrokerModule, BusError};
use crate::runtime::pg::steps::ack_op;
use crate::runtime::pg::to_message;
use crate::runtime::steps::message::Include;
use crate::runtime::{render, Runtime};
use crate::telemetry::TriggerTelemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const REBIND_MAX: Duration = Duration::from_secs(5);
/// The Go provider's max_deliver when a consumer row has none.
const GO_MAX_DELIVER: i64 = 5;
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// What the consumer row says, needed per message.
#[derive(Clone, Copy)]
struct Bound {
    ack_wait: Duration,
    max_deliver: i64,
}

pub struct PgWorker {
    rt: Runtime,
    spec: TriggerSpec,
    broker: Arc<BrokerModule>,
    stop: CancellationToken,
    tasks: TaskTracker,
    tm: Arc<TriggerTelemetry>,
}

impl PgWorker {
    pub fn new(
        rt: Runtime,
        spec: TriggerSpec,
        broker: Arc<BrokerModule>,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let tm = Arc::new(TriggerTelemetry::for_trigger(
            &broker.spec,
            &spec.stream,
            &spec.durable,
            &spec.workflow_type,
        ));
        PgWorker {
            rt,
            spec,
            broker,
            stop,
            tasks,
            tm,
        }
    }

    /// Used by StartModule: fails with a clear error when the consumer cannot be bound now.
    pub async fn bind_once(&self) -> Result<(), BusError> {
        self.prepare().await.map(|_| ())
    }

    /// Declared stream and consumer written as rows (again: they may have been deleted behind
    /// our back), an undeclared consumer created with the trigger's own filter, then the
    /// consumer's limits read back.
    async fn prepare(&self) -> Result<(PgBus, Bound), BusError> {
        let bus = self.broker.require_pg().await?;
        if let Some(s) = self.rt.stream_module(&self.spec.stream) {
            s.invalidate().await;
            s.ensure_pg(&self.broker).await?;
        }
        if self.spec.declared {
            for c in self.rt.consumer_modules(&self.spec.durable) {
                if c.spec.stream == self.spec.stream {
                    c.invalidate().await;
                    c.ensure_pg(&self.broker).await?;
                }
            }
        }
        let def = match bus.consumer(&self.spec.stream, &self.spec.durable).await? {
            Some(d) => d,
            None if !self.spec.declared => {
                let d = ConsumerDef {
                    stream: self.spec.stream.clone(),
                    name: self.spec.durable.clone(),
                    filter_subjects: if self.spec.filter_subject.is_empty() {
                        Vec::new()
                    } else {
                        vec![self.spec.filter_subject.clone()]
                    },
                    deliver: DeliverFrom::All,
                    ack_policy: AckPolicy::Explicit,
                    max_deliver: i32::try_from(self.spec.max_deliver).unwrap_or(i32::MAX),
                    ack_wait: DEFAULT_ACK_WAIT,
                    backoff: Vec::new(),
                };
                bus.ensure_consumer(&d).await?;
                d
            }
            None => {
                return Err(BusError::Invalid(format!(
                    "consumer {:?} on stream {:?} does not exist",
                    self.spec.durable, self.spec.stream
                )))
            }
        };
        if !self.spec.filter_subject.is_empty()
            && !def.filter_subjects.is_empty()
            && def.filter_subjects != [self.spec.filter_subject.clone()]
        {
            return Err(BusError::Invalid(format!(
                "consumer {:?} filters {:?}, the trigger asks for {:?}; align the consumer or drop filter_subject",
                self.spec.durable,
                def.filter_subjects.join(","),
                self.spec.filter_subject
            )));
        }
        let consumer_max = if def.max_deliver > 0 {
            def.max_deliver as i64
        } else {
            GO_MAX_DELIVER
        };
        // The smaller positive limit wins, as with NATS: past the consumer's limit the bus
        // stops delivering, so a larger trigger value would never reach its last attempt.
        let max_deliver = if self.spec.max_deliver > 0 {
            self.spec.max_deliver.min(consumer_max)
        } else {
            consumer_max
        };
        let ack_wait = if def.ack_wait.is_zero() {
            DEFAULT_ACK_WAIT
        } else {
            def.ack_wait
        };
        crate::telemetry::lag::watch_pg(
            &self.broker.spec.name,
            &bus,
            &self.spec.stream,
            &self.spec.durable,
        );
        Ok((
            bus,
            Bound {
                ack_wait,
                max_deliver,
            },
        ))
    }

    pub async fn run(self) {
        let sem = Arc::new(Semaphore::new(self.spec.max_in_flight));
        let mut log = RateLimitedLog::new();
        let mut backoff = Duration::from_millis(100);
        let name = self.spec.workflow_type.clone();
        let Some(launcher) = self.rt.launcher_or_stop(&self.stop, &name).await else {
            return;
        };
        'outer: while !self.stop.is_cancelled() {
            let (bus, bound) = match self.prepare().await {
                Ok(b) => b,
                Err(e) => {
                    log.warn(
                        &name,
                        "trigger cannot bind its consumer; retrying",
                        &render(&e),
                    );
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(REBIND_MAX);
                    continue;
                }
            };
            let opts = SubOpts {
                dead_letter_subject: self.spec.dead_letter_subject.clone(),
                cancel: self.stop.clone(),
            };
            // Waits while another process holds this consumer.
            let sub = tokio::select! {
                _ = self.stop.cancelled() => break,
                s = bus.subscribe(&self.spec.stream, &self.spec.durable, opts) => s,
            };
            let mut sub = match sub {
                Ok(s) => s,
                Err(e) => {
                    log.warn(
                        &name,
                        "trigger cannot subscribe; retrying",
                        &render(&BusError::from(e)),
                    );
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(REBIND_MAX);
                    continue;
                }
            };
            tracing::info!(trigger = %name, stream = %self.spec.stream, consumer = %self.spec.durable, "subscribed (pgchannel)");
            backoff = Duration::from_millis(100);
            loop {
                // Slots first, so no row waits in our hands while its lease runs.
                let first = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let mut permits = vec![first];
                let want = self.spec.batch_size.max(1);
                while permits.len() < want {
                    match sem.clone().try_acquire_owned() {
                        Ok(p) => permits.push(p),
                        Err(_) => break,
                    }
                }
                let rows = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    r = sub.next_batch(permits.len()) => r,
                };
                match rows {
                    Ok(rows) => {
                        for row in rows {
                            let Some(permit) = permits.pop() else {
                                // More rows than asked for: the lease brings them back.
                                tracing::warn!(trigger = %name, id = row.token.id, "bus returned more rows than asked; left for redelivery");
                                continue;
                            };
                            let h = PgHandler {
                                launcher: self.rt.launcher().unwrap_or_else(|| launcher.clone()),
                                spec: self.spec.clone(),
                                bus: bus.clone(),
                                bound,
                                stop: self.stop.clone(),
                                tm: self.tm.clone(),
                                trace: Default::default(),
                            };
                            self.tasks.spawn(async move {
                                h.handle(row).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => {
                        log.warn(
                            &name,
                            "trigger lost its subscription; re-subscribing",
                            &render(&BusError::from(e)),
                        );
                        if self.sleep(backoff).await {
                            break 'outer;
                        }
                        backoff = (backoff * 2).min(REBIND_MAX);
                        continue 'outer;
                    }
                }
            }
        }
        tracing::debug!(trigger = %name, "trigger worker stopped");
    }

    /// Sleeps unless stopped; true when stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

/// The encoded size of the TriggerWorkflow request carrying `call`, plus framing.
fn call_size(call: &TriggerCall) -> usize {
    use prost::Message as _;
    call.data.encoded_len() + call.trigger_type.len() + call.action.len() + 64
}

/// What the dead-letter publish needs after the delivery became the pipeline's data.
struct Original {
    token: AckToken,
    subject: String,
    payload: bytes::Bytes,
    headers: std::collections::BTreeMap<String, String>,
    correlation_id: Option<String>,
    delivered: i64,
}

struct PgHandler {
    launcher: Arc<dyn Launcher>,
    spec: TriggerSpec,
    bus: PgBus,
    bound: Bound,
    stop: CancellationToken,
    tm: Arc<TriggerTelemetry>,
    trace: crate::telemetry::trace::Slot,
}

impl PgHandler {
    async fn handle(&self, d: Delivery) {
        let orig = Original {
            token: d.token.clone(),
            subject: d.subject.clone(),
            payload: d.payload.clone(),
            headers: d.headers.clone(),
            correlation_id: d.correlation_id.clone(),
            delivered: d.delivery_count as i64,
        };
        let mut m = to_message(d, Include::ALL);
        let mut delivery = self.tm.deliver(&mut m);
        self.trace.set(&delivery);
        let call = TriggerCall {
            trigger_type: self.spec.workflow_type.clone(),
            action: "message".into(),
            data: payload::build(m, &self.spec.broker_ref),
        };
        if let Some(limit) = self.launcher.max_call_bytes() {
            let size = call_size(&call);
            if size > limit {
                let err = format!(
                    "message too large for the engine callback: the pipeline data is {size} bytes, the host accepts {limit}; consume it with step.eventbus.consume instead"
                );
                tracing::error!(trigger = %self.spec.workflow_type, id = orig.token.id, size, limit, "{err}");
                if let Some(dlq) = &self.spec.dead_letter_subject {
                    if !self.park(dlq, &orig, &err).await {
                        return;
                    }
                }
                self.settle(&orig.token, AckKind::Term).await;
                return;
            }
        }
        // Keep the lease while a long pipeline runs (in-progress at ack_wait/2).
        let progress_every = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        let run = self.tm.run();
        let pipeline = self.launcher.launch(call);
        tokio::pin!(pipeline);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let result = loop {
            tokio::select! {
                r = &mut pipeline => break r,
                _ = ticker.tick() => self.progress(&orig.token).await,
            }
        };
        run.finish(result.is_ok());
        delivery.end(&result);
        match result {
            Ok(()) => {
                if self.spec.ack_mode == AckMode::Auto {
                    self.settle(&orig.token, AckKind::Ack).await;
                }
            }
            Err(err) => self.fail(&orig, &err).await,
        }
    }

    async fn fail(&self, orig: &Original, err: &str) {
        let delivered = orig.delivered;
        let last = self.bound.max_deliver > 0 && delivered >= self.bound.max_deliver;
        tracing::warn!(trigger = %self.spec.workflow_type, id = orig.token.id, delivered, last, error = %err, "pipeline failed");
        if !last {
            self.settle(
                &orig.token,
                AckKind::Nak(Some(nak_delay(self.spec.nak_delay, delivered))),
            )
            .await;
            return;
        }
        if let Some(dlq) = &self.spec.dead_letter_subject {
            if !self.park(dlq, orig, err).await {
                return;
            }
        }
        self.settle(&orig.token, AckKind::Term).await;
    }

    /// Dead-letters on the last delivery, retrying until the publish lands (the row stays
    /// leased meanwhile through in-progress acks). False when the trigger stopped first: the
    /// row is then left unsettled and comes back after its lease.
    async fn park(&self, dlq: &str, orig: &Original, err: &str) -> bool {
        let cap = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        for attempt in 1i64.. {
            let sent = self.dead_letter(dlq, orig, err).await;
            self.tm.dead_lettered(sent.is_ok());
            let e = match sent {
                Ok(()) => return true,
                Err(e) => e,
            };
            let wait = nak_delay(self.spec.nak_delay, attempt).min(cap);
            if attempt % 8 == 1 {
                tracing::error!(trigger = %self.spec.workflow_type, subject = %dlq, id = orig.token.id, attempt, retry_in = ?wait, error = %render(&e), "dead-letter publish failed; retrying, message kept");
            }
            self.progress(&orig.token).await;
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::error!(trigger = %self.spec.workflow_type, token = %orig.token, subject = %dlq, "trigger stopped before the dead-letter publish succeeded; the message stays unsettled");
        false
    }

    async fn dead_letter(&self, subject: &str, orig: &Original, err: &str) -> Result<(), BusError> {
        let mut headers = orig.headers.clone();
        headers.insert("Eventbus-Original-Subject".into(), orig.subject.clone());
        headers.insert("Eventbus-Original-Stream".into(), orig.token.stream.clone());
        headers.insert(
            "Eventbus-Original-Sequence".into(),
            orig.token.id.to_string(),
        );
        headers.insert("Eventbus-Delivery-Count".into(), orig.delivered.to_string());
        let reason: String = err.chars().take(512).filter(|c| !c.is_control()).collect();
        headers.insert("Eventbus-Error".into(), reason);
        let msg = Outgoing {
            subject: subject.to_string(),
            payload: orig.payload.clone(),
            headers,
            correlation_id: orig.correlation_id.clone(),
            msg_id: None,
        };
        match tokio::time::timeout(
            DEFAULT_REQUEST_TIMEOUT,
            self.bus.publish(std::slice::from_ref(&msg)),
        )
        .await
        {
            Ok(r) => r.map(|_| ()).map_err(BusError::from),
            Err(_) => Err(BusError::TimedOut {
                op: "dead-letter publish",
                after: DEFAULT_REQUEST_TIMEOUT,
            }),
        }
    }

    async fn progress(&self, token: &AckToken) {
        let r = self.bus.ack(token, ack_op(AckKind::Progress)).await;
        self.tm.settled(AckKind::Progress, r.is_ok());
        if let Err(e) = r {
            tracing::debug!(error = %e, "progress ack failed");
        }
    }

    /// One terminal decision per row; retried briefly across a database blip (a lost one at
    /// worst lets the lease run out and the row come back).
    async fn settle(&self, token: &AckToken, kind: AckKind) {
        let _span = self.trace.settle(kind.name());
        for attempt in 0..3u32 {
            let r =
                tokio::time::timeout(DEFAULT_REQUEST_TIMEOUT, self.bus.ack(token, ack_op(kind)))
                    .await;
            if attempt == 2 || matches!(r, Ok(Ok(()))) {
                self.tm.settled(kind, matches!(r, Ok(Ok(()))));
            }
            match r {
                Ok(Ok(())) => return,
                Ok(Err(e)) if attempt == 2 => {
                    tracing::warn!(trigger = %self.spec.workflow_type, action = kind.name(), error = %e, "could not settle message; it will be redelivered");
                }
                Err(_) if attempt == 2 => {
                    tracing::warn!(trigger = %self.spec.workflow_type, action = kind.name(), "settling timed out; it will be redelivered");
                }
                _ => tokio::time::sleep(Duration::from_millis(200 * (attempt as u64 + 1))).await,
            }
        }
    }
}
