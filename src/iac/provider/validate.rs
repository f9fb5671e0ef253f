//! Plan validation: read-only checks across the whole plan, no network.

use super::{Desired, Provider};
use crate::iac::drivers::{self, broker, Kind};
use crate::iac::error::DriverError;
use crate::iac::state::ProviderState;
use crate::pb::iac::{IaCPlan, PlanDiagnostic, PlanDiagnosticSeverity};
use std::collections::{BTreeMap, BTreeSet};

impl Provider {
    /// Plan-level checks, read-only, no network: every stream/consumer's broker is in the plan
    /// or in the provider state, replicas fit the broker, names and configs are valid.
    pub fn validate_plan(&self, plan: &IaCPlan) -> Vec<PlanDiagnostic> {
        let state = self.ctx.state.load().unwrap_or_default();
        validate_with(&state, plan)
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
    // Which of them are pgchannel brokers (their streams and consumers are rows).
    let mut on_pg: BTreeMap<String, bool> = state
        .brokers
        .iter()
        .map(|(n, r)| (n.clone(), r.pg.is_some()))
        .collect();
    // And which are kafka brokers (their streams and consumers are topics and groups).
    let mut on_kafka: BTreeMap<String, bool> = state
        .brokers
        .iter()
        .map(|(n, r)| (n.clone(), r.kafka.is_some()))
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
                    Desired::Broker(b) if drivers::pg::broker::is_pg(b) => {
                        brokers.insert(spec.name.clone(), 1);
                        on_pg.insert(spec.name.clone(), true);
                    }
                    Desired::Broker(b) if b.spec.provider == crate::providers::Provider::Kafka => {
                        // Adopted: the target must be self_hosted.
                        if let Some(e) = drivers::kafka::broker_refused(&spec.name, b) {
                            let lines: Vec<String> = match e {
                                DriverError::Config(c) => c.problems,
                                other => vec![other.to_string()],
                            };
                            for line in lines {
                                let field = if line.contains("config.deploy_target") {
                                    "deploy_target".to_string()
                                } else {
                                    line.strip_prefix("config.")
                                        .and_then(|l| l.split(':').next())
                                        .unwrap_or_default()
                                        .to_string()
                                };
                                out.push(diag(Error, &spec.name, &field, line));
                            }
                        }
                        brokers.insert(spec.name.clone(), 0);
                        on_pg.insert(spec.name.clone(), false);
                        on_kafka.insert(spec.name.clone(), true);
                    }
                    Desired::Broker(b) => {
                        on_pg.insert(spec.name.clone(), false);
                        on_kafka.insert(spec.name.clone(), false);
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
                    Desired::Consumer(_) | Desired::Kv(_) | Desired::KvEntry(_) => {}
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
        on_pg.remove(b);
        on_kafka.remove(b);
    }
    for (name, d) in &decoded {
        let (broker_ref, servers, replicas, stream_name) = match d {
            Desired::Broker(_) => continue,
            Desired::Stream(s) => (&s.broker_ref, &s.servers, Some(s.replicas as u32), None),
            Desired::Consumer(c) => (&c.broker_ref, &c.servers, None, Some(&c.stream)),
            Desired::KvEntry(e) => (&e.broker_ref, &e.servers, None, None),
            Desired::Kv(k) => (
                &k.stream.broker_ref,
                &k.stream.servers,
                Some(k.stream.replicas as u32),
                None,
            ),
        };
        // Partitions are kafka's: every other provider refuses them with the shared line.
        let partitions = match d {
            Desired::Stream(s) => s.refuse_partitions().err(),
            _ => None,
        };
        let refused = if spec_on(&on_kafka, broker_ref, servers) {
            match d {
                Desired::Stream(s) => drivers::kafka::stream_refused(name, s),
                Desired::Consumer(c) => drivers::kafka::consumer_refused(name, c),
                Desired::Kv(_) | Desired::KvEntry(_) => {
                    out.push(no_buckets(d, name, "kafka"));
                    None
                }
                Desired::Broker(_) => None,
            }
        } else if spec_on(&on_pg, broker_ref, servers) {
            match d {
                Desired::Stream(s) => drivers::pg::stream::def(name, s).err(),
                Desired::Consumer(c) => drivers::pg::consumer::def(name, c).err(),
                Desired::Kv(_) | Desired::KvEntry(_) => {
                    out.push(no_buckets(d, name, "pgchannel"));
                    None
                }
                Desired::Broker(_) => None,
            }
            .or(partitions)
        } else {
            partitions
        };
        // The settings the broker's provider does not have, one diagnostic per field.
        if let Some(DriverError::Config(c)) = refused {
            for line in c.problems {
                let field = line
                    .strip_prefix("config.")
                    .and_then(|l| l.split(':').next())
                    .unwrap_or_default()
                    .to_string();
                out.push(diag(
                    Error,
                    name,
                    &field,
                    format!("{}: {line}", c.component),
                ));
            }
        }
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

/// Whether a stream or consumer spec is on a pgchannel broker that `brokers` (the plan's and
/// the provider state's, by name → is pgchannel) names; for plan validation.
fn spec_on(brokers: &BTreeMap<String, bool>, broker_ref: &str, servers: &[String]) -> bool {
    if servers.iter().any(|s| !s.trim().is_empty()) {
        return false;
    }
    let name = if broker_ref.is_empty() && brokers.len() == 1 {
        brokers.keys().next().cloned()
    } else {
        Some(broker_ref.to_string())
    };
    name.and_then(|n| brokers.get(&n).copied()).unwrap_or(false)
}

/// A key-value bucket, object store or entry on a provider that has none: one line.
fn no_buckets(d: &Desired, name: &str, provider: &str) -> PlanDiagnostic {
    diag(
                        PlanDiagnosticSeverity::PlanDiagnosticError,
                        name,
                        "broker_ref",
                        format!(
                            "{} {name:?}: provider {provider} has no key-value buckets or object stores; they need a NATS broker",
                            match d {
                                Desired::Kv(k) if *k.vocab == crate::nats::kv::OBJ => {
                                    drivers::OBJECT_STORE_TYPE
                                }
                                Desired::Kv(_) => drivers::KV_TYPE,
                                _ => drivers::KV_ENTRY_TYPE,
                            }
                        ),
                    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::iac::{PlanAction, ResourceSpec};
    use serde_json::{json, Value as Json};

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
}
