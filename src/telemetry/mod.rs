//! Observability: Prometheus metrics (`metrics`, served by `endpoint`, consumer lag refreshed
//! by `lag`) and W3C trace context with optional OTLP spans (`trace`).
//!
//! The runtime calls in here with one line per event (`tm.delivered(n)`,
//! `telemetry::published(..)`); every decision (is it on, which series, which span) is made
//! here, so a provider or a run loop added later reports the same things by making the same
//! calls. With metrics off and no OTLP endpoint set, each call is one atomic load.

pub mod endpoint;
pub mod lag;
pub mod metrics;
pub mod trace;

pub use endpoint::{parse_addr as parse_metrics_addr, serving as metrics_address};
pub use metrics::{
    bulk_published, connection, published, reconnected, Published, Settle, TriggerTelemetry,
};
pub use trace::BrokerId;

/// A single publish finished: `Ok(duplicate)` or an error.
pub fn publish_done<E>(broker: &impl BrokerId, r: Result<bool, E>) {
    let outcome = match r {
        Ok(false) => Published::Ok,
        Ok(true) => Published::Duplicate,
        Err(_) => Published::Error,
    };
    published(broker.broker_name(), broker.provider_name(), outcome);
}

/// A bulk publish finished: its per-message results.
pub fn bulk_done(broker: &impl BrokerId, results: &[crate::pb::eventbus::BulkPublishResult]) {
    if metrics::get().is_none() {
        return;
    }
    let (mut ok, mut dup, mut err) = (0, 0, 0);
    for r in results {
        match (r.error.is_empty(), r.duplicate) {
            (false, _) => err += 1,
            (true, true) => dup += 1,
            (true, false) => ok += 1,
        }
    }
    bulk_published(broker.broker_name(), broker.provider_name(), ok, dup, err);
}

/// A step.eventbus.ack settlement (labels: broker and outcome; no trigger, stream or consumer).
pub fn step_settled(broker: &impl BrokerId, kind: crate::nats::ack::AckKind, ok: bool) {
    metrics::step_settled(
        broker.broker_name(),
        broker.provider_name(),
        kind.into(),
        u64::from(ok),
        u64::from(!ok),
    );
}

/// A bulk step.eventbus.ack: its per-token results.
pub fn step_acks(
    broker: &impl BrokerId,
    kind: crate::nats::ack::AckKind,
    results: &[crate::pb::eventbus::BulkAckResult],
) {
    if metrics::get().is_none() {
        return;
    }
    let failed = results.iter().filter(|r| !r.error.is_empty()).count() as u64;
    let ok = results.len() as u64 - failed;
    metrics::step_settled(
        broker.broker_name(),
        broker.provider_name(),
        kind.into(),
        ok,
        failed,
    );
}

/// Messages a step.eventbus.consume returned: deliveries (empty trigger label), and each
/// message's trace context in its `trace_headers`.
pub fn consumed(
    broker: &impl BrokerId,
    stream: &str,
    consumer: &str,
    messages: &mut [crate::pb::eventbus::Message],
) {
    for m in messages.iter_mut() {
        // Spans of consumed messages end at once: the pipeline's use of them is not ours to see.
        drop(trace::deliver(
            m,
            broker.broker_name(),
            broker.provider_name(),
            "",
        ));
    }
    if messages.is_empty() || metrics::get().is_none() {
        return;
    }
    let redelivered = messages.iter().filter(|m| m.delivery_count > 1).count() as u64;
    metrics::consumed(
        broker.broker_name(),
        broker.provider_name(),
        stream,
        consumer,
        messages.len() as u64,
        redelivered,
    );
}

/// Process start: the metrics endpoint from `EVENTBUS_METRICS_ADDR`, if set. The error is one
/// line naming the variable, the address and why it cannot be used.
pub fn start_from_env() -> Result<(), endpoint::EndpointError> {
    endpoint::start_from_env().map(|_| ())
}

/// StartModule of a broker module: its `metrics_address`, if set (one listener per process).
pub fn serve_for_broker(
    broker: &str,
    addr: Option<std::net::SocketAddr>,
) -> Result<(), endpoint::EndpointError> {
    match addr {
        Some(a) => endpoint::serve(a, &format!("broker {broker:?} metrics_address")).map(|_| ()),
        None => Ok(()),
    }
}

/// A NATS connection event: up (`true`, `after_loss` when it had been lost before) or down.
pub fn nats_connection(broker: &str, up: bool, after_loss: bool) {
    connection(broker, "nats", up);
    if up && after_loss {
        reconnected(broker, "nats");
    }
}
