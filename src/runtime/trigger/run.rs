//! The trigger worker, written once over the provider contract: bind, subscribe, run at most
//! `max_in_flight` pipelines at once, and decide each message's fate explicitly (ack, nak with
//! growing delay, dead-letter + term). A subscription error never ends the worker: it logs
//! (rate-limited), backs off and binds again, so a reconnect, a broker restart, a lost lock or
//! a deleted consumer heal by themselves.

use super::batch::{self, Deliver, Interrupt};
use super::{payload, AckMode, TriggerSpec};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::{
    AckKind, BindAsk, Bound, Delivered, Next, Origin, Provider, ProviderError, Subscription,
};
use crate::runtime::registry::Registry;
use crate::runtime::render;
use crate::telemetry::TriggerTelemetry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MAX_NAK_DELAY: Duration = Duration::from_secs(300);
const REBIND_MAX: Duration = Duration::from_secs(5);
const LOG_EVERY: Duration = Duration::from_secs(10);

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

/// StartModule of a trigger: binds once (bounded) and leaves the worker running on `tasks`.
pub(super) struct Start {
    pub rt: Registry,
    pub spec: TriggerSpec,
    pub broker: Arc<BrokerModule>,
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
}

impl ForProvider for Start {
    type Out = Result<(), ProviderError>;
    async fn run<P: Open>(self, _broker: &BrokerModule) -> Self::Out {
        let name = self.spec.workflow_type.clone();
        let tm = Arc::new(TriggerTelemetry::for_trigger(
            &self.broker.spec,
            &self.spec.stream,
            &self.spec.durable,
            &self.spec.workflow_type,
        ));
        let worker = Worker::<P> {
            tm,
            rt: self.rt,
            spec: self.spec,
            broker: self.broker,
            stop: self.stop,
            tasks: self.tasks.clone(),
            _provider: std::marker::PhantomData,
        };
        match worker.bind().await {
            Ok(_) => {}
            // The broker is down right now: start anyway, the worker binds when it is back,
            // so a broker restart during a deploy does not fail the engine's Start.
            Err(e) if e.is_transient() => {
                tracing::warn!(trigger = %name, error = %render(&e), "broker unavailable at start; the trigger binds when it returns");
            }
            // Anything else is a configuration problem the user must see now.
            Err(e) => return Err(e),
        }
        self.tasks.spawn(worker.run());
        Ok(())
    }
}

pub struct Worker<P> {
    rt: Registry,
    spec: TriggerSpec,
    broker: Arc<BrokerModule>,
    stop: CancellationToken,
    tasks: TaskTracker,
    tm: Arc<TriggerTelemetry>,
    _provider: std::marker::PhantomData<fn() -> P>,
}

impl<P: Open> Worker<P> {
    fn ask(&self) -> BindAsk<'_> {
        BindAsk {
            stream: &self.spec.stream,
            durable: &self.spec.durable,
            filter_subject: &self.spec.filter_subject,
            max_deliver: self.spec.max_deliver,
            declared: self.spec.declared,
            dead_letter_subject: self.spec.dead_letter_subject.as_deref(),
            ordered: self.spec.max_in_flight == 1,
            last_per_subject: self.spec.kv_bucket.is_some() || self.spec.object_bucket.is_some(),
        }
    }

    /// The provider, the declared stream and consumer ensured (again: they may have been
    /// deleted behind our back, or lost with a restarted broker's memory storage), then the
    /// consumer bound.
    async fn bind(&self) -> Result<(P, P::Binding, Bound), ProviderError> {
        let p = P::clone(&*P::open(&self.broker).await?);
        p.ready(p.request_timeout().max(Duration::from_secs(2)))
            .await?;
        if let Some(s) = self.rt.stream_module(&self.spec.stream) {
            // A declared stream that is gone is recreated as declared. Its "ensured once" flag
            // used to skip that, and the trigger then failed to bind forever.
            if p.gone(&self.spec.stream, None).await {
                s.invalidate().await;
            }
            s.ensure_on(&p).await?;
        }
        if self.spec.declared {
            for c in self.rt.consumer_modules(&self.spec.durable) {
                if c.spec.stream == self.spec.stream {
                    c.invalidate().await; // re-check: it may have been deleted behind our back
                    c.ensure_on(&p).await?;
                }
            }
        }
        let (binding, bound) = p.bind(self.ask()).await?;
        p.watch_lag(
            &self.broker.spec.name,
            &self.spec.stream,
            &self.spec.durable,
        );
        Ok((p, binding, bound))
    }

    pub async fn run(self) {
        let sem = Arc::new(Semaphore::new(self.spec.max_in_flight));
        let mut log = RateLimitedLog::new();
        let mut backoff = Duration::from_millis(100);
        let name = self.spec.workflow_type.clone();
        let batched = self.spec.deliver == Deliver::Batch;
        let Some(launcher) = self.rt.launcher_or_stop(&self.stop, &name).await else {
            return;
        };
        'outer: while !self.stop.is_cancelled() {
            let (p, binding, bound) = match self.bind().await {
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
            // May wait while another process holds the consumer.
            let sub = tokio::select! {
                _ = self.stop.cancelled() => break,
                s = p.subscribe(binding, self.ask(), self.spec.batch_size, &self.stop) => s,
            };
            let mut sub = match sub {
                Ok(s) => s,
                Err(e) => {
                    log.warn(&name, "trigger cannot subscribe; retrying", &render(&e));
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(REBIND_MAX);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Deliveries taken for a batch that did not fit it; they open the next one.
            let mut pending: VecDeque<P::Delivery> = VecDeque::new();
            loop {
                // Slots first, so no message waits in our hands while its ack_wait runs.
                let first = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let handler = || Handler {
                    rt: self.rt.clone(),
                    // The latest callback: ConfigureCallback may run again.
                    launcher: self.rt.launcher().unwrap_or_else(|| launcher.clone()),
                    spec: self.spec.clone(),
                    provider: p.clone(),
                    bound,
                    stop: self.stop.clone(),
                    tm: self.tm.clone(),
                    trace: Default::default(),
                };
                let interrupt = if batched {
                    let (msgs, interrupt) =
                        batch::collect(&mut pending, &mut sub, &self.spec, &self.stop).await;
                    if !msgs.is_empty() {
                        let h = handler();
                        self.tasks.spawn(async move {
                            h.handle_batch(msgs).await;
                            drop(first);
                        });
                    }
                    interrupt
                } else {
                    let mut permits = vec![first];
                    while permits.len() < self.spec.batch_size.max(1) {
                        match sem.clone().try_acquire_owned() {
                            Ok(p) => permits.push(p),
                            Err(_) => break,
                        }
                    }
                    let next = tokio::select! {
                        _ = self.stop.cancelled() => break 'outer,
                        n = sub.next(permits.len()) => n,
                    };
                    match next {
                        Next::Items(items) => {
                            for d in items {
                                let Some(permit) = permits.pop() else {
                                    // More than asked for: the broker delivers it again.
                                    tracing::warn!(trigger = %name, "provider returned more messages than asked; left for redelivery");
                                    continue;
                                };
                                let h = handler();
                                self.tasks.spawn(async move {
                                    h.handle(d).await;
                                    drop(permit);
                                });
                            }
                            None
                        }
                        Next::Failed(e) => Some(Interrupt::Failed(e)),
                        Next::Rebind(e) => Some(Interrupt::Rebind(e)),
                    }
                };
                match interrupt {
                    None => {}
                    Some(Interrupt::Failed(e)) => log.warn(&name, "trigger stream error", &e),
                    Some(Interrupt::Rebind(e)) => {
                        log.warn(&name, "trigger lost its subscription; re-binding", &e);
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

pub(super) struct Handler<P> {
    pub rt: Registry,
    /// The host callback, configured before the worker fetched anything.
    pub launcher: Arc<dyn super::Launcher>,
    pub spec: TriggerSpec,
    pub provider: P,
    pub bound: Bound,
    pub stop: CancellationToken,
    pub tm: Arc<TriggerTelemetry>,
    trace: crate::telemetry::trace::Slot,
}

impl<P: Provider> Handler<P> {
    async fn handle(&self, d: P::Delivery) {
        let mut m = d.to_message(&self.spec.durable, self.spec.include);
        let mut delivery = self.tm.deliver(&mut m);
        self.trace.set(&delivery);
        let origin = Origin::of(&m);
        let data = payload::build(m, &self.spec.broker_ref);
        // Derived forms are left out first; a call the host would still refuse for its size
        // fails the same way on every delivery: straight to the dead-letter subject (or
        // terminated) with the reason, no retries.
        let limit = self.launcher.max_call_bytes();
        let call = match payload::message_call(&self.spec.workflow_type, data, limit) {
            Ok(call) => call,
            Err(too_large) => {
                self.refuse_too_large(&d, &origin, too_large).await;
                return;
            }
        };
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
                _ = ticker.tick() => self.progress(&origin.token).await,
            }
        };
        run.finish(result.is_ok());
        delivery.end(&result);
        match result {
            Ok(()) => {
                if self.spec.ack_mode == AckMode::Auto {
                    self.settle(&origin.token, AckKind::Ack).await;
                }
            }
            Err(err) => self.fail_message(&d, &origin, &err).await,
        }
    }

    /// A message that cannot reach a pipeline at any delivery: dead-lettered (when configured)
    /// with the reason, and terminated.
    pub(super) async fn refuse_too_large(
        &self,
        d: &P::Delivery,
        origin: &Origin,
        too_large: payload::TooLarge,
    ) {
        let err = too_large.to_string();
        tracing::error!(trigger = %self.spec.workflow_type, seq = %origin.sequence, size = too_large.size, limit = too_large.limit, "{err}");
        if let Some(dlq) = &self.spec.dead_letter_subject {
            if !self.park(dlq, d, origin, &err).await {
                return;
            }
        }
        self.settle(&origin.token, AckKind::Term).await;
    }

    /// A failed delivery: nak with a growing delay, or on its last delivery dead-letter (when
    /// configured) and terminate.
    pub(super) async fn fail_message(&self, d: &P::Delivery, origin: &Origin, err: &str) {
        let delivered = origin.delivery_count as i64;
        let last = self.bound.max_deliver > 0 && delivered >= self.bound.max_deliver;
        tracing::warn!(trigger = %self.spec.workflow_type, seq = %origin.sequence, delivered, last, error = %err, "pipeline failed");
        if !last {
            self.settle(
                &origin.token,
                AckKind::Nak(Some(nak_delay(self.spec.nak_delay, delivered))),
            )
            .await;
            return;
        }
        if let Some(dlq) = &self.spec.dead_letter_subject {
            if !self.park(dlq, d, origin, err).await {
                return;
            }
        }
        self.settle(&origin.token, AckKind::Term).await;
    }

    /// Dead-letters the message on its last delivery, retrying until the publish lands. A nak
    /// cannot keep it: the broker delivers no more after max_deliver, so a failed dead-letter
    /// publish followed by a nak lost the message. Retries back off like naks (capped below
    /// ack_wait, with an in-progress ack each time so the message stays ours) and hold this
    /// message's max_in_flight slot, which slows intake while the dead-letter subject is
    /// unreachable. A copy the broker can never take (its payload alone over the size limit;
    /// the provider fits the headers to it otherwise) is not retried: the message is then
    /// terminated, counted as a failed dead letter. False when the trigger stopped first: the message is then left unsettled
    /// (the log names its sequence) rather than terminated.
    async fn park(&self, dlq: &str, d: &P::Delivery, m: &Origin, err: &str) -> bool {
        let cap = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        let extra = m.dead_letter_headers(err);
        for attempt in 1i64.. {
            let sent = self.provider.dead_letter(dlq, d, &extra).await;
            self.tm.dead_lettered(sent.is_ok());
            let e = match sent {
                Ok(()) => return true,
                Err(e) if e.is_too_large() => {
                    // No retry can send it: settled (terminated) rather than held forever.
                    tracing::warn!(trigger = %self.spec.workflow_type, stream = %m.stream, seq = %m.sequence, subject = %dlq, error = %render(&e), "message cannot be dead-lettered: too large for the broker even without headers; terminated without a copy");
                    return true;
                }
                Err(e) => e,
            };
            let wait = nak_delay(self.spec.nak_delay, attempt).min(cap);
            // First failure and then every 8th: a long outage does not flood stderr.
            if attempt % 8 == 1 {
                tracing::error!(trigger = %self.spec.workflow_type, subject = %dlq, seq = %m.sequence, attempt, retry_in = ?wait, error = %render(&e), "dead-letter publish failed; retrying, message kept");
            }
            self.progress(&m.token).await;
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::error!(trigger = %self.spec.workflow_type, stream = %m.stream, seq = %m.sequence, subject = %dlq, "trigger stopped before the dead-letter publish succeeded; the message stays in its stream unsettled");
        false
    }

    /// An in-progress ack: the message stays ours for another ack_wait. Best effort; a lost
    /// one at worst lets the broker redeliver.
    pub(super) async fn progress(&self, token: &str) {
        let r = self.provider.settle(token, AckKind::Progress).await;
        self.tm.settled(AckKind::Progress, r.is_ok());
        if let Err(e) = r {
            tracing::debug!(error = %e, "progress ack failed");
        }
    }

    /// One terminal decision per message, confirmed; retried briefly across a reconnect (a
    /// lost one at worst lets the broker redeliver).
    pub(super) async fn settle(&self, token: &str, kind: AckKind) {
        let _span = self.trace.settle(kind.name());
        for attempt in 0..3u32 {
            match self.provider.settle(token, kind).await {
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
    fn nak_delays_grow_and_cap() {
        let b = Duration::from_secs(1);
        assert_eq!(nak_delay(b, 1), Duration::from_secs(1));
        assert_eq!(nak_delay(b, 2), Duration::from_secs(2));
        assert_eq!(nak_delay(b, 4), Duration::from_secs(8));
        assert_eq!(nak_delay(b, 100), MAX_NAK_DELAY);
    }
}
