//! The pure half of the provider: the change type every resource diff produces, the helpers
//! those diffs share, and the plan algorithm. Each resource's diff lives with its driver
//! (`drivers/`), so this file depends on no driver.
//!
//! wfctl's Diff only ever sees persisted outputs, so each driver compares a decoded, validated
//! spec against outputs. A field the server cannot change in place is a `force_new` change,
//! which wfctl plans as a replace.

use super::error::DriverError;
use crate::nats::stream::{Change as NatsChange, FieldDiff};
use crate::pb::iac::{DiffResult, FieldChange, IaCPlan, PlanAction, ResourceSpec, ResourceState};
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub path: String,
    pub old: Json,
    pub new: Json,
    pub force_new: bool,
}

impl Change {
    fn wire(&self) -> FieldChange {
        FieldChange {
            path: self.path.clone(),
            old_json: serde_json::to_vec(&self.old).unwrap_or_default(),
            new_json: serde_json::to_vec(&self.new).unwrap_or_default(),
            force_new: self.force_new,
        }
    }
}

pub fn to_result(changes: &[Change]) -> DiffResult {
    let replace = changes.iter().any(|c| c.force_new);
    DiffResult {
        needs_update: !changes.is_empty() && !replace,
        needs_replace: replace,
        changes: changes.iter().map(Change::wire).collect(),
    }
}

pub(crate) fn field(o: &Json, key: &str) -> Json {
    o.get(key).cloned().unwrap_or(Json::Null)
}

/// A stream or consumer diff against its persisted outputs: the identity keys (`(output key,
/// desired value)`, skipped when the value is not known; a change forces a replace), the
/// spec's own field differences with values as the outputs show them, then the flags.
pub(crate) fn resource_changes(
    identity: &[(&str, Option<&str>)],
    fields: Vec<FieldDiff>,
    want: &Json,
    current: &Json,
) -> Vec<Change> {
    let mut out = Vec::new();
    for (key, value) in identity {
        if let Some(v) = value {
            identity_change(&mut out, key, v, current);
        }
    }
    for d in fields {
        out.push(Change {
            path: d.field.into(),
            old: field(current, d.field),
            new: field(want, d.field),
            force_new: d.change != NatsChange::InPlace,
        });
    }
    flag_changes(&mut out, want, current);
    out
}

fn flag_changes(out: &mut Vec<Change>, want: &Json, current: &Json) {
    for key in ["prevent_destroy", "bind"] {
        let (w, h) = (field(want, key), field(current, key));
        if w.as_bool().unwrap_or(false) != h.as_bool().unwrap_or(false) {
            out.push(Change {
                path: key.into(),
                old: h,
                new: w,
                force_new: false,
            });
        }
    }
}

fn identity_change(out: &mut Vec<Change>, key: &str, want: &str, current: &Json) {
    let have = current.get(key).and_then(Json::as_str).unwrap_or_default();
    if !have.is_empty() && have != want {
        out.push(Change {
            path: key.into(),
            old: Json::String(have.into()),
            new: Json::String(want.into()),
            force_new: true,
        });
    }
}

/// The host's algorithm (docs/iac-host.md §4.1): new specs are created, existing ones diffed,
/// state entries no longer desired deleted; creates/updates/replaces in dependency order,
/// then deletes in reverse dependency order.
pub fn compute_plan(
    desired: &[ResourceSpec],
    current: &[ResourceState],
    mut diff: impl FnMut(&ResourceSpec, &ResourceState) -> Result<Vec<Change>, DriverError>,
) -> Result<IaCPlan, DriverError> {
    let by_name: HashMap<&str, &ResourceState> =
        current.iter().map(|s| (s.name.as_str(), s)).collect();
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    let mut forward = Vec::new();
    for spec in desired {
        match by_name.get(spec.name.as_str()) {
            None => forward.push(action("create", spec.clone(), None, Vec::new())),
            Some(st) => {
                let changes = diff(spec, st)?;
                if changes.is_empty() {
                    continue;
                }
                let kind = if changes.iter().any(|c| c.force_new) {
                    "replace"
                } else {
                    "update"
                };
                forward.push(action(kind, spec.clone(), Some((*st).clone()), changes));
            }
        }
    }
    let forward = topo_sort(forward, |a| {
        a.resource
            .as_ref()
            .map(|r| r.depends_on.clone())
            .unwrap_or_default()
    })?;
    let deletes: Vec<PlanAction> = current
        .iter()
        .filter(|s| !wanted.contains(s.name.as_str()))
        .map(|s| {
            let spec = ResourceSpec {
                name: s.name.clone(),
                r#type: s.r#type.clone(),
                depends_on: s.dependencies.clone(),
                ..Default::default()
            };
            action("delete", spec, Some(s.clone()), Vec::new())
        })
        .collect();
    let mut deletes = topo_sort(deletes, |a| {
        a.resource
            .as_ref()
            .map(|r| r.depends_on.clone())
            .unwrap_or_default()
    })?;
    deletes.reverse();
    let mut actions = forward;
    actions.extend(deletes);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(IaCPlan {
        id: format!("eventbus-{}", now.as_nanos()),
        actions,
        created_at: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
        ..Default::default()
    })
}

fn action(
    kind: &str,
    spec: ResourceSpec,
    current: Option<ResourceState>,
    changes: Vec<Change>,
) -> PlanAction {
    PlanAction {
        action: kind.into(),
        resource: Some(spec),
        current,
        changes: changes.iter().map(Change::wire).collect(),
        resolved_config_hash: String::new(),
    }
}

/// Stable topological order (dependencies first) over the names in `items`; dependencies on
/// names outside the set are ignored. A cycle is an error.
fn topo_sort(
    items: Vec<PlanAction>,
    deps: impl Fn(&PlanAction) -> Vec<String>,
) -> Result<Vec<PlanAction>, DriverError> {
    let name = |a: &PlanAction| {
        a.resource
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default()
    };
    let index: BTreeMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, a)| (name(a), i))
        .collect();
    let mut state = vec![0u8; items.len()]; // 0 new, 1 visiting, 2 done
    let mut order = Vec::with_capacity(items.len());
    fn visit(
        i: usize,
        items: &[PlanAction],
        index: &BTreeMap<String, usize>,
        deps: &dyn Fn(&PlanAction) -> Vec<String>,
        state: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), String> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                return Err(items[i]
                    .resource
                    .as_ref()
                    .map(|r| r.name.clone())
                    .unwrap_or_default())
            }
            _ => {}
        }
        state[i] = 1;
        for d in deps(&items[i]) {
            if let Some(&j) = index.get(&d) {
                visit(j, items, index, deps, state, order)?;
            }
        }
        state[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..items.len() {
        visit(i, &items, &index, &deps, &mut state, &mut order).map_err(|n| {
            DriverError::invalid("plan", format!("depends_on has a cycle through {n:?}"))
        })?;
    }
    let mut slots: Vec<Option<PlanAction>> = items.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::drivers::broker::{self, diff as diff_broker};
    use crate::iac::drivers::stream::{self, diff as diff_stream};
    use serde_json::json;

    fn spec(name: &str, deps: &[&str]) -> ResourceSpec {
        ResourceSpec {
            name: name.into(),
            r#type: "infra.eventbus.stream".into(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn state(name: &str, deps: &[&str]) -> ResourceState {
        ResourceState {
            name: name.into(),
            r#type: "infra.eventbus.stream".into(),
            dependencies: deps.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn creates_follow_dependencies_and_deletes_reverse_them() {
        let desired = vec![
            spec("consumer", &["stream"]),
            spec("stream", &["bus"]),
            spec("bus", &[]),
        ];
        let plan = compute_plan(&desired, &[], |_, _| Ok(Vec::new())).unwrap();
        let names: Vec<_> = plan
            .actions
            .iter()
            .map(|a| a.resource.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["bus", "stream", "consumer"]);
        let current = vec![
            state("bus", &[]),
            state("stream", &["bus"]),
            state("consumer", &["stream"]),
        ];
        let plan = compute_plan(&[], &current, |_, _| Ok(Vec::new())).unwrap();
        let names: Vec<_> = plan
            .actions
            .iter()
            .map(|a| (a.action.clone(), a.resource.as_ref().unwrap().name.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("delete".into(), "consumer".into()),
                ("delete".into(), "stream".into()),
                ("delete".into(), "bus".to_string())
            ]
        );
    }

    #[test]
    fn force_new_means_replace_and_no_change_means_no_action() {
        let desired = vec![spec("a", &[]), spec("b", &[]), spec("c", &[])];
        let current = vec![state("a", &[]), state("b", &[]), state("c", &[])];
        let plan = compute_plan(&desired, &current, |s, _| {
            Ok(match s.name.as_str() {
                "a" => vec![Change {
                    path: "max_msgs".into(),
                    old: json!(1),
                    new: json!(2),
                    force_new: false,
                }],
                "b" => vec![Change {
                    path: "storage".into(),
                    old: json!("x"),
                    new: json!("y"),
                    force_new: true,
                }],
                _ => Vec::new(),
            })
        })
        .unwrap();
        let kinds: Vec<_> = plan.actions.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(kinds, ["update", "replace"]);
        let r = to_result(&[Change {
            path: "storage".into(),
            old: json!("x"),
            new: json!("y"),
            force_new: true,
        }]);
        assert!(r.needs_replace && !r.needs_update);
    }

    #[test]
    fn cycles_are_errors() {
        let desired = vec![spec("a", &["b"]), spec("b", &["a"])];
        assert!(compute_plan(&desired, &[], |_, _| Ok(Vec::new())).is_err());
    }

    #[test]
    fn stream_field_classes() {
        let base =
            stream::decode("s", br#"{"name":"S","subjects":["a.>"],"max_msgs":10}"#).unwrap();
        let current = stream::desired_outputs(&base, "bus");
        assert!(diff_stream(&base, Some("bus"), &current).is_empty());
        let changed = stream::decode(
            "s",
            br#"{"name":"S","subjects":["a.>"],"max_msgs":20,"storage":"STORAGE_TYPE_MEMORY"}"#,
        )
        .unwrap();
        let d = diff_stream(&changed, Some("bus"), &current);
        let by: BTreeMap<_, _> = d.iter().map(|c| (c.path.as_str(), c.force_new)).collect();
        assert_eq!(by.get("max_msgs"), Some(&false));
        assert_eq!(by.get("storage"), Some(&true));
        assert_eq!(
            d.iter().find(|c| c.path == "max_msgs").unwrap().new,
            json!(20)
        );
        let renamed =
            stream::decode("s", br#"{"name":"T","subjects":["a.>"],"max_msgs":10}"#).unwrap();
        assert!(diff_stream(&renamed, Some("bus"), &current)
            .iter()
            .any(|c| c.path == "name" && c.force_new));
        assert!(diff_stream(&base, Some("other"), &current)
            .iter()
            .any(|c| c.path == "broker" && c.force_new));
    }

    #[test]
    fn broker_views_diff_by_key() {
        let d = broker::decode(
            "bus",
            br#"{"provider":"nats","deploy_target":"local","replicas":3}"#,
        )
        .unwrap();
        let mut cur = broker::desired_view(&d).unwrap();
        assert!(diff_broker(&d, &cur).unwrap().is_empty());
        cur["replicas"] = json!(1);
        cur["max_file_store"] = json!(1024);
        let c = diff_broker(&d, &cur).unwrap();
        assert!(c.iter().any(|c| c.path == "replicas" && c.force_new));
        assert!(c.iter().any(|c| c.path == "max_file_store" && !c.force_new));
    }
}
