//! Stream and consumer configs on a pgchannel broker, converted into the rows this domain
//! keeps: the one conversion both faces use. The runtime ensures its stream and consumer
//! modules through it, and the IaC drivers plan and apply with it, so the engine and wfctl
//! accept and refuse the same configs with the same words. The input is the validated
//! `StreamSpec` / `ConsumerSpec` both providers share (one strict decode); a setting that only
//! NATS JetStream has (replicas, memory storage, retention and discard policies, per-subject
//! limits, ...) is refused with one line naming the field: silently dropping it would leave a
//! config that says something the database does not do.

use super::{
    AckPolicy as PgAck, ConsumerDef, DeliverFrom, StreamDef, DEFAULT_ACK_WAIT,
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_DELIVER,
};
use crate::config::error::{ConfigError, Problems};
use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use std::time::Duration;

/// Milliseconds: the unit the ack wait, backoff and duplicate window columns keep.
pub const MS: Duration = Duration::from_millis(1);

pub const NATS_ONLY: &str = "is a NATS JetStream setting; pgchannel";

/// The domain's own checks (stream names name a NOTIFY channel; filters are literal, comma
/// lists or `prefix.>`), so wfctl and the runtime refuse the same configs.
fn domain(r: Result<(), super::PgError>) -> Result<(), String> {
    r.map_err(|e| {
        let m = e.to_string();
        m.strip_prefix("pgchannel: ").unwrap_or(&m).to_string()
    })
}

/// To the unit a column stores, rounded as the domain rounds when it writes (max_age up to
/// whole seconds, milliseconds and microseconds down), so the desired side compares equal to
/// what was written, and a row the runtime ensured from the same config reads back the same.
fn ceil_to(d: Duration, unit: Duration) -> Duration {
    let (n, u) = (d.as_nanos(), unit.as_nanos());
    Duration::from_nanos(u64::try_from(n.div_ceil(u) * u).unwrap_or(u64::MAX))
}

pub fn floor_to(d: Duration, unit: Duration) -> Duration {
    let (n, u) = (d.as_nanos(), unit.as_nanos());
    Duration::from_nanos(u64::try_from(n / u * u).unwrap_or(u64::MAX))
}

pub fn limit(v: i64) -> Option<i64> {
    (v > 0).then_some(v)
}

/// The row a stream config asks for, or every NATS-only setting it uses.
pub fn stream_def(type_name: &str, module: &str, s: &StreamSpec) -> Result<StreamDef, ConfigError> {
    let mut p = Problems::new(type_name, module);
    p.check("name", domain(super::validate_stream_name(&s.name)));
    if s.replicas > 1 {
        p.field(
            "num_replicas",
            format!("{} {NATS_ONLY} stores one copy, in PostgreSQL (remove it, or replicate the database)", s.replicas),
        );
    }
    if s.storage == StorageType::Memory {
        p.field(
            "storage",
            format!("STORAGE_TYPE_MEMORY {NATS_ONLY} keeps events in tables (remove it)"),
        );
    }
    if s.retention != RetentionPolicy::Limits {
        p.field(
            "retention_policy",
            format!(
                "{} {NATS_ONLY} retains by max_age/max_msgs/max_bytes only (remove it)",
                if s.retention == RetentionPolicy::Interest {
                    "RETENTION_POLICY_INTEREST"
                } else {
                    "RETENTION_POLICY_WORKQUEUE"
                }
            ),
        );
    }
    if s.discard == DiscardPolicy::New {
        p.field(
            "discard",
            format!("DISCARD_POLICY_NEW {NATS_ONLY} prunes the oldest events (remove it)"),
        );
    }
    if s.max_msgs_per_subject > 0 {
        p.field(
            "max_msgs_per_subject",
            format!("{NATS_ONLY} has no per-subject limit (remove it)"),
        );
    }
    if s.max_msg_size > 0 {
        p.field(
            "max_msg_size",
            format!("{NATS_ONLY} has no message size limit (remove it)"),
        );
    }
    if s.description.is_some() {
        p.field(
            "description",
            "pgchannel has no column for it (remove it, or put it in a YAML comment)",
        );
    }
    for key in s.settings.keys() {
        p.field(key, format!("{NATS_ONLY} has no equivalent (remove it)"));
    }
    if s.servers.iter().any(|u| !u.trim().is_empty()) {
        p.field(
            "servers",
            "names NATS servers; a pgchannel stream lives in its broker's database (use broker_ref)",
        );
    }
    // max_age is kept in whole seconds (the Go column), the window in milliseconds. The window
    // defaults to 2 min whatever max_age is, as the runtime face ensures the row.
    let max_age = (!s.max_age.is_zero()).then(|| ceil_to(s.max_age, Duration::from_secs(1)));
    let dup = floor_to(s.duplicate_window.unwrap_or(DEFAULT_DUPLICATE_WINDOW), MS);
    p.finish(StreamDef {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        max_age,
        max_msgs: limit(s.max_msgs),
        max_bytes: limit(s.max_bytes),
        duplicate_window: dup,
    })
}

/// The row a consumer config asks for, or every NATS-only setting it uses.
pub fn consumer_def(
    type_name: &str,
    module: &str,
    c: &ConsumerSpec,
) -> Result<ConsumerDef, ConfigError> {
    let mut p = Problems::new(type_name, module);
    p.check(
        "stream_name",
        domain(super::validate_stream_name(&c.stream)),
    );
    if c.durable.contains(':') {
        p.field(
            "name",
            "must not contain ':' on pgchannel (ack tokens are <stream>:<consumer>:<id>)",
        );
    }
    for (i, f) in c.filter_subjects.iter().enumerate() {
        p.check(
            &format!("filter_subjects[{i}]"),
            domain(super::parse_filters(std::slice::from_ref(f)).map(|_| ())),
        );
    }
    let deliver = match &c.deliver {
        DeliverPolicy::All => DeliverFrom::All,
        DeliverPolicy::New => DeliverFrom::New,
        DeliverPolicy::Last => DeliverFrom::Last,
        DeliverPolicy::ByStartSequence { start_sequence } => {
            DeliverFrom::BySeq(i64::try_from(*start_sequence).unwrap_or(i64::MAX))
        }
        // Kept in microseconds.
        DeliverPolicy::ByStartTime { start_time } => DeliverFrom::ByTime(
            start_time
                .replace_nanosecond(start_time.nanosecond() / 1000 * 1000)
                .unwrap_or(*start_time),
        ),
        // Not in the config's enum today; refused should it ever be.
        DeliverPolicy::LastPerSubject => {
            p.field(
                "deliver_policy",
                format!("DELIVER_POLICY_LAST_PER_SUBJECT {NATS_ONLY} supports _ALL, _NEW, _LAST, _BY_START_SEQUENCE and _BY_START_TIME"),
            );
            DeliverFrom::All
        }
    };
    let ack_policy = match c.ack {
        AckPolicy::None => PgAck::None,
        AckPolicy::All => PgAck::All,
        _ => PgAck::Explicit,
    };
    if c.max_ack_pending.is_some_and(|n| n > 0) {
        p.field(
            "max_ack_pending",
            format!("{NATS_ONLY} bounds in-flight messages per subscriber (trigger max_in_flight) (remove it)"),
        );
    }
    if c.description.is_some() {
        p.field(
            "description",
            "pgchannel has no column for it (remove it, or put it in a YAML comment)",
        );
    }
    for key in c.settings.keys() {
        p.field(key, format!("{NATS_ONLY} has no equivalent (remove it)"));
    }
    if c.servers.iter().any(|u| !u.trim().is_empty()) {
        p.field(
            "servers",
            "names NATS servers; a pgchannel consumer lives in its broker's database (use broker_ref)",
        );
    }
    let max_deliver = if c.max_deliver <= 0 {
        DEFAULT_MAX_DELIVER
    } else {
        i32::try_from(c.max_deliver).unwrap_or(i32::MAX)
    };
    p.finish(ConsumerDef {
        stream: c.stream.clone(),
        name: c.durable.clone(),
        filter_subjects: c.filter_subjects.clone(),
        deliver,
        ack_policy,
        max_deliver,
        // Kept in milliseconds.
        ack_wait: floor_to(c.ack_wait.unwrap_or(DEFAULT_ACK_WAIT), MS),
        backoff: c.backoff.iter().map(|b| floor_to(*b, MS)).collect(),
    })
}
