//! What the plugin tells the host about its types: module schemas (field docs for UIs), the
//! contract registry (STRICT_PROTO descriptors + the FileDescriptorSet) and the manifest.

use super::types::{self, ModuleKind, StepKind, MODULE_TYPES, STEP_TYPES};
use crate::config::decode::message_descriptor;
use crate::pb::plugin::{
    ConfigFieldDef, ContractDescriptor, ContractKind, ContractMode, ModuleSchema,
};
use prost::Message;
use prost_reflect::{FieldDescriptor, Kind};

/// (description, required, default) of a config field; shared names mean the same everywhere.
pub fn field_doc(message: &str, field: &str) -> Option<(&'static str, bool, &'static str)> {
    let d = |s, r, def| Some((s, r, def));
    match (message, field) {
        ("ClusterConfig", "provider") => d("Broker implementation: nats, pgchannel (PostgreSQL tables + LISTEN/NOTIFY, Go-plugin compatible) or kafka (topics and consumer groups on a cluster you run); kinesis is declared but not available yet", true, ""),
        ("ClusterConfig", "deploy_target") => d("Where the broker runs: local, self_hosted, kubernetes, digitalocean.app_platform, aws.ecs or aws.eks (nats); self_hosted for kafka (an existing cluster, adopted); ignored for pgchannel, as in the Go plugin", true, ""),
        ("ClusterConfig", "version") => d("Pinned nats-server release for provisioned brokers, e.g. 2.10 (latest is refused)", false, ""),
        ("ClusterConfig", "replicas") => d("Server count for provisioned brokers; 3 or 5 form a JetStream cluster", false, "1"),
        ("ClusterConfig", "jetstream") => d("JetStream limits for provisioned brokers (enabled, max_storage_bytes, max_memory_bytes)", false, ""),
        ("ClusterConfig", "kafka") => d("Provider kafka: brokers (or bootstrap_servers), client_id, sasl_mechanism and security_protocol (with auth and tls), default_replication_factor, min_insync_replicas, librdkafka_options (extra client properties such as linger.ms)", false, ""),
        ("ClusterConfig", "kinesis") => d("Reserved for the kinesis provider (not available yet)", false, ""),
        ("ClusterConfig", "limits") => d("CPU/memory/storage hints for provisioned brokers", false, ""),
        ("ClusterConfig", "dsn") => d("nats: url(s), comma-separated; wins over EVENTBUS_<NAME>_URI and NATS_URL. kafka: kafka://h1:9092,h2:9092; wins over EVENTBUS_<NAME>_URI. pgchannel: PostgreSQL connection string (postgres://user:pw@host/db?sslmode=verify-full&sslrootcert=ca.pem or key=value form); wins over EVENTBUS_<NAME>_URI; the password is never logged", false, ""),
        ("ClusterConfig", "poll_interval") => d("pgchannel: safety-net poll tick under LISTEN/NOTIFY, Go duration text (500ms, 1s); invalid or <= 0 is refused", false, "1s"),
        ("ClusterConfig", "broker_target") => d("pgchannel: in_process or empty (the Go plugin's only value)", false, ""),
        ("ClusterConfig", "max_conns") => d("pgchannel: connection pool size (1..=1000)", false, "16"),
        (_, "iac_provider") => d("Name of the iac.provider module (provider: eventbus) that provisions this resource", false, ""),
        (_, "depends_on") => d("Resources wfctl applies before this one", false, ""),
        (_, "size") => d("Abstract size for provisioning (xs, s, m, l, xl)", false, ""),
        (_, "adopt_existing") => d("wfctl: adopt an existing resource of this name instead of creating it", false, "false"),
        (_, "protected") => d("wfctl: block replace and delete unless explicitly allowed", false, "false"),
        (_, "region") => d("Cloud region for provisioned brokers", false, ""),
        (_, "servers") => d("Explicit NATS urls (instead of dsn, or for IaC resources to find their broker)", false, ""),
        ("ClusterConfig", "auth") => d("Credentials: token, user+password, creds_file or nkey_seed_file (never logged)", false, ""),
        ("ClusterConfig", "tls") => d("TLS: ca_file, cert_file + key_file, required", false, ""),
        ("ClusterConfig", "connection_name") => d("Client connection name shown by the server", false, "workflow-plugin-eventbus:<module>"),
        ("ClusterConfig", "connect_timeout") => d("Timeout of one connection attempt (reconnects continue forever)", false, "5s"),
        ("ClusterConfig", "metrics_address") => d("Prometheus endpoint of the plugin process (host:port or :port), off when unset; one per process (EVENTBUS_METRICS_ADDR sets it too)", false, ""),
        ("ClusterConfig", "request_timeout") => d("Bound on publish, ack and JetStream API calls", false, "5s"),
        ("ClusterConfig", "local") => d("deploy_target local: binary, state_dir, client_port, remove_data_on_delete", false, ""),
        ("ClusterConfig", "aws") => d("deploy_target aws.ecs: region, cluster, vpc_id, subnets, execution_role_arn, infrastructure_role_arn, cpu, memory, volume_type, volume_size_gib, load_balancer (internal, none, public), client_cidrs, client_security_groups, tags, acknowledge_data_loss, acknowledge_nfs_unsupported, efs_file_system_id, image, task_role_arn, log_retention_days, ready_timeout, endpoint_url", false, ""),
        ("ClusterConfig", "kubernetes") => d("deploy_target kubernetes or aws.eks: namespace, storage_size, storage_class, resources (cpu, memory; requests = limits), service_type, image, labels, annotations, service_annotations, delete_pvcs_on_delete, zone_spread, internal_load_balancer (aws.eks), cluster_domain, context, ready_timeout, tls (secret_name or cert_manager, verify, routes), websocket, leafnodes, metrics (exporter, pod_monitor), tolerations, node_selector, affinity, priority_class_name, image_pull_secrets, service_account", false, ""),
        ("ClusterConfig", "app_platform") => d("deploy_target digitalocean.app_platform: acknowledge_data_loss (required), instance_size, http_port, deploy_timeout", false, ""),
        (_, "prevent_destroy") => d("IaC: refuse to delete this resource", false, "false"),
        (_, "bind") => d("IaC: adopt only; never create (fails when it does not exist)", false, "false"),
        ("KvBucketConfig", "bucket") => d("Bucket name: letters, digits, '_' and '-' (the server keeps it as the stream KV_<bucket>)", true, ""),
        ("KvBucketConfig", "description") => d("Description of the bucket", false, ""),
        ("KvBucketConfig", "history") => d("Values kept per key (1..=64)", false, "1"),
        ("KvBucketConfig", "ttl") => d("How long a value lives, e.g. 3600s; unset = forever", false, ""),
        ("KvBucketConfig", "max_value_size") => d("Largest value in bytes; 0 or -1 = unlimited", false, "-1"),
        ("KvBucketConfig", "max_bucket_size") => d("Size limit of the whole bucket in bytes; 0 or -1 = unlimited", false, "-1"),
        ("KvBucketConfig", "storage") => d("File or memory storage (changes by replace)", false, "STORAGE_TYPE_FILE"),
        ("KvBucketConfig", "num_replicas") => d("Replicas (needs a cluster of at least that many servers)", false, "1"),
        ("KvBucketConfig", "compression") => d("true: S2, false: none (nats-server 2.10+); unset: left as the server has it", false, ""),
        ("KvBucketConfig", "placement") => d("Cluster and server tags the bucket is placed on", false, ""),
        ("KvBucketConfig", "mirror") => d("Copy another bucket (name: its bucket name); fixed at creation", false, ""),
        ("KvBucketConfig", "sources") => d("Buckets whose keys are copied into this one", false, ""),
        ("KvBucketConfig", "republish") => d("Republish every change to another subject", false, ""),
        ("KvBucketConfig", "limit_marker_ttl") => d("Per-key TTLs and limit markers kept this long (nats-server 2.11+)", false, ""),
        ("ObjectStoreConfig", "bucket") => d("Object store name: letters, digits, '_' and '-' (the server keeps it as the stream OBJ_<bucket>)", true, ""),
        ("ObjectStoreConfig", "description") => d("Description of the object store", false, ""),
        ("ObjectStoreConfig", "ttl") => d("How long an object lives, e.g. 3600s; unset = forever", false, ""),
        ("ObjectStoreConfig", "max_bucket_size") => d("Size limit of the whole store in bytes; 0 or -1 = unlimited", false, "-1"),
        ("ObjectStoreConfig", "storage") => d("File or memory storage (changes by replace)", false, "STORAGE_TYPE_FILE"),
        ("ObjectStoreConfig", "num_replicas") => d("Replicas (needs a cluster of at least that many servers)", false, "1"),
        ("ObjectStoreConfig", "compression") => d("true: S2, false: none (nats-server 2.10+); unset: left as the server has it", false, ""),
        ("ObjectStoreConfig", "placement") => d("Cluster and server tags the store is placed on", false, ""),
        ("StreamConfig", "name") => d("Stream name (no spaces, dots or wildcards)", true, ""),
        ("StreamConfig", "subjects") => d("Subjects captured by the stream, e.g. orders.>", true, ""),
        ("StreamConfig", "retention_policy") => d("Message retention", false, "RETENTION_POLICY_LIMITS"),
        ("StreamConfig", "num_replicas") => d("Replicas (needs a cluster of at least that many servers)", false, "1"),
        ("StreamConfig", "max_bytes") => d("Size limit in bytes; 0 = unlimited", false, "0"),
        ("StreamConfig", "max_age") => d("Message age limit, e.g. 86400s; unset = unlimited", false, ""),
        ("StreamConfig", "ack_wait") => d("Kept for compatibility; set ack_wait on the consumer", false, ""),
        (_, "broker_ref") => d("eventbus.broker module to use; may be omitted when exactly one broker is declared", false, ""),
        ("StreamConfig", "storage") => d("File or memory storage", false, "STORAGE_TYPE_FILE"),
        ("StreamConfig", "max_msgs") => d("Message count limit; 0 = unlimited", false, "0"),
        ("StreamConfig", "max_msgs_per_subject") => d("Per-subject message limit; 0 = unlimited", false, "0"),
        ("StreamConfig", "max_msg_size") => d("Largest accepted message in bytes; 0 = server limit", false, "0"),
        ("StreamConfig", "discard") => d("What to drop when full", false, "DISCARD_POLICY_OLD"),
        ("StreamConfig", "duplicate_window") => d("De-duplication window for Nats-Msg-Id", false, "120s"),
        ("StreamConfig", "partitions") => d("Provider kafka: the topic's partition count (raised in place, never lowered); refused by nats and pgchannel", false, "1"),
        (_, "description") => d("Free text stored on the server", false, ""),
        ("StreamConfig", "mirror") => d("Copy another stream (name, opt_start_seq, opt_start_time, filter_subject, external {api, deliver}, subject_transforms, domain); subjects must be empty; fixed at creation", false, ""),
        ("StreamConfig", "sources") => d("Streams to copy from (same keys as mirror); changes in place", false, ""),
        ("StreamConfig", "subject_transform") => d("Rewrite subjects on store: {src, dest} (nats-server 2.10+)", false, ""),
        ("StreamConfig", "republish") => d("Republish stored messages: {src, dest, headers_only}", false, ""),
        ("StreamConfig", "compression") => d("On-disk compression (nats-server 2.10+)", false, "STREAM_COMPRESSION_NONE"),
        ("StreamConfig", "placement") => d("Cluster and server tags to place the stream on: {cluster, tags}", false, ""),
        (_, "metadata") => d("String key/value pairs stored on the server (nats-server 2.10+)", false, ""),
        ("StreamConfig", "deny_delete") => d("Refuse message deletes through the API; once true it cannot be cleared in place", false, "false"),
        ("StreamConfig", "deny_purge") => d("Refuse purges through the API; once true it cannot be cleared in place", false, "false"),
        ("StreamConfig", "allow_rollup_hdrs") => d("Allow the Nats-Rollup header", false, "false"),
        ("StreamConfig", "allow_direct") => d("Allow direct get from any replica", false, "false"),
        ("StreamConfig", "mirror_direct") => d("Allow direct get on a mirror", false, "false"),
        ("StreamConfig", "discard_new_per_subject") => d("Refuse new messages per subject at max_msgs_per_subject (needs DISCARD_POLICY_NEW)", false, "false"),
        ("StreamConfig", "max_consumers") => d("Consumers allowed on the stream; 0 or -1 = unlimited", false, "-1"),
        ("StreamConfig", "consumer_limits") => d("Upper bounds for its consumers: {inactive_threshold, max_ack_pending} (nats-server 2.10+)", false, ""),
        ("StreamConfig", "allow_msg_ttl") => d("Allow per-message TTL (Nats-TTL header); once true it cannot be cleared in place (nats-server 2.11+)", false, "false"),
        ("StreamConfig", "subject_delete_marker_ttl") => d("Leave a delete marker for this long when max_age removes a subject's last message; needs allow_msg_ttl (nats-server 2.11+)", false, ""),
        ("ConsumerConfig", "replay_policy") => d("Deliver stored messages at once or at their original pace; fixed at creation", false, "REPLAY_POLICY_INSTANT"),
        ("ConsumerConfig", "sample_freq") => d("Percent of acks sampled as advisories, 0..=100", false, "0"),
        ("ConsumerConfig", "headers_only") => d("Deliver headers without payloads", false, "false"),
        ("ConsumerConfig", "inactive_threshold") => d("Delete the consumer after this long without activity", false, ""),
        ("ConsumerConfig", "num_replicas") => d("Consumer replicas; 0 = the stream's", false, "0"),
        ("ConsumerConfig", "mem_storage") => d("Keep consumer state in memory; fixed at creation", false, "false"),
        ("ConsumerConfig", "max_waiting") => d("Pull requests waiting at once; fixed at creation", false, "512"),
        ("ConsumerConfig", "max_batch") => d("Largest batch one pull may ask for; 0 = unlimited", false, "0"),
        ("ConsumerConfig", "max_expires") => d("Longest expiry one pull may ask for", false, ""),
        ("ConsumerConfig", "max_bytes") => d("Largest byte budget one pull may ask for; 0 = unlimited", false, "0"),
        ("ConsumerConfig", "pause_until") => d("Deliver nothing until this time, RFC 3339 (nats-server 2.11+)", false, ""),
        ("ConsumerConfig", "priority_policy") => d("Pull priority groups: overflow or pinned_client (nats-server 2.11+)", false, "PRIORITY_POLICY_NONE"),
        ("ConsumerConfig", "priority_groups") => d("Priority group names, with priority_policy", false, ""),
        ("ConsumerConfig", "priority_timeout") => d("pinned_client: how long a pin lasts without pulls", false, "120s"),
        ("ConsumerConfig", "name") => d("Durable consumer name", true, ""),
        ("ConsumerConfig", "stream_name") => d("Stream the consumer reads", true, ""),
        ("ConsumerConfig", "filter_subject") => d("Only deliver messages on this subject", false, ""),
        ("ConsumerConfig", "filter_subjects") => d("Only deliver messages on these subjects", false, ""),
        ("ConsumerConfig", "deliver_policy") => d("Where a new consumer starts", false, "DELIVER_POLICY_ALL"),
        ("ConsumerConfig", "ack_policy") => d("Acknowledgement mode", false, "ACK_POLICY_EXPLICIT"),
        ("ConsumerConfig", "max_deliver") => d("Delivery attempts before the server stops redelivering; 0 = unlimited", false, "0"),
        ("ConsumerConfig", "opt_start_seq") => d("Start sequence, with DELIVER_POLICY_BY_START_SEQUENCE", false, ""),
        ("ConsumerConfig", "opt_start_time") => d("Start time (RFC 3339), with DELIVER_POLICY_BY_START_TIME", false, ""),
        ("ConsumerConfig", "ack_wait") => d("Redelivery timeout of an unacknowledged message", false, "30s"),
        ("ConsumerConfig", "max_ack_pending") => d("Unacknowledged messages allowed at once", false, "1000"),
        ("ConsumerConfig", "backoff") => d("Redelivery delays per attempt (max_deliver must exceed the count)", false, ""),
        _ => None,
    }
}

fn kind_name(f: &FieldDescriptor) -> String {
    let base = match f.kind() {
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => "duration".to_string(),
            "google.protobuf.Timestamp" => "timestamp".to_string(),
            "google.protobuf.Value" => "any".to_string(),
            _ => "object".to_string(),
        },
        Kind::Enum(_) => "enum".to_string(),
        other => format!("{other:?}").to_ascii_lowercase(),
    };
    if f.is_map() {
        "map".into()
    } else if f.is_list() {
        format!("[]{base}")
    } else {
        base
    }
}

pub fn config_fields(message: &str) -> Vec<ConfigFieldDef> {
    let Ok(desc) = message_descriptor(&types::qualified(message)) else {
        return Vec::new();
    };
    desc.fields()
        .map(|f| {
            let (description, required, default) =
                field_doc(message, f.name()).unwrap_or(("", false, ""));
            let options = match f.kind() {
                Kind::Enum(e) => e
                    .values()
                    .filter(|v| v.number() != 0)
                    .map(|v| v.name().to_string())
                    .collect(),
                _ if f.name() == "deploy_target" => crate::providers::Provider::Nats
                    .targets()
                    .iter()
                    .map(|t| t.as_str().to_string())
                    .collect(),
                _ if f.name() == "provider" => vec!["nats".into(), "pgchannel".into()],
                _ => Vec::new(),
            };
            ConfigFieldDef {
                name: f.name().to_string(),
                r#type: kind_name(&f),
                description: description.to_string(),
                default_value: default.to_string(),
                required,
                options,
            }
        })
        .collect()
}

pub fn module_schemas() -> Vec<ModuleSchema> {
    MODULE_TYPES
        .iter()
        .map(|(type_name, kind)| {
            let (label, description) = match kind {
                ModuleKind::Broker => (
                    "Event bus broker",
                    "A NATS JetStream broker connection (and, through wfctl, a provisioned broker)",
                ),
                ModuleKind::Stream => (
                    "Event bus stream",
                    "A JetStream stream, created or updated in place at Start",
                ),
                ModuleKind::Consumer => (
                    "Event bus consumer",
                    "A durable JetStream pull consumer, created or updated in place at Start",
                ),
                ModuleKind::Kv => (
                    "Event bus key-value bucket",
                    "A JetStream key-value bucket, created or updated in place at Start",
                ),
                ModuleKind::ObjectStore => (
                    "Event bus object store",
                    "A JetStream object store, created or updated in place at Start",
                ),
            };
            ModuleSchema {
                r#type: type_name.to_string(),
                label: label.into(),
                category: "eventbus".into(),
                description: description.into(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                config_fields: config_fields(kind.config_message()),
            }
        })
        .collect()
}

fn descriptor(kind: ContractKind) -> ContractDescriptor {
    ContractDescriptor {
        kind: kind as i32,
        mode: ContractMode::StrictProto as i32,
        ..Default::default()
    }
}

/// Service names of the IaC services this binary serves (SERVICE descriptors + plugin.json).
pub const IAC_SERVICES: &[&str] = crate::pb::IAC_SERVICES;

pub fn contract_descriptors() -> Vec<ContractDescriptor> {
    let mut out = Vec::new();
    for (type_name, kind) in MODULE_TYPES {
        out.push(ContractDescriptor {
            module_type: type_name.to_string(),
            config_message: types::qualified(kind.config_message()),
            ..descriptor(ContractKind::Module)
        });
    }
    for kind in STEP_TYPES {
        let (c, i, o) = StepKind::messages(*kind);
        out.push(ContractDescriptor {
            step_type: kind.type_name().to_string(),
            config_message: types::qualified(c),
            input_message: types::qualified(i),
            output_message: types::qualified(o),
            ..descriptor(ContractKind::Step)
        });
    }
    out.push(ContractDescriptor {
        trigger_type: types::TRIGGER_TYPE.to_string(),
        config_message: types::qualified(types::TRIGGER_CONFIG_MESSAGE),
        output_message: types::qualified(types::TRIGGER_OUTPUT_MESSAGE),
        ..descriptor(ContractKind::Trigger)
    });
    for service in IAC_SERVICES {
        out.push(ContractDescriptor {
            service_name: service.to_string(),
            ..descriptor(ContractKind::Service)
        });
    }
    out
}

pub fn descriptor_set() -> Option<prost_types::FileDescriptorSet> {
    prost_types::FileDescriptorSet::decode(crate::pb::EVENTBUS_DESCRIPTOR_SET).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_config_field_is_documented() {
        for kind in [
            ModuleKind::Broker,
            ModuleKind::Stream,
            ModuleKind::Consumer,
            ModuleKind::Kv,
            ModuleKind::ObjectStore,
        ] {
            for f in config_fields(kind.config_message()) {
                assert!(
                    !f.description.is_empty(),
                    "{}.{} has no description",
                    kind.config_message(),
                    f.name
                );
            }
        }
    }

    #[test]
    fn every_contract_message_resolves() {
        for d in contract_descriptors() {
            for m in [&d.config_message, &d.input_message, &d.output_message] {
                if !m.is_empty() {
                    message_descriptor(m).unwrap();
                }
            }
        }
    }
}
