//! What the state file keeps of a broker on `aws.ecs`: enough to find, update and delete every
//! AWS resource later, even from a destroy wfctl runs without the broker's config.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EcsRecord {
    /// The region the resources are in, and the endpoint override they were made through.
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint_url: String,
    pub cluster: String,
    /// Whether apply created the cluster (then delete removes it when nothing else runs there).
    #[serde(default)]
    pub cluster_created: bool,
    /// One per node, in node order.
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub discovery_services: Vec<String>,
    #[serde(default)]
    pub task_definitions: Vec<String>,
    #[serde(default)]
    pub namespace_id: String,
    #[serde(default)]
    pub security_group_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub load_balancer_arn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_group_arn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub listener_arn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_arn: String,
    pub log_group: String,
    /// The load balancer's client url (`nats://<dns>:4222`), "" without one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lb_url: String,
}
