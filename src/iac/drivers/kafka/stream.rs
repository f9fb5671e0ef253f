//! `infra.eventbus.stream` on a kafka broker: a topic.
//!
//! | stream field | topic | change |
//! |---|---|---|
//! | `name` | topic name | replace |
//! | `subjects` | kept by the plugin (which subjects publish to the topic) | in place |
//! | `partitions` | partition count | up: in place (CreatePartitions); down: replace |
//! | `num_replicas` | replication factor (unset: the broker's default) | replace |
//! | `max_age` / `max_bytes` / `max_msg_size` | `retention.ms` / `retention.bytes` / `max.message.bytes` | in place (AlterConfigs) |
//!
//! A replace deletes the topic with its records and the committed offsets of every group on
//! it; the plan says how many records and which groups, read from the live cluster. Settings
//! Kafka has not are refused at plan and apply, one line each (`topic_spec`). Only the config
//! entries the user set are compared, so broker defaults never show as changes; an entry set
//! on the topic behind wfctl's back shows as drift.

use super::conns::{self, REQUEST_TIMEOUT};
use crate::config::error::ConfigError;
use crate::iac::drivers::stream::{
    broker_key, delete_gate, provider_id, push_destroys, Flags, Located, StreamDesired,
};
use crate::iac::drivers::{
    duration_from_json, duration_json, i64_field, record_placed, strings_field, Ctx, Output,
    Placed, CONSUMER_TYPE, STREAM_TYPE,
};
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::iac::state::{KafkaRecord, ProviderState};
use crate::kafka::admin::{RdAdmin, TopicEntries};
use crate::kafka::group::OffsetLookup;
use crate::kafka::topic::{
    self, ObservedTopic, TopicAdmin, TopicDefaults, MAX_MESSAGE_BYTES, MIN_INSYNC_REPLICAS,
    RETENTION_BYTES, RETENTION_MS,
};
use crate::kafka::{Ensured, KafkaError, TopicSpec};
use crate::nats::stream::{Change, FieldDiffs};
use crate::pb::iac::ResourceRef;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The topic config entries this provider manages (from the stream's limits and the broker).
pub const MANAGED: &[&str] = &[
    RETENTION_MS,
    RETENTION_BYTES,
    MAX_MESSAGE_BYTES,
    MIN_INSYNC_REPLICAS,
];

fn label(resource: &str, topic: &str) -> String {
    format!("{STREAM_TYPE} {resource:?} (kafka topic {topic:?})")
}

/// The config as a topic: the domain's conversion (`TopicSpec::validate`, the runtime's own,
/// refusing the NATS-only limits one line each) plus the JetStream-only settings the shared
/// spec parsed (mirror, sources, ...), each refused by name.
pub fn topic_spec(
    resource: &str,
    d: &StreamDesired,
    k: &KafkaRecord,
) -> Result<TopicSpec, DriverError> {
    let defaults = TopicDefaults {
        replication_factor: (k.default_replication_factor > 0)
            .then_some(k.default_replication_factor),
        min_insync_replicas: (k.min_insync_replicas > 0).then_some(k.min_insync_replicas),
    };
    // The runtime's conversion (one per provider, so plan and engine refuse with the same
    // words); partitions are the IaC face's: a stream module adopts what the topic has.
    let mut spec = crate::kafka::spec::topic_spec(STREAM_TYPE, resource, &d.spec, defaults)
        .map_err(DriverError::from);
    if !(0..=10_000).contains(&d.config.partitions) {
        let line = format!(
            "config.partitions: {} is out of range (1..=10000; 0 means 1)",
            d.config.partitions
        );
        spec = match spec {
            Err(DriverError::Config(mut c)) => {
                c.problems.push(line);
                Err(DriverError::Config(c))
            }
            Err(e) => Err(e),
            Ok(_) => Err(ConfigError {
                component: format!("{STREAM_TYPE} {}", crate::secret::quote(resource)),
                problems: vec![line],
            }
            .into()),
        };
    }
    spec.map(|mut t| {
        t.partitions = d.config.partitions.max(1);
        t
    })
}

/// The broker's entries as an observed topic: every entry set on the topic, and the managed
/// entries the spec sets whatever the broker says their source is (so an override removed
/// behind wfctl's back shows the broker's value, and brokers that report topic entries as
/// defaults, as tansu 0.6.0 does, still compare).
pub fn observe<'a>(e: &TopicEntries, set: impl IntoIterator<Item = &'a str>) -> ObservedTopic {
    let set: Vec<&str> = set.into_iter().collect();
    ObservedTopic {
        partitions: e.partitions,
        replication_factor: e.replication_factor,
        configs: e
            .entries
            .iter()
            .filter(|(k, (_, on_topic))| *on_topic || set.contains(&k.as_str()))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Create, or update in place what Kafka allows: partitions up, changed config entries (the
/// whole override set, AlterConfigs replaces it; a managed entry the spec no longer sets is
/// removed, back to the broker's default). Fewer partitions or another replication factor is
/// refused (the plan made those a replace). Generic over the admin layer: the test broker
/// lacks CreatePartitions and AlterConfigs, so those paths are tested on `topic::FakeAdmin`.
pub async fn converge<A: TopicAdmin>(
    admin: &A,
    want: &TopicSpec,
    observed: Option<&ObservedTopic>,
) -> Result<Ensured, KafkaError> {
    let Some(o) = observed else {
        admin.create(want).await?;
        return Ok(Ensured::Created);
    };
    let plan = topic::plan(want, Some(o));
    if !plan.refused.is_empty() {
        return Err(KafkaError::Refused(plan.refused.join("; ")));
    }
    let mut overrides: BTreeMap<String, String> = o
        .configs
        .iter()
        .filter(|(k, _)| !MANAGED.contains(&k.as_str()) || want.configs.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    overrides.extend(want.configs.clone());
    let mut changed = false;
    if let Some(n) = plan.partitions_to {
        admin.create_partitions(&want.name, n).await?;
        changed = true;
    }
    if overrides != o.configs {
        admin.alter_configs(&want.name, &overrides).await?;
        changed = true;
    }
    Ok(if changed {
        Ensured::Updated
    } else {
        Ensured::Unchanged
    })
}

fn config_i64(o: &ObservedTopic, key: &str) -> i64 {
    o.configs
        .get(key)
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v >= 0)
        .unwrap_or(-1)
}

/// A topic → outputs, in the stream config's vocabulary (unset limits are -1 / "0s", as for
/// NATS), with `provider: kafka` so a Diff without the provider state knows what they describe.
pub fn topic_outputs(name: &str, o: &ObservedTopic, subjects: &[String], f: &Flags) -> Json {
    let age = config_i64(o, RETENTION_MS);
    json!({
        "name": name,
        "provider": super::broker::PROVIDER,
        "broker": f.broker,
        "broker_ref": f.broker_ref,
        "subjects": subjects,
        "partitions": o.partitions,
        "num_replicas": o.replication_factor,
        "max_age": duration_json(Duration::from_millis(age.max(0) as u64)),
        "max_bytes": config_i64(o, RETENTION_BYTES),
        "max_msg_size": config_i64(o, MAX_MESSAGE_BYTES),
        "prevent_destroy": f.prevent_destroy,
        "bind": f.bind,
    })
}

/// The spec as the outputs it would produce.
fn desired(spec: &TopicSpec) -> ObservedTopic {
    ObservedTopic {
        partitions: spec.partitions,
        replication_factor: spec.replication_factor.unwrap_or(0),
        configs: spec.configs.clone(),
    }
}

/// The broker's defaults the record brings to a topic spec, for a Diff whose broker the
/// state no longer records (then the spec's own settings only).
fn record_or_default(state: &ProviderState, broker: Option<&str>) -> KafkaRecord {
    broker
        .and_then(|b| state.brokers.get(b))
        .and_then(|b| b.kafka.clone())
        .unwrap_or_default()
}

/// Pure: the spec against persisted outputs.
pub fn diff(
    resource: &str,
    d: &StreamDesired,
    state: &ProviderState,
    broker: Option<&str>,
    current: &Json,
) -> Result<Vec<PlanChange>, DriverError> {
    let spec = topic_spec(resource, d, &record_or_default(state, broker))?;
    let flags = Flags {
        broker: broker.unwrap_or_default().to_string(),
        broker_ref: d.broker_ref.clone(),
        prevent_destroy: d.prevent_destroy,
        bind: d.bind,
    };
    let want = topic_outputs(&spec.name, &desired(&spec), &d.subjects, &flags);
    let mut f = FieldDiffs::default();
    let sorted = |v: &Json| {
        let mut s = strings_field(v, "subjects");
        s.sort();
        format!("{s:?}")
    };
    f.compare("subjects", sorted(&want), sorted(current), Change::InPlace);
    let (wp, hp) = (
        i64::from(spec.partitions),
        i64_field(current, "partitions", 0),
    );
    let shrink = wp < hp;
    f.compare(
        "partitions",
        wp.to_string(),
        hp.to_string(),
        Change::of(!shrink),
    );
    if let Some(rf) = spec.replication_factor {
        f.compare(
            "num_replicas",
            rf.to_string(),
            i64_field(current, "num_replicas", 0).to_string(),
            Change::Replace,
        );
    }
    for key in ["max_age", "max_bytes", "max_msg_size"] {
        f.compare(
            key,
            want[key].to_string(),
            current[key].to_string(),
            Change::InPlace,
        );
    }
    Ok(resource_changes(
        &[("name", Some(&spec.name)), ("broker", broker)],
        f.0,
        &want,
        current,
    ))
}

/// What a replace deletes, read from the live cluster: the topic's records, and the committed
/// offsets of the groups this provider records on it.
pub async fn loss(
    ctx: &Ctx,
    state: &ProviderState,
    broker: &str,
    k: &KafkaRecord,
    topic: &str,
) -> Result<Vec<String>, DriverError> {
    let what = label(topic, topic);
    let admin = ctx.kafka().admin(&what, broker, k)?;
    let marks = admin
        .watermarks(topic)
        .await
        .map_err(|e| DriverError::kafka(&what, e))?;
    let Some(marks) = marks else {
        return Ok(Vec::new());
    };
    let records: i64 = marks.iter().map(|(_, low, high)| (high - low).max(0)).sum();
    let mut notes = vec![format!(
        "kafka topic {topic:?}: {records} record(s) in {} partition(s) (next offsets {}) are deleted with it",
        marks.len(),
        marks
            .iter()
            .map(|(p, _, h)| format!("{p}:{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    let groups: Vec<String> = state
        .resources
        .values()
        .filter(|r| r.type_name == CONSUMER_TYPE && r.broker == broker && r.stream == topic)
        .map(|r| r.durable.clone())
        .collect();
    for g in groups {
        let t = topic.to_string();
        let committed = conns::with_offsets(&what, k, &g, move |o| {
            let parts = o.partitions(&t)?;
            let c = o.committed(&t, &parts)?;
            Ok(parts.into_iter().zip(c).collect::<Vec<_>>())
        })
        .await?;
        let shown: Vec<String> = committed
            .iter()
            .filter_map(|(p, c)| c.map(|c| format!("{p}:{c}")))
            .collect();
        if !shown.is_empty() {
            notes.push(format!(
                "consumer group {g:?} loses its committed offsets ({}) on it",
                shown.join(", ")
            ));
        }
    }
    Ok(notes)
}

/// Adds what a replace destroys to a plan that has one ("destroys", as for NATS).
pub async fn plan_report(
    ctx: &Ctx,
    state: &ProviderState,
    broker: Option<(String, KafkaRecord)>,
    topic: &str,
    mut changes: Vec<PlanChange>,
) -> Vec<PlanChange> {
    if !changes.iter().any(|c| c.force_new) {
        return changes;
    }
    let Some((broker, k)) = broker else {
        return changes;
    };
    let bound = REQUEST_TIMEOUT * 2;
    let notes = match tokio::time::timeout(bound, loss(ctx, state, &broker, &k, topic)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => vec![format!(
            "unknown: the cluster could not be read to count what the replace deletes ({e})"
        )],
        Err(_) => vec![format!(
            "unknown: the cluster did not answer within {bound:?} to count what the replace deletes"
        )],
    };
    push_destroys(&mut changes, &notes);
    changes
}

/// The topic as the cluster shows it now (right after a create, metadata may take a moment).
async fn describe(
    admin: &RdAdmin,
    what: &str,
    topic: &str,
    tries: u32,
) -> Result<Option<TopicEntries>, DriverError> {
    for i in 0..tries {
        let got = admin
            .describe_entries(topic)
            .await
            .map_err(|e| DriverError::kafka(what, e))?;
        if got.is_some() || i + 1 == tries {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(None)
}

/// Create-or-adopt, and Update.
pub async fn apply(
    ctx: &Ctx,
    resource: &str,
    d: &StreamDesired,
    broker: &str,
    k: &KafkaRecord,
) -> Result<Output, DriverError> {
    let want = topic_spec(resource, d, k)?;
    let what = label(resource, &want.name);
    let admin = ctx.kafka().admin(&what, broker, k)?;
    let set = || want.configs.keys().map(String::as_str);
    let observed = describe(&admin, &what, &want.name, 1)
        .await?
        .map(|e| observe(&e, set()));
    if observed.is_none() && d.bind {
        return Err(DriverError::refused(
            &what,
            format!("bind is set and the topic does not exist on broker {broker:?}; bind adopts an existing topic and never creates one (remove bind to let the provider create it)"),
        ));
    }
    let ensured = converge(&admin, &want, observed.as_ref())
        .await
        .map_err(|e| DriverError::kafka(&what, e))?;
    tracing::info!(resource, topic = %want.name, broker, outcome = ?ensured, "kafka topic ensured");
    let now = describe(&admin, &what, &want.name, 10)
        .await?
        .map(|e| observe(&e, set()))
        .unwrap_or_else(|| desired(&want));
    let at = Placed {
        broker,
        servers: &[],
        stream: &want.name,
        durable: None,
        broker_ref: &d.broker_ref,
        prevent_destroy: d.prevent_destroy,
        bind: d.bind,
        provider_id: provider_id(broker, &want.name),
    };
    record_placed(ctx, resource, at, |flags| {
        topic_outputs(&want.name, &now, &d.subjects, flags)
    })
}

/// The topic as it is now; none is "not found" (drift reports GHOST). The entries compared
/// are those the recorded outputs say the user set, and any set on the topic (all managed
/// entries when nothing is recorded).
pub async fn read(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    k: &KafkaRecord,
    recorded: &Json,
) -> Result<Output, DriverError> {
    let what = label(&r.name, &l.stream);
    let admin = ctx.kafka().admin(&what, &l.broker, k)?;
    let Some(e) = describe(&admin, &what, &l.stream, 1).await? else {
        return Err(DriverError::not_found(format!(
            "{what}: no such topic on broker {:?}",
            broker_key(&l.broker)
        )));
    };
    // Without a record (an import), the managed entries the topic keeps by, whatever their
    // source: the adopted config is the topic as it behaves.
    let mut set = if recorded.is_object() {
        Vec::new()
    } else {
        MANAGED.to_vec()
    };
    if !duration_from_json(recorded.get("max_age")).is_zero() {
        set.push(RETENTION_MS);
    }
    if i64_field(recorded, "max_bytes", -1) >= 0 {
        set.push(RETENTION_BYTES);
    }
    if i64_field(recorded, "max_msg_size", -1) >= 0 {
        set.push(MAX_MESSAGE_BYTES);
    }
    let o = observe(&e, set);
    Ok(Output {
        provider_id: provider_id(&l.broker, &l.stream),
        outputs: topic_outputs(
            &l.stream,
            &o,
            &strings_field(recorded, "subjects"),
            &l.flags,
        ),
        sensitive: Vec::new(),
        status: "running".into(),
    })
}

/// Idempotent; `prevent_destroy` refuses, `bind` only forgets. The topic's records go with
/// it, and the records of the groups on it leave the state.
pub async fn delete(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    k: &KafkaRecord,
) -> Result<(), DriverError> {
    let what = label(&r.name, &l.stream);
    if !delete_gate(
        ctx,
        r,
        l,
        &what,
        "bound kafka topic released; it and its records stay",
    )? {
        return Ok(());
    }
    let admin = ctx.kafka().admin(&what, &l.broker, k)?;
    admin
        .delete(&l.stream)
        .await
        .map_err(|e| DriverError::kafka(&what, e))?;
    tracing::info!(resource = %r.name, topic = %l.stream, "kafka topic deleted with its records");
    let stream_id = provider_id(&l.broker, &l.stream);
    ctx.state.update(|s| {
        s.resources.remove(&r.name);
        s.resources.retain(|_, rec| {
            !(rec.type_name == CONSUMER_TYPE
                && rec.provider_id.starts_with(&format!("{stream_id}/")))
        });
    })
}
