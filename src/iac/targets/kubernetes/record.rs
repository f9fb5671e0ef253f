//! What the state file keeps of a broker on `kubernetes` / `aws.eks`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A broker applied to a Kubernetes cluster: enough to find, reach and delete it later, even
/// from a destroy wfctl runs without the provider's config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KubeRecord {
    /// The kubeconfig file and context used ("" = the defaults: KUBECONFIG, current context,
    /// else in-cluster).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kubeconfig: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub context: String,
    pub namespace: String,
    pub stateful_set: String,
    pub client_service: String,
    /// The claim template (PVCs are `<claim>-<stateful_set>-<ordinal>`).
    pub claim: String,
    /// The pods' label selector (port-forwards go to its Ready pods).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Applied objects in apply order; delete walks them backwards.
    #[serde(default)]
    pub objects: Vec<KubeObject>,
    #[serde(default)]
    pub delete_pvcs: bool,
    /// The client Service's external address (`nats://<lb>:4222`), "" without one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub external_url: String,
}

/// One applied object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeObject {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}
