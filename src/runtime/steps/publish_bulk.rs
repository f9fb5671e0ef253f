//! `step.eventbus.publish` with `messages` (config) or `publish_messages` (pipeline state): many messages in one ExecuteStep, pipelined with a
//! bounded window of unacknowledged publishes (one gRPC hop per list instead of per message),
//! one result per message in list order. A message that cannot be sent (bad subject, say) gets
//! its error without stopping the others; `fail_on` decides whether the step fails.

use super::bulk::{failure_summary, window, FailOn, MAX_ITEMS};
use super::message::{build_message, now_rfc3339, payload_of};
use super::{pick, StepOutput};
use crate::config::error::{duration, Problems};
use crate::pb::eventbus::{
    BulkPublishMessage, BulkPublishResult, PublishRequest, PublishResponse, PublishStepConfig,
};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::OutMessage;
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use opentelemetry::trace::SpanContext;
use std::collections::HashMap;
use std::time::Duration;

/// Unacknowledged publishes at once when `max_in_flight` is unset: enough to keep one
/// connection busy on a LAN, far below the JetStream context's own ack limit.
pub const DEFAULT_WINDOW: usize = 256;
pub const MAX_WINDOW: usize = 4096;

/// Create-time checks of the bulk fields (what is known before templates resolve).
pub(super) fn check_config(p: &mut Problems, c: &PublishStepConfig) {
    if let Err(e) = FailOn::parse(&c.fail_on) {
        p.field("fail_on", e);
    }
    if c.max_in_flight < 0 || c.max_in_flight as usize > MAX_WINDOW {
        p.field(
            "max_in_flight",
            format!(
                "{} is out of range (1..={MAX_WINDOW}; 0 means {DEFAULT_WINDOW})",
                c.max_in_flight
            ),
        );
    }
    if c.messages.len() > MAX_ITEMS {
        p.field(
            "messages",
            format!(
                "{} messages is more than one call takes ({MAX_ITEMS}); split the list",
                c.messages.len()
            ),
        );
    }
    if !c.messages.is_empty() && !c.message_id.is_empty() {
        p.field(
            "message_id",
            "does not apply with messages (one id would de-duplicate them all into one); set message_id on each message",
        );
    }
    // Each static message gets the checks Execute would give it (reserved subjects, header
    // names and values, ids), so a bad list fails at CreateStep, not on every run. One line
    // names the first bad message and how many more there are.
    let mut bad =
        c.messages.iter().enumerate().filter_map(|(i, m)| {
            static_message_problem(m).map(|(field, problem)| (i, field, problem))
        });
    if let Some((i, field, problem)) = bad.next() {
        let more = bad.count();
        let more = if more > 0 {
            format!(" (and {more} more messages with problems)")
        } else {
            String::new()
        };
        p.field(
            &format!("messages[{i}].{field}"),
            format!("{problem}{more}"),
        );
    }
}

/// What Execute would refuse in one configured message, where no template is involved.
fn static_message_problem(m: &BulkPublishMessage) -> Option<(String, String)> {
    use super::templated;
    use crate::nats::guard::{check_header_name, check_header_value, check_publish_target};
    if !m.subject.is_empty() && !templated(&m.subject) {
        if let Err(e) = check_publish_target(&m.subject) {
            return Some(("subject".into(), e));
        }
    }
    for (k, v) in &m.headers {
        if !templated(k) {
            if let Err(e) = check_header_name(k) {
                return Some(("headers".into(), e));
            }
        }
        if !templated(v) && !templated(k) {
            if let Err(e) = check_header_value(v) {
                return Some((format!("headers.{k}"), e));
            }
        }
    }
    for (field, v) in [
        ("correlation_id", &m.correlation_id),
        ("message_id", &m.message_id),
    ] {
        if !templated(v) {
            if let Err(e) = check_header_value(v) {
                return Some((field.into(), e));
            }
        }
    }
    None
}

/// One message after defaults, checked and ready, or why it cannot be sent.
type Prepared = Result<OutMessage, String>;

/// Fills a message's unset fields from the step and checks it through the same per-message
/// builder the single publish uses.
fn prepare(
    m: BulkPublishMessage,
    subject: &str,
    headers: &HashMap<String, String>,
    correlation: &str,
    payload: &Option<Vec<u8>>,
    trace: (&crate::config::broker::BrokerSpec, Option<&SpanContext>),
) -> (String, String, Prepared) {
    let subject = pick(&m.subject, subject);
    // One context per message: its own traceparent header, else the step's.
    let parent = crate::telemetry::trace::headers_parent(&m.headers);
    let started =
        crate::telemetry::trace::start_publish(parent.as_ref().or(trace.1), trace.0, &subject);
    let message_id = m.message_id;
    let correlation = pick(&m.correlation_id, correlation);
    let body = if !m.payload_bytes.is_empty() {
        Ok(m.payload_bytes)
    } else {
        payload_of(m.payload.as_ref()).map(|p| p.or_else(|| payload.clone()).unwrap_or_default())
    };
    let prepared = body.and_then(|b| {
        build_message(
            subject.clone(),
            headers.iter().chain(m.headers.iter()),
            correlation,
            message_id.clone(),
            b,
        )
        .map_err(|e| e.to_string())
    });
    let prepared = prepared.map(|mut msg| {
        started.inject(&mut msg.headers);
        msg
    });
    // Bulk spans end when the message is handed to the provider (the acks come back in bulk).
    started.end(prepared.as_ref().map(|_| ()));
    (subject, message_id, prepared)
}

pub(super) async fn execute(
    component: &str,
    rt: &Registry,
    cfg: PublishStepConfig,
    inp: PublishRequest,
    parent: Option<SpanContext>,
) -> Result<StepOutput, RuntimeError> {
    let fail_on = FailOn::parse(&cfg.fail_on)
        .map_err(|e| RuntimeError::failed(component, format!("fail_on {e}")))?;
    let list = if cfg.messages.is_empty() {
        inp.publish_messages
    } else {
        cfg.messages
    };
    if list.len() > MAX_ITEMS {
        return Err(RuntimeError::failed(
            component,
            format!(
                "messages: {} is more than one call takes ({MAX_ITEMS}); split the list",
                list.len()
            ),
        ));
    }
    // Step-level defaults: state first, config over it (as the single publish).
    let subject = pick(&cfg.subject, &inp.subject);
    let mut headers = inp.headers;
    headers.extend(cfg.headers);
    let correlation = pick(&cfg.correlation_id, &inp.correlation_id);
    let payload =
        match payload_of(cfg.payload.as_ref()).map_err(|e| RuntimeError::failed(component, e))? {
            Some(p) => Some(p),
            None if !inp.payload.is_empty() => Some(inp.payload),
            None => None,
        };
    let total = list.len();
    let broker = rt.broker(&pick(&cfg.broker_ref, &inp.broker_ref), component)?;
    let prepared: Vec<_> = list
        .into_iter()
        .map(|m| {
            let trace = (&broker.spec, parent.as_ref());
            prepare(m, &subject, &headers, &correlation, &payload, trace)
        })
        .collect();
    let job = PublishList {
        component,
        prepared,
        window: window(cfg.max_in_flight, DEFAULT_WINDOW, MAX_WINDOW),
        timeout: duration(&cfg.timeout).filter(|d| !d.is_zero()),
    };
    let results = broker.dispatch(job).await?;
    crate::telemetry::bulk_done(&broker.spec, &results);
    let failed = results.iter().filter(|r| !r.error.is_empty()).count();
    if fail_on.fails(failed, total) {
        return Err(RuntimeError::failed(
            component,
            failure_summary(
                "messages",
                total,
                fail_on,
                results
                    .iter()
                    .filter(|r| !r.error.is_empty())
                    .map(|r| (r.index as usize, r.error.as_str())),
            ),
        ));
    }
    let out = PublishResponse {
        acked_at: now_rfc3339(),
        published: (total - failed) as i32,
        failed: failed as i32,
        duplicates: results.iter().filter(|r| r.duplicate).count() as i32,
        results,
        ..Default::default()
    };
    Ok(StepOutput {
        typed: StepKind::Publish.pack_output(&out),
    })
}

/// The valid messages of a bulk publish, sent in list order through the provider's window;
/// one result per message in list order, the invalid ones with their reason.
struct PublishList<'a> {
    component: &'a str,
    prepared: Vec<(String, String, Prepared)>,
    window: usize,
    timeout: Option<Duration>,
}

impl ForProvider for PublishList<'_> {
    type Out = Result<Vec<BulkPublishResult>, RuntimeError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        let failed = |e| RuntimeError::broker(self.component, e);
        let p = P::open(broker).await.map_err(failed)?;
        p.ready(self.timeout.unwrap_or(p.request_timeout()))
            .await
            .map_err(failed)?;
        let mut results = Vec::with_capacity(self.prepared.len());
        let mut sendable = Vec::with_capacity(self.prepared.len());
        let mut sent_at = Vec::with_capacity(self.prepared.len());
        for (i, (subject, message_id, prepared)) in self.prepared.into_iter().enumerate() {
            let mut r = BulkPublishResult {
                index: i as i32,
                subject,
                message_id,
                ..Default::default()
            };
            match prepared {
                Err(e) => r.error = e,
                Ok(m) => {
                    sendable.push(m);
                    sent_at.push(i);
                }
            }
            results.push(r);
        }
        let done = p.publish_list(sendable, self.window, self.timeout).await;
        if done.len() != sent_at.len() {
            let e = format!(
                "publish returned {} results for {} messages",
                done.len(),
                sent_at.len()
            );
            for i in sent_at {
                results[i].error = e.clone();
            }
            return Ok(results);
        }
        for (i, d) in sent_at.into_iter().zip(done) {
            let r = &mut results[i];
            match d {
                Ok(ack) => {
                    r.sequence = ack.sequence;
                    r.stream = ack.stream;
                    r.duplicate = ack.duplicate;
                }
                Err(e) => r.error = e,
            }
        }
        Ok(results)
    }
}
