//! Drift: the live resource against its recorded outputs (and the spec when given).

use super::{diff_with, outputs_of, Provider};
use crate::iac::drivers::Kind;
use crate::iac::error::DriverError;
use crate::iac::state::ProviderState;
use crate::pb::iac::{DriftClass, DriftResult, ResourceRef, ResourceSpec};
use serde_json::{json, Value as Json};
use std::collections::{BTreeSet, HashMap};

impl Provider {
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
                    let keys = kind.driver().drift_keys();
                    let fields: Vec<String> = keys
                        .iter()
                        // A key the recorded outputs lack was written before the setting
                        // existed: not drift until an apply records it.
                        .filter(|k| {
                            recorded.get(**k).is_some()
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
}

fn recorded_outputs(state: &ProviderState, kind: Kind, name: &str) -> Json {
    match kind {
        Kind::Broker => state.brokers.get(name).map(|r| r.outputs.clone()),
        _ => state.resources.get(name).map(|r| r.outputs.clone()),
    }
    .filter(Json::is_object)
    .unwrap_or(Json::Null)
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
