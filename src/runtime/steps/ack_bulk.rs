//! `step.eventbus.ack` with `ack_tokens` (or the `messages` of a consume step's output or a
//! batch trigger's data): one action on many tokens in one ExecuteStep, each confirmed by the
//! server, pipelined with a bounded window, one result per token in list order.

use super::bulk::{FailOn, MAX_ITEMS};
use super::StepOutput;
use crate::nats::ack::{ack_token, AckKind};
use crate::nats::guard::check_ack_token as check_token;
use crate::nats::{NatsConn, NatsError};
use crate::pb::eventbus::BulkAckResult;
use crate::runtime::{render, Runtime, RuntimeError};
use futures::StreamExt;

/// Confirmations awaited at once: each is one request/reply on the shared connection.
const WINDOW: usize = 256;

/// Settles one token, the single and the bulk ack alike. A nak of a message that a batch
/// trigger run is holding is not sent: the trigger applies its own failure rules to it when the
/// run ends (growing nak delay, dead-letter on the last delivery), so a pipeline marking one
/// message failed cannot drop it on its last delivery. Any other action is sent and recorded,
/// so the trigger leaves that message alone.
pub(crate) async fn settle(
    rt: &Runtime,
    conn: &NatsConn,
    token: &str,
    kind: AckKind,
) -> Result<(), NatsError> {
    let marks = rt.batch_marks();
    if matches!(kind, AckKind::Nak(_)) && marks.mark_failed(token) {
        return Ok(());
    }
    ack_token(&conn.client, token, kind, conn.request_timeout).await?;
    if kind != AckKind::Progress {
        marks.mark_settled(token);
    }
    Ok(())
}

pub(super) async fn execute(
    component: &str,
    rt: &Runtime,
    broker_ref: &str,
    tokens: Vec<String>,
    kind: AckKind,
    fail_on: FailOn,
) -> Result<StepOutput, RuntimeError> {
    if tokens.len() > MAX_ITEMS {
        return Err(RuntimeError::failed(
            component,
            format!(
                "ack_tokens: {} tokens is more than one call takes ({MAX_ITEMS}); split the list",
                tokens.len()
            ),
        ));
    }
    let broker = rt.broker(broker_ref, component)?;
    if broker.is_pg() {
        return crate::runtime::pg::steps::ack_bulk(component, &broker, tokens, kind, fail_on)
            .await;
    }
    let conn = broker
        .require()
        .await
        .map_err(|e| RuntimeError::nats(component, e))?;
    conn.wait_connected(conn.request_timeout)
        .await
        .map_err(|e| RuntimeError::nats(component, e))?;
    let conn = &conn;
    let results: Vec<BulkAckResult> = futures::stream::iter(tokens.into_iter().enumerate())
        .map(|(i, token)| async move {
            // The same token check as the single ack, before anything is sent.
            let error = match check_token(&token) {
                Err(e) => format!("ack_token {e}"),
                Ok(()) => match settle(rt, conn, &token, kind).await {
                    Ok(()) => String::new(),
                    Err(e) => render(&e),
                },
            };
            BulkAckResult {
                index: i as i32,
                ack_token: token,
                error,
            }
        })
        .buffered(WINDOW)
        .collect()
        .await;
    crate::telemetry::step_acks(&broker.spec, kind, &results);
    super::bulk::ack_output(component, kind, fail_on, results)
}
