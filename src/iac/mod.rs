//! The IaC face: `wfctl infra plan/apply/destroy` provisions brokers, streams and consumers
//! through these services (docs/iac-host.md). Each RPC converts the wire request, calls one
//! `Provider` function and converts back; the work is in `provider`, `drivers/`, `plan` (pure),
//! `state` (the provider's own records) and `targets` (where brokers run).

pub(crate) mod drivers;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod plan;
pub(crate) mod provider;
pub mod render_cmd;
pub(crate) mod scrub;
pub(crate) mod state;
pub mod targets;

use crate::pb::iac::{
    ia_c_provider_drift_detector_server::{
        IaCProviderDriftDetector, IaCProviderDriftDetectorServer,
    },
    ia_c_provider_enumerator_server::{IaCProviderEnumerator, IaCProviderEnumeratorServer},
    ia_c_provider_required_server::{IaCProviderRequired, IaCProviderRequiredServer},
    ia_c_provider_validator_server::{IaCProviderValidator, IaCProviderValidatorServer},
    resource_driver_server::{ResourceDriver, ResourceDriverServer},
    *,
};
use error::DriverError;
use provider::Provider;
use std::sync::{Arc, RwLock};
use tonic::{Request, Response, Status};

/// The IaC services this face serves; the list lives with the other wire names in `pb`, where
/// the contract registry reads it too.
pub use crate::pb::IAC_SERVICES as SERVICES;

/// The services' shared handle: the provider configured by the last Initialize (a default one
/// before that, so no call ever depends on in-memory state from another command).
#[derive(Clone)]
pub struct IacService {
    provider: Arc<RwLock<Arc<Provider>>>,
}

impl Default for IacService {
    fn default() -> Self {
        let p = Provider::from_config(b"").unwrap_or_else(|_| Provider {
            ctx: drivers::Ctx::new(provider::DEFAULT_STATE_DIR.into()),
        });
        IacService {
            provider: Arc::new(RwLock::new(Arc::new(p))),
        }
    }
}

impl IacService {
    fn p(&self) -> Arc<Provider> {
        self.provider
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every IaC service, on the same handle, ready to add to the host's router.
    pub fn add_to(
        self,
        router: tonic::transport::server::Router,
    ) -> tonic::transport::server::Router {
        router
            .add_service(IaCProviderRequiredServer::new(self.clone()))
            .add_service(ResourceDriverServer::new(self.clone()))
            .add_service(IaCProviderDriftDetectorServer::new(self.clone()))
            .add_service(IaCProviderValidatorServer::new(self.clone()))
            .add_service(IaCProviderEnumeratorServer::new(self))
    }
}

type R<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> R<T> {
    Ok(Response::new(t))
}

fn fail<T>(e: DriverError) -> R<T> {
    Err(e.into())
}

fn spec_of(s: Option<ResourceSpec>) -> Result<ResourceSpec, Status> {
    s.ok_or_else(|| Status::invalid_argument("spec is required"))
}

fn ref_of(r: Option<ResourceRef>) -> Result<ResourceRef, Status> {
    r.ok_or_else(|| Status::invalid_argument("ref is required"))
}

#[tonic::async_trait]
impl IaCProviderRequired for IacService {
    async fn initialize(&self, req: Request<InitializeRequest>) -> R<InitializeResponse> {
        let p = Provider::from_config(&req.into_inner().config_json).map_err(Status::from)?;
        tracing::debug!(state_dir = %p.ctx.state.dir().display(), "iac provider initialized");
        *self.provider.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
        ok(InitializeResponse {})
    }

    async fn name(&self, _: Request<NameRequest>) -> R<NameResponse> {
        ok(NameResponse {
            name: provider::NAME.into(),
        })
    }

    async fn version(&self, _: Request<VersionRequest>) -> R<VersionResponse> {
        ok(VersionResponse {
            version: provider::VERSION.into(),
        })
    }

    async fn capabilities(&self, _: Request<CapabilitiesRequest>) -> R<CapabilitiesResponse> {
        ok(CapabilitiesResponse {
            capabilities: Provider::capabilities(),
            canonical_keys: Vec::new(),
            compute_plan_version: "v2".into(),
        })
    }

    async fn plan(&self, req: Request<PlanRequest>) -> R<PlanResponse> {
        let r = req.into_inner();
        match self.p().plan(&r.desired, &r.current) {
            Ok(plan) => ok(PlanResponse { plan: Some(plan) }),
            Err(e) => fail(e),
        }
    }

    async fn destroy(&self, req: Request<DestroyRequest>) -> R<DestroyResponse> {
        let result = self.p().destroy(&req.into_inner().refs).await;
        ok(DestroyResponse {
            result: Some(result),
        })
    }

    async fn status(&self, req: Request<StatusRequest>) -> R<StatusResponse> {
        let statuses = self.p().status(&req.into_inner().refs).await;
        ok(StatusResponse { statuses })
    }

    async fn import(&self, req: Request<ImportRequest>) -> R<ImportResponse> {
        let r = req.into_inner();
        match self.p().import(&r.provider_id, &r.resource_type).await {
            Ok(state) => ok(ImportResponse { state: Some(state) }),
            Err(e) => fail(e),
        }
    }

    /// Abstract sizes mean nothing for an event bus: an empty answer is a no-op for wfctl.
    async fn resolve_sizing(&self, _: Request<ResolveSizingRequest>) -> R<ResolveSizingResponse> {
        ok(ResolveSizingResponse { sizing: None })
    }

    /// This provider manages no state bucket.
    async fn bootstrap_state_backend(
        &self,
        _: Request<BootstrapStateBackendRequest>,
    ) -> R<BootstrapStateBackendResponse> {
        ok(BootstrapStateBackendResponse { result: None })
    }
}

#[tonic::async_trait]
impl ResourceDriver for IacService {
    async fn create(&self, req: Request<ResourceCreateRequest>) -> R<ResourceCreateResponse> {
        let r = req.into_inner();
        let spec = spec_of(r.spec)?;
        match self.p().create(&r.resource_type, &spec).await {
            Ok(o) => ok(ResourceCreateResponse { output: Some(o) }),
            Err(e) => fail(e),
        }
    }

    async fn read(&self, req: Request<ResourceReadRequest>) -> R<ResourceReadResponse> {
        let r = req.into_inner();
        let rf = ref_of(r.r#ref)?;
        match self.p().read(&r.resource_type, &rf).await {
            Ok(o) => ok(ResourceReadResponse { output: Some(o) }),
            Err(e) => fail(e),
        }
    }

    async fn update(&self, req: Request<ResourceUpdateRequest>) -> R<ResourceUpdateResponse> {
        let r = req.into_inner();
        let (rf, spec) = (ref_of(r.r#ref)?, spec_of(r.spec)?);
        match self.p().update(&r.resource_type, &rf, &spec).await {
            Ok(o) => ok(ResourceUpdateResponse { output: Some(o) }),
            Err(e) => fail(e),
        }
    }

    async fn delete(&self, req: Request<ResourceDeleteRequest>) -> R<ResourceDeleteResponse> {
        let r = req.into_inner();
        let rf = ref_of(r.r#ref)?;
        match self.p().delete(&r.resource_type, &rf).await {
            Ok(()) => ok(ResourceDeleteResponse {}),
            Err(e) => fail(e),
        }
    }

    async fn diff(&self, req: Request<ResourceDiffRequest>) -> R<ResourceDiffResponse> {
        let r = req.into_inner();
        let desired = r
            .desired
            .ok_or_else(|| Status::invalid_argument("desired is required"))?;
        let current = r.current.map(|c| c.outputs_json).unwrap_or_default();
        match self.p().diff(&r.resource_type, &desired, &current).await {
            Ok(changes) => ok(ResourceDiffResponse {
                result: Some(plan::to_result(&changes)),
            }),
            Err(e) => fail(e),
        }
    }

    async fn scale(&self, req: Request<ResourceScaleRequest>) -> R<ResourceScaleResponse> {
        let r = req.into_inner();
        let rf = ref_of(r.r#ref)?;
        match self.p().scale(&r.resource_type, &rf, r.replicas).await {
            Ok(o) => ok(ResourceScaleResponse { output: Some(o) }),
            Err(e) => fail(e),
        }
    }

    async fn health_check(
        &self,
        req: Request<ResourceHealthCheckRequest>,
    ) -> R<ResourceHealthCheckResponse> {
        let r = req.into_inner();
        let rf = ref_of(r.r#ref)?;
        match self.p().health(&r.resource_type, &rf).await {
            Ok((healthy, message)) => ok(ResourceHealthCheckResponse {
                result: Some(HealthResult { healthy, message }),
            }),
            Err(e) => fail(e),
        }
    }

    async fn sensitive_keys(&self, req: Request<SensitiveKeysRequest>) -> R<SensitiveKeysResponse> {
        match Provider::sensitive_keys(&req.into_inner().resource_type) {
            Ok(keys) => ok(SensitiveKeysResponse { keys }),
            Err(e) => fail(e),
        }
    }

    async fn troubleshoot(&self, req: Request<TroubleshootRequest>) -> R<TroubleshootResponse> {
        let r = req.into_inner();
        let rf = ref_of(r.r#ref)?;
        match self.p().troubleshoot(&r.resource_type, &rf) {
            Ok(d) => ok(TroubleshootResponse {
                diagnostics: d
                    .into_iter()
                    .map(|(id, detail)| Diagnostic {
                        id,
                        phase: "nats-server log".into(),
                        cause: r.failure_msg.clone(),
                        at: None,
                        detail,
                    })
                    .collect(),
            }),
            Err(e) => fail(e),
        }
    }
}

#[tonic::async_trait]
impl IaCProviderDriftDetector for IacService {
    async fn detect_drift(&self, req: Request<DetectDriftRequest>) -> R<DetectDriftResponse> {
        match self
            .p()
            .drift(&req.into_inner().refs, &Default::default())
            .await
        {
            Ok(drifts) => ok(DetectDriftResponse { drifts }),
            Err(e) => fail(e),
        }
    }

    async fn detect_drift_with_specs(
        &self,
        req: Request<DetectDriftWithSpecsRequest>,
    ) -> R<DetectDriftWithSpecsResponse> {
        let r = req.into_inner();
        let specs = r.specs.into_iter().collect();
        match self.p().drift(&r.refs, &specs).await {
            Ok(drifts) => ok(DetectDriftWithSpecsResponse { drifts }),
            Err(e) => fail(e),
        }
    }
}

#[tonic::async_trait]
impl IaCProviderValidator for IacService {
    async fn validate_plan(&self, req: Request<ValidatePlanRequest>) -> R<ValidatePlanResponse> {
        let diagnostics = match req.into_inner().plan {
            Some(plan) => self.p().validate_plan(&plan),
            None => Vec::new(),
        };
        ok(ValidatePlanResponse { diagnostics })
    }
}

#[tonic::async_trait]
impl IaCProviderEnumerator for IacService {
    async fn enumerate_all(&self, req: Request<EnumerateAllRequest>) -> R<EnumerateAllResponse> {
        match self.p().enumerate(&req.into_inner().resource_type).await {
            Ok(outputs) => ok(EnumerateAllResponse { outputs }),
            Err(e) => fail(e),
        }
    }

    /// Nothing this provider creates carries tags, so no resource matches one.
    async fn enumerate_by_tag(
        &self,
        _: Request<EnumerateByTagRequest>,
    ) -> R<EnumerateByTagResponse> {
        ok(EnumerateByTagResponse { refs: Vec::new() })
    }
}
