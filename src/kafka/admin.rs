//! The real admin layer: topics through librdkafka's AdminClient (CreateTopics, DeleteTopics,
//! CreatePartitions, DescribeConfigs, AlterConfigs) and metadata, and a group's offsets through
//! a consumer that carries the group id but never joins (OffsetFetch, ListOffsets,
//! OffsetCommit). librdkafka's synchronous calls run on the blocking pool.

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::client::KafkaSettings;
use super::group::OffsetLookup;
use super::topic::{ObservedTopic, TopicAdmin, TopicSpec};
use super::KafkaError;

#[derive(Clone)]
pub struct RdAdmin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    timeout: Duration,
}

fn result_code(
    op: &'static str,
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
    ok: &[RDKafkaErrorCode],
) -> Result<(), KafkaError> {
    for r in results {
        if let Err((name, code)) = r {
            if !ok.contains(&code) {
                return Err(KafkaError::Client {
                    op,
                    msg: format!("{name}: {code}"),
                    transient: false,
                });
            }
        }
    }
    Ok(())
}

impl RdAdmin {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, KafkaError> {
        let admin: AdminClient<DefaultClientContext> = settings
            .client_config()
            .create()
            .map_err(|e| KafkaError::client("CreateAdmin", e))?;
        Ok(RdAdmin {
            admin: Arc::new(admin),
            timeout,
        })
    }

    fn opts(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    /// Whether a broker answers a metadata request within `bound` (blocking).
    pub fn reachable(&self, bound: Duration) -> Result<(), KafkaError> {
        self.admin
            .inner()
            .fetch_metadata(None, bound)
            .map(|_| ())
            .map_err(|e| KafkaError::client("Metadata", e))
    }

    /// Deletes a consumer group (its committed offsets). A missing group succeeds; a group with
    /// live members is refused by the broker (NonEmptyGroup) and reported.
    pub async fn delete_group(&self, group: &str) -> Result<(), KafkaError> {
        let r = self
            .admin
            .delete_groups(&[group], &self.opts())
            .await
            .map_err(|e| KafkaError::client("DeleteGroups", e))?;
        result_code("DeleteGroups", r, &[RDKafkaErrorCode::GroupIdNotFound])
    }

    /// Partition count and replication factor from metadata; None when the topic is unknown.
    async fn metadata(&self, topic: &str) -> Result<Option<(i32, i32)>, KafkaError> {
        let (admin, topic, timeout) = (self.admin.clone(), topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| KafkaError::client("Metadata", e))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Ok(None);
            };
            if let Some(err) = t.error() {
                let code = RDKafkaErrorCode::from(err);
                if matches!(
                    code,
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                ) {
                    return Ok(None);
                }
                return Err(KafkaError::Client {
                    op: "Metadata",
                    msg: code.to_string(),
                    transient: true,
                });
            }
            if t.partitions().is_empty() {
                return Ok(None);
            }
            let rf = t
                .partitions()
                .first()
                .map_or(0, |p| p.replicas().len() as i32);
            Ok(Some((t.partitions().len() as i32, rf)))
        })
        .await
        .map_err(|_| KafkaError::Cancelled("Metadata"))?
    }
}

/// A topic as metadata and DescribeConfigs show it, for the IaC face: every config entry with
/// a value, flagged `true` when it is set on the topic (a dynamic topic entry) rather than a
/// broker or static default. (tansu 0.6.0 reports the entries given at create as defaults.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicEntries {
    pub partitions: i32,
    pub replication_factor: i32,
    pub entries: BTreeMap<String, (String, bool)>,
}

impl RdAdmin {
    /// The topic's partitions, replication factor and config entries; None when unknown.
    pub async fn describe_entries(&self, topic: &str) -> Result<Option<TopicEntries>, KafkaError> {
        let Some((partitions, replication_factor)) = self.metadata(topic).await? else {
            return Ok(None);
        };
        let spec = ResourceSpecifier::Topic(topic);
        let res = self
            .admin
            .describe_configs([&spec], &self.opts())
            .await
            .map_err(|e| KafkaError::client("DescribeConfigs", e))?;
        let mut entries = BTreeMap::new();
        for r in res.into_iter().flatten() {
            for e in r.entries {
                let set = !e.is_default && matches!(e.source, ConfigSource::DynamicTopic);
                if let Some(v) = e.value {
                    entries.insert(e.name, (v, set));
                }
            }
        }
        Ok(Some(TopicEntries {
            partitions,
            replication_factor,
            entries,
        }))
    }

    /// How many brokers the cluster's metadata lists (proves the cluster answers).
    pub async fn cluster_brokers(&self) -> Result<usize, KafkaError> {
        let (admin, timeout) = (self.admin.clone(), self.timeout);
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, timeout)
                .map(|md| md.brokers().len())
                .map_err(|e| KafkaError::client("Metadata", e))
        })
        .await
        .map_err(|_| KafkaError::Cancelled("Metadata"))?
    }

    /// (partition, low, high) per partition; None when the topic is unknown.
    pub async fn watermarks(
        &self,
        topic: &str,
    ) -> Result<Option<Vec<(i32, i64, i64)>>, KafkaError> {
        let (admin, topic, timeout) = (self.admin.clone(), topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| KafkaError::client("Metadata", e))?;
            let Some(t) = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            else {
                return Ok(None);
            };
            let mut out = Vec::with_capacity(t.partitions().len());
            for p in t.partitions() {
                let (low, high) = admin
                    .inner()
                    .fetch_watermarks(&topic, p.id(), timeout)
                    .map_err(|e| KafkaError::client("ListOffsets", e))?;
                out.push((p.id(), low, high));
            }
            Ok(Some(out))
        })
        .await
        .map_err(|_| KafkaError::Cancelled("ListOffsets"))?
    }
}

/// One partition of a group's position: committed offset, high watermark and the lag between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    pub committed: Option<i64>,
    pub high_watermark: i64,
    /// Records not yet committed by the group (from the low watermark when none is committed).
    pub lag: i64,
}

/// A group's offsets and lag on a topic (IaC outputs), through any [`OffsetLookup`].
pub fn group_lag<L: OffsetLookup + ?Sized>(
    l: &L,
    topic: &str,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let parts = l.partitions(topic)?;
    let committed = l.committed(topic, &parts)?;
    let mut out = Vec::with_capacity(parts.len());
    for (p, c) in parts.into_iter().zip(committed) {
        let (low, high) = l.watermarks(topic, p)?;
        out.push(PartitionLag {
            partition: p,
            committed: c,
            high_watermark: high,
            lag: (high - c.unwrap_or(low).max(low)).max(0),
        });
    }
    Ok(out)
}

impl TopicAdmin for RdAdmin {
    async fn describe(&self, topic: &str) -> Result<Option<ObservedTopic>, KafkaError> {
        let Some((partitions, replication_factor)) = self.metadata(topic).await? else {
            return Ok(None);
        };
        let spec = ResourceSpecifier::Topic(topic);
        let res = self
            .admin
            .describe_configs([&spec], &self.opts())
            .await
            .map_err(|e| KafkaError::client("DescribeConfigs", e))?;
        let mut configs = BTreeMap::new();
        for r in res.into_iter().flatten() {
            for e in r.entries {
                if !e.is_default && matches!(e.source, ConfigSource::DynamicTopic) {
                    if let Some(v) = e.value {
                        configs.insert(e.name, v);
                    }
                }
            }
        }
        Ok(Some(ObservedTopic {
            partitions,
            replication_factor,
            configs,
        }))
    }

    /// Create-or-adopt: "already exists" is success.
    async fn create(&self, spec: &TopicSpec) -> Result<(), KafkaError> {
        let mut nt = NewTopic::new(
            &spec.name,
            spec.partitions,
            TopicReplication::Fixed(spec.replication_factor.unwrap_or(-1)),
        );
        for (k, v) in &spec.configs {
            nt = nt.set(k, v);
        }
        let r = self
            .admin
            .create_topics([&nt], &self.opts())
            .await
            .map_err(|e| KafkaError::client("CreateTopics", e))?;
        result_code("CreateTopics", r, &[RDKafkaErrorCode::TopicAlreadyExists])
    }

    async fn create_partitions(&self, topic: &str, total: i32) -> Result<(), KafkaError> {
        let np = NewPartitions::new(topic, total.max(1) as usize);
        let r = self
            .admin
            .create_partitions([&np], &self.opts())
            .await
            .map_err(|e| KafkaError::client("CreatePartitions", e))?;
        result_code("CreatePartitions", r, &[])
    }

    async fn alter_configs(
        &self,
        topic: &str,
        all: &BTreeMap<String, String>,
    ) -> Result<(), KafkaError> {
        let mut ac = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in all {
            ac = ac.set(k, v);
        }
        let r = self
            .admin
            .alter_configs([&ac], &self.opts())
            .await
            .map_err(|e| KafkaError::client("AlterConfigs", e))?;
        for x in r {
            if let Err((_, code)) = x {
                return Err(KafkaError::Client {
                    op: "AlterConfigs",
                    msg: format!("{topic}: {code}"),
                    transient: false,
                });
            }
        }
        Ok(())
    }

    /// Deleting a missing topic succeeds.
    async fn delete(&self, topic: &str) -> Result<(), KafkaError> {
        let r = self
            .admin
            .delete_topics(&[topic], &self.opts())
            .await
            .map_err(|e| KafkaError::client("DeleteTopics", e))?;
        result_code(
            "DeleteTopics",
            r,
            &[RDKafkaErrorCode::UnknownTopicOrPartition],
        )
    }
}

/// A group's offsets without joining it: a consumer with the group id that never subscribes.
pub struct RdOffsets {
    consumer: BaseConsumer,
    timeout: Duration,
}

impl RdOffsets {
    pub fn new(
        settings: &KafkaSettings,
        group: &str,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| KafkaError::client("CreateConsumer", e))?;
        Ok(RdOffsets { consumer, timeout })
    }
}

impl OffsetLookup for RdOffsets {
    fn partitions(&self, topic: &str) -> Result<Vec<i32>, KafkaError> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| KafkaError::client("Metadata", e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| KafkaError::TopicNotFound(topic.to_string()))?;
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    fn committed(&self, topic: &str, partitions: &[i32]) -> Result<Vec<Option<i64>>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(|e| KafkaError::client("OffsetFetch", e))?;
        Ok(partitions
            .iter()
            .map(
                |p| match got.find_partition(topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= 0 => Some(o),
                    _ => None,
                },
            )
            .collect())
    }

    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        self.consumer
            .fetch_watermarks(topic, partition, self.timeout)
            .map_err(|e| KafkaError::client("ListOffsets", e))
    }

    fn offset_for_time(
        &self,
        topic: &str,
        partition: i32,
        ms: i64,
    ) -> Result<Option<i64>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(ms))
            .map_err(|e| KafkaError::client("ListOffsets", e))?;
        let got = self
            .consumer
            .offsets_for_times(tpl, self.timeout)
            .map_err(|e| KafkaError::client("ListOffsets", e))?;
        Ok(
            match got.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(o),
                _ => None,
            },
        )
    }

    fn commit(&self, topic: &str, offsets: &[(i32, i64)]) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(|e| KafkaError::client("OffsetCommit", e))?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| KafkaError::client("OffsetCommit", e))
    }
}
