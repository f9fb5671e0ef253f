//! The provider's domain operations, one function per RPC, over the drivers, the pure plan and
//! the provider's state; the gRPC services in `iac/mod.rs` only convert. This file routes the
//! per-resource calls (CRUD, diff, plan); the other jobs have a file each: `destroy`
//! (ordered deletes), `inventory` (status, import, enumerate), `drift`, `validate` (plan checks).

mod destroy;
mod drift;
mod inventory;
mod validate;

use super::drivers::{
    self, broker, BrokerDriver, ConsumerDriver, Ctx, Driver, Kind, Output, StreamDriver,
};
use super::error::DriverError;
use super::plan::{self, Change};
use super::state::ProviderState;
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::StreamDesired;
use crate::nats::kv::KvSpec;
use crate::pb::iac::{
    IaCCapabilityDeclaration, IaCPlan, ResourceOutput, ResourceRef, ResourceSpec, ResourceState,
};
use serde_json::{json, Value as Json};
use std::path::PathBuf;

pub const NAME: &str = "eventbus";
/// Part of wfctl's on-disk Diff cache key: bump the suffix whenever Diff semantics change.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+diff.2");
pub const DEFAULT_STATE_DIR: &str = ".eventbus-iac";
/// Keys of the `iac.provider` module config; `provider` routes, `plugin`/`service` are the
/// engine's.
const CONFIG_KEYS: &[&str] = &[
    "provider",
    "state_dir",
    "digitalocean_token",
    "digitalocean_api_url",
    "kubeconfig",
    "kube_context",
    "kube_reach",
    "aws_reach",
    "plugin",
    "service",
];

pub struct Provider {
    pub ctx: Ctx,
}

/// A decoded, validated desired config.
pub enum Desired {
    Broker(Box<broker::BrokerDesired>),
    Stream(Box<StreamDesired>),
    Consumer(Box<ConsumerDesired>),
    Kv(KvSpec),
    KvEntry(drivers::kv_entry::KvEntrySpec),
}

impl Desired {
    pub fn decode(kind: Kind, name: &str, config_json: &[u8]) -> Result<Desired, DriverError> {
        Ok(match kind {
            Kind::Broker => Desired::Broker(Box::new(BrokerDriver::decode(name, config_json)?)),
            Kind::Stream => Desired::Stream(Box::new(StreamDriver::decode(name, config_json)?)),
            Kind::Consumer => {
                Desired::Consumer(Box::new(ConsumerDriver::decode(name, config_json)?))
            }
            Kind::Kv => Desired::Kv(drivers::KvDriver::decode(name, config_json)?),
            Kind::ObjectStore => {
                Desired::Kv(drivers::ObjectStoreDriver::decode(name, config_json)?)
            }
            Kind::KvEntry => Desired::KvEntry(drivers::KvEntryDriver::decode(name, config_json)?),
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
            if [
                "digitalocean_token",
                "digitalocean_api_url",
                "kubeconfig",
                "kube_context",
                "aws_reach",
            ]
            .contains(&k.as_str())
            {
                if !matches!(v, Json::String(_) | Json::Null) {
                    return Err(DriverError::invalid(what, format!("{k} must be a string")));
                }
                continue;
            }
            if k == "kube_reach" {
                // How wfctl's machine reaches a kubernetes broker: through a port-forward
                // (default) or straight at the recorded urls (wfctl runs inside the cluster).
                let known = match v {
                    Json::Null => true,
                    Json::String(s) => ["", "port_forward", "direct"].contains(&s.as_str()),
                    _ => false,
                };
                if !known {
                    return Err(DriverError::invalid(
                        what,
                        "kube_reach must be port_forward (default) or direct",
                    ));
                }
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
                format!(
                    "unknown key {} (valid keys: {})",
                    crate::iac::scrub::quote(k),
                    CONFIG_KEYS.join(", ")
                ),
            ));
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let dir = match state_dir {
            Some(p) if p.is_absolute() => p,
            Some(p) => cwd.join(p),
            None => cwd.join(DEFAULT_STATE_DIR),
        };
        let mut ctx = Ctx::new(dir);
        ctx.provider_config = cfg;
        Ok(Provider { ctx })
    }

    pub fn capabilities() -> Vec<IaCCapabilityDeclaration> {
        Kind::ALL
            .iter()
            .map(|k| {
                let d = k.driver();
                IaCCapabilityDeclaration {
                    resource_type: k.type_name().into(),
                    tier: d.tier(),
                    operations: d.operations().iter().map(|s| s.to_string()).collect(),
                }
            })
            .collect()
    }

    // ---------------------------------------------------------------- ResourceDriver

    /// Create is create-or-adopt (wfctl cannot recognise "already exists" over gRPC).
    pub async fn create(
        &self,
        type_name: &str,
        spec: &ResourceSpec,
    ) -> Result<ResourceOutput, DriverError> {
        let kind = Kind::parse(or(type_name, &spec.r#type))?;
        let out = kind.driver().apply(&self.ctx, spec).await?;
        Ok(wire(&spec.name, kind.type_name(), out))
    }

    /// Update applies in place; a resource deleted behind our back is created again.
    pub async fn update(
        &self,
        type_name: &str,
        r: &ResourceRef,
        spec: &ResourceSpec,
    ) -> Result<ResourceOutput, DriverError> {
        check_ref(Kind::parse(or(type_name, &r.r#type))?, r)?;
        self.create(type_name, spec).await
    }

    pub async fn read(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<ResourceOutput, DriverError> {
        let kind = Kind::parse(or(type_name, &r.r#type))?;
        check_ref(kind, r)?;
        let out = kind.driver().read(&self.ctx, r).await?;
        Ok(wire(&r.name, kind.type_name(), out))
    }

    pub async fn delete(&self, type_name: &str, r: &ResourceRef) -> Result<(), DriverError> {
        let kind = Kind::parse(or(type_name, &r.r#type))?;
        check_ref(kind, r)?;
        kind.driver().delete(&self.ctx, r).await
    }

    /// The pure diff (the provider state resolves a stream's broker), then, for a planned replace
    /// or a change older releases cannot make in place, what the live broker says.
    pub async fn diff(
        &self,
        type_name: &str,
        desired: &ResourceSpec,
        current_outputs: &[u8],
    ) -> Result<Vec<Change>, DriverError> {
        let state = self.ctx.state.load()?;
        Kind::parse(or(type_name, &desired.r#type))?
            .driver()
            .diff_live(&self.ctx, &state, desired, &outputs_of(current_outputs))
            .await
    }

    pub async fn scale(
        &self,
        type_name: &str,
        r: &ResourceRef,
        replicas: i32,
    ) -> Result<ResourceOutput, DriverError> {
        let kind = Kind::parse(type_name)?;
        check_ref(kind, r)?;
        let out = kind.driver().scale(&self.ctx, r, replicas).await?;
        Ok(wire(&r.name, type_name, out))
    }

    pub async fn health(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<(bool, String), DriverError> {
        let kind = Kind::parse(type_name)?;
        check_ref(kind, r)?;
        kind.driver().health(&self.ctx, r).await
    }

    pub fn sensitive_keys(type_name: &str) -> Result<Vec<String>, DriverError> {
        let d = Kind::parse(type_name)?.driver();
        Ok(d.sensitive().iter().map(|k| k.to_string()).collect())
    }

    pub fn troubleshoot(
        &self,
        type_name: &str,
        r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError> {
        let kind = Kind::parse(type_name)?;
        check_ref(kind, r)?;
        kind.driver().troubleshoot(&self.ctx, r)
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
}

/// The diff of one resource against outputs, with the broker resolved from `state`.
pub fn diff_with(
    state: &ProviderState,
    type_name: &str,
    desired: &ResourceSpec,
    current: &Json,
) -> Result<Vec<Change>, DriverError> {
    Kind::parse(or(type_name, &desired.r#type))?
        .driver()
        .diff(state, desired, current)
}

/// The request's resource type, else the one the spec or ref carries.
/// The longest resource name, and broker part of a provider id, accepted (a module name).
const MAX_REF_NAME: usize = 255;

/// A resource reference from wfctl's state, checked before any call that could reach a
/// broker: the name, and a provider id `<broker>/<STREAM>` or `<broker>/<STREAM>/<durable>`
/// whose stream and durable follow NATS' name rules and lengths (a 10 KB stream name made Read
/// take 5 s and Delete 29 s, and dropped the provider's connection). One line naming the field.
fn check_ref(kind: Kind, r: &ResourceRef) -> Result<(), DriverError> {
    use crate::nats::names::check_name;
    use crate::secret::quote;
    let what = format!("{} {}", kind.type_name(), quote(&r.name));
    let bad =
        |field: &str, msg: String| DriverError::invalid(what.clone(), format!("{field} {msg}"));
    let plain = |s: &str| s.len() <= MAX_REF_NAME && !s.chars().any(char::is_control);
    if !plain(&r.name) {
        return Err(bad(
            "name",
            format!(
                "{}: a resource name has at most {MAX_REF_NAME} bytes and no control characters",
                quote(&r.name)
            ),
        ));
    }
    let pid = r.provider_id.as_str();
    if pid.is_empty() {
        return Ok(());
    }
    let shape = match kind {
        Kind::Broker => "<broker>",
        Kind::Stream => "<broker>/<STREAM>",
        Kind::Consumer => "<broker>/<STREAM>/<durable>",
        Kind::Kv => "<broker>/<KV_bucket>",
        Kind::ObjectStore => "<broker>/<OBJ_bucket>",
        Kind::KvEntry => "<broker>/<bucket>/<key>",
    };
    let wrong = |msg: String| {
        bad(
            "provider_id",
            format!("{}: {msg} (it is {shape})", quote(pid)),
        )
    };
    let parts: Vec<&str> = match kind {
        Kind::Broker => vec![pid],
        Kind::Stream | Kind::Kv | Kind::ObjectStore => pid.rsplitn(2, '/').collect(),
        // A key may hold '/': the broker and bucket come first.
        Kind::KvEntry => pid
            .splitn(3, '/')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect(),
        Kind::Consumer => pid.rsplitn(3, '/').collect(),
    };
    let Some(broker) = parts
        .last()
        .filter(|_| parts.len() == shape.matches('<').count())
    else {
        // Not of this shape: found in the state by name, or not at all (no broker is asked).
        return if pid.len() <= 3 * MAX_REF_NAME + 2 && !pid.chars().any(char::is_control) {
            Ok(())
        } else {
            Err(wrong("is not a provider id of this plugin".into()))
        };
    };
    if !plain(broker) {
        return Err(wrong(format!(
            "the broker part has more than {MAX_REF_NAME} bytes or a control character"
        )));
    }
    if kind == Kind::KvEntry {
        return crate::nats::kv::check_bucket(parts[1])
            .map_err(|e| format!("the bucket name {e}"))
            .and_then(|_| crate::nats::kv::check_key(parts[0]).map_err(|e| format!("the key {e}")))
            .map_err(wrong);
    }
    let names = [
        ("stream", parts.len().checked_sub(2)),
        ("durable", (parts.len() == 3).then_some(0)),
    ];
    for (label, at) in names {
        if let Some(i) = at {
            if let Err(e) = check_name(parts[i]) {
                return Err(wrong(format!("the {label} name {e}")));
            }
        }
    }
    Ok(())
}

fn or<'a>(type_name: &'a str, fallback: &'a str) -> &'a str {
    if type_name.is_empty() {
        fallback
    } else {
        type_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
