//! The host's EngineCallbackService, reached through the broker, as the runtime's `Launcher`.

use crate::pb::plugin::{
    engine_callback_service_client::EngineCallbackServiceClient, TriggerWorkflowRequest,
};
use crate::runtime::{Launcher, TriggerCall};
use futures::future::BoxFuture;
use tonic::transport::Channel;

/// The host's callback server keeps grpc-go's default 4 MiB inbound limit.
pub const HOST_CALLBACK_LIMIT: usize = 4 * 1024 * 1024;

pub struct CallbackLauncher {
    client: EngineCallbackServiceClient<Channel>,
}

impl CallbackLauncher {
    pub fn new(channel: Channel) -> Self {
        CallbackLauncher {
            client: EngineCallbackServiceClient::new(channel)
                .max_encoding_message_size(HOST_CALLBACK_LIMIT)
                .max_decoding_message_size(HOST_CALLBACK_LIMIT),
        }
    }
}

impl Launcher for CallbackLauncher {
    fn max_call_bytes(&self) -> Option<usize> {
        Some(HOST_CALLBACK_LIMIT)
    }

    fn launch(&self, call: TriggerCall) -> BoxFuture<'static, Result<(), String>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let req = TriggerWorkflowRequest {
                trigger_type: call.trigger_type,
                action: call.action,
                data: Some(call.data),
                typed_data: None,
            };
            match client.trigger_workflow(req).await {
                Ok(r) if r.get_ref().error.is_empty() => Ok(()),
                Ok(r) => Err(r.into_inner().error),
                Err(status) => Err(format!("trigger workflow: {}", status.message())),
            }
        })
    }
}
