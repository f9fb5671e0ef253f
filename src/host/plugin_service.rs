//! `workflow.plugin.v1.PluginService`: thin conversions between wire messages and `Runtime`.
//! Application failures go into the response `error` field with status OK, as the host expects.

use super::broker::BrokerState;
use super::callback::CallbackLauncher;
use crate::config::decode::RawConfig;
use crate::pb::plugin::{
    plugin_service_server::PluginService, ConfigFragmentResponse, ConfigureCallbackRequest,
    ContractRegistry, CreateModuleRequest, CreateStepRequest, CreateTriggerRequest,
    DeliverMessageRequest, DeliverMessageResponse, ErrorResponse, ExecuteStepRequest,
    ExecuteStepResponse, GetAssetRequest, GetAssetResponse, HandleRequest, HandleResponse,
    InvokeServiceRequest, InvokeServiceResponse, Manifest, ModuleSchemaList, TypeList,
};
use crate::runtime::{render, schema, types, ExecuteInput, Runtime, RuntimeError};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long ConfigureCallback waits for the host's ConnInfo to arrive on the broker stream.
pub const CALLBACK_WAIT: Duration = Duration::from_secs(10);

pub struct PluginSvc {
    pub runtime: Runtime,
    pub broker: BrokerState,
}

fn error(r: Result<(), RuntimeError>) -> Response<ErrorResponse> {
    Response::new(ErrorResponse {
        error: r.err().map(|e| render(&e)).unwrap_or_default(),
    })
}

fn handle(r: Result<String, RuntimeError>) -> Response<HandleResponse> {
    Response::new(match r {
        Ok(handle_id) => HandleResponse {
            handle_id,
            error: String::new(),
        },
        Err(e) => HandleResponse {
            handle_id: String::new(),
            error: render(&e),
        },
    })
}

#[tonic::async_trait]
impl PluginService for PluginSvc {
    async fn get_manifest(&self, _: Request<()>) -> Result<Response<Manifest>, Status> {
        Ok(Response::new(super::manifest::manifest()))
    }

    async fn get_module_types(&self, _: Request<()>) -> Result<Response<TypeList>, Status> {
        Ok(Response::new(TypeList {
            types: types::module_type_names(),
        }))
    }

    async fn get_step_types(&self, _: Request<()>) -> Result<Response<TypeList>, Status> {
        Ok(Response::new(TypeList {
            types: types::step_type_names(),
        }))
    }

    async fn get_trigger_types(&self, _: Request<()>) -> Result<Response<TypeList>, Status> {
        Ok(Response::new(TypeList {
            types: types::trigger_type_names(),
        }))
    }

    async fn get_module_schemas(
        &self,
        _: Request<()>,
    ) -> Result<Response<ModuleSchemaList>, Status> {
        Ok(Response::new(ModuleSchemaList {
            schemas: schema::module_schemas(),
        }))
    }

    async fn get_contract_registry(
        &self,
        _: Request<()>,
    ) -> Result<Response<ContractRegistry>, Status> {
        Ok(Response::new(ContractRegistry {
            contracts: schema::contract_descriptors(),
            file_descriptor_set: schema::descriptor_set(),
        }))
    }

    async fn create_module(
        &self,
        req: Request<CreateModuleRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let r = req.into_inner();
        let raw = RawConfig {
            typed: r.typed_config.as_ref(),
            legacy: r.config.as_ref(),
        };
        Ok(handle(self.runtime.create_module(&r.r#type, &r.name, raw)))
    }

    async fn init_module(
        &self,
        req: Request<HandleRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(error(
            self.runtime.init_module(&req.into_inner().handle_id).await,
        ))
    }

    async fn start_module(
        &self,
        req: Request<HandleRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(error(
            self.runtime.start_module(&req.into_inner().handle_id).await,
        ))
    }

    async fn stop_module(
        &self,
        req: Request<HandleRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(error(
            self.runtime.stop_module(&req.into_inner().handle_id).await,
        ))
    }

    async fn destroy_module(
        &self,
        req: Request<HandleRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(error(
            self.runtime
                .destroy_module(&req.into_inner().handle_id)
                .await,
        ))
    }

    async fn create_step(
        &self,
        req: Request<CreateStepRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let r = req.into_inner();
        let raw = RawConfig {
            typed: r.typed_config.as_ref(),
            legacy: r.config.as_ref(),
        };
        Ok(handle(self.runtime.create_step(&r.r#type, &r.name, raw)))
    }

    async fn execute_step(
        &self,
        req: Request<ExecuteStepRequest>,
    ) -> Result<Response<ExecuteStepResponse>, Status> {
        let r = req.into_inner();
        let input = ExecuteInput {
            typed_config: r.typed_config.as_ref(),
            config: r.config.as_ref(),
            typed_input: r.typed_input.as_ref(),
            current: r.current.as_ref(),
            trigger_data: r.trigger_data.as_ref(),
            step_outputs: Some(&r.step_outputs),
        };
        Ok(Response::new(
            match self.runtime.execute_step(&r.handle_id, input).await {
                Ok(out) => ExecuteStepResponse {
                    typed_output: Some(out.typed),
                    ..Default::default()
                },
                Err(e) => ExecuteStepResponse {
                    error: render(&e),
                    ..Default::default()
                },
            },
        ))
    }

    async fn destroy_step(
        &self,
        req: Request<HandleRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(error(
            self.runtime.destroy_step(&req.into_inner().handle_id),
        ))
    }

    async fn invoke_service(
        &self,
        req: Request<InvokeServiceRequest>,
    ) -> Result<Response<InvokeServiceResponse>, Status> {
        Ok(Response::new(InvokeServiceResponse {
            error: format!(
                "workflow-plugin-eventbus: modules expose no service methods (asked for {:?})",
                req.into_inner().method
            ),
            ..Default::default()
        }))
    }

    async fn deliver_message(
        &self,
        _: Request<DeliverMessageRequest>,
    ) -> Result<Response<DeliverMessageResponse>, Status> {
        Ok(Response::new(DeliverMessageResponse {
            error: "workflow-plugin-eventbus: DeliverMessage is not supported; publish with step.eventbus.publish".into(),
            acknowledged: false,
        }))
    }

    async fn get_config_fragment(
        &self,
        _: Request<()>,
    ) -> Result<Response<ConfigFragmentResponse>, Status> {
        let dir = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        Ok(Response::new(ConfigFragmentResponse {
            yaml_config: Vec::new(),
            plugin_dir: dir,
        }))
    }

    async fn get_asset(
        &self,
        req: Request<GetAssetRequest>,
    ) -> Result<Response<GetAssetResponse>, Status> {
        Ok(Response::new(GetAssetResponse {
            error: format!(
                "workflow-plugin-eventbus ships no assets (asked for {:?})",
                req.into_inner().path
            ),
            ..Default::default()
        }))
    }

    async fn configure_callback(
        &self,
        req: Request<ConfigureCallbackRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        let id = req.into_inner().broker_id;
        let res = async {
            let channel = self.broker.dial(id, CALLBACK_WAIT).await?;
            self.runtime
                .set_launcher(Arc::new(CallbackLauncher::new(channel)));
            Ok::<_, super::broker::BrokerError>(())
        }
        .await;
        Ok(Response::new(ErrorResponse {
            error: res
                .err()
                .map(|e| format!("configure callback: {}", render(&e)))
                .unwrap_or_default(),
        }))
    }

    async fn create_trigger(
        &self,
        req: Request<CreateTriggerRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let r = req.into_inner();
        Ok(handle(self.runtime.create_trigger(
            &r.r#type,
            &r.name,
            r.config.as_ref(),
        )))
    }
}
