//! The `kubernetes` and `aws.eks` deploy targets: a JetStream cluster as a StatefulSet with a
//! persistent volume per pod, applied through the Kubernetes API.
//!
//! `config` validates the broker config's `kubernetes:` section and derives the object names,
//! `render` turns it into the objects server-side apply sends (and the `render` subcommand
//! writes), `yaml` writes those as YAML every reader takes the same way. All three are pure;
//! talking to a cluster lives beside them.

pub mod addons;
pub mod apply;
pub mod client;
pub mod config;
pub mod forward;
pub mod record;
pub mod render;
mod target;
pub mod yaml;

pub use config::{
    name_base, quantity_bytes, settings, Flavor, KubeAuth, KubeSettings, Names, ServiceType,
};
pub use render::{render, render_settings, to_yaml, Rendered, RenderedObject};
pub use target::{KubernetesTarget, AWS_EKS, KUBERNETES};
