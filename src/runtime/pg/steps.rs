//! `step.eventbus.publish`, `.consume` and `.ack` on a pgchannel broker. The steps decode and
//! check their config and input exactly as for NATS (same messages, same rules) and hand over
//! here once they know the broker is a `PgBus`; the output messages have the same shape.

use super::{looks_like_token, to_message};
use crate::config::broker::DEFAULT_REQUEST_TIMEOUT;
use crate::nats::ack::AckKind;
use crate::pb::eventbus::{
    AckResponse, BulkAckResult, BulkPublishResult, ConsumeResponse, PublishResponse,
};
use crate::pg::{AckOp, AckToken, FetchOpts, Outgoing, PgBus};
use crate::runtime::modules::broker::{BrokerModule, BusError};
use crate::runtime::modules::ConsumerModule;
use crate::runtime::steps::bulk::{failure_summary, FailOn};
use crate::runtime::steps::message::{
    now_rfc3339, rfc3339, Include, CORRELATION_HEADER, MSG_ID_HEADER,
};
use crate::runtime::steps::StepOutput;
use crate::runtime::types::StepKind;
use crate::runtime::{render, Runtime, RuntimeError};
use async_nats::HeaderMap;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Messages per publish transaction in a bulk publish: one round trip each, and a bounded
/// transaction (a 10 000-message list is 20 of them, not one huge lock holder).
const PUBLISH_CHUNK: usize = 500;
/// Acks awaited at once in a bulk ack; each takes a pooled connection.
const ACK_WINDOW: usize = 16;

/// The headers the step built for NATS, split the way the pgchannel tables keep them: the
/// correlation id in its own column, the message id as the de-duplication key, the rest as the
/// headers JSON (multi-valued headers joined with commas, as consumed NATS messages show them).
pub(crate) fn outgoing(subject: String, headers: &HeaderMap, payload: Vec<u8>) -> Outgoing {
    let mut out = BTreeMap::new();
    let mut correlation_id = None;
    let mut msg_id = None;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        let joined = values
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if name.eq_ignore_ascii_case(CORRELATION_HEADER) {
            correlation_id = Some(joined);
        } else if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
            msg_id = Some(joined);
        } else {
            out.insert(name.to_string(), joined);
        }
    }
    Outgoing {
        subject,
        payload: payload.into(),
        headers: out,
        correlation_id,
        msg_id,
    }
}

async fn bounded<T>(
    op: &'static str,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, crate::pg::PgError>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r.map_err(BusError::from),
        Err(_) => Err(BusError::TimedOut { op, after }),
    }
}

/// A single publish: one transaction (insert + notify), bounded by the step's timeout.
pub(crate) async fn publish_one(
    component: &str,
    broker: &BrokerModule,
    msg: Outgoing,
    timeout: Option<Duration>,
) -> Result<StepOutput, RuntimeError> {
    let failed = |e: BusError| RuntimeError::bus(component, e);
    let timeout = timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let published = match broker.require_pg().await {
        Ok(bus) => bounded("publish", timeout, bus.publish(std::slice::from_ref(&msg))).await,
        Err(e) => Err(e),
    };
    let first = published.map(|p| p.into_iter().next());
    crate::telemetry::publish_done(
        &broker.spec,
        first
            .as_ref()
            .map(|p| p.as_ref().is_some_and(|p| p.duplicate)),
    );
    let Some(p) = first.map_err(failed)? else {
        return Err(RuntimeError::failed(
            component,
            "publish returned no result for the message",
        ));
    };
    let resp = PublishResponse {
        sequence: p.id.to_string(),
        // The database's timestamp of the row, as the Go provider reported it.
        acked_at: rfc3339(p.ts),
        stream: p.stream,
        duplicate: p.duplicate,
        ..Default::default()
    };
    Ok(StepOutput {
        typed: StepKind::Publish.pack_output(&resp),
    })
}

/// One prepared bulk message: `(subject, message_id, Ok((subject, headers, body)) or why not)`.
pub(crate) type BulkItem = (String, String, Result<(String, HeaderMap, Vec<u8>), String>);

/// A bulk publish: the valid messages in list order, `PUBLISH_CHUNK` per transaction; a
/// chunk that fails fails each of its messages (nothing of it was stored).
pub(crate) async fn publish_bulk(
    component: &str,
    broker: &BrokerModule,
    prepared: Vec<BulkItem>,
    fail_on: FailOn,
    timeout: Option<Duration>,
) -> Result<StepOutput, RuntimeError> {
    let bus = broker
        .require_pg()
        .await
        .map_err(|e| RuntimeError::bus(component, e))?;
    let timeout = timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let total = prepared.len();
    let mut results: Vec<BulkPublishResult> = Vec::with_capacity(total);
    // (index into results, message) of the sendable ones.
    let mut sendable: Vec<(usize, Outgoing)> = Vec::with_capacity(total);
    for (i, (subject, message_id, p)) in prepared.into_iter().enumerate() {
        let mut r = BulkPublishResult {
            index: i as i32,
            subject,
            message_id,
            ..Default::default()
        };
        match p {
            Err(e) => r.error = e,
            Ok((subj, headers, body)) => sendable.push((i, outgoing(subj, &headers, body))),
        }
        results.push(r);
    }
    for chunk in sendable.chunks(PUBLISH_CHUNK) {
        let msgs: Vec<Outgoing> = chunk.iter().map(|(_, m)| m.clone()).collect();
        match bounded("publish", timeout, bus.publish(&msgs)).await {
            Ok(published) if published.len() == chunk.len() => {
                for ((i, _), p) in chunk.iter().zip(published) {
                    let r = &mut results[*i];
                    r.sequence = p.id.to_string();
                    r.stream = p.stream;
                    r.duplicate = p.duplicate;
                }
            }
            Ok(other) => {
                let e = format!(
                    "publish returned {} results for {} messages",
                    other.len(),
                    chunk.len()
                );
                for (i, _) in chunk {
                    results[*i].error = e.clone();
                }
            }
            Err(e) => {
                let e = render(&e);
                for (i, _) in chunk {
                    results[*i].error = e.clone();
                }
            }
        }
    }
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

/// What one consume execution asks for, already checked by the step.
pub(crate) struct ConsumeAsk<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    pub batch: usize,
    pub max_bytes: usize,
    pub include: Include,
    pub max_wait: Duration,
}

/// One bounded batch: declared stream and consumer ensured as rows first (as for NATS), then
/// rows leased to this caller inside a transaction, so concurrent consumers never share one.
pub(crate) async fn consume(
    component: &str,
    rt: &Runtime,
    broker: &Arc<BrokerModule>,
    declared: Option<&Arc<ConsumerModule>>,
    ask: ConsumeAsk<'_>,
) -> Result<StepOutput, RuntimeError> {
    let failed = |e: BusError| RuntimeError::bus(component, e);
    if let Some(c) = declared {
        if let Some(s) = rt.stream_module(&c.spec.stream) {
            s.ensure_pg(broker).await.map_err(failed)?;
        }
        c.ensure_pg(broker).await.map_err(failed)?;
    }
    let bus = broker.require_pg().await.map_err(failed)?;
    let opts = FetchOpts {
        batch: ask.batch,
        max_wait: ask.max_wait,
        max_bytes: Some(ask.max_bytes),
        dead_letter_subject: None,
    };
    // The fetch ends by itself at max_wait; the outer bound only guards against a database
    // that stops answering mid-call.
    let bound = ask.max_wait + DEFAULT_REQUEST_TIMEOUT;
    let rows = bounded("fetch", bound, bus.fetch(ask.stream, ask.durable, opts))
        .await
        .map_err(failed)?;
    let mut messages: Vec<_> = rows
        .into_iter()
        .map(|d| to_message(d, ask.include))
        .collect();
    crate::telemetry::consumed(&broker.spec, ask.stream, ask.durable, &mut messages);
    let out = ConsumeResponse {
        count: messages.len() as i32,
        messages,
    };
    Ok(StepOutput {
        typed: StepKind::Consume.pack_output(&out),
    })
}

pub(crate) fn ack_op(kind: AckKind) -> AckOp {
    match kind {
        AckKind::Ack => AckOp::Ack,
        AckKind::Nak(d) => AckOp::Nak(d),
        AckKind::Term => AckOp::Term,
        AckKind::Progress => AckOp::Progress,
    }
}

/// A pgchannel token or the reason it is not one (the Go provider's text).
fn token(t: &str) -> Result<AckToken, BusError> {
    t.parse::<AckToken>().map_err(BusError::from)
}

/// Create-time check of a literal token in an ack step: either provider's shape passes, since
/// the broker is known only at Execute.
pub(crate) fn check_any_token(t: &str) -> Result<(), String> {
    if looks_like_token(t) {
        return Ok(());
    }
    crate::nats::guard::check_ack_token(t)
        .map_err(|e| format!("{e}; a pgchannel token is \"<stream>:<consumer>:<id>\""))
}

async fn settle(bus: &PgBus, t: &str, kind: AckKind) -> Result<(), BusError> {
    let tok = token(t)?;
    bounded("ack", DEFAULT_REQUEST_TIMEOUT, bus.ack(&tok, ack_op(kind))).await
}

pub(crate) async fn ack_one(
    component: &str,
    broker: &BrokerModule,
    t: &str,
    kind: AckKind,
) -> Result<StepOutput, RuntimeError> {
    let failed = |e: BusError| RuntimeError::bus(component, e);
    let bus = broker.require_pg().await.map_err(failed)?;
    let settled = settle(&bus, t, kind).await;
    crate::telemetry::step_settled(&broker.spec, kind, settled.is_ok());
    settled.map_err(failed)?;
    let out = AckResponse {
        action: kind.name().to_string(),
        ..Default::default()
    };
    Ok(StepOutput {
        typed: StepKind::Ack.pack_output(&out),
    })
}

pub(crate) async fn ack_bulk(
    component: &str,
    broker: &BrokerModule,
    tokens: Vec<String>,
    kind: AckKind,
    fail_on: FailOn,
) -> Result<StepOutput, RuntimeError> {
    // The token count was checked by the caller (steps::ack_bulk::execute), for both providers.
    let bus = broker
        .require_pg()
        .await
        .map_err(|e| RuntimeError::bus(component, e))?;
    let bus = &bus;
    let results: Vec<BulkAckResult> = futures::stream::iter(tokens.into_iter().enumerate())
        .map(|(i, t)| async move {
            let error = match settle(bus, &t, kind).await {
                Ok(()) => String::new(),
                Err(e) => render(&e),
            };
            BulkAckResult {
                index: i as i32,
                ack_token: t,
                error,
            }
        })
        .buffered(ACK_WINDOW)
        .collect()
        .await;
    crate::telemetry::step_acks(&broker.spec, kind, &results);
    crate::runtime::steps::bulk::ack_output(component, kind, fail_on, results)
}
