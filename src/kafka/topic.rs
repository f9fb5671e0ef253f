//! A stream is a topic. `TopicSpec` is validated from the same `StreamConfig` NATS and pgchannel
//! read; the settings Kafka has map onto topic properties, the ones it has not are refused, one
//! line each:
//!
//! | stream field | topic |
//! |---|---|
//! | `name` | topic name (`[A-Za-z0-9._-]`, at most 249) |
//! | `subjects` | kept by the plugin: which topic a subject is published to |
//! | `partitions` | partition count (default 1; only ever raised in place) |
//! | `num_replicas` | replication factor (0: `kafka.default_replication_factor`, else the broker's default) |
//! | `max_age` | `retention.ms` |
//! | `max_bytes` | `retention.bytes` (Kafka enforces it per partition) |
//! | `max_msg_size` | `max.message.bytes` |
//! | broker `kafka.min_insync_replicas` | `min.insync.replicas` |
//!
//! Ensuring a topic is create-or-adopt, then an in-place update: partitions up
//! (CreatePartitions) and changed config entries (AlterConfigs, sent as the whole override set
//! because that request replaces it). Fewer partitions and another replication factor are
//! refused: Kafka cannot do either in place. The admin calls go through [`TopicAdmin`] so the
//! plan can be tested against [`FakeAdmin`] where the test broker lacks an API.

use crate::config::error::{duration, negative, ConfigError, Problems};
use crate::config::kafka::KafkaClientConfig;
use crate::nats::names::check_filter_subject;
use crate::pb::eventbus::{DiscardPolicy, RetentionPolicy, StorageType, StreamConfig};
use crate::secret::quote;
use std::collections::BTreeMap;

use super::KafkaError;

pub const RETENTION_MS: &str = "retention.ms";
pub const RETENTION_BYTES: &str = "retention.bytes";
pub const MAX_MESSAGE_BYTES: &str = "max.message.bytes";
pub const MIN_INSYNC_REPLICAS: &str = "min.insync.replicas";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub partitions: i32,
    /// None: the broker's default.
    pub replication_factor: Option<i32>,
    /// Only the entries the user set; anything else stays the broker's default.
    pub configs: BTreeMap<String, String>,
}

/// What the broker module contributes to its topics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicDefaults {
    pub replication_factor: Option<i32>,
    pub min_insync_replicas: Option<i32>,
}

impl From<&KafkaClientConfig> for TopicDefaults {
    fn from(c: &KafkaClientConfig) -> Self {
        TopicDefaults {
            replication_factor: c.default_replication_factor,
            min_insync_replicas: c.min_insync_replicas,
        }
    }
}

/// Kafka's topic name rule.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{} is not a valid topic name", quote(name)));
    }
    if name.len() > 249 {
        return Err(format!(
            "{} is longer than 249 characters (Kafka's limit)",
            quote(name)
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{} contains {c:?}; kafka topic names use letters, digits, '.', '_' and '-' only",
            quote(name)
        ));
    }
    Ok(())
}

impl TopicSpec {
    pub fn validate(
        type_name: &str,
        module: &str,
        c: &StreamConfig,
        defaults: TopicDefaults,
    ) -> Result<TopicSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check("name", check_topic_name(&c.name));
        if c.subjects.is_empty() {
            p.field(
                "subjects",
                "must contain at least one subject, e.g. [\"orders.>\"]",
            );
        }
        for (i, s) in c.subjects.iter().enumerate() {
            p.check(&format!("subjects[{i}]"), check_filter_subject(s));
        }
        if !(0..=10_000).contains(&c.partitions) {
            p.field(
                "partitions",
                format!("{} is out of range (1..=10000; 0 means 1)", c.partitions),
            );
        }
        if !(0..=32).contains(&c.num_replicas) {
            p.field(
                "num_replicas",
                format!(
                    "{} is out of range (1..=32; 0 means the default)",
                    c.num_replicas
                ),
            );
        }
        let mut configs = BTreeMap::new();
        if negative(&c.max_age) {
            p.field("max_age", "must not be negative");
        } else if let Some(age) = duration(&c.max_age).filter(|d| !d.is_zero()) {
            if age.subsec_nanos() % 1_000_000 != 0 {
                p.field("max_age", "kafka keeps whole milliseconds (retention.ms)");
            }
            configs.insert(RETENTION_MS.to_string(), age.as_millis().to_string());
        }
        if c.max_bytes > 0 {
            configs.insert(RETENTION_BYTES.to_string(), c.max_bytes.to_string());
        } else if c.max_bytes < -1 {
            p.field("max_bytes", "must be -1 or 0 (unlimited) or a byte count");
        }
        if c.max_msg_size > 0 {
            configs.insert(MAX_MESSAGE_BYTES.to_string(), c.max_msg_size.to_string());
        } else if c.max_msg_size < -1 {
            p.field(
                "max_msg_size",
                "must be -1 or 0 (the broker's limit) or a byte count",
            );
        }
        if let Some(n) = defaults.min_insync_replicas {
            configs.insert(MIN_INSYNC_REPLICAS.to_string(), n.to_string());
        }
        // NATS-only settings: refused, not ignored (a limit that silently does nothing would
        // leave a user believing it holds).
        let nats = |what: &str| format!("is a NATS setting; kafka topics have no {what}");
        match RetentionPolicy::try_from(c.retention_policy) {
            Ok(RetentionPolicy::Unspecified | RetentionPolicy::Limits) => {}
            _ => p.field(
                "retention_policy",
                "kafka topics keep records by age and size only (RETENTION_POLICY_LIMITS); a consumer's acks never delete them",
            ),
        }
        if !matches!(
            StorageType::try_from(c.storage),
            Ok(StorageType::Unspecified | StorageType::File)
        ) {
            p.field("storage", nats("memory storage"));
        }
        if !matches!(
            DiscardPolicy::try_from(c.discard),
            Ok(DiscardPolicy::Unspecified | DiscardPolicy::Old)
        ) {
            p.field(
                "discard",
                nats("discard-new policy (full topics drop their oldest segments)"),
            );
        }
        if c.max_msgs != 0 {
            p.field(
                "max_msgs",
                nats("message count limit (use max_age or max_bytes)"),
            );
        }
        if c.max_msgs_per_subject != 0 {
            p.field("max_msgs_per_subject", nats("per-subject limit"));
        }
        if c.duplicate_window.is_some() {
            p.field(
                "duplicate_window",
                "is a NATS setting; kafka de-duplicates only a producer's own retries (message_id travels as a header, see the README)",
            );
        }
        if c.ack_wait.is_some() {
            p.field(
                "ack_wait",
                "has no effect on a stream; set ack_wait on the consumer",
            );
        }
        if !c.description.is_empty() {
            p.field("description", nats("description"));
        }
        let spec = TopicSpec {
            name: c.name.clone(),
            subjects: c.subjects.clone(),
            partitions: c.partitions.max(1),
            replication_factor: if c.num_replicas > 0 {
                Some(c.num_replicas)
            } else {
                defaults.replication_factor
            },
            configs,
        };
        p.finish(spec)
    }
}

/// A topic as the broker describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedTopic {
    pub partitions: i32,
    pub replication_factor: i32,
    /// Entries set on the topic (not broker defaults).
    pub configs: BTreeMap<String, String>,
}

/// What ensuring a topic does, decided from the spec and what the broker has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicPlan {
    pub create: bool,
    pub partitions_to: Option<i32>,
    /// The whole override set to write (AlterConfigs replaces it), when any entry changes.
    pub configs_to: Option<BTreeMap<String, String>>,
    /// Changes Kafka cannot make in place, one line each.
    pub refused: Vec<String>,
}

impl TopicPlan {
    pub fn is_noop(&self) -> bool {
        !self.create
            && self.partitions_to.is_none()
            && self.configs_to.is_none()
            && self.refused.is_empty()
    }
}

/// Pure: compares only what the user set, so broker defaults never show up as changes.
pub fn plan(spec: &TopicSpec, observed: Option<&ObservedTopic>) -> TopicPlan {
    let Some(o) = observed else {
        return TopicPlan {
            create: true,
            ..Default::default()
        };
    };
    let mut out = TopicPlan::default();
    if spec.partitions > o.partitions {
        out.partitions_to = Some(spec.partitions);
    } else if spec.partitions < o.partitions {
        out.refused.push(format!(
            "topic {:?} has {} partitions; kafka cannot reduce them to {} (replace the topic: its records are lost)",
            spec.name, o.partitions, spec.partitions
        ));
    }
    if let Some(rf) = spec.replication_factor {
        if rf != o.replication_factor {
            out.refused.push(format!(
                "topic {:?} has replication factor {}; changing it to {rf} is a partition reassignment kafka does not do through this API (replace the topic: its records are lost)",
                spec.name, o.replication_factor
            ));
        }
    }
    let changed = spec
        .configs
        .iter()
        .any(|(k, v)| o.configs.get(k) != Some(v));
    if changed {
        let mut all = o.configs.clone();
        all.extend(spec.configs.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.configs_to = Some(all);
    }
    out
}

/// The admin calls topic ensure needs. [`RdAdmin`] is the real one; [`FakeAdmin`] is an
/// in-memory stand-in for the calls the test broker does not serve.
#[allow(async_fn_in_trait)]
pub trait TopicAdmin {
    async fn describe(&self, topic: &str) -> Result<Option<ObservedTopic>, KafkaError>;
    async fn create(&self, spec: &TopicSpec) -> Result<(), KafkaError>;
    async fn create_partitions(&self, topic: &str, total: i32) -> Result<(), KafkaError>;
    async fn alter_configs(
        &self,
        topic: &str,
        all: &BTreeMap<String, String>,
    ) -> Result<(), KafkaError>;
    async fn delete(&self, topic: &str) -> Result<(), KafkaError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Updated,
    Unchanged,
}

/// Create-or-adopt, then update in place; a refused change fails naming what and why.
pub async fn ensure<A: TopicAdmin>(admin: &A, spec: &TopicSpec) -> Result<Ensured, KafkaError> {
    let observed = admin.describe(&spec.name).await?;
    let plan = plan(spec, observed.as_ref());
    if !plan.refused.is_empty() {
        return Err(KafkaError::Refused(plan.refused.join("; ")));
    }
    if plan.create {
        admin.create(spec).await?;
        return Ok(Ensured::Created);
    }
    if plan.is_noop() {
        return Ok(Ensured::Unchanged);
    }
    if let Some(n) = plan.partitions_to {
        admin.create_partitions(&spec.name, n).await?;
    }
    if let Some(all) = &plan.configs_to {
        admin.alter_configs(&spec.name, all).await?;
    }
    Ok(Ensured::Updated)
}

/// In-memory topics for tests of the admin calls the test broker lacks (CreatePartitions,
/// AlterConfigs). It records each call, so a test can assert what ensure asked for.
#[derive(Debug, Default)]
pub struct FakeAdmin {
    pub topics: std::sync::Mutex<BTreeMap<String, ObservedTopic>>,
    pub calls: std::sync::Mutex<Vec<String>>,
}

impl FakeAdmin {
    fn log(&self, s: String) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
    fn topics(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ObservedTopic>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TopicAdmin for FakeAdmin {
    async fn describe(&self, topic: &str) -> Result<Option<ObservedTopic>, KafkaError> {
        Ok(self.topics().get(topic).cloned())
    }
    async fn create(&self, spec: &TopicSpec) -> Result<(), KafkaError> {
        self.log(format!("create {} {}", spec.name, spec.partitions));
        self.topics().insert(
            spec.name.clone(),
            ObservedTopic {
                partitions: spec.partitions,
                replication_factor: spec.replication_factor.unwrap_or(1),
                configs: spec.configs.clone(),
            },
        );
        Ok(())
    }
    async fn create_partitions(&self, topic: &str, total: i32) -> Result<(), KafkaError> {
        self.log(format!("create_partitions {topic} {total}"));
        let mut t = self.topics();
        let o = t
            .get_mut(topic)
            .ok_or_else(|| KafkaError::TopicNotFound(topic.into()))?;
        if total <= o.partitions {
            return Err(KafkaError::Refused(format!(
                "InvalidPartitions: {topic} has {}",
                o.partitions
            )));
        }
        o.partitions = total;
        Ok(())
    }
    async fn alter_configs(
        &self,
        topic: &str,
        all: &BTreeMap<String, String>,
    ) -> Result<(), KafkaError> {
        self.log(format!("alter_configs {topic} {all:?}"));
        let mut t = self.topics();
        let o = t
            .get_mut(topic)
            .ok_or_else(|| KafkaError::TopicNotFound(topic.into()))?;
        // AlterConfigs semantics: the given set replaces every override.
        o.configs = all.clone();
        Ok(())
    }
    async fn delete(&self, topic: &str) -> Result<(), KafkaError> {
        self.log(format!("delete {topic}"));
        self.topics().remove(topic);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(f: impl FnOnce(&mut StreamConfig)) -> Result<TopicSpec, ConfigError> {
        let mut c = StreamConfig {
            name: "orders".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        };
        f(&mut c);
        TopicSpec::validate("eventbus.stream", "orders", &c, TopicDefaults::default())
    }

    #[test]
    fn stream_fields_map_to_topic_properties() {
        let s = stream(|c| {
            c.partitions = 6;
            c.num_replicas = 3;
            c.max_age = Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            });
            c.max_bytes = 1 << 30;
            c.max_msg_size = 1 << 20;
        })
        .unwrap();
        assert_eq!(s.partitions, 6);
        assert_eq!(s.replication_factor, Some(3));
        assert_eq!(
            s.configs.get(RETENTION_MS).map(String::as_str),
            Some("86400000")
        );
        assert_eq!(
            s.configs.get(RETENTION_BYTES).map(String::as_str),
            Some("1073741824")
        );
        assert_eq!(
            s.configs.get(MAX_MESSAGE_BYTES).map(String::as_str),
            Some("1048576")
        );
        let d = stream(|_| {}).unwrap();
        assert_eq!((d.partitions, d.replication_factor), (1, None));
        assert!(d.configs.is_empty(), "unset fields stay broker defaults");
        let with_defaults = TopicSpec::validate(
            "eventbus.stream",
            "orders",
            &StreamConfig {
                name: "orders".into(),
                subjects: vec!["orders.>".into()],
                ..Default::default()
            },
            TopicDefaults {
                replication_factor: Some(3),
                min_insync_replicas: Some(2),
            },
        )
        .unwrap();
        assert_eq!(with_defaults.replication_factor, Some(3));
        assert_eq!(
            with_defaults
                .configs
                .get(MIN_INSYNC_REPLICAS)
                .map(String::as_str),
            Some("2")
        );
    }

    #[test]
    fn nats_only_settings_are_refused_one_line_each() {
        let e = stream(|c| {
            c.retention_policy = RetentionPolicy::Workqueue as i32;
            c.storage = StorageType::Memory as i32;
            c.discard = DiscardPolicy::New as i32;
            c.max_msgs = 10;
            c.max_msgs_per_subject = 1;
            c.duplicate_window = Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            });
            c.description = "x".into();
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 7, "{e}");
        for f in [
            "retention_policy",
            "storage",
            "discard",
            "max_msgs",
            "max_msgs_per_subject",
            "duplicate_window",
            "description",
        ] {
            assert!(
                e.problems
                    .iter()
                    .any(|l| l.starts_with(&format!("config.{f}: "))),
                "{f}: {e}"
            );
        }
        assert!(e.problems.iter().all(|l| !l.contains('\n')));
    }

    #[test]
    fn topic_names_follow_kafka() {
        assert!(check_topic_name("orders.v2_eu-1").is_ok());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
        let e = check_topic_name("orders events").unwrap_err();
        assert!(e.contains("letters, digits, '.', '_' and '-'"), "{e}");
        let e = stream(|c| c.name = "a/b".into()).unwrap_err().to_string();
        assert!(e.contains("config.name: \"a/b\" contains '/'"), "{e}");
    }

    fn observed(p: i32, rf: i32, cfg: &[(&str, &str)]) -> ObservedTopic {
        ObservedTopic {
            partitions: p,
            replication_factor: rf,
            configs: cfg
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn plan_compares_only_what_the_user_set() {
        let s = stream(|c| c.partitions = 3).unwrap();
        assert!(plan(&s, None).create);
        // Broker-side extras (cleanup.policy) are not drift.
        assert!(plan(&s, Some(&observed(3, 1, &[("cleanup.policy", "delete")]))).is_noop());
        let up = plan(&s, Some(&observed(2, 1, &[])));
        assert_eq!(up.partitions_to, Some(3));
        let down = plan(&s, Some(&observed(4, 1, &[])));
        assert!(
            down.refused[0].contains("cannot reduce them to 3"),
            "{down:?}"
        );
        let s = stream(|c| {
            c.num_replicas = 3;
            c.max_age = Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            });
        })
        .unwrap();
        let p = plan(&s, Some(&observed(1, 1, &[("cleanup.policy", "compact")])));
        assert!(p.refused[0].contains("replication factor 1"), "{p:?}");
        // The whole override set is sent: AlterConfigs would drop cleanup.policy otherwise.
        let want: BTreeMap<String, String> =
            [("cleanup.policy", "compact"), (RETENTION_MS, "60000")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(p.configs_to, Some(want));
    }

    #[tokio::test]
    async fn ensure_against_the_fake_admin_raises_partitions_and_alters_configs() {
        let admin = FakeAdmin::default();
        let s1 = stream(|c| c.partitions = 2).unwrap();
        assert_eq!(ensure(&admin, &s1).await.unwrap(), Ensured::Created);
        assert_eq!(ensure(&admin, &s1).await.unwrap(), Ensured::Unchanged);
        let s2 = stream(|c| {
            c.partitions = 4;
            c.max_bytes = 1000;
        })
        .unwrap();
        assert_eq!(ensure(&admin, &s2).await.unwrap(), Ensured::Updated);
        let t = admin.describe("orders").await.unwrap().unwrap();
        assert_eq!(t.partitions, 4);
        assert_eq!(
            t.configs.get(RETENTION_BYTES).map(String::as_str),
            Some("1000")
        );
        assert_eq!(ensure(&admin, &s2).await.unwrap(), Ensured::Unchanged);
        let e = ensure(&admin, &s1).await.unwrap_err().to_string();
        assert!(e.contains("cannot reduce them to 2"), "{e}");
        let calls = admin.calls.lock().unwrap().clone();
        assert_eq!(calls[0], "create orders 2");
        assert_eq!(calls[1], "create_partitions orders 4");
        assert!(calls[2].starts_with("alter_configs orders"), "{calls:?}");
        assert_eq!(
            calls.len(),
            3,
            "no call for unchanged or refused: {calls:?}"
        );
    }
}
