//! Stream and consumer modules on a kafka broker: the validated `StreamSpec` / `ConsumerSpec`
//! every provider shares, converted into a topic and a consumer group. The runtime ensures its
//! stream and consumer modules through these, so a setting only NATS JetStream has is refused
//! with one line naming the field (silently dropping it would leave a config that says
//! something the cluster does not do).

use super::group::{check_group_id, GroupSpec, StartPolicy, DEFAULT_ACK_WAIT};
use super::topic::{
    check_topic_name, TopicDefaults, TopicSpec, MAX_MESSAGE_BYTES, MIN_INSYNC_REPLICAS,
    RETENTION_BYTES, RETENTION_MS,
};
use crate::config::error::{ConfigError, Problems};
use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use std::collections::BTreeMap;

const NATS_ONLY: &str = "is a NATS JetStream setting; kafka";

/// The topic a stream module asks for, or every setting Kafka does not have. The partition
/// count is the broker's (1 for a new topic; an existing topic keeps its own).
pub fn topic_spec(
    type_name: &str,
    module: &str,
    s: &StreamSpec,
    defaults: TopicDefaults,
) -> Result<TopicSpec, ConfigError> {
    let mut p = Problems::new(type_name, module);
    p.check("name", check_topic_name(&s.name));
    if s.retention != RetentionPolicy::Limits {
        p.field(
            "retention_policy",
            format!("{NATS_ONLY} topics keep records by age and size only (RETENTION_POLICY_LIMITS); acks never delete them"),
        );
    }
    if s.storage == StorageType::Memory {
        p.field(
            "storage",
            format!(
                "STORAGE_TYPE_MEMORY {NATS_ONLY} topics live on the brokers' disks (remove it)"
            ),
        );
    }
    if s.discard == DiscardPolicy::New {
        p.field(
            "discard",
            format!(
                "DISCARD_POLICY_NEW {NATS_ONLY} drops a full topic's oldest segments (remove it)"
            ),
        );
    }
    if s.max_msgs > 0 {
        p.field(
            "max_msgs",
            format!("{NATS_ONLY} limits by age and size only (use max_age or max_bytes)"),
        );
    }
    if s.max_msgs_per_subject > 0 {
        p.field(
            "max_msgs_per_subject",
            format!("{NATS_ONLY} has no per-subject limit"),
        );
    }
    if s.duplicate_window.is_some() {
        p.field(
            "duplicate_window",
            format!("{NATS_ONLY} de-duplicates only a producer's own retries; message_id travels as a header (see the README)"),
        );
    }
    if s.description.is_some() {
        p.field(
            "description",
            format!("{NATS_ONLY} topics have no description"),
        );
    }
    for key in s.settings.keys() {
        p.field(
            key,
            format!("{NATS_ONLY} topics do not have it (remove it)"),
        );
    }
    let mut configs = BTreeMap::new();
    if !s.max_age.is_zero() {
        if !s.max_age.subsec_nanos().is_multiple_of(1_000_000) {
            p.field("max_age", "kafka keeps whole milliseconds (retention.ms)");
        }
        configs.insert(RETENTION_MS.to_string(), s.max_age.as_millis().to_string());
    }
    if s.max_bytes > 0 {
        configs.insert(RETENTION_BYTES.to_string(), s.max_bytes.to_string());
    }
    if s.max_msg_size > 0 {
        configs.insert(MAX_MESSAGE_BYTES.to_string(), s.max_msg_size.to_string());
    }
    if let Some(n) = defaults.min_insync_replicas {
        configs.insert(MIN_INSYNC_REPLICAS.to_string(), n.to_string());
    }
    let spec = TopicSpec {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        partitions: 1,
        replication_factor: if s.replicas > 1 {
            i32::try_from(s.replicas).ok()
        } else {
            defaults.replication_factor
        },
        configs,
    };
    p.finish(spec)
}

/// The consumer group a consumer module asks for, or every setting Kafka does not have.
pub fn group_spec(
    type_name: &str,
    module: &str,
    c: &ConsumerSpec,
) -> Result<GroupSpec, ConfigError> {
    let mut p = Problems::new(type_name, module);
    p.check("name", check_group_id(&c.durable));
    p.check("stream_name", check_topic_name(&c.stream));
    let start = match c.deliver {
        DeliverPolicy::All => StartPolicy::All,
        DeliverPolicy::New => StartPolicy::New,
        DeliverPolicy::ByStartTime { start_time } => {
            StartPolicy::ByTime((start_time.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        DeliverPolicy::Last | DeliverPolicy::LastPerSubject => {
            p.field("deliver_policy", "DELIVER_POLICY_LAST and _LAST_PER_SUBJECT have no kafka equivalent (offsets are per partition); use _ALL, _NEW or _BY_START_TIME");
            StartPolicy::All
        }
        DeliverPolicy::ByStartSequence { .. } => {
            p.field("deliver_policy", "DELIVER_POLICY_BY_START_SEQUENCE has no kafka equivalent (offsets are per partition); use _ALL, _NEW or _BY_START_TIME");
            StartPolicy::All
        }
    };
    if c.ack != AckPolicy::Explicit {
        p.field("ack_policy", "kafka consumers settle each message (ACK_POLICY_EXPLICIT); offsets are committed up to the lowest unsettled one");
    }
    if c.description.is_some() {
        p.field("description", "kafka consumer groups have no description");
    }
    for key in c.settings.keys() {
        p.field(
            key,
            format!("{NATS_ONLY} consumer groups do not have it (remove it)"),
        );
    }
    let spec = GroupSpec {
        group: c.durable.clone(),
        topic: c.stream.clone(),
        filters: c.filter_subjects.clone(),
        start,
        max_deliver: (c.max_deliver > 0).then(|| u32::try_from(c.max_deliver).unwrap_or(u32::MAX)),
        ack_wait: c
            .ack_wait
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_ACK_WAIT),
        backoff: c.backoff.clone(),
        max_ack_pending: c
            .max_ack_pending
            .filter(|n| *n > 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    p.finish(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::eventbus::{ConsumerConfig, StreamConfig};
    use std::time::Duration;

    fn stream(f: impl FnOnce(&mut StreamConfig)) -> Result<TopicSpec, ConfigError> {
        let mut c = StreamConfig {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        };
        f(&mut c);
        let s = StreamSpec::validate("eventbus.stream", "orders", &c).expect("stream spec");
        topic_spec(
            "eventbus.stream",
            "orders",
            &s,
            TopicDefaults {
                replication_factor: Some(3),
                min_insync_replicas: Some(2),
            },
        )
    }

    fn consumer(f: impl FnOnce(&mut ConsumerConfig)) -> Result<GroupSpec, ConfigError> {
        let mut c = ConsumerConfig {
            name: "billing".into(),
            stream_name: "ORDERS".into(),
            ..Default::default()
        };
        f(&mut c);
        let s = ConsumerSpec::validate("eventbus.consumer", "billing", &c).expect("consumer");
        group_spec("eventbus.consumer", "billing", &s)
    }

    #[test]
    fn limits_become_topic_configs() {
        let t = stream(|c| {
            c.max_age = Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            });
            c.max_bytes = 1 << 20;
            c.max_msg_size = 4096;
        })
        .unwrap();
        assert_eq!(t.name, "ORDERS");
        assert_eq!(t.subjects, vec!["orders.>"]);
        assert_eq!(t.replication_factor, Some(3));
        assert_eq!(t.configs[RETENTION_MS], "3600000");
        assert_eq!(t.configs[RETENTION_BYTES], "1048576");
        assert_eq!(t.configs[MAX_MESSAGE_BYTES], "4096");
        assert_eq!(t.configs[MIN_INSYNC_REPLICAS], "2");
    }

    #[test]
    fn nats_only_stream_settings_are_refused_one_line_each() {
        let e = stream(|c| {
            c.max_msgs = 10;
            c.duplicate_window = Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            });
            c.description = "d".into();
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        for f in ["max_msgs", "duplicate_window", "description"] {
            assert!(e.to_string().contains(&format!("config.{f}: ")), "{f}: {e}");
        }
    }

    #[test]
    fn consumers_become_groups() {
        let g = consumer(|c| {
            c.filter_subject = "orders.*.paid".into();
            c.max_deliver = 3;
            c.ack_wait = Some(prost_types::Duration {
                seconds: 7,
                nanos: 0,
            });
        })
        .unwrap();
        assert_eq!(g.group, "billing");
        assert_eq!(g.topic, "ORDERS");
        assert_eq!(g.filters, vec!["orders.*.paid"]);
        assert_eq!(g.max_deliver, Some(3));
        assert_eq!(g.ack_wait, Duration::from_secs(7));
        assert_eq!(g.start, StartPolicy::All);
        assert_eq!(consumer(|_| {}).unwrap().max_deliver, None, "unlimited");
        let e = consumer(|c| c.deliver_policy = 2).unwrap_err();
        assert!(e.to_string().contains("config.deliver_policy: "), "{e}");
    }
}
