//! `step.eventbus.ack` with `ack_tokens` (or the `messages` of a consume step's output or a
//! batch trigger's data): one action on many tokens in one ExecuteStep, each confirmed by the
//! broker, pipelined with the provider's window, one result per token in list order.

use super::bulk::{FailOn, MAX_ITEMS};
use super::StepOutput;
use crate::pb::eventbus::BulkAckResult;
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::{AckKind, Provider, ProviderError};
use crate::runtime::{render, Runtime, RuntimeError};
use futures::StreamExt;

/// Settles one token, the single and the bulk ack alike. A nak of a message that a batch
/// trigger run is holding is not sent: the trigger applies its own failure rules to it when the
/// run ends (growing nak delay, dead-letter on the last delivery), so a pipeline marking one
/// message failed cannot drop it on its last delivery. Any other action is sent and recorded,
/// so the trigger leaves that message alone.
pub(crate) async fn settle<P: Provider>(
    rt: &Runtime,
    p: &P,
    token: &str,
    kind: AckKind,
) -> Result<(), ProviderError> {
    let marks = rt.batch_marks();
    if matches!(kind, AckKind::Nak(_)) && marks.mark_failed(token) {
        return Ok(());
    }
    p.settle(token, kind).await?;
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
    let results = broker
        .dispatch(AckList {
            component,
            rt,
            tokens,
            kind,
        })
        .await?;
    super::bulk::ack_output(component, kind, fail_on, results)
}

/// The tokens of a bulk ack, settled on the broker's provider.
struct AckList<'a> {
    component: &'a str,
    rt: &'a Runtime,
    tokens: Vec<String>,
    kind: AckKind,
}

impl ForProvider for AckList<'_> {
    type Out = Result<Vec<BulkAckResult>, RuntimeError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        let failed = |e| RuntimeError::broker(self.component, e);
        let p = P::open(broker).await.map_err(failed)?;
        p.ready(p.request_timeout()).await.map_err(failed)?;
        let (p, rt, kind) = (&p, self.rt, self.kind);
        Ok(futures::stream::iter(self.tokens.into_iter().enumerate())
            .map(|(i, token)| async move {
                // The same token check as the single ack, before anything is sent.
                let error = match P::check_token(&token) {
                    Err(e) => format!("ack_token {e}"),
                    Ok(()) => match settle(rt, p, &token, kind).await {
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
            .buffered(P::ACK_WINDOW)
            .collect()
            .await)
    }
}
