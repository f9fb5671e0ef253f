//! The provider's domain operations: one function per RPC, routed by resource kind, over the
//! drivers, the pure plan and the provider's state. The gRPC services in `mod.rs` only convert.

use super::drivers::{
    self, broker, consumer, stream, BrokerDriver, ConsumerDriver, Ctx, Driver, Kind, Output,
    StreamDriver,
};
use super::error::DriverError;
use super::plan::{self, Change};
use super::state::ProviderState;
use crate::pb::iac::{
    ActionError, DestroyResult, DriftClass, DriftResult, IaCCapabilityDeclaration, IaCPlan,
    PlanDiagnostic, PlanDiagnosticSeverity, ResourceOutput, ResourceRef, ResourceSpec,
    ResourceState, ResourceStatus,
};
use crate::runtime::modules::consumer::ConsumerSpec;
use crate::runtime::modules::stream::StreamSpec;
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

pub const NAME: &str = "eventbus";
/// Part of wfctl's on-disk Diff cache key: bump the suffix whenever Diff semantics change.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+diff.1");
pub const DEFAULT_STATE_DIR: &str = ".eventbus-iac";
/// Keys of the `iac.provider` module config; `provider` routes, `plugin`/`service` are the
/// engine's.
const CONFIG_KEYS: &[&str] = &["provider", "state_dir", "plugin", "service"];

pub struct Provider {
    pub ctx: Ctx,
}

/// A decoded, validated desired config.
pub enum Desired {
    Broker(Box<broker::BrokerDesired>),
    Stream(StreamSpec),
    Consumer(ConsumerSpec),
}

impl Desired {
    pub fn decode(kind: Kind, name: &str, config_json: &[u8]) -> Result<Desired, DriverError> {
        Ok(match kind {
            Kind::Broker => Desired::Broker(Box::new(BrokerDriver::decode(name, config_json)?)),
            Kind::Stream => Desired::Stream(StreamDriver::decode(name, config_json)?),
            Kind::Consumer => Desired::Consumer(ConsumerDriver::decode(name, config_json)?),
        })
    }
}

fn outputs_of(bytes: &[u8]) -> Json {
    match serde_json::from_slice::<Json>(bytes) {
        Ok(v @ Json::Object(_)) => v,
        _ => json!({}),
    }
}

fn wire(name: &str, type_name: &str, o: Output) -> ResourceOutput {
    ResourceOutput {
        name: name.to_string(),
        r#type: type_name.to_string(),
        provider_id: o.provider_id,
        outputs_json: serde_json::to_vec(&o.outputs).unwrap_or_else(|_| b"{}".to_vec()),
        sensitive: o.sensitive.into_iter().map(|k| (k, true)).collect(),
        status: o.status,
    }
}

impl Provider {
    /// From the `iac.provider` module's config; empty or null config is fine (orphan destroy).
    pub fn from_config(config_json: &[u8]) -> Result<Provider, DriverError> {
        let what = "iac.provider config (provider: eventbus)";
        let cfg = drivers::config_object(what, config_json)?;
        let mut state_dir = None;
        for (k, v) in &cfg {
            if k.starts_with('_') || ["provider", "plugin", "service"].contains(&k.as_str()) {
                continue;
            }
            if k == "state_dir" {
                match v {
                    Json::String(s) if !s.trim().is_empty() => {
                        state_dir = Some(PathBuf::from(s.trim()))
                    }
                    Json::String(_) | Json::Null => {}
                    _ => {
                        return Err(DriverError::invalid(
                            what,
                            "state_dir must be a path string",
                        ))
                    }
                }
                continue;
            }
            return Err(DriverError::invalid(
                what,
                format!("unknown key {k:?} (valid keys: {})", CONFIG_KEYS.join(", ")),
            ));
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let dir = match state_dir {
            Some(p) if p.is_absolute() => p,
            Some(p) => cwd.join(p),
            None => cwd.join(DEFAULT_STATE_DIR),
        };
        Ok(Provider { ctx: Ctx::new(dir) })
    }

    pub fn capabilities() -> Vec<IaCCapabilityDeclaration> {
        let ops = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        vec![
            IaCCapabilityDeclaration {
                resource_type: drivers::BROKER_TYPE.into(),
                tier: 1,
                operations: ops(&["create", "read", "update", "delete"]),
            },
            IaCCapabilityDeclaration {
                resource_type: drivers::STREAM_TYPE.into(),
                tier: 2,
                operations: ops(&["create", "read", "update", "delete", "scale"]),
            },
            IaCCapabilityDeclaration {
                resource_type: drivers::CONSUMER_TYPE.into(),
                tier: 2,
                operations: ops(&["create", "read", "update", "delete"]),
            },
        ]
    }

    // ---------------------------------------------------------------- ResourceDriver

    async fn apply(
        &self,
        spec: &ResourceSpec,
        type_name: &str,
    ) -> Result<ResourceOutput, DriverError> {
        let type_name = if type_name.is_empty() {
            &spec.r#type
        } else {
            type_name
        };
        async fn one<D: Driver>(
            ctx: &Ctx,
            spec: &ResourceSpec,
        ) -> Result<ResourceOutput, DriverError> {
            let desired = D::decode(&spec.name, &spec.config_json)?;
            let out = D::apply(ctx, &spec.name, &desired).await?;
            Ok(wire(&spec.name, D::KIND.type_name(), out))
        }
        match Kind::parse(type_name)? {
            Kind::Broker => one::<BrokerDriver>(&self.ctx, spec).await,
            Kind::Stream => one::<StreamDriver>(&self.ctx, spec).await,
            Kind::Consumer => one::<ConsumerDriver>(&self.ctx, spec).await,
        }
    }

    /// Create is create-or-adopt (wfctl cannot recognise "already exists" over gRPC).
    pub async fn create(
        &self,
        type_name: &str,
        spec: &ResourceSpec,
    ) -> Result<ResourceOutput, DriverError> {
        self.apply(spec, type_name).await
    }

    /// Update applies in place; a resource deleted behind our back is created again.
    pub async fn update(
        &self,
        type_name: &str,
        _r: &ResourceRef,
        spec: &ResourceSpec,
    ) -> Result<ResourceOutput, DriverError> {
        self.apply(spec, type_name).await
    }

    pub async fn read(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<ResourceOutput, DriverError> {
        let kind = Kind::parse(if type_name.is_empty() {
            &r.r#type
        } else {
            type_name
        })?;
        let out = match kind {
            Kind::Broker => BrokerDriver::read(&self.ctx, r).await?,
            Kind::Stream => StreamDriver::read(&self.ctx, r).await?,
            Kind::Consumer => ConsumerDriver::read(&self.ctx, r).await?,
        };
        Ok(wire(&r.name, kind.type_name(), out))
    }

    pub async fn delete(&self, type_name: &str, r: &ResourceRef) -> Result<(), DriverError> {
        match Kind::parse(if type_name.is_empty() {
            &r.r#type
        } else {
            type_name
        })? {
            Kind::Broker => BrokerDriver::delete(&self.ctx, r).await,
            Kind::Stream => StreamDriver::delete(&self.ctx, r).await,
            Kind::Consumer => ConsumerDriver::delete(&self.ctx, r).await,
        }
    }

    /// Pure apart from reading the provider state (to resolve a stream's broker).
    pub fn diff(
        &self,
        type_name: &str,
        desired: &ResourceSpec,
        current_outputs: &[u8],
    ) -> Result<Vec<Change>, DriverError> {
        let state = self.ctx.state.load()?;
        diff_with(&state, type_name, desired, &outputs_of(current_outputs))
    }

    pub async fn scale(
        &self,
        type_name: &str,
        r: &ResourceRef,
        replicas: i32,
    ) -> Result<ResourceOutput, DriverError> {
        match Kind::parse(type_name)? {
            Kind::Stream => Ok(wire(&r.name, type_name, stream::scale(&self.ctx, r, replicas).await?)),
            Kind::Broker => Err(DriverError::Unsupported(
                "Scale of infra.eventbus (replicas of a local broker change by replace; set replicas and apply)".into(),
            )),
            Kind::Consumer => Err(DriverError::Unsupported("Scale of infra.eventbus.consumer".into())),
        }
    }

    pub async fn health(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<(bool, String), DriverError> {
        match Kind::parse(type_name)? {
            Kind::Broker => BrokerDriver::health(&self.ctx, r).await,
            Kind::Stream => StreamDriver::health(&self.ctx, r).await,
            Kind::Consumer => ConsumerDriver::health(&self.ctx, r).await,
        }
    }

    pub fn sensitive_keys(type_name: &str) -> Result<Vec<String>, DriverError> {
        Ok(match Kind::parse(type_name)? {
            Kind::Broker => vec!["token".into(), "password".into()],
            _ => Vec::new(),
        })
    }

    pub fn troubleshoot(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError> {
        match Kind::parse(type_name)? {
            Kind::Broker => broker::troubleshoot(&self.ctx, r),
            _ => Err(DriverError::Unsupported(format!(
                "Troubleshoot of {type_name}"
            ))),
        }
    }

    // ---------------------------------------------------------------- IaCProviderRequired

    /// Deletes in dependency order (consumers, streams, brokers); already gone is success. The
    /// streams and consumers of a local broker that is itself being destroyed and no longer
    /// runs go with its store.
    pub async fn destroy(&self, refs: &[ResourceRef]) -> DestroyResult {
        let mut result = DestroyResult::default();
        let mut ordered: Vec<(Kind, &ResourceRef)> = Vec::new();
        for r in refs {
            match Kind::parse(&r.r#type) {
                Ok(k) => ordered.push((k, r)),
                Err(e) => result.errors.push(ActionError {
                    resource: r.name.clone(),
                    action: "delete".into(),
                    error: crate::runtime::render(&e),
                }),
            }
        }
        ordered.sort_by_key(|(k, _)| Kind::DELETE_ORDER.iter().position(|o| o == k));
        let down = self.local_brokers_down(
            refs.iter()
                .filter(|r| r.r#type == drivers::BROKER_TYPE)
                .map(|r| r.name.clone())
                .collect(),
        );
        for (kind, r) in ordered {
            let res = if kind != Kind::Broker && self.on_broker(r, &down) {
                self.ctx
                    .state
                    .update(|s| {
                        s.resources.remove(&r.name);
                    })
                    .map(|_| ())
            } else {
                self.delete(kind.type_name(), r).await
            };
            match res {
                Ok(()) => result.destroyed.push(r.name.clone()),
                Err(e) => result.errors.push(ActionError {
                    resource: r.name.clone(),
                    action: "delete".into(),
                    error: crate::runtime::render(&e),
                }),
            }
        }
        result
    }

    /// Local brokers (among `names`, or all when empty) none of whose processes answer.
    fn local_brokers_down(&self, names: BTreeSet<String>) -> BTreeSet<String> {
        let Ok(state) = self.ctx.state.load() else {
            return BTreeSet::new();
        };
        state
            .brokers
            .iter()
            .filter(|(n, _)| names.is_empty() || names.contains(*n))
            .filter(|(n, r)| super::drivers::all_down(n, r))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn on_broker(&self, r: &ResourceRef, brokers: &BTreeSet<String>) -> bool {
        if brokers.is_empty() {
            return false;
        }
        let Ok(state) = self.ctx.state.load() else {
            return false;
        };
        stream::locate(&state, r, &r.r#type)
            .is_some_and(|l| l.servers.is_empty() && brokers.contains(&l.broker))
    }

    /// One status per ref (all recorded resources when `refs` is empty); failures are
    /// `unknown`, never an RPC error.
    pub async fn status(&self, refs: &[ResourceRef]) -> Vec<ResourceStatus> {
        let refs: Vec<ResourceRef> = if refs.is_empty() {
            self.recorded_refs()
        } else {
            refs.to_vec()
        };
        let mut out = Vec::with_capacity(refs.len());
        for r in &refs {
            let st = match self.read(&r.r#type, r).await {
                Ok(o) => ResourceStatus {
                    name: r.name.clone(),
                    r#type: r.r#type.clone(),
                    provider_id: o.provider_id,
                    status: o.status,
                    outputs_json: o.outputs_json,
                },
                Err(e) => {
                    let stopped = e.is_not_found()
                        && r.r#type == drivers::BROKER_TYPE
                        && self
                            .ctx
                            .state
                            .load()
                            .is_ok_and(|s| s.brokers.contains_key(&r.name));
                    ResourceStatus {
                        name: r.name.clone(),
                        r#type: r.r#type.clone(),
                        provider_id: r.provider_id.clone(),
                        status: if stopped { "stopped" } else { "unknown" }.into(),
                        outputs_json: serde_json::to_vec(
                            &json!({"error": crate::runtime::render(&e)}),
                        )
                        .unwrap_or_default(),
                    }
                }
            };
            out.push(st);
        }
        out
    }

    fn recorded_refs(&self) -> Vec<ResourceRef> {
        let Ok(state) = self.ctx.state.load() else {
            return Vec::new();
        };
        let mut v: Vec<ResourceRef> = state
            .brokers
            .keys()
            .map(|n| ResourceRef {
                name: n.clone(),
                r#type: drivers::BROKER_TYPE.into(),
                provider_id: n.clone(),
            })
            .collect();
        v.extend(state.resources.iter().map(|(n, r)| ResourceRef {
            name: n.clone(),
            r#type: r.type_name.clone(),
            provider_id: r.provider_id.clone(),
        }));
        v
    }

    pub async fn import(
        &self,
        provider_id: &str,
        type_name: &str,
    ) -> Result<ResourceState, DriverError> {
        let kind = Kind::parse(type_name)?;
        let name = match kind {
            Kind::Broker => provider_id.to_string(),
            _ => String::new(),
        };
        let r = ResourceRef {
            name,
            r#type: type_name.into(),
            provider_id: provider_id.into(),
        };
        let o = self.read(type_name, &r).await?;
        let mut applied = outputs_of(&o.outputs_json);
        if let Some(m) = applied.as_object_mut() {
            for k in [
                "broker",
                "url",
                "urls",
                "nodes",
                "server_version",
                "data_dir",
                "binary",
                "cluster_name",
                "token",
                "password",
            ] {
                m.remove(k);
            }
        }
        Ok(ResourceState {
            id: provider_id.into(),
            name: r.name.clone(),
            r#type: type_name.into(),
            provider: NAME.into(),
            provider_id: o.provider_id,
            applied_config_json: serde_json::to_vec(&applied).unwrap_or_default(),
            applied_config_source: "adoption".into(),
            outputs_json: o.outputs_json,
            ..Default::default()
        })
    }

    /// The host's own algorithm, for engine steps that call Plan (wfctl computes its own).
    pub fn plan(
        &self,
        desired: &[ResourceSpec],
        current: &[ResourceState],
    ) -> Result<IaCPlan, DriverError> {
        let state = self.ctx.state.load()?;
        plan::compute_plan(desired, current, |spec, st| {
            diff_with(&state, &spec.r#type, spec, &outputs_of(&st.outputs_json))
        })
    }

    // ---------------------------------------------------------------- drift

    /// GHOST when gone, CONFIG with the differing fields, IN_SYNC otherwise. A broker that
    /// cannot be reached is an error (never GHOST); the streams and consumers of a local broker
    /// that is down are UNKNOWN (the broker itself is GHOST, and apply restarts it).
    pub async fn drift(
        &self,
        refs: &[ResourceRef],
        specs: &HashMap<String, ResourceSpec>,
    ) -> Result<Vec<DriftResult>, DriverError> {
        let state = self.ctx.state.load()?;
        let down = self.local_brokers_down(BTreeSet::new());
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let Ok(kind) = Kind::parse(&r.r#type) else {
                continue;
            };
            let base = DriftResult {
                name: r.name.clone(),
                r#type: r.r#type.clone(),
                ..Default::default()
            };
            if kind != Kind::Broker && self.on_broker(r, &down) {
                out.push(DriftResult {
                    class: DriftClass::Unknown as i32,
                    ..base
                });
                continue;
            }
            let live = match self.read(&r.r#type, r).await {
                Ok(o) => outputs_of(&o.outputs_json),
                Err(e) if e.is_not_found() => {
                    out.push(DriftResult {
                        drifted: true,
                        class: DriftClass::Ghost as i32,
                        ..base
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (fields, expected) = match specs.get(&r.name) {
                Some(spec) => {
                    let changes = diff_with(&state, &r.r#type, spec, &live)?;
                    let expected: serde_json::Map<String, Json> = changes
                        .iter()
                        .map(|c| (c.path.clone(), c.new.clone()))
                        .collect();
                    (
                        changes.into_iter().map(|c| c.path).collect::<Vec<_>>(),
                        Json::Object(expected),
                    )
                }
                None => {
                    let recorded = recorded_outputs(&state, kind, &r.name);
                    let keys = drift_keys(kind);
                    let fields: Vec<String> = keys
                        .iter()
                        .filter(|k| {
                            !recorded.is_null()
                                && normalise(&recorded[**k]) != normalise(&live[**k])
                        })
                        .map(|k| k.to_string())
                        .collect();
                    let expected: serde_json::Map<String, Json> = fields
                        .iter()
                        .map(|k| (k.clone(), recorded[k.as_str()].clone()))
                        .collect();
                    (fields, Json::Object(expected))
                }
            };
            if fields.is_empty() {
                out.push(DriftResult {
                    class: DriftClass::InSync as i32,
                    ..base
                });
            } else {
                let actual: serde_json::Map<String, Json> = fields
                    .iter()
                    .map(|k| (k.clone(), live[k.as_str()].clone()))
                    .collect();
                out.push(DriftResult {
                    drifted: true,
                    class: DriftClass::Config as i32,
                    expected_json: serde_json::to_vec(&expected).unwrap_or_default(),
                    actual_json: serde_json::to_vec(&actual).unwrap_or_default(),
                    fields,
                    ..base
                });
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- validator

    /// Plan-level checks, read-only, no network: every stream/consumer's broker is in the plan
    /// or in the provider state, replicas fit the broker, names and configs are valid.
    pub fn validate_plan(&self, plan: &IaCPlan) -> Vec<PlanDiagnostic> {
        let state = self.ctx.state.load().unwrap_or_default();
        validate_with(&state, plan)
    }

    // ---------------------------------------------------------------- enumerator

    pub async fn enumerate(&self, type_name: &str) -> Result<Vec<ResourceOutput>, DriverError> {
        let kind = Kind::parse(type_name)?;
        let state = self.ctx.state.load()?;
        let mut out = Vec::new();
        match kind {
            Kind::Broker => {
                for name in state.brokers.keys() {
                    let r = ResourceRef {
                        name: name.clone(),
                        r#type: type_name.into(),
                        provider_id: name.clone(),
                    };
                    match self.read(type_name, &r).await {
                        Ok(o) => out.push(o),
                        Err(e) => {
                            tracing::warn!(broker = %name, error = %crate::runtime::render(&e), "enumerate: skipped")
                        }
                    }
                }
            }
            Kind::Stream => {
                for name in state.brokers.keys() {
                    match stream::list(&self.ctx, name).await {
                        Ok(list) => out.extend(list.into_iter().map(|(pid, cfg)| {
                            let flags = stream::Flags {
                                broker: name.clone(),
                                broker_ref: name.clone(),
                                ..Default::default()
                            };
                            wire(
                                &cfg.name.clone(),
                                type_name,
                                Output {
                                    provider_id: pid,
                                    outputs: stream::to_outputs(&cfg, &flags),
                                    sensitive: Vec::new(),
                                    status: "running".into(),
                                },
                            )
                        })),
                        Err(e) => {
                            tracing::warn!(broker = %name, error = %crate::runtime::render(&e), "enumerate: skipped")
                        }
                    }
                }
            }
            Kind::Consumer => {
                for name in state.brokers.keys() {
                    match consumer::list(&self.ctx, name).await {
                        Ok(list) => out.extend(list.into_iter().map(|(pid, stream_name, cfg)| {
                            let flags = stream::Flags {
                                broker: name.clone(),
                                broker_ref: name.clone(),
                                ..Default::default()
                            };
                            let outputs = consumer::to_outputs(&cfg, &stream_name, &flags);
                            let durable = drivers::str_field(&outputs, "name").to_string();
                            wire(
                                &durable,
                                type_name,
                                Output {
                                    provider_id: pid,
                                    outputs,
                                    sensitive: Vec::new(),
                                    status: "running".into(),
                                },
                            )
                        })),
                        Err(e) => {
                            tracing::warn!(broker = %name, error = %crate::runtime::render(&e), "enumerate: skipped")
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

fn recorded_outputs(state: &ProviderState, kind: Kind, name: &str) -> Json {
    match kind {
        Kind::Broker => state.brokers.get(name).map(|r| r.outputs.clone()),
        _ => state.resources.get(name).map(|r| r.outputs.clone()),
    }
    .filter(Json::is_object)
    .unwrap_or(Json::Null)
}

/// The server-side settings drift compares without a spec.
fn drift_keys(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Broker => &["url"],
        Kind::Stream => &[
            "subjects",
            "retention_policy",
            "storage",
            "num_replicas",
            "max_bytes",
            "max_msgs",
            "max_msgs_per_subject",
            "max_msg_size",
            "max_age",
            "discard",
            "duplicate_window",
            "description",
        ],
        Kind::Consumer => &[
            "filter_subjects",
            "deliver_policy",
            "ack_policy",
            "max_deliver",
            "ack_wait",
            "max_ack_pending",
            "backoff",
            "description",
        ],
    }
}

/// Lists compare as sets.
fn normalise(v: &Json) -> Json {
    match v {
        Json::Array(a) => {
            let mut items: Vec<String> = a.iter().map(|x| x.to_string()).collect();
            items.sort();
            json!(items)
        }
        other => other.clone(),
    }
}

/// The diff of one resource against outputs, with the broker resolved from `state`.
pub fn diff_with(
    state: &ProviderState,
    type_name: &str,
    desired: &ResourceSpec,
    current: &Json,
) -> Result<Vec<Change>, DriverError> {
    let type_name = if type_name.is_empty() {
        &desired.r#type
    } else {
        type_name
    };
    fn one<D: Driver>(
        state: &ProviderState,
        desired: &ResourceSpec,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        D::diff(
            &D::decode(&desired.name, &desired.config_json)?,
            state,
            current,
        )
    }
    match Kind::parse(type_name)? {
        Kind::Broker => one::<BrokerDriver>(state, desired, current),
        Kind::Stream => one::<StreamDriver>(state, desired, current),
        Kind::Consumer => one::<ConsumerDriver>(state, desired, current),
    }
}

fn diag(
    severity: PlanDiagnosticSeverity,
    resource: &str,
    field: &str,
    message: String,
) -> PlanDiagnostic {
    PlanDiagnostic {
        severity: severity as i32,
        resource: resource.into(),
        field: field.into(),
        message,
    }
}

/// See `Provider::validate_plan`.
pub fn validate_with(state: &ProviderState, plan: &IaCPlan) -> Vec<PlanDiagnostic> {
    use PlanDiagnosticSeverity::{PlanDiagnosticError as Error, PlanDiagnosticWarning as Warning};
    let mut out = Vec::new();
    // Brokers (name -> replicas; 0 = unknown) and stream names the plan will hold.
    let mut brokers: BTreeMap<String, u32> = state
        .brokers
        .iter()
        .map(|(n, r)| (n.clone(), r.replicas))
        .collect();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut streams: BTreeSet<String> = state
        .resources
        .values()
        .filter(|r| r.type_name == drivers::STREAM_TYPE)
        .map(|r| r.stream.clone())
        .collect();
    let mut decoded: Vec<(String, Desired)> = Vec::new();
    for a in &plan.actions {
        let Some(spec) = &a.resource else { continue };
        let Ok(kind) = Kind::parse(&spec.r#type) else {
            continue; // another provider's resource
        };
        if a.action == "delete" {
            deleted.insert(spec.name.clone());
            continue;
        }
        match Desired::decode(kind, &spec.name, &spec.config_json) {
            Ok(d) => {
                match &d {
                    Desired::Broker(b) => {
                        let replicas = match broker::check_target(b) {
                            Ok(t) => t.replicas(b),
                            Err(e) => {
                                out.push(diag(Error, &spec.name, "deploy_target", e.to_string()));
                                b.declared_replicas
                            }
                        };
                        brokers.insert(spec.name.clone(), replicas);
                    }
                    Desired::Stream(s) => {
                        streams.insert(s.name.clone());
                    }
                    Desired::Consumer(_) => {}
                }
                decoded.push((spec.name.clone(), d));
            }
            Err(e) => {
                let text = String::from_utf8_lossy(&spec.config_json);
                let severity = if text.contains("${") { Warning } else { Error };
                let lines: Vec<String> = match &e {
                    DriverError::Config(c) => c.problems.clone(),
                    other => vec![other.to_string()],
                };
                for line in lines {
                    let field = line
                        .strip_prefix("config.")
                        .and_then(|l| l.split(':').next())
                        .unwrap_or_default()
                        .to_string();
                    out.push(diag(severity, &spec.name, &field, line));
                }
            }
        }
    }
    for b in &deleted {
        brokers.remove(b);
    }
    for (name, d) in &decoded {
        let (broker_ref, servers, replicas, stream_name) = match d {
            Desired::Broker(_) => continue,
            Desired::Stream(s) => (&s.broker_ref, &s.servers, Some(s.replicas as u32), None),
            Desired::Consumer(c) => (&c.broker_ref, &c.servers, None, Some(&c.stream)),
        };
        let explicit = servers.iter().any(|s| !s.trim().is_empty());
        let broker = if !broker_ref.is_empty() {
            if !brokers.contains_key(broker_ref.as_str()) && !explicit {
                out.push(diag(
                    Error,
                    name,
                    "broker_ref",
                    format!(
                        "broker {broker_ref:?} is neither an infra.eventbus resource in this plan nor a broker this provider created or adopted"
                    ),
                ));
            }
            Some(broker_ref.clone())
        } else if explicit {
            None
        } else if brokers.len() == 1 {
            brokers.keys().next().cloned()
        } else {
            out.push(diag(
                Error,
                name,
                "broker_ref",
                if brokers.is_empty() {
                    "no broker: set broker_ref (an infra.eventbus resource) or servers".into()
                } else {
                    format!(
                        "broker_ref is required: several brokers exist ({})",
                        brokers.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                },
            ));
            None
        };
        if let (Some(r), Some(b)) = (replicas, broker.as_ref().and_then(|b| brokers.get(b))) {
            if *b > 0 && r > *b {
                out.push(diag(
                    Error,
                    name,
                    "num_replicas",
                    format!(
                        "{r} replicas, but broker {:?} has {b} server(s); JetStream needs at least as many servers as replicas",
                        broker.clone().unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(s) = stream_name {
            if !streams.contains(s.as_str()) {
                out.push(diag(
                    Warning,
                    name,
                    "stream_name",
                    format!("stream {s:?} is not in this plan or in the provider state; it must already exist on the broker"),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::iac::PlanAction;

    fn action(kind: &str, name: &str, type_name: &str, config: Json) -> PlanAction {
        PlanAction {
            action: kind.into(),
            resource: Some(ResourceSpec {
                name: name.into(),
                r#type: type_name.into(),
                config_json: serde_json::to_vec(&config).unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn validator_flags_unknown_brokers_replicas_and_names() {
        let plan = IaCPlan {
            actions: vec![
                action(
                    "create",
                    "bus",
                    drivers::BROKER_TYPE,
                    json!({"provider": "nats", "deploy_target": "local", "replicas": 1}),
                ),
                action(
                    "create",
                    "s1",
                    drivers::STREAM_TYPE,
                    json!({"name": "S1", "subjects": ["a.>"], "broker_ref": "bus", "num_replicas": 3}),
                ),
                action(
                    "create",
                    "s2",
                    drivers::STREAM_TYPE,
                    json!({"name": "S2", "subjects": ["b.>"], "broker_ref": "nope"}),
                ),
                action(
                    "create",
                    "s3",
                    drivers::STREAM_TYPE,
                    json!({"name": "bad.name", "subjects": ["c.>"], "broker_ref": "bus"}),
                ),
                action(
                    "create",
                    "c1",
                    drivers::CONSUMER_TYPE,
                    json!({"name": "w", "stream_name": "MISSING", "broker_ref": "bus"}),
                ),
                action(
                    "create",
                    "k8s",
                    drivers::BROKER_TYPE,
                    json!({"provider": "nats", "deploy_target": "kubernetes"}),
                ),
                action("create", "db", "infra.database", json!({"whatever": 1})),
            ],
            ..Default::default()
        };
        let d = validate_with(&ProviderState::default(), &plan);
        let has = |res: &str, field: &str, sev: PlanDiagnosticSeverity| {
            d.iter()
                .any(|x| x.resource == res && x.field == field && x.severity == sev as i32)
        };
        assert!(
            has(
                "s1",
                "num_replicas",
                PlanDiagnosticSeverity::PlanDiagnosticError
            ),
            "{d:?}"
        );
        assert!(
            has(
                "s2",
                "broker_ref",
                PlanDiagnosticSeverity::PlanDiagnosticError
            ),
            "{d:?}"
        );
        assert!(
            has("s3", "name", PlanDiagnosticSeverity::PlanDiagnosticError),
            "{d:?}"
        );
        assert!(
            has(
                "c1",
                "stream_name",
                PlanDiagnosticSeverity::PlanDiagnosticWarning
            ),
            "{d:?}"
        );
        assert!(
            has(
                "k8s",
                "deploy_target",
                PlanDiagnosticSeverity::PlanDiagnosticError
            ),
            "{d:?}"
        );
        assert!(
            !d.iter().any(|x| x.resource == "db"),
            "other providers' resources are ignored"
        );
    }

    #[test]
    fn initialize_accepts_empty_and_rejects_typos() {
        for empty in [&b""[..], b"null", b"{}", b"{\"provider\":\"eventbus\"}"] {
            let p = Provider::from_config(empty).unwrap();
            assert!(p.ctx.state.dir().ends_with(DEFAULT_STATE_DIR));
        }
        let p = Provider::from_config(br#"{"provider":"eventbus","state_dir":"/tmp/x"}"#).unwrap();
        assert_eq!(p.ctx.state.dir(), std::path::Path::new("/tmp/x"));
        let e = Provider::from_config(br#"{"provider":"eventbus","state_dri":"/tmp/x"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("state_dri") && e.contains("state_dir"), "{e}");
    }
}
