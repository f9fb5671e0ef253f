//! `step.eventbus.publish`: send and await the JetStream PublishAck, bounded by a timeout so a
//! step never hangs while the broker is down (Go defect B21).

use super::{decode_execute, pick, templated, ExecuteInput, StepOutput};
use crate::config::decode::{self, RawConfig};
use crate::config::error::Problems;
use crate::nats::guard::{
    check_duration, check_header_name, check_header_value, check_publish_target, MAX_DURATION,
};
use crate::pb::eventbus::{PublishRequest, PublishResponse, PublishStepConfig};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::OutMessage;
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use crate::telemetry::trace;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::message::{build_message, payload_of};

pub struct PublishStep {
    /// `<type> "<name>"`, the prefix of every error this step reports.
    component: String,
}

impl PublishStep {
    pub fn create(name: &str, raw: RawConfig<'_>) -> Result<Self, RuntimeError> {
        let kind = StepKind::Publish;
        let mut p = Problems::new(kind.type_name(), name);
        match decode::decode::<PublishStepConfig>(kind.full_messages().0, raw) {
            Err(lines) => p.raw(lines),
            Ok(c) => {
                if !c.subject.is_empty() && !templated(&c.subject) {
                    p.check("subject", check_publish_target(&c.subject));
                }
                for (k, v) in &c.headers {
                    if !templated(k) {
                        p.check("headers", check_header_name(k));
                    }
                    if !templated(v) {
                        p.check(&format!("headers.{k}"), check_header_value(v));
                    }
                }
                for (field, v) in [
                    ("correlation_id", &c.correlation_id),
                    ("message_id", &c.message_id),
                ] {
                    if !templated(v) {
                        p.check(field, check_header_value(v));
                    }
                }
                p.check("timeout", check_timeout(&c.timeout).map(|_| ()));
                if !templated(&c.traceparent) {
                    p.check("traceparent", trace::check_traceparent(&c.traceparent));
                }
                super::publish_bulk::check_config(&mut p, &c);
            }
        }
        p.finish(PublishStep {
            component: format!("{} {name:?}", kind.type_name()),
        })
        .map_err(Into::into)
    }

    /// Everything up to the network, done synchronously so that only what the send needs
    /// lives across an await (the future stays small; it is moved into a box per call).
    fn prepare(
        &self,
        rt: &Registry,
        cfg: PublishStepConfig,
        inp: PublishRequest,
        input: &ExecuteInput<'_>,
    ) -> Result<Outgoing, RuntimeError> {
        let parent = trace_parent(&cfg, &inp, input);
        let subject = pick(&cfg.subject, &inp.subject);
        let payload = payload_of(cfg.payload.as_ref())
            .map_err(|e| RuntimeError::failed(&self.component, e))?
            .unwrap_or(inp.payload);
        let correlation = pick(&cfg.correlation_id, &inp.correlation_id);
        let msg_id = pick(&cfg.message_id, &inp.message_id);
        let mut msg = build_message(
            subject,
            inp.headers.iter().chain(cfg.headers.iter()),
            correlation,
            msg_id,
            payload,
        )
        .map_err(|e| {
            let hint = if e.field == "subject" {
                " (set config.subject or a `subject` in pipeline state)"
            } else {
                ""
            };
            RuntimeError::failed(&self.component, format!("{e}{hint}"))
        })?;
        let timeout = check_timeout(&cfg.timeout)
            .map_err(|e| RuntimeError::failed(&self.component, format!("timeout {e}")))?;
        let broker = rt.broker(&pick(&cfg.broker_ref, &inp.broker_ref), &self.component)?;
        let trace = trace::start_publish(parent.as_ref(), &broker.spec, &msg.subject);
        trace.inject(&mut msg.headers);
        Ok(Outgoing {
            msg,
            broker,
            timeout,
            trace,
        })
    }

    pub async fn execute(
        &self,
        rt: &Registry,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let (cfg, inp): (PublishStepConfig, PublishRequest) =
            decode_execute(StepKind::Publish, &self.component, &input)?;
        if !cfg.messages.is_empty() || !inp.publish_messages.is_empty() {
            // Boxed: the bulk future holds the window and would size every single publish.
            let parent = trace_parent(&cfg, &inp, &input);
            return Box::pin(super::publish_bulk::execute(
                &self.component,
                rt,
                cfg,
                inp,
                parent,
            ))
            .await;
        }
        let Outgoing {
            msg,
            broker,
            timeout,
            trace,
        } = self.prepare(rt, cfg, inp, &input)?;
        let job = PublishOne {
            component: &self.component,
            msg,
            timeout,
            trace,
        };
        broker.dispatch(job).await
    }
}

/// A single publish on the broker's provider.
struct PublishOne<'a> {
    component: &'a str,
    msg: OutMessage,
    timeout: Option<Duration>,
    trace: trace::PublishTrace,
}

impl ForProvider for PublishOne<'_> {
    type Out = Result<StepOutput, RuntimeError>;
    /// A plain fn returning the future: only the fields live in it, not the job beside them.
    fn run<P: Open>(self, broker: &BrokerModule) -> impl Future<Output = Self::Out> + Send {
        let PublishOne {
            component,
            msg,
            timeout,
            trace,
        } = self;
        async move {
            let failed = |e| RuntimeError::broker(component, e);
            let sent = match P::open(broker).await {
                Ok(p) => p.publish(msg, timeout).await,
                Err(e) => Err(e),
            };
            crate::telemetry::publish_done(&broker.spec, sent.as_ref().map(|a| a.duplicate));
            trace.end(sent.as_ref().map(|_| ()));
            let ack = sent.map_err(failed)?;
            let resp = PublishResponse {
                sequence: ack.sequence,
                acked_at: ack.acked_at,
                stream: ack.stream,
                duplicate: ack.duplicate,
                ..Default::default()
            };
            Ok(StepOutput {
                typed: StepKind::Publish.pack_output(&resp),
            })
        }
    }
}

/// The parent trace context of this execution's publish (see `telemetry::trace`).
fn trace_parent(
    cfg: &PublishStepConfig,
    inp: &PublishRequest,
    input: &ExecuteInput<'_>,
) -> Option<opentelemetry::trace::SpanContext> {
    trace::publish_parent(&trace::PublishSources {
        carrier_key: &cfg.trace_carrier,
        input_carrier: &inp.trace_headers,
        current: input.current,
        trigger_data: input.trigger_data,
        step_outputs: input.step_outputs,
        config: (&cfg.traceparent, &cfg.tracestate),
        state: (&inp.traceparent, &inp.tracestate),
        headers: [&cfg.headers, &inp.headers],
    })
}

/// A positive timeout within the bound, or `None` for the broker's request timeout.
fn check_timeout(d: &Option<prost_types::Duration>) -> Result<Option<Duration>, String> {
    match check_duration(d, MAX_DURATION)? {
        Some(t) if t.is_zero() => Err("must be a positive duration such as \"5s\"".into()),
        t => Ok(t),
    }
}

/// A validated publish, ready to send.
struct Outgoing {
    msg: OutMessage,
    broker: Arc<BrokerModule>,
    timeout: Option<Duration>,
    trace: trace::PublishTrace,
}
