//! Stream and consumer outputs on a pgchannel broker. The config → row conversion (which
//! refuses the settings only NATS has, at plan (Diff, ValidatePlan) and at apply, with one line
//! naming the field) is the domain's own, `crate::pg::spec`, shared with the runtime face.
//!
//! The outputs of a pgchannel stream or consumer use the NATS drivers' key names and value
//! vocabulary for the settings both have, so drift and a reader of wfctl's state see one
//! language; they carry `provider: pgchannel` so a Diff without the provider state still knows
//! which provider they describe.

use crate::iac::drivers::duration_json;
pub use crate::pg::spec::{consumer_def, stream_def};
use crate::pg::{AckPolicy as PgAck, ConsumerDef, DeliverFrom, StreamDef};
use serde_json::{json, Value as Json};

pub const PROVIDER: &str = "pgchannel";

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
    use crate::nats::stream::StreamSpec;
    use crate::pg::spec::{limit, NATS_ONLY};
    use crate::pg::{DEFAULT_ACK_WAIT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_DELIVER};
    use std::time::Duration;

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
