//! Pipeline steps. Each step keeps its Create-time config (validated where no template is
//! involved); at Execute the host sends the config again with templates resolved plus the
//! pipeline state filtered to the input message, and fields set in config win over input.

pub mod ack;
pub mod ack_bulk;
pub mod bulk;
pub mod consume;
pub mod message;
pub mod output;
pub mod publish;
pub mod publish_bulk;

use super::types::StepKind;
use super::{Runtime, RuntimeError};
use crate::config::decode::{self, RawConfig};

pub struct ExecuteInput<'a> {
    pub typed_config: Option<&'a prost_types::Any>,
    pub config: Option<&'a prost_types::Struct>,
    pub typed_input: Option<&'a prost_types::Any>,
    pub current: Option<&'a prost_types::Struct>,
    /// Always sent by the host; read only for a trace carrier under a custom key.
    pub trigger_data: Option<&'a prost_types::Struct>,
    pub step_outputs: Option<&'a std::collections::HashMap<String, prost_types::Struct>>,
}

pub struct StepOutput {
    pub typed: prost_types::Any,
}

pub enum Step {
    Publish(publish::PublishStep),
    Consume(consume::ConsumeStep),
    Ack(ack::AckStep),
}

/// A value that still holds a host template; it is checked only once resolved at Execute.
pub fn templated(s: &str) -> bool {
    s.contains("{{")
}

impl Step {
    pub fn create(kind: StepKind, name: &str, raw: RawConfig<'_>) -> Result<Step, RuntimeError> {
        Ok(match kind {
            StepKind::Publish => Step::Publish(publish::PublishStep::create(name, raw)?),
            StepKind::Consume => Step::Consume(consume::ConsumeStep::create(name, raw)?),
            StepKind::Ack => Step::Ack(ack::AckStep::create(name, raw)?),
        })
    }

    pub fn kind(&self) -> StepKind {
        match self {
            Step::Publish(_) => StepKind::Publish,
            Step::Consume(_) => StepKind::Consume,
            Step::Ack(_) => StepKind::Ack,
        }
    }

    pub async fn execute(
        &self,
        rt: &Runtime,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        match self {
            Step::Publish(s) => s.execute(rt, input).await,
            // Boxed: consume's future is the largest (its pull loop) and would set the size
            // that every publish and ack future pays to move.
            Step::Consume(s) => Box::pin(s.execute(rt, input)).await,
            Step::Ack(s) => s.execute(rt, input).await,
        }
    }
}

/// Decodes this execution's config and input messages of `kind`; errors start with `component`.
pub(crate) fn decode_execute<C, I>(
    kind: StepKind,
    component: &str,
    input: &ExecuteInput<'_>,
) -> Result<(C, I), RuntimeError>
where
    C: prost::Message + Default,
    I: prost::Message + Default,
{
    let (cfg_msg, in_msg) = kind.full_messages();
    let cfg = decode::decode::<C>(
        cfg_msg,
        RawConfig {
            typed: input.typed_config,
            legacy: input.config,
        },
    )
    .map_err(|e| RuntimeError::failed(component, format!("config: {}", e.join("; "))))?;
    // Input comes from pipeline state: when it arrives as a Struct, keep only the input
    // message's fields, as the host does for typed_input.
    let inp = match (input.typed_input, input.current) {
        (Some(any), _) => decode::decode::<I>(
            in_msg,
            RawConfig {
                typed: Some(any),
                legacy: None,
            },
        ),
        (None, Some(current)) => {
            let desc = decode::message_descriptor(in_msg)
                .map_err(|e| RuntimeError::failed(component, e))?;
            let json = decode::struct_to_json(current)
                .into_iter()
                .filter(|(k, _)| {
                    desc.get_field_by_name(k).is_some() || desc.get_field_by_json_name(k).is_some()
                })
                .collect();
            decode::decode_json::<I>(in_msg, json)
        }
        (None, None) => Ok(I::default()),
    }
    .map_err(|e| RuntimeError::failed(component, format!("input: {}", e.join("; "))))?;
    Ok((cfg, inp))
}

pub(crate) fn pick(config: &str, input: &str) -> String {
    if config.is_empty() { input } else { config }.to_string()
}
