//! `step.eventbus.ack`: ack, nak (with delay), term or progress by ack token, confirmed.

use super::bulk::FailOn;
use super::{decode_execute, pick, templated, ExecuteInput, StepOutput};
use crate::config::decode::{self, RawConfig};
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::pb::eventbus::{AckAction, AckRequest, AckResponse, AckStepConfig};
use crate::runtime::modules::broker::{check_any_token, BrokerModule, ForProvider, Open};
use crate::runtime::provider::AckKind;
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;

pub struct AckStep {
    /// `<type> "<name>"`, the prefix of every error this step reports.
    component: String,
}

fn kind_of(c: &AckStepConfig) -> Result<AckKind, String> {
    let delay = check_duration(&c.nak_delay, MAX_DURATION)
        .map_err(|e| format!("nak_delay {e}"))?
        .filter(|d| !d.is_zero());
    match AckAction::try_from(c.action) {
        Ok(AckAction::Unspecified | AckAction::Ack) if delay.is_none() => Ok(AckKind::Ack),
        Ok(AckAction::Nak) => Ok(AckKind::Nak(delay)),
        Ok(AckAction::Term) if delay.is_none() => Ok(AckKind::Term),
        Ok(AckAction::Progress) if delay.is_none() => Ok(AckKind::Progress),
        Ok(_) => Err("nak_delay only applies with action ACK_ACTION_NAK".into()),
        Err(_) => Err("action must be ACK_ACTION_ACK, _NAK, _TERM or _PROGRESS".into()),
    }
}

/// Create-time checks of the bulk fields.
fn check_bulk_config(p: &mut Problems, c: &AckStepConfig) {
    if let Err(e) = FailOn::parse(&c.fail_on) {
        p.field("fail_on", e);
    }
    if !c.ack_tokens.is_empty() && !c.ack_token.is_empty() {
        p.field(
            "ack_tokens",
            "set either ack_token (one message) or ack_tokens (many), not both",
        );
    }
    for (i, t) in c.ack_tokens.iter().enumerate() {
        if !templated(t) {
            p.check(&format!("ack_tokens[{i}]"), check_any_token(t));
        }
    }
}

/// The tokens of a bulk ack, or None for a single one. Config wins over pipeline state, and a
/// single token wins over lists at the same level, so pipelines that ack one message keep
/// doing so when their state also holds a list.
fn bulk_tokens(cfg: &AckStepConfig, inp: &mut AckRequest) -> Option<Vec<String>> {
    if !cfg.ack_tokens.is_empty() {
        return Some(cfg.ack_tokens.clone());
    }
    if !cfg.ack_token.is_empty() || !inp.ack_token.is_empty() {
        return None;
    }
    if !inp.ack_tokens.is_empty() {
        return Some(std::mem::take(&mut inp.ack_tokens));
    }
    if !inp.messages.is_empty() {
        return Some(
            std::mem::take(&mut inp.messages)
                .into_iter()
                .map(|m| m.ack_token)
                .collect(),
        );
    }
    None
}

impl AckStep {
    pub fn create(name: &str, raw: RawConfig<'_>) -> Result<Self, RuntimeError> {
        let kind = StepKind::Ack;
        let mut p = Problems::new(kind.type_name(), name);
        match decode::decode::<AckStepConfig>(kind.full_messages().0, raw) {
            Err(lines) => p.raw(lines),
            Ok(c) => {
                if !c.ack_token.is_empty() && !templated(&c.ack_token) {
                    p.check("ack_token", check_any_token(&c.ack_token));
                }
                if let Err(e) = check_duration(&c.nak_delay, MAX_DURATION) {
                    p.field("nak_delay", e);
                } else if let Err(e) = kind_of(&c) {
                    p.field("action", e);
                }
                check_bulk_config(&mut p, &c);
            }
        }
        p.finish(AckStep {
            component: format!("{} {name:?}", kind.type_name()),
        })
        .map_err(Into::into)
    }

    pub async fn execute(
        &self,
        rt: &Registry,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let component = &self.component;
        let (cfg, mut inp): (AckStepConfig, AckRequest) =
            decode_execute(StepKind::Ack, &self.component, &input)?;
        if let Some(tokens) = bulk_tokens(&cfg, &mut inp) {
            let kind = kind_of(&cfg).map_err(|e| RuntimeError::failed(component, e))?;
            let fail_on = FailOn::parse(&cfg.fail_on)
                .map_err(|e| RuntimeError::failed(component, format!("fail_on {e}")))?;
            let broker_ref = pick(&cfg.broker_ref, &inp.broker_ref);
            // Boxed: the bulk future holds the window and would size every single ack.
            return Box::pin(super::ack_bulk::execute(
                component,
                rt,
                &broker_ref,
                tokens,
                kind,
                fail_on,
            ))
            .await;
        }
        let kind = kind_of(&cfg).map_err(|e| RuntimeError::failed(component, e))?;
        let token = pick(&cfg.ack_token, &inp.ack_token);
        if token.is_empty() {
            return Err(RuntimeError::failed(
                component,
                "ack_token is required (the ack_token of a consumed or triggered message)",
            ));
        }
        let broker = match rt.broker(&pick(&cfg.broker_ref, &inp.broker_ref), component) {
            Ok(b) => b,
            Err(e) => {
                // A token no provider would take is the first thing to fix.
                check_any_token(&token)
                    .map_err(|t| RuntimeError::failed(component, format!("ack_token {t}")))?;
                return Err(e);
            }
        };
        broker
            .dispatch(AckOne {
                component,
                rt,
                token: &token,
                kind,
            })
            .await
    }
}

/// One token settled on the broker's provider.
struct AckOne<'a> {
    component: &'a str,
    rt: &'a Registry,
    token: &'a str,
    kind: AckKind,
}

impl ForProvider for AckOne<'_> {
    type Out = Result<StepOutput, RuntimeError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        let component = self.component;
        P::check_token(self.token)
            .map_err(|e| RuntimeError::failed(component, format!("ack_token {e}")))?;
        let failed = |e| RuntimeError::broker(component, e);
        let p = P::open(broker).await.map_err(failed)?;
        p.ready(p.request_timeout()).await.map_err(failed)?;
        let settled = super::ack_bulk::settle(self.rt, &*p, self.token, self.kind).await;
        crate::telemetry::step_settled(&broker.spec, self.kind, settled.is_ok());
        settled.map_err(failed)?;
        let out = AckResponse {
            action: self.kind.name().to_string(),
            ..Default::default()
        };
        Ok(StepOutput {
            typed: StepKind::Ack.pack_output(&out),
        })
    }
}
