//! The door from a trigger to the host: the engine callback that fires a pipeline, implemented
//! by the host layer so the runtime never sees gRPC.

use futures::future::BoxFuture;

/// Fires a pipeline in the host (EngineCallbackService.TriggerWorkflow); implemented by the
/// host layer so the runtime never sees gRPC.
pub trait Launcher: Send + Sync {
    fn launch(&self, call: TriggerCall) -> BoxFuture<'static, Result<(), String>>;

    /// The largest encoded call the host accepts, if it has a limit: a message whose call
    /// would exceed it can never reach a pipeline.
    fn max_call_bytes(&self) -> Option<usize> {
        None
    }
}

pub struct TriggerCall {
    pub trigger_type: String,
    pub action: String,
    pub data: prost_types::Struct,
}
