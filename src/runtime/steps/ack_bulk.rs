//! `step.eventbus.ack` with `ack_tokens` (or the `messages` of a consume step's output or a
//! batch trigger's data): one action on many tokens in one ExecuteStep, each confirmed by the
//! broker, pipelined with the provider's window, one result per token in list order.

use super::bulk::{FailOn, MAX_ITEMS};
use super::StepOutput;
use crate::pb::eventbus::BulkAckResult;
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::{AckKind, Provider, ProviderError};
use crate::runtime::registry::Registry;
use crate::runtime::{render, RuntimeError};

/// Settles one token, the single and the bulk ack alike. A nak of a message that a batch
/// trigger run is holding is not sent: the trigger applies its own failure rules to it when the
/// run ends (growing nak delay, dead-letter on the last delivery), so a pipeline marking one
/// message failed cannot drop it on its last delivery. Any other action is sent and recorded,
/// so the trigger leaves that message alone.
pub(crate) async fn settle<P: Provider>(
    rt: &Registry,
    p: &P,
    token: &str,
    kind: AckKind,
) -> Result<(), ProviderError> {
    if left_to_batch(rt, token, kind) {
        return Ok(());
    }
    p.settle(token, kind).await?;
    record_settled(rt, token, kind);
    Ok(())
}

/// A nak of a token a batch trigger run holds: marked failed for that run, and not sent.
fn left_to_batch(rt: &Registry, token: &str, kind: AckKind) -> bool {
    matches!(kind, AckKind::Nak(_)) && rt.batch_marks().mark_failed(token)
}

/// A sent settle (other than progress), recorded so a batch run leaves the message alone.
fn record_settled(rt: &Registry, token: &str, kind: AckKind) {
    if kind != AckKind::Progress {
        rt.batch_marks().mark_settled(token);
    }
}

pub(super) async fn execute(
    component: &str,
    rt: &Registry,
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
    crate::telemetry::step_acks(&broker.spec, kind, &results);
    super::bulk::ack_output(component, kind, fail_on, results)
}

/// The tokens of a bulk ack, settled on the broker's provider.
struct AckList<'a> {
    component: &'a str,
    rt: &'a Registry,
    tokens: Vec<String>,
    kind: AckKind,
}

impl ForProvider for AckList<'_> {
    type Out = Result<Vec<BulkAckResult>, RuntimeError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        let failed = |e| RuntimeError::broker(self.component, e);
        let p = P::open(broker).await.map_err(failed)?;
        p.ready(p.request_timeout()).await.map_err(failed)?;
        let (rt, kind) = (self.rt, self.kind);
        // The same token check as the single ack, before anything is sent; a nak of a token a
        // batch run holds is left to that run (`settle`), everything else goes in one list.
        let mut errors: Vec<Option<String>> = Vec::with_capacity(self.tokens.len());
        let mut send: Vec<&str> = Vec::new();
        for token in &self.tokens {
            match P::check_token(token) {
                Err(e) => errors.push(Some(format!("ack_token {e}"))),
                Ok(()) if left_to_batch(rt, token, kind) => errors.push(Some(String::new())),
                Ok(()) => {
                    errors.push(None);
                    send.push(token);
                }
            }
        }
        let mut sent = p.settle_list(&send, kind).await.into_iter();
        Ok(self
            .tokens
            .iter()
            .zip(errors)
            .enumerate()
            .map(|(i, (token, early))| {
                let error = match early {
                    Some(e) => e,
                    None => match sent.next() {
                        Some(Ok(())) => {
                            record_settled(rt, token, kind);
                            String::new()
                        }
                        Some(Err(e)) => render(&e),
                        None => "ack: no result for the token".into(),
                    },
                };
                BulkAckResult {
                    index: i as i32,
                    ack_token: token.clone(),
                    error,
                }
            })
            .collect())
    }
}
