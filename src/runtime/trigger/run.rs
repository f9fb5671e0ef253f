//! The trigger worker: fetch in batches, run at most `max_in_flight` pipelines at once, and
//! decide each message's fate explicitly (ack, nak with growing delay, dead-letter + term).
//! A stream error never ends the worker: it logs (rate-limited), backs off and re-binds, so a
//! reconnect, a lame-duck restart or a deleted consumer heal by themselves.

use super::batch::{self, Deliver};
use super::{payload, AckMode, TriggerCall, TriggerSpec};
use crate::nats::ack::{ack_token, AckKind};
use crate::nats::conn::ConnState;
use crate::nats::{NatsConn, NatsError};
use crate::runtime::modules::broker::BrokerModule;
use crate::runtime::modules::consumer::{fetch_consumer_config, get_stream};
use crate::runtime::steps::consume::{to_message, Include};
use crate::runtime::{render, Runtime};
use crate::telemetry::TriggerTelemetry;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MAX_NAK_DELAY: Duration = Duration::from_secs(300);
const REBIND_MAX: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(5);
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const LOG_EVERY: Duration = Duration::from_secs(10);
const MIN_PULL_BATCH: usize = 2;

/// Logs the first failure, then at most one line per `LOG_EVERY` with the count suppressed, so
/// a long outage does not flood stderr.
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }
    pub fn warn(&mut self, trigger: &str, what: &str, err: &str) {
        let now = Instant::now();
        if self.last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            tracing::warn!(trigger, suppressed = self.suppressed, "{what}: {err}");
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Nak delay for the n-th delivery: base, doubling per attempt, capped.
pub fn nak_delay(base: Duration, delivered: i64) -> Duration {
    let exp = (delivered.max(1) - 1).min(16) as u32;
    base.saturating_mul(2u32.saturating_pow(exp))
        .min(MAX_NAK_DELAY)
}

pub struct Worker {
    rt: Runtime,
    spec: TriggerSpec,
    broker: Arc<BrokerModule>,
    stop: CancellationToken,
    tasks: TaskTracker,
    tm: Arc<TriggerTelemetry>,
}

/// What the server says about the bound consumer, needed per message.
#[derive(Clone, Copy)]
pub(super) struct Bound {
    pub ack_wait: Duration,
    max_deliver: i64,
}

impl Worker {
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
        Worker {
            rt,
            spec,
            broker,
            stop,
            tasks,
            tm,
        }
    }

    /// Used by StartModule: fails with a clear error when the consumer cannot be bound now.
    pub async fn bind_once(&self) -> Result<(), NatsError> {
        self.bind().await.map(|_| ())
    }

    async fn bind(&self) -> Result<(NatsConn, PullConsumer, Bound), NatsError> {
        let conn = self.broker.require().await?;
        conn.wait_connected(conn.request_timeout.max(Duration::from_secs(2)))
            .await?;
        if let Some(s) = self.rt.stream_module(&self.spec.stream) {
            // A declared stream that is gone (memory storage after a broker restart, or deleted
            // behind our back) is recreated as declared. Its "ensured once" flag used to skip
            // that, and the trigger then failed to bind forever ("stream not found").
            if matches!(get_stream(&conn, &self.spec.stream).await, Err(e) if e.is_not_found()) {
                s.invalidate().await;
            }
            s.ensure(&self.broker).await?;
        }
        if self.spec.declared {
            for c in self.rt.consumer_modules(&self.spec.durable) {
                if c.spec.stream == self.spec.stream {
                    c.invalidate().await; // re-check: it may have been deleted behind our back
                    c.ensure(&self.broker).await?;
                }
            }
        }
        let stream = get_stream(&conn, &self.spec.stream).await?;
        let consumer: PullConsumer = if self.spec.declared {
            stream
                .get_consumer(&self.spec.durable)
                .await
                .map_err(|e| NatsError::other("bind consumer", e))?
        } else {
            // Not declared: create it if missing with the trigger's own filter (Go B12).
            stream
                .get_or_create_consumer(
                    &self.spec.durable,
                    pull::Config {
                        durable_name: Some(self.spec.durable.clone()),
                        filter_subject: self.spec.filter_subject.clone(),
                        ack_policy: AckPolicy::Explicit,
                        max_deliver: if self.spec.max_deliver > 0 {
                            self.spec.max_deliver
                        } else {
                            -1
                        },
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| NatsError::other("bind consumer", e))?
        };
        let cfg = &consumer.cached_info().config;
        if !self.spec.filter_subject.is_empty() {
            let f = &self.spec.filter_subject;
            if cfg.filter_subject != *f && cfg.filter_subjects != [f.clone()] {
                return Err(NatsError::other(
                    "bind consumer",
                    format!(
                        "consumer {:?} filters {:?}, the trigger asks for {f:?}; align the consumer or drop filter_subject",
                        self.spec.durable,
                        if cfg.filter_subject.is_empty() { cfg.filter_subjects.join(",") } else { cfg.filter_subject.clone() }
                    ),
                ));
            }
        }
        // The server stops redelivering at the consumer's max_deliver, so a larger trigger value
        // would never reach its last attempt and the message would be dropped, not
        // dead-lettered: the smaller positive limit wins.
        let max_deliver = match (self.spec.max_deliver, cfg.max_deliver) {
            (t, c) if t > 0 && c > 0 => t.min(c),
            (t, _) if t > 0 => t,
            (_, c) => c,
        };
        let ack_wait = if cfg.ack_wait.is_zero() {
            Duration::from_secs(30)
        } else {
            cfg.ack_wait
        };
        crate::telemetry::lag::watch_nats(&conn, &self.spec.stream, &self.spec.durable);
        Ok((
            conn,
            consumer,
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
            let (conn, consumer, bound) = match self.bind().await {
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
            let messages = consumer
                .stream()
                // A batch of 1 stalls async-nats' pull stream until the request expires (the
                // bench measured ~10 s per message); 2 keeps it flowing, and the semaphore
                // still bounds what runs.
                .max_messages_per_batch(self.spec.batch_size.max(MIN_PULL_BATCH))
                .heartbeat(HEARTBEAT)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    log.warn(&name, "trigger pull failed; re-binding", &e.to_string());
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(REBIND_MAX);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut conn_state = conn.state_changes();
            // What the stream yielded after a batch closed; handled before pulling more.
            let mut leftover: Option<batch::Leftover> = None;
            loop {
                // Take a slot first so no message waits in our hands while its ack_wait runs.
                let permit = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let next = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    n = batch::next(&mut leftover, &mut messages) => n,
                    Ok(()) = conn_state.changed() => {
                        let reconnected = *conn_state.borrow_and_update() == ConnState::Connected;
                        // A restarted broker may have lost a memory stream and its consumers;
                        // the pull would notice only after two missed heartbeats (~10 s).
                        if reconnected && self.source_gone(&conn).await {
                            tracing::info!(trigger = %name, stream = %self.spec.stream, consumer = %self.spec.durable, "stream or consumer gone after reconnect; re-binding");
                            continue 'outer;
                        }
                        continue;
                    }
                };
                match next {
                    Some(Ok(msg)) => {
                        let h = Handler {
                            rt: self.rt.clone(),
                            // The latest callback: ConfigureCallback may run again.
                            launcher: self.rt.launcher().unwrap_or_else(|| launcher.clone()),
                            spec: self.spec.clone(),
                            conn: conn.clone(),
                            bound,
                            stop: self.stop.clone(),
                            tm: self.tm.clone(),
                            trace: Default::default(),
                        };
                        if self.spec.deliver == Deliver::Batch {
                            let (msgs, rest) =
                                batch::collect(msg, &mut messages, &self.spec, &self.stop).await;
                            leftover = rest;
                            self.tasks.spawn(async move {
                                h.handle_batch(msgs).await;
                                drop(permit);
                            });
                            continue;
                        }
                        self.tasks.spawn(async move {
                            h.handle(msg).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                        let rebind = matches!(
                            e.kind(),
                            K::MissingHeartbeat
                                | K::ConsumerDeleted
                                | K::NoResponders
                                | K::RequestLimitExceeded
                        );
                        log.warn(&name, "trigger stream error", &e.to_string());
                        if rebind {
                            if self.sleep(backoff).await {
                                break 'outer;
                            }
                            continue 'outer;
                        }
                    }
                    None => continue 'outer,
                }
            }
        }
        tracing::debug!(trigger = %name, "trigger worker stopped");
    }

    /// Whether the stream or the consumer this worker pulls from no longer exists (a failed
    /// check for any other reason is not "gone": the pull's own errors handle that).
    async fn source_gone(&self, conn: &NatsConn) -> bool {
        match get_stream(conn, &self.spec.stream).await {
            Err(e) => e.is_not_found(),
            Ok(s) => matches!(
                fetch_consumer_config(&s, &self.spec.durable).await,
                Ok(None)
            ),
        }
    }

    /// Sleeps unless stopped; true when stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

/// Publish-time JetStream directives (de-duplication id, expected stream/sequence, rollup, TTL,
/// batch, schedule, counter) were meant for the original stream: copied onto the dead-letter
/// publish they made it fail (e.g. `Nats-Expected-Stream`) or vanish as a duplicate
/// (`Nats-Msg-Id` in a stream that saw it), and the message was then lost on its last delivery.
/// Every other header travels; the original id is kept as `Eventbus-Original-Msg-Id`.
fn dead_letter_headers(original: Option<&async_nats::HeaderMap>) -> async_nats::HeaderMap {
    const DROP: &[&str] = &[
        "nats-msg-id",
        "nats-rollup",
        "nats-ttl",
        "nats-incr",
        "nats-required-api-level",
    ];
    const DROP_PREFIX: &[&str] = &["nats-expected-", "nats-batch-", "nats-schedule"];
    let mut out = async_nats::HeaderMap::new();
    let Some(original) = original else {
        return out;
    };
    for (name, values) in original.iter() {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if lower == "nats-msg-id" {
            if let Some(v) = values.last() {
                out.insert("Eventbus-Original-Msg-Id", v.as_str());
            }
        }
        if DROP.contains(&lower.as_str()) || DROP_PREFIX.iter().any(|p| lower.starts_with(p)) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// The encoded size of the TriggerWorkflow request carrying `call`, plus framing.
fn call_size(call: &TriggerCall) -> usize {
    use prost::Message as _;
    call.data.encoded_len() + call.trigger_type.len() + call.action.len() + 64
}

/// Where a delivery came from: what the handler still needs after the message itself has
/// become the pipeline's data.
pub(super) struct Origin {
    pub subject: String,
    pub stream: String,
    pub sequence: String,
    pub delivery_count: i32,
}

pub(super) struct Handler {
    pub rt: Runtime,
    /// The host callback, configured before the worker fetched anything.
    pub launcher: Arc<dyn super::Launcher>,
    pub spec: TriggerSpec,
    conn: NatsConn,
    pub bound: Bound,
    stop: CancellationToken,
    pub tm: Arc<TriggerTelemetry>,
    trace: crate::telemetry::trace::Slot,
}

impl Handler {
    async fn handle(&self, msg: async_nats::jetstream::Message) {
        let mut m = to_message(&msg, &self.spec.durable, Include::ALL);
        let mut delivery = self.tm.deliver(&mut m);
        self.trace.set(&delivery);
        let origin = Origin {
            subject: m.subject.clone(),
            stream: m.stream.clone(),
            sequence: m.sequence.clone(),
            delivery_count: m.delivery_count,
        };
        let delivered = m.delivery_count as i64;
        let token = m.ack_token.clone();
        let call = TriggerCall {
            trigger_type: self.spec.workflow_type.clone(),
            action: "message".into(),
            data: payload::build(m, &self.spec.broker_ref),
        };
        // A call the host would refuse for its size fails the same way on every delivery:
        // straight to the dead-letter subject (or terminated) with the reason, no retries.
        if let Some(limit) = self.launcher.max_call_bytes() {
            let size = call_size(&call);
            if size > limit {
                let err = format!(
                    "message too large for the engine callback: the pipeline data is {size} bytes, the host accepts {limit}; consume it with step.eventbus.consume instead"
                );
                tracing::error!(trigger = %self.spec.workflow_type, seq = %origin.sequence, size, limit, "{err}");
                if let Some(dlq) = &self.spec.dead_letter_subject {
                    if !self.park(dlq, &msg, &origin, &err, &token).await {
                        return;
                    }
                }
                self.settle(&token, AckKind::Term).await;
                return;
            }
        }
        // Keep the message ours while a long pipeline runs (in-progress acks at ack_wait/2).
        let progress_every = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        let run = self.tm.run();
        let pipeline = self.launcher.launch(call);
        tokio::pin!(pipeline);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let result = loop {
            tokio::select! {
                r = &mut pipeline => break r,
                _ = ticker.tick() => self.progress(&token).await,
            }
        };
        run.finish(result.is_ok());
        delivery.end(&result);
        match result {
            Ok(()) => {
                if self.spec.ack_mode == AckMode::Auto {
                    self.settle(&token, AckKind::Ack).await;
                }
            }
            Err(err) => {
                self.fail_message(&msg, &origin, &token, delivered, &err)
                    .await
            }
        }
    }

    /// A failed delivery: nak with a growing delay, or on its last delivery dead-letter (when
    /// configured) and terminate.
    pub(super) async fn fail_message(
        &self,
        msg: &async_nats::jetstream::Message,
        origin: &Origin,
        token: &str,
        delivered: i64,
        err: &str,
    ) {
        let last = self.bound.max_deliver > 0 && delivered >= self.bound.max_deliver;
        tracing::warn!(trigger = %self.spec.workflow_type, seq = %origin.sequence, delivered, last, error = %err, "pipeline failed");
        if !last {
            self.settle(
                token,
                AckKind::Nak(Some(nak_delay(self.spec.nak_delay, delivered))),
            )
            .await;
            return;
        }
        if let Some(dlq) = &self.spec.dead_letter_subject {
            if !self.park(dlq, msg, origin, err, token).await {
                return;
            }
        }
        self.settle(token, AckKind::Term).await;
    }

    /// Dead-letters the message on its last delivery, retrying until the publish lands. A nak
    /// cannot keep it: the server delivers no more after max_deliver, so a failed dead-letter
    /// publish followed by a nak lost the message. Retries back off like naks (capped below
    /// ack_wait, with an in-progress ack each time so the message stays ours) and hold this
    /// message's max_in_flight slot, which slows intake while the dead-letter subject is
    /// unreachable. False when the trigger stopped first: the message is then left unsettled
    /// in its stream (the log names its sequence) rather than terminated.
    async fn park(
        &self,
        dlq: &str,
        msg: &async_nats::jetstream::Message,
        m: &Origin,
        err: &str,
        token: &str,
    ) -> bool {
        let cap = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        for attempt in 1i64.. {
            let sent = self.dead_letter(dlq, msg, m, err).await;
            self.tm.dead_lettered(sent.is_ok());
            let e = match sent {
                Ok(()) => return true,
                Err(e) => e,
            };
            let wait = nak_delay(self.spec.nak_delay, attempt).min(cap);
            // First failure and then every 8th: a long outage does not flood stderr.
            if attempt % 8 == 1 {
                tracing::error!(trigger = %self.spec.workflow_type, subject = %dlq, seq = %m.sequence, attempt, retry_in = ?wait, error = %render(&e), "dead-letter publish failed; retrying, message kept");
            }
            self.progress(token).await;
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::error!(trigger = %self.spec.workflow_type, stream = %m.stream, seq = %m.sequence, subject = %dlq, "trigger stopped before the dead-letter publish succeeded; the message stays in its stream unsettled");
        false
    }

    async fn dead_letter(
        &self,
        subject: &str,
        msg: &async_nats::jetstream::Message,
        m: &Origin,
        err: &str,
    ) -> Result<(), NatsError> {
        let mut headers = dead_letter_headers(msg.headers.as_ref());
        headers.insert("Eventbus-Original-Subject", m.subject.as_str());
        headers.insert("Eventbus-Original-Stream", m.stream.as_str());
        headers.insert("Eventbus-Original-Sequence", m.sequence.as_str());
        headers.insert(
            "Eventbus-Delivery-Count",
            m.delivery_count.to_string().as_str(),
        );
        let reason: String = err.chars().take(512).filter(|c| !c.is_control()).collect();
        headers.insert("Eventbus-Error", reason.as_str());
        let ack = self
            .conn
            .js
            .publish_with_headers(subject.to_string(), headers, msg.payload.clone())
            .await
            .map_err(|e| NatsError::other("dead-letter publish", e))?;
        tokio::time::timeout(self.conn.request_timeout, ack)
            .await
            .map_err(|_| NatsError::TimedOut {
                op: "dead-letter publish",
                after: self.conn.request_timeout,
            })?
            .map_err(|e| NatsError::other("dead-letter publish", e))?;
        Ok(())
    }

    /// An in-progress ack: the message stays ours for another ack_wait. Best effort; a lost
    /// one at worst lets the server redeliver.
    pub(super) async fn progress(&self, token: &str) {
        let timeout = self.conn.request_timeout;
        let r = ack_token(&self.conn.client, token, AckKind::Progress, timeout).await;
        self.tm.settled(AckKind::Progress, r.is_ok());
        if let Err(e) = r {
            tracing::debug!(error = %e, "progress ack failed");
        }
    }

    /// One terminal decision per message, confirmed; retried briefly across a reconnect.
    pub(super) async fn settle(&self, token: &str, kind: AckKind) {
        let _span = self.trace.settle(kind.name());
        for attempt in 0..3u32 {
            match ack_token(&self.conn.client, token, kind, self.conn.request_timeout).await {
                Ok(()) => return self.tm.settled(kind, true),
                Err(e) if attempt == 2 => {
                    self.tm.settled(kind, false);
                    tracing::warn!(trigger = %self.spec.workflow_type, action = kind.name(), error = %e, "could not settle message; it will be redelivered");
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200 * (attempt as u64 + 1))).await
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_drops_publish_directives_and_keeps_the_rest() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "id-1");
        h.insert("Nats-Expected-Stream", "JOBS");
        h.insert("Nats-Expected-Last-Sequence", "4");
        h.insert("Nats-Correlation-Id", "c-1");
        h.append("x-k", "a");
        h.append("x-k", "b");
        let out = dead_letter_headers(Some(&h));
        assert!(out.get("Nats-Msg-Id").is_none());
        assert!(out.get("Nats-Expected-Stream").is_none());
        assert!(out.get("Nats-Expected-Last-Sequence").is_none());
        assert_eq!(
            out.get("Eventbus-Original-Msg-Id").unwrap().as_str(),
            "id-1"
        );
        assert_eq!(out.get("Nats-Correlation-Id").unwrap().as_str(), "c-1");
        assert_eq!(out.get_all("x-k").count(), 2);
        assert!(dead_letter_headers(None).is_empty());
    }

    #[test]
    fn nak_delays_grow_and_cap() {
        let b = Duration::from_secs(1);
        assert_eq!(nak_delay(b, 1), Duration::from_secs(1));
        assert_eq!(nak_delay(b, 2), Duration::from_secs(2));
        assert_eq!(nak_delay(b, 4), Duration::from_secs(8));
        assert_eq!(nak_delay(b, 100), MAX_NAK_DELAY);
    }
}
