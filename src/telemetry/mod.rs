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

pub use endpoint::{parse_addr as parse_metrics_addr, serving as metrics_address};
pub use metrics::{
    bulk_published, connection, published, reconnected, Published, Settle, TriggerTelemetry,
};

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
