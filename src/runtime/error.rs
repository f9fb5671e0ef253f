//! The runtime face's error: what a module, step or trigger reports back to the host.

use super::provider::ProviderError;
use crate::config::error::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("unknown {kind} handle: {id}")]
    UnknownHandle { kind: &'static str, id: String },
    #[error("workflow-plugin-eventbus: unknown {kind} type {} (known: {known})", crate::secret::quote(.type_name))]
    UnknownType {
        kind: &'static str,
        type_name: String,
        known: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{component}: {message}")]
    Failed { component: String, message: String },
    /// The broker failed the operation (its provider's error as the source).
    #[error("{component}")]
    Broker {
        component: String,
        #[source]
        source: ProviderError,
    },
}

impl RuntimeError {
    pub fn failed(component: impl Into<String>, message: impl Into<String>) -> Self {
        RuntimeError::Failed {
            component: component.into(),
            message: message.into(),
        }
    }
    pub fn broker(component: impl Into<String>, source: impl Into<ProviderError>) -> Self {
        RuntimeError::Broker {
            component: component.into(),
            source: source.into(),
        }
    }
}
