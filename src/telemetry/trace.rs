//! W3C trace context through publish and delivery, and OTLP spans when asked for.
//!
//! The host passes plugins no trace context; its `step.trace_inject` writes a carrier map into
//! pipeline state (`trace_headers` by default) and `step.trace_extract` reads one. So:
//! * publish takes `traceparent`/`tracestate` from that carrier (the key is the step's
//!   `trace_carrier`), else from the step's config, else from pipeline state (the fields, then a
//!   `traceparent` among the message headers), else starts a fresh trace, and writes them as
//!   message headers;
//! * the trigger and the consume step hand each delivered message's context to the pipeline as
//!   `trace_headers` (besides the headers), so `step.trace_extract` and a later publish continue
//!   the trace.
//!
//! Spans (`publish` PRODUCER, `deliver` CONSUMER, `settle` INTERNAL) are exported over OTLP/gRPC
//! only when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; the
//! SDK reads the rest of the standard variables (service name, sampler, headers, timeout).
//! Without them no tracer exists: the context is parsed and forwarded, nothing is recorded.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The carrier key the engine's `step.trace_inject` writes by default.
pub const DEFAULT_CARRIER: &str = "trace_headers";

struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static OTEL: OnceLock<Otel> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    OTEL.get().map(|o| &o.tracer)
}

fn env_set(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.trim().is_empty())
}

/// Starts the OTLP exporter when the standard endpoint variables ask for one (process start,
/// inside the runtime). `Ok(false)`: tracing stays off.
pub fn init_from_env() -> Result<bool, String> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(false);
    }
    for k in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ] {
        if let Ok(p) = std::env::var(k) {
            if !p.trim().is_empty() && p.trim() != "grpc" {
                return Err(format!(
                    "{k}={p:?}: this plugin exports OTLP over gRPC only; set it to grpc (or unset it) and point the endpoint at the collector's gRPC port (usually 4317)"
                ));
            }
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("workflow-plugin-eventbus");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer =
        opentelemetry::trace::TracerProvider::tracer(&provider, "workflow-plugin-eventbus");
    let _ = OTEL.set(Otel { provider, tracer });
    tracing::info!("exporting trace spans over OTLP");
    Ok(true)
}

/// Flushes and stops the exporter (process exit). Blocking.
pub fn shutdown() {
    if let Some(o) = OTEL.get() {
        if let Err(e) = o.provider.shutdown() {
            tracing::debug!(error = %e, "OTLP shutdown");
        }
    }
}

// ---------------------------------------------------------------- context

struct Get<'a, F: Fn(&str) -> Option<&'a str>>(F);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Get<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

fn propagator() -> &'static TraceContextPropagator {
    static P: OnceLock<TraceContextPropagator> = OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

/// A valid remote context from a traceparent (and tracestate), or `None`.
pub fn parse(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    if traceparent.is_empty() {
        return None;
    }
    let get = |k: &str| match k {
        TRACEPARENT => Some(traceparent),
        TRACESTATE if !tracestate.is_empty() => Some(tracestate),
        _ => None,
    };
    let cx = propagator().extract(&Get(get));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Config-time check of a configured traceparent (W3C: `00-<32 hex>-<16 hex>-<2 hex>`).
pub fn check_traceparent(v: &str) -> Result<(), String> {
    if v.is_empty() || parse(v, "").is_some() {
        return Ok(());
    }
    Err(format!(
        "{v:?} is not a W3C traceparent such as \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\""
    ))
}

/// The `traceparent`/`tracestate` of a context (none for an invalid one, no `tracestate` when
/// it is empty).
pub fn carrier(sc: &SpanContext) -> HashMap<String, String> {
    let mut out = HashMap::with_capacity(2);
    put_carrier(sc, |k, v| {
        out.insert(k.to_string(), v);
    });
    out
}

/// Hands `put` the headers of [`carrier`], in the W3C form the SDK's propagator writes
/// (version 00, only the sampled flag), without a `Context`, an injector or `fmt`: every
/// publish runs this, and the propagator's path cost a publish about 5,000 instructions.
fn put_carrier(sc: &SpanContext, mut put: impl FnMut(&'static str, String)) {
    if !sc.is_valid() {
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // 00-<32 hex>-<16 hex>-<2 hex>, filled as bytes (a `char` push per digit cost ~10x more).
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let hex = |out: &mut [u8], bytes: &[u8]| {
        for (o, b) in out.chunks_exact_mut(2).zip(bytes) {
            o[0] = HEX[usize::from(b >> 4)];
            o[1] = HEX[usize::from(b & 0xf)];
        }
    };
    hex(&mut tp[3..35], &sc.trace_id().to_bytes());
    hex(&mut tp[36..52], &sc.span_id().to_bytes());
    if sc.trace_flags().is_sampled() {
        tp[54] = b'1';
    }
    // Only ASCII digits, letters and dashes were written, so this never falls back.
    let tp = String::from_utf8(tp.to_vec()).unwrap_or_default();
    put(TRACEPARENT, tp);
    let state = sc.trace_state().header();
    if !state.is_empty() {
        put(TRACESTATE, state);
    }
}

/// The `trace_headers` [`deliver`] will give a message with these headers, for sizing before
/// it runs (the consume step fits its output to `max_bytes` first): the same keys and value
/// lengths, only the span id differs. Empty when deliver adds none (tracing off and no context
/// in the headers).
pub fn carrier_for_sizing(headers: &HashMap<String, String>) -> HashMap<String, String> {
    match headers_parent(headers) {
        Some(p) => carrier(&p),
        None if tracer().is_some() => carrier(&fresh()),
        None => HashMap::new(),
    }
}

fn from_map<'a>(m: impl Fn(&str) -> Option<&'a str>) -> Option<SpanContext> {
    parse(m(TRACEPARENT)?, m(TRACESTATE).unwrap_or(""))
}

/// A header lookup that ignores case (HTTP carriers capitalise, NATS keeps what was sent).
fn header<'a>(h: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    h.get(k)
        .or_else(|| {
            h.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v)
        })
        .map(String::as_str)
}

fn struct_str<'a>(s: &'a prost_types::Struct, k: &str) -> Option<&'a str> {
    match s.fields.get(k)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

fn struct_carrier(s: &prost_types::Struct, key: &str) -> Option<SpanContext> {
    match s.fields.get(key)?.kind.as_ref()? {
        prost_types::value::Kind::StructValue(c) => from_map(|k| {
            struct_str(c, k).or_else(|| {
                c.fields
                    .keys()
                    .find(|n| n.eq_ignore_ascii_case(k))
                    .and_then(|n| struct_str(c, n))
            })
        }),
        _ => None,
    }
}

/// Where a publish finds its parent context, in order.
pub struct PublishSources<'a> {
    /// The step's `trace_carrier` (empty: `trace_headers`).
    pub carrier_key: &'a str,
    /// `trace_headers` from the typed input (the host fills it from pipeline state).
    pub input_carrier: &'a HashMap<String, String>,
    /// Pipeline state as a Struct (legacy modes), the trigger data and step outputs: where a
    /// carrier under another key is found.
    pub current: Option<&'a prost_types::Struct>,
    pub trigger_data: Option<&'a prost_types::Struct>,
    pub step_outputs: Option<&'a HashMap<String, prost_types::Struct>>,
    pub config: (&'a str, &'a str),
    pub state: (&'a str, &'a str),
    /// Step headers (config over state).
    pub headers: [&'a HashMap<String, String>; 2],
}

/// The parent of a publish, or `None` for a fresh trace.
pub fn publish_parent(s: &PublishSources<'_>) -> Option<SpanContext> {
    let key = if s.carrier_key.is_empty() {
        DEFAULT_CARRIER
    } else {
        s.carrier_key
    };
    let from_carrier = || {
        if key == DEFAULT_CARRIER {
            if let Some(sc) = from_map(|k| header(s.input_carrier, k)) {
                return Some(sc);
            }
        }
        if let Some(sc) = s.current.and_then(|c| struct_carrier(c, key)) {
            return Some(sc);
        }
        // The latest writer is unknown (a map); any valid one of them, in step-name order.
        let mut outputs: Vec<_> = s.step_outputs.into_iter().flatten().collect();
        outputs.sort_by(|a, b| a.0.cmp(b.0));
        outputs
            .into_iter()
            .rev()
            .find_map(|(_, o)| struct_carrier(o, key))
            .or_else(|| s.trigger_data.and_then(|t| struct_carrier(t, key)))
    };
    from_carrier()
        .or_else(|| parse(s.config.0, s.config.1))
        .or_else(|| parse(s.state.0, s.state.1))
        .or_else(|| s.headers.iter().find_map(|h| from_map(|k| header(h, k))))
}

/// A message's parent context from its own headers (bulk: one context per message).
pub fn headers_parent(h: &HashMap<String, String>) -> Option<SpanContext> {
    from_map(|k| header(h, k))
}

fn fresh() -> SpanContext {
    let ids = RandomIdGenerator::default();
    SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

/// What names a broker in metrics and spans; the broker spec implements it, so telemetry
/// needs nothing from the config or runtime layers (they call in here, never the reverse).
pub trait BrokerId {
    fn broker_name(&self) -> &str;
    fn provider_name(&self) -> &'static str;
}

// ---------------------------------------------------------------- spans

/// One outgoing message's trace: its span (when exporting) and the context its headers carry.
pub struct PublishTrace {
    /// Boxed: only an exporting process has one, and every publish future holds this.
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
    sc: SpanContext,
}

/// Starts the publish of one message under `parent` (a fresh trace when `None`).
pub fn start_publish(
    parent: Option<&SpanContext>,
    broker: &dyn BrokerId,
    subject: &str,
) -> PublishTrace {
    let Some(t) = tracer() else {
        return PublishTrace {
            span: None,
            sc: parent.cloned().unwrap_or_else(fresh),
        };
    };
    let cx = parent.map_or_else(Context::new, |p| {
        Context::new().with_remote_span_context(p.clone())
    });
    let span = t
        .span_builder(format!("publish {}", broker.broker_name()))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", broker.provider_name()),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", subject.to_string()),
            KeyValue::new("eventbus.broker", broker.broker_name().to_string()),
        ])
        .start_with_context(t, &cx);
    let sc = span.span_context().clone();
    PublishTrace {
        span: Some(Box::new(span)),
        sc,
    }
}

impl PublishTrace {
    /// Writes `traceparent` (and `tracestate`) into the outgoing headers, replacing any.
    pub fn inject(&self, headers: &mut std::collections::BTreeMap<String, String>) {
        put_carrier(&self.sc, |k, v| {
            // The traceparent is written here (hex and dashes); a tracestate comes from the
            // parent, and the header check is what keeps async-nats from panicking on it.
            if k == TRACEPARENT || crate::nats::guard::check_header_value(&v).is_ok() {
                headers.insert(k.to_string(), v);
            }
        });
    }

    /// The publish is acknowledged (`Ok`) or failed.
    pub fn end<E: std::fmt::Display>(self, r: Result<(), E>) {
        if let Some(mut s) = self.span {
            if let Err(e) = r {
                s.set_status(Status::error(e.to_string()));
            }
            s.end();
        }
    }
}

/// One delivered message's trace: the `deliver` span (when exporting) and the context handed
/// to the pipeline.
#[derive(Default)]
pub struct Delivery {
    span: Option<opentelemetry_sdk::trace::Span>,
    sc: Option<SpanContext>,
}

/// A message is handed over: its `deliver` span starts under the publisher's context (from its
/// headers), and `m.trace_headers` gets the context the pipeline continues.
pub fn deliver(
    m: &mut crate::pb::eventbus::Message,
    broker: &str,
    provider: &str,
    trigger: &str,
) -> Delivery {
    let parent = headers_parent(&m.headers);
    let Some(t) = tracer() else {
        if let Some(p) = &parent {
            m.trace_headers = carrier(p);
        }
        return Delivery {
            span: None,
            sc: parent,
        };
    };
    let cx = parent.as_ref().map_or_else(Context::new, |p| {
        Context::new().with_remote_span_context(p.clone())
    });
    let mut attrs = vec![
        KeyValue::new("messaging.system", provider.to_string()),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.destination.name", m.subject.clone()),
        KeyValue::new("messaging.consumer.group.name", m.consumer.clone()),
        KeyValue::new("eventbus.broker", broker.to_string()),
        KeyValue::new("eventbus.stream", m.stream.clone()),
        KeyValue::new("eventbus.sequence", m.sequence.clone()),
        KeyValue::new("eventbus.delivery_count", i64::from(m.delivery_count)),
    ];
    if !trigger.is_empty() {
        attrs.push(KeyValue::new("eventbus.trigger", trigger.to_string()));
    }
    let span = t
        .span_builder(format!("deliver {}", m.stream))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attrs)
        .start_with_context(t, &cx);
    let sc = span.span_context().clone();
    m.trace_headers = carrier(&sc);
    Delivery {
        span: Some(span),
        sc: Some(sc),
    }
}

impl Delivery {
    /// The pipeline returned.
    pub fn end(&mut self, r: &Result<(), String>) {
        if let Some(mut s) = self.span.take() {
            if let Err(e) = r {
                s.set_status(Status::error(e.clone()));
            }
            s.end();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(mut s) = self.span.take() {
            s.end();
        }
    }
}

/// The delivery a handler works on, for the `settle` spans of its message (per-message
/// handlers; empty for batch runs and when not exporting).
#[derive(Default)]
pub struct Slot(Mutex<Option<SpanContext>>);

impl Slot {
    pub fn set(&self, d: &Delivery) {
        if tracer().is_some() {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = d.sc.clone();
        }
    }

    /// A `settle` span under the delivery, ended when the returned guard drops.
    pub fn settle(&self, action: &'static str) -> Option<SettleSpan> {
        let t = tracer()?;
        let parent = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let span = t
            .span_builder(format!("settle {action}"))
            .with_kind(SpanKind::Internal)
            .with_attributes([KeyValue::new("eventbus.settle", action)])
            .start_with_context(t, &Context::new().with_remote_span_context(parent));
        Some(SettleSpan(span))
    }
}

pub struct SettleSpan(opentelemetry_sdk::trace::Span);

impl Drop for SettleSpan {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01";

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let sc = parse(TP, "k=v").unwrap();
        let c = carrier(&sc);
        assert_eq!(c.get(TRACEPARENT).map(String::as_str), Some(TP));
        assert_eq!(c.get(TRACESTATE).map(String::as_str), Some("k=v"));
        for bad in [
            "",
            "00-00000000000000000000000000000000-549f7769e4797b1f-01",
            "00-23c897c462a4cff9e965eec71ad7b501-0000000000000000-01",
            "ff-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01",
            "00-23C897C462A4CFF9E965EEC71AD7B501-549f7769e4797b1f-01x",
            "garbage",
        ] {
            assert!(parse(bad, "").is_none(), "{bad}");
        }
        assert!(check_traceparent("nope").unwrap_err().contains("W3C"));
    }

    /// The hand-written carrier writes what the SDK's W3C propagator writes, for sampled and
    /// unsampled contexts, with and without a tracestate, and nothing for an invalid one.
    #[test]
    fn the_carrier_matches_the_sdk_propagator() {
        #[derive(Default)]
        struct Put(HashMap<String, String>);
        impl opentelemetry::propagation::Injector for Put {
            fn set(&mut self, key: &str, value: String) {
                self.0.insert(key.to_string(), value);
            }
        }
        let unsampled = "00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-00";
        let mut cases: Vec<SpanContext> = [(TP, ""), (TP, "k=v,a=b"), (unsampled, "x=1")]
            .iter()
            .map(|(tp, ts)| parse(tp, ts).unwrap())
            .collect();
        cases.push(fresh());
        cases.push(SpanContext::empty_context());
        for sc in cases {
            let mut put = Put::default();
            propagator().inject_context(
                &Context::new().with_remote_span_context(sc.clone()),
                &mut put,
            );
            put.0.retain(|_, v| !v.is_empty());
            assert_eq!(carrier(&sc), put.0, "{sc:?}");
        }
    }

    #[test]
    fn the_carrier_wins_then_config_then_state_then_headers() {
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let empty = HashMap::new();
        let mut carrier_map = HashMap::new();
        carrier_map.insert("Traceparent".to_string(), TP.to_string());
        let mut h = HashMap::new();
        h.insert("traceparent".to_string(), other.to_string());
        let base = |input_carrier| PublishSources {
            carrier_key: "",
            input_carrier,
            current: None,
            trigger_data: None,
            step_outputs: None,
            config: ("", ""),
            state: ("", ""),
            headers: [&empty, &empty],
        };
        let id = |sc: Option<SpanContext>| sc.map(|s| s.trace_id().to_string());
        assert_eq!(
            id(publish_parent(&PublishSources {
                config: (other, ""),
                ..base(&carrier_map)
            })),
            Some("23c897c462a4cff9e965eec71ad7b501".into())
        );
        assert_eq!(
            id(publish_parent(&PublishSources {
                config: (other, ""),
                state: (TP, ""),
                ..base(&empty)
            })),
            Some("0af7651916cd43dd8448eb211c80319c".into())
        );
        assert_eq!(
            id(publish_parent(&PublishSources {
                headers: [&empty, &h],
                ..base(&empty)
            })),
            Some("0af7651916cd43dd8448eb211c80319c".into())
        );
        assert!(publish_parent(&base(&empty)).is_none());
        // Another carrier key is looked up in step outputs.
        let mut inner = prost_types::Struct::default();
        inner.fields.insert(
            "traceparent".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(TP.into())),
            },
        );
        let mut out = prost_types::Struct::default();
        out.fields.insert(
            "otel".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(inner)),
            },
        );
        let outputs: HashMap<String, prost_types::Struct> = [("inject".to_string(), out)].into();
        assert_eq!(
            id(publish_parent(&PublishSources {
                carrier_key: "otel",
                step_outputs: Some(&outputs),
                ..base(&empty)
            })),
            Some("23c897c462a4cff9e965eec71ad7b501".into())
        );
    }

    #[test]
    fn without_a_tracer_a_publish_forwards_its_parent_or_starts_a_trace() {
        let parent = parse(TP, "").unwrap();
        let broker = crate::config::broker::BrokerSpec::validate(
            "eventbus.broker",
            "b",
            &crate::pb::eventbus::ClusterConfig {
                provider: "nats".into(),
                deploy_target: "self_hosted".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let t = start_publish(Some(&parent), &broker, "a.b");
        let mut h = std::collections::BTreeMap::new();
        t.inject(&mut h);
        assert_eq!(h.get(TRACEPARENT).unwrap().as_str(), TP);
        let fresh = start_publish(None, &broker, "a.b");
        let mut h = std::collections::BTreeMap::new();
        fresh.inject(&mut h);
        assert!(parse(h.get(TRACEPARENT).unwrap().as_str(), "").is_some());
    }
}
