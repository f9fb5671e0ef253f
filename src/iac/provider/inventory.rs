//! What the provider knows about: status of refs, import of existing resources, and
//! enumeration by type.

use super::{outputs_of, wire, Provider, NAME};
use crate::iac::drivers::{self, Kind};
use crate::iac::error::DriverError;
use crate::pb::iac::{ResourceOutput, ResourceRef, ResourceState, ResourceStatus};
use serde_json::json;

impl Provider {
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
                    outputs_json: masked(&o),
                    name: r.name.clone(),
                    r#type: r.r#type.clone(),
                    provider_id: o.provider_id,
                    status: o.status,
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
                            &json!({"error": crate::error_chain::render(&e)}),
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
                // pgchannel: the dsn shown is redacted, so it is no config to apply again.
                "dsn",
                "dsn_env",
                "tables",
                "schema_version",
                // kafka: the cluster as seen and a group's position are no config either.
                "brokers_env",
                "cluster_brokers",
                "committed_offsets",
                "lag",
            ] {
                m.remove(k);
            }
        }
        Ok(ResourceState {
            outputs_json: masked(&o),
            id: provider_id.into(),
            name: r.name.clone(),
            r#type: type_name.into(),
            provider: NAME.into(),
            provider_id: o.provider_id,
            applied_config_json: serde_json::to_vec(&applied).unwrap_or_default(),
            applied_config_source: "adoption".into(),
            ..Default::default()
        })
    }

    pub async fn enumerate(&self, type_name: &str) -> Result<Vec<ResourceOutput>, DriverError> {
        let kind = Kind::parse(type_name)?;
        let state = self.ctx.state.load()?;
        let mut out = Vec::new();
        for broker in state.brokers.keys() {
            match kind.driver().enumerate(&self.ctx, broker).await {
                Ok(list) => out.extend(
                    list.into_iter()
                        .map(|(name, o)| wire(&name, kind.type_name(), o)),
                ),
                Err(e) => {
                    tracing::warn!(broker = %broker, error = %crate::error_chain::render(&e), "enumerate: skipped")
                }
            }
        }
        Ok(out)
    }
}

/// What a sensitive output shows where the RPC has no sensitive map to mark it.
pub(crate) const MASK: &str = "(sensitive)";

/// `o`'s outputs with the values of its sensitive keys replaced by `MASK`, for replies that
/// cannot mark keys sensitive (ResourceStatus, ResourceState): wfctl would print or persist
/// the secret as a plain value.
fn masked(o: &ResourceOutput) -> Vec<u8> {
    let mut v = outputs_of(&o.outputs_json);
    if let Some(m) = v.as_object_mut() {
        for (k, sensitive) in &o.sensitive {
            if *sensitive {
                if let Some(x) = m.get_mut(k) {
                    *x = json!(MASK);
                }
            }
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}
