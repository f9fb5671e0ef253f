//! `infra.eventbus.consumer` on a kafka broker: a consumer group on its stream's topic.
//!
//! Create positions the new group at its `deliver_policy` by committing its starting offsets
//! (all: each partition's earliest kept offset, new: its end, by_start_time: the first offset
//! at or after the time, where the broker answers that lookup correctly; else a clear error).
//! The start is thus fixed when wfctl applies, not when a subscriber first joins. An existing
//! group keeps its offsets (as on NATS, where the start applies to a new consumer only), so a
//! changed start is a replace. Its other settings (filter, max_deliver, ack_wait, backoff,
//! max_ack_pending) live in the plugin and change in place. Outputs carry the committed offset
//! per partition and the lag. Delete is DeleteGroups (its committed offsets); a group that has
//! no committed offset left was deleted behind wfctl's back (drift: GHOST).

use super::conns;
use crate::iac::drivers::consumer::{provider_id, ConsumerDesired};
use crate::iac::drivers::stream::{broker_key, delete_gate, push_destroys, Flags, Located};
use crate::iac::drivers::CONSUMER_TYPE;
use crate::iac::drivers::{duration_json, record_placed, str_field, Ctx, Output, Placed};
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::iac::state::KafkaRecord;
use crate::kafka::admin::{group_lag, PartitionLag};
use crate::kafka::group::{position_new_group, OffsetLookup};
use crate::kafka::{GroupSpec, KafkaError, StartPolicy};
use crate::nats::stream::{Change, FieldDiffs};
use crate::pb::iac::ResourceRef;
use serde_json::{json, Map, Value as Json};

fn label(resource: &str, topic: &str, group: &str) -> String {
    format!("{CONSUMER_TYPE} {resource:?} (kafka consumer group {group:?} on topic {topic:?})")
}

/// The config as a group: the domain's conversion (`GroupSpec::validate`, the runtime's own)
/// plus the JetStream-only settings the shared spec parsed, each refused by name.
pub fn group_spec(resource: &str, d: &ConsumerDesired) -> Result<GroupSpec, DriverError> {
    // The runtime's conversion: plan and engine refuse with the same words.
    crate::kafka::spec::group_spec(CONSUMER_TYPE, resource, &d.spec).map_err(DriverError::from)
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The keys a consumer's diff compares, and those only a new group honours (a replace).
pub const KEYS: &[&str] = &[
    "filter_subjects",
    "deliver_policy",
    "opt_start_time",
    "max_deliver",
    "ack_wait",
    "backoff",
    "max_ack_pending",
];
pub const REPLACE: &[&str] = &["deliver_policy", "opt_start_time"];

/// A group → outputs in the NATS consumer driver's vocabulary, plus its position when read
/// (`committed_offsets` per partition, `lag` in records).
pub fn group_outputs(g: &GroupSpec, f: &Flags, position: Option<&[PartitionLag]>) -> Json {
    let (policy, start) = match g.start {
        StartPolicy::All => ("DELIVER_POLICY_ALL", String::new()),
        StartPolicy::New => ("DELIVER_POLICY_NEW", String::new()),
        StartPolicy::ByTime(ms) => ("DELIVER_POLICY_BY_START_TIME", rfc3339_ms(ms)),
    };
    let mut o = json!({
        "name": g.group,
        "provider": super::broker::PROVIDER,
        "stream_name": g.topic,
        "broker": f.broker,
        "broker_ref": f.broker_ref,
        "filter_subjects": g.filters,
        "deliver_policy": policy,
        "opt_start_time": start,
        "ack_policy": "ACK_POLICY_EXPLICIT",
        "max_deliver": g.max_deliver.map_or(-1, i64::from),
        "ack_wait": duration_json(g.ack_wait),
        "backoff": g.backoff.iter().map(|b| duration_json(*b)).collect::<Vec<_>>(),
        "max_ack_pending": g.max_ack_pending.map_or(-1, |n| n as i64),
        "prevent_destroy": f.prevent_destroy,
        "bind": f.bind,
    });
    if let (Some(p), Some(m)) = (position, o.as_object_mut()) {
        let committed: Map<String, Json> = p
            .iter()
            .map(|l| (l.partition.to_string(), json!(l.committed.unwrap_or(-1))))
            .collect();
        m.insert("committed_offsets".into(), Json::Object(committed));
        m.insert("lag".into(), json!(p.iter().map(|l| l.lag).sum::<i64>()));
    }
    o
}

/// Pure: the spec against persisted outputs.
pub fn diff(
    resource: &str,
    d: &ConsumerDesired,
    broker: Option<&str>,
    current: &Json,
) -> Result<Vec<PlanChange>, DriverError> {
    let g = group_spec(resource, d)?;
    let flags = Flags {
        broker: broker.unwrap_or_default().to_string(),
        broker_ref: d.broker_ref.clone(),
        prevent_destroy: d.prevent_destroy,
        bind: d.bind,
    };
    let want = group_outputs(&g, &flags, None);
    let mut f = FieldDiffs::default();
    for key in KEYS {
        let (w, mut h) = (want[*key].clone(), current[*key].clone());
        if *key == "filter_subjects" {
            let mut a: Vec<String> = crate::iac::drivers::strings_field(&want, key);
            let mut b: Vec<String> = crate::iac::drivers::strings_field(current, key);
            a.sort();
            b.sort();
            if a == b {
                h = w.clone();
            }
        }
        f.compare(
            key,
            w.to_string(),
            h.to_string(),
            Change::of(!REPLACE.contains(key)),
        );
    }
    Ok(resource_changes(
        &[
            ("name", Some(&g.group)),
            ("stream_name", Some(&g.topic)),
            ("broker", broker),
        ],
        f.0,
        &want,
        current,
    ))
}

/// Whether the broker answers lookups by time correctly: a time far in the future has no
/// offset at or after it, so any offset below the end is a wrong answer (tansu 0.6.0 answers
/// 0 for every time; a real Kafka broker answers "none").
pub fn check_time_lookup<L: OffsetLookup + ?Sized>(l: &L, topic: &str) -> Result<(), KafkaError> {
    const FAR: i64 = 32_503_680_000_000; // the year 3000, in ms
    for p in l.partitions(topic)? {
        let (_, high) = l.watermarks(topic, p)?;
        if let Some(o) = l.offset_for_time(topic, p, FAR)? {
            if o < high {
                return Err(KafkaError::Invalid(format!(
                    "config.deliver_policy: DELIVER_POLICY_BY_START_TIME needs the broker's offsets-for-time lookup, and this broker answers it wrongly (offset {o} of topic {topic:?} partition {p} for the year 3000); use DELIVER_POLICY_ALL or _NEW"
                )));
            }
        }
    }
    Ok(())
}

/// Positions a new group (no committed offset) at its start; an existing group keeps its
/// offsets. Returns whether it was new. Generic over the offsets layer so the by-time path is
/// tested on a fake where the test broker cannot answer it.
pub fn position<L: OffsetLookup + ?Sized>(l: &L, g: &GroupSpec) -> Result<bool, KafkaError> {
    let parts = l.partitions(&g.topic)?;
    if l.committed(&g.topic, &parts)?.iter().any(Option::is_some) {
        return Ok(false);
    }
    if matches!(g.start, StartPolicy::ByTime(_)) {
        check_time_lookup(l, &g.topic)?;
    }
    Ok(position_new_group(l, g)?.is_some())
}

/// What a replace destroys, read from the live cluster ("destroys", as for NATS): the group's
/// committed offsets, so the new group starts over at its deliver policy.
pub async fn plan_report(
    group: &str,
    topic: &str,
    broker: Option<(String, KafkaRecord)>,
    mut changes: Vec<PlanChange>,
) -> Vec<PlanChange> {
    if !changes.iter().any(|c| c.force_new) {
        return changes;
    }
    let Some((_, k)) = broker else {
        return changes;
    };
    let what = label(group, topic, group);
    let t = topic.to_string();
    let read = conns::with_offsets(&what, &k, group, move |o| group_lag(o, &t));
    let bound = conns::REQUEST_TIMEOUT * 2;
    let note = match tokio::time::timeout(bound, read).await {
        Ok(Ok(lag)) => {
            let shown: Vec<String> = lag
                .iter()
                .filter_map(|l| l.committed.map(|c| format!("{}:{c}", l.partition)))
                .collect();
            if shown.is_empty() {
                return changes;
            }
            format!(
                "consumer group {group:?} loses its committed offsets on topic {topic:?} ({}; {} record(s) not yet consumed) and starts over at its new deliver_policy",
                shown.join(", "),
                lag.iter().map(|l| l.lag).sum::<i64>()
            )
        }
        Ok(Err(e)) => format!(
            "unknown: the cluster could not be read for the offsets the replace deletes ({e})"
        ),
        Err(_) => format!(
            "unknown: the cluster did not answer within {bound:?} for the offsets the replace deletes"
        ),
    };
    push_destroys(&mut changes, &[note]);
    changes
}

pub async fn apply(
    ctx: &Ctx,
    resource: &str,
    d: &ConsumerDesired,
    broker: &str,
    k: &KafkaRecord,
) -> Result<Output, DriverError> {
    let g = group_spec(resource, d)?;
    let what = label(resource, &g.topic, &g.group);
    let (spec, bind) = (g.clone(), d.bind);
    let outcome = conns::with_offsets(&what, k, &g.group, move |o| {
        let parts = match o.partitions(&spec.topic) {
            Ok(p) => p,
            Err(KafkaError::TopicNotFound(t)) => {
                return Err(KafkaError::Refused(format!(
                    "topic {t:?} does not exist; apply the stream first (list it in this consumer's depends_on)"
                )))
            }
            Err(e) => return Err(e),
        };
        let exists = o.committed(&spec.topic, &parts)?.iter().any(Option::is_some);
        if !exists && bind {
            return Err(KafkaError::Refused(
                "bind is set and the consumer group has no committed offsets; bind adopts an existing group and never creates one".into(),
            ));
        }
        let created = position(o, &spec)?;
        Ok((created, group_lag(o, &spec.topic)?))
    })
    .await?;
    let (created, lag) = outcome;
    tracing::info!(resource, topic = %g.topic, group = %g.group, broker, created, "kafka consumer group ensured");
    let at = Placed {
        broker,
        servers: &[],
        stream: &g.topic,
        durable: Some(&g.group),
        broker_ref: &d.broker_ref,
        prevent_destroy: d.prevent_destroy,
        bind: d.bind,
        provider_id: provider_id(broker, &g.topic, &g.group),
    };
    record_placed(ctx, resource, at, |flags| {
        group_outputs(&g, flags, Some(&lag))
    })
}

/// The recorded settings with the group's position now; a group without committed offsets
/// (or whose topic is gone) is "not found".
pub async fn read(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    k: &KafkaRecord,
    recorded: &Json,
) -> Result<Output, DriverError> {
    let _ = ctx;
    let what = label(&r.name, &l.stream, &l.durable);
    let topic = l.stream.clone();
    let lag = conns::with_offsets(&what, k, &l.durable, move |o| group_lag(o, &topic)).await?;
    if lag.iter().all(|p| p.committed.is_none()) {
        return Err(DriverError::not_found(format!(
            "{what}: the group has no committed offsets on broker {:?} (deleted)",
            broker_key(&l.broker)
        )));
    }
    let mut outputs = if recorded.is_object() && str_field(recorded, "name") == l.durable {
        recorded.clone()
    } else {
        group_outputs(&GroupSpec::new(&l.durable, &l.stream), &l.flags, None)
    };
    if let (Some(m), Json::Object(now)) = (
        outputs.as_object_mut(),
        group_outputs(&GroupSpec::new(&l.durable, &l.stream), &l.flags, Some(&lag)),
    ) {
        for key in ["committed_offsets", "lag"] {
            if let Some(v) = now.get(key) {
                m.insert(key.into(), v.clone());
            }
        }
    }
    Ok(Output {
        provider_id: provider_id(&l.broker, &l.stream, &l.durable),
        outputs,
        sensitive: Vec::new(),
        status: "running".into(),
    })
}

/// Idempotent (a missing group succeeds); `prevent_destroy` refuses, `bind` only forgets. A
/// group with live members is refused by the broker (stop its subscribers first).
pub async fn delete(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    k: &KafkaRecord,
) -> Result<(), DriverError> {
    let what = label(&r.name, &l.stream, &l.durable);
    if !delete_gate(
        ctx,
        r,
        l,
        &what,
        "bound kafka consumer group released; its offsets stay",
    )? {
        return Ok(());
    }
    let admin = ctx.kafka().admin(&what, &l.broker, k)?;
    admin
        .delete_group(&l.durable)
        .await
        .map_err(|e| DriverError::kafka(&what, e))?;
    tracing::info!(resource = %r.name, group = %l.durable, "kafka consumer group deleted with its committed offsets");
    ctx.state.update(|s| {
        s.resources.remove(&r.name);
    })
}
