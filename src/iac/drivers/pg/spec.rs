//! Stream and consumer configs on a pgchannel broker: the same validated `StreamSpec` /
//! `ConsumerSpec` the NATS drivers use (one strict decode for both providers), converted into
//! the rows `crate::pg` keeps. A setting that only NATS JetStream has (replicas, memory
//! storage, retention and discard policies, per-subject limits, ...) is refused here, at plan
//! (Diff, ValidatePlan) and at apply, with one line naming the field: silently dropping it
//! would leave a config that says something the database does not do.
//!
//! The outputs of a pgchannel stream or consumer use the NATS drivers' key names and value
//! vocabulary for the settings both have, so drift and a reader of wfctl's state see one
//! language; they carry `provider: pgchannel` so a Diff without the provider state still knows
//! which provider they describe.

use crate::config::error::{ConfigError, Problems};
use crate::iac::drivers::duration_json;
use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use crate::pg::{
    AckPolicy as PgAck, ConsumerDef, DeliverFrom, StreamDef, DEFAULT_ACK_WAIT,
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_DELIVER,
};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use serde_json::{json, Value as Json};
use std::time::Duration;

pub const PROVIDER: &str = "pgchannel";
const MS: Duration = Duration::from_millis(1);

const NATS_ONLY: &str = "is a NATS JetStream setting; pgchannel";

/// The domain's own checks (stream names name a NOTIFY channel; filters are literal, comma
/// lists or `prefix.>`), so wfctl and the runtime refuse the same configs.
fn domain(r: Result<(), crate::pg::PgError>) -> Result<(), String> {
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

fn floor_to(d: Duration, unit: Duration) -> Duration {
    let (n, u) = (d.as_nanos(), unit.as_nanos());
    Duration::from_nanos(u64::try_from(n / u * u).unwrap_or(u64::MAX))
}

fn limit(v: i64) -> Option<i64> {
    (v > 0).then_some(v)
}

/// The row a stream config asks for, or every NATS-only setting it uses.
pub fn stream_def(type_name: &str, module: &str, s: &StreamSpec) -> Result<StreamDef, ConfigError> {
    let mut p = Problems::new(type_name, module);
    p.check("name", domain(crate::pg::validate_stream_name(&s.name)));
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
                crate::iac::drivers::stream::retention_name(s.retention)
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
        domain(crate::pg::validate_stream_name(&c.stream)),
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
            domain(crate::pg::parse_filters(std::slice::from_ref(f)).map(|_| ())),
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

/// The record-only flags are the NATS drivers' own: both providers keep them in the same
/// resource records.
pub use crate::iac::drivers::stream::Flags;

/// A stream row → outputs (unlimited limits show as -1, as for NATS).
pub fn stream_outputs(d: &StreamDef, f: &Flags) -> Json {
    json!({
        "name": d.name,
        "provider": PROVIDER,
        "broker": f.broker,
        "broker_ref": f.broker_ref,
        "subjects": d.subjects,
        "max_age": duration_json(d.max_age.unwrap_or_default()),
        "max_msgs": d.max_msgs.unwrap_or(-1),
        "max_bytes": d.max_bytes.unwrap_or(-1),
        "duplicate_window": duration_json(d.duplicate_window),
        "prevent_destroy": f.prevent_destroy,
        "bind": f.bind,
    })
}

fn rfc3339(t: &time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A consumer row → outputs, in the NATS consumer driver's vocabulary.
pub fn consumer_outputs(d: &ConsumerDef, f: &Flags) -> Json {
    let (policy, seq, start) = match &d.deliver {
        DeliverFrom::All => ("DELIVER_POLICY_ALL", 0, String::new()),
        DeliverFrom::New => ("DELIVER_POLICY_NEW", 0, String::new()),
        DeliverFrom::Last => ("DELIVER_POLICY_LAST", 0, String::new()),
        DeliverFrom::BySeq(s) => ("DELIVER_POLICY_BY_START_SEQUENCE", *s, String::new()),
        DeliverFrom::ByTime(t) => ("DELIVER_POLICY_BY_START_TIME", 0, rfc3339(t)),
    };
    json!({
        "name": d.name,
        "provider": PROVIDER,
        "stream_name": d.stream,
        "broker": f.broker,
        "broker_ref": f.broker_ref,
        "filter_subjects": d.filter_subjects,
        "deliver_policy": policy,
        "opt_start_seq": seq,
        "opt_start_time": start,
        "ack_policy": match d.ack_policy {
            PgAck::Explicit => "ACK_POLICY_EXPLICIT",
            PgAck::None => "ACK_POLICY_NONE",
            PgAck::All => "ACK_POLICY_ALL",
        },
        "max_deliver": d.max_deliver,
        "ack_wait": duration_json(d.ack_wait),
        "backoff": d.backoff.iter().map(|b| duration_json(*b)).collect::<Vec<_>>(),
        "prevent_destroy": f.prevent_destroy,
        "bind": f.bind,
    })
}

/// The keys a stream's diff compares, each in place (a row update keeps the events).
pub const STREAM_KEYS: &[&str] = &[
    "subjects",
    "max_age",
    "max_msgs",
    "max_bytes",
    "duplicate_window",
];

/// The keys a consumer's diff compares.
pub const CONSUMER_KEYS: &[&str] = &[
    "filter_subjects",
    "deliver_policy",
    "opt_start_seq",
    "opt_start_time",
    "ack_policy",
    "max_deliver",
    "ack_wait",
    "backoff",
];

/// Where a consumer starts only matters when its row is created (an existing row keeps its
/// position), so changing it is a replace, as for a JetStream consumer: the row is deleted and
/// made again, starting where the new setting says.
pub const CONSUMER_REPLACE: &[&str] = &["deliver_policy", "opt_start_seq", "opt_start_time"];

/// Lists compare as sets (subjects, filters), except backoff, whose order is the schedule.
pub fn same(key: &str, a: &Json, b: &Json) -> bool {
    let set = |v: &Json| {
        let mut items: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default();
        items.sort();
        items
    };
    match key {
        "subjects" | "filter_subjects" => set(a) == set(b),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::drivers::{
        consumer, duration_from_json, i64_field, str_field, stream, strings_field, CONSUMER_TYPE,
        STREAM_TYPE,
    };

    /// Outputs → the stream row they describe (the round trip the tests check).
    pub fn stream_from_outputs(o: &Json) -> StreamDef {
        let age = duration_from_json(o.get("max_age"));
        StreamDef {
            name: str_field(o, "name").to_string(),
            subjects: strings_field(o, "subjects"),
            max_age: (!age.is_zero()).then_some(age),
            max_msgs: limit(i64_field(o, "max_msgs", -1)),
            max_bytes: limit(i64_field(o, "max_bytes", -1)),
            duplicate_window: duration_from_json(o.get("duplicate_window")),
        }
    }

    fn s(cfg: Json) -> StreamSpec {
        stream::decode("orders", cfg.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn every_jetstream_setting_is_refused_one_line_each() {
        use crate::nats::settings::{CONSUMER as CONSUMER_SETTINGS, STREAM as STREAM_SETTINGS};
        let spec = s(json!({
            "name": "ORDERS", "subjects": ["orders.>"], "sources": [{"name": "UP"}],
            "subject_transform": {"src": "orders.>", "dest": "o.>"},
            "republish": {"src": "orders.>", "dest": "r.>"}, "compression": "STREAM_COMPRESSION_S2",
            "placement": {"tags": ["ssd"]}, "metadata": {"a": "b"}, "deny_delete": true,
            "deny_purge": true, "allow_rollup_hdrs": true, "allow_direct": true,
            "discard_new_per_subject": false, "max_consumers": 3,
            "consumer_limits": {"max_ack_pending": 5}, "allow_msg_ttl": true,
            "subject_delete_marker_ttl": "60s", "mirror_direct": false
        }));
        let e = stream_def(STREAM_TYPE, "orders", &spec)
            .unwrap_err()
            .to_string();
        // Every setting but mirror (a mirror has no subjects, tested by the stream's own checks).
        assert_eq!(e.lines().count(), STREAM_SETTINGS.len() - 1, "{e}");
        for st in STREAM_SETTINGS.iter().filter(|st| st.key != "mirror") {
            let line = format!(
                "config.{}: {NATS_ONLY} has no equivalent (remove it)",
                st.key
            );
            assert!(e.contains(&line), "{line} missing in: {e}");
        }
        let c = consumer::decode(
            "w",
            json!({
                "name": "w", "stream_name": "ORDERS", "metadata": {"a": "b"},
                "replay_policy": "REPLAY_POLICY_ORIGINAL", "sample_freq": 10, "headers_only": true,
                "inactive_threshold": "60s", "num_replicas": 1, "mem_storage": true,
                "max_waiting": 5, "max_batch": 5, "max_expires": "5s", "max_bytes": 100,
                "pause_until": "2030-01-01T00:00:00Z", "priority_policy": "PRIORITY_POLICY_PINNED_CLIENT",
                "priority_groups": ["g"], "priority_timeout": "60s"
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let e = consumer_def(CONSUMER_TYPE, "w", &c)
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), CONSUMER_SETTINGS.len(), "{e}");
        for st in CONSUMER_SETTINGS {
            assert!(
                e.contains(&format!("config.{}: ", st.key)),
                "{} missing in: {e}",
                st.key
            );
        }
    }

    #[test]
    fn nats_only_stream_settings_are_refused_by_name() {
        let spec = s(json!({
            "name": "ORDERS", "subjects": ["orders.>"], "num_replicas": 3,
            "storage": "STORAGE_TYPE_MEMORY", "retention_policy": "RETENTION_POLICY_WORKQUEUE",
            "discard": "DISCARD_POLICY_NEW", "max_msgs_per_subject": 2, "max_msg_size": 10
        }));
        let e = stream_def(STREAM_TYPE, "orders", &spec)
            .unwrap_err()
            .to_string();
        for field in [
            "config.num_replicas",
            "config.storage",
            "config.retention_policy",
            "config.discard",
            "config.max_msgs_per_subject",
            "config.max_msg_size",
        ] {
            assert!(e.contains(field), "{field} missing in: {e}");
        }
        assert_eq!(e.lines().count(), 6, "{e}");
        assert!(e
            .lines()
            .all(|l| l.starts_with("infra.eventbus.stream \"orders\": config.")));
    }

    #[test]
    fn stream_rows_round_trip_through_outputs() {
        let spec = s(json!({
            "name": "ORDERS", "subjects": ["orders.>", "refunds.created"], "max_age": "3600s",
            "max_msgs": 100, "max_bytes": 1048576, "duplicate_window": "30s"
        }));
        let d = stream_def(STREAM_TYPE, "orders", &spec).unwrap();
        assert_eq!(d.duplicate_window, Duration::from_secs(30));
        let out = stream_outputs(&d, &Flags::default());
        assert_eq!(out["max_age"], "3600s");
        assert_eq!(out["provider"], PROVIDER);
        let back = stream_from_outputs(&out);
        assert_eq!(stream_outputs(&back, &Flags::default()), out);
        // Unlimited and defaults.
        let d = stream_def(
            STREAM_TYPE,
            "o",
            &s(json!({"name": "O", "subjects": ["o.>"], "max_age": "60s"})),
        )
        .unwrap();
        assert_eq!((d.max_msgs, d.max_bytes), (None, None));
        assert_eq!(d.duplicate_window, DEFAULT_DUPLICATE_WINDOW);
    }

    #[test]
    fn pg_names_and_star_filters_are_refused() {
        let e = stream_def(
            STREAM_TYPE,
            "x",
            &s(json!({"name": "BMW-Fulfillment", "subjects": ["bmw.*.done"]})),
        )
        .unwrap_err()
        .to_string();
        assert!(
            // Stream subjects may use `*` (publish routes by them); only filters may not.
            e.contains("config.name") && e.contains("NOTIFY") && !e.contains("subjects"),
            "{e}"
        );
        let c = consumer::decode(
            "w",
            br#"{"name":"w","stream_name":"ORDERS","filter_subject":"orders.*","max_ack_pending":10}"#,
        )
        .unwrap();
        let e = consumer_def(CONSUMER_TYPE, "w", &c)
            .unwrap_err()
            .to_string();
        for f in ["config.filter_subjects[0]", "config.max_ack_pending"] {
            assert!(e.contains(f), "{f}: {e}");
        }
    }

    #[test]
    fn consumer_defaults_follow_the_go_provider() {
        let c = consumer::decode("w", br#"{"name":"w","stream_name":"ORDERS"}"#).unwrap();
        let d = consumer_def(CONSUMER_TYPE, "w", &c).unwrap();
        assert_eq!(d.max_deliver, DEFAULT_MAX_DELIVER);
        assert_eq!(d.ack_wait, DEFAULT_ACK_WAIT);
        let out = consumer_outputs(&d, &Flags::default());
        assert_eq!(out["deliver_policy"], "DELIVER_POLICY_ALL");
        assert_eq!(out["ack_policy"], "ACK_POLICY_EXPLICIT");
    }
}
