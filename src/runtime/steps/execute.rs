//! What every step's Execute shares: the host's input, the step's output, and the decoding of
//! this execution's config and input messages. A leaf the steps take, under their dispatch.

use crate::config::decode::{self, RawConfig};
use crate::runtime::error::RuntimeError;
use crate::runtime::types::StepKind;

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

/// A value that still holds a host template; it is checked only once resolved at Execute.
pub fn templated(s: &str) -> bool {
    s.contains("{{")
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
