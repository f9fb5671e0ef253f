//! The deploy-target seam of the broker driver: the only place that matches on
//! `deploy_target`. Each target is one module here implementing `BrokerTarget` (`api.rs`):
//! its compared and replace-forcing keys, its part of the broker view and outputs, apply,
//! liveness probe, delete and troubleshooting.
//!
//! Adding a target: write `<target>.rs` (or a `<target>/` folder) implementing `BrokerTarget`,
//! declare it below, and add its arm to `for_target`. Nothing else in the provider changes;
//! `docs/adding-a-deploy-target.md` walks through it.

mod api;
pub mod app_platform;
pub mod ecs;
pub mod kubernetes;
pub(crate) mod local;
pub(crate) mod nats_server;
pub(crate) mod self_hosted;

pub use api::{block, label, strip_userinfo, BrokerDesired, BrokerTarget, Platform, Reach};

use crate::iac::error::DriverError;
use crate::providers::DeployTarget;

/// The targets this provider provisions, in the order errors offer them.
const AVAILABLE: [DeployTarget; 6] = [
    DeployTarget::Local,
    DeployTarget::SelfHosted,
    DeployTarget::DigitalOceanApp,
    DeployTarget::Kubernetes,
    DeployTarget::AwsEks,
    DeployTarget::AwsEcs,
];

/// The implementation of `target`, or the "not available yet" error naming `broker`.
pub fn for_target(
    broker: &str,
    target: DeployTarget,
) -> Result<&'static dyn BrokerTarget, DriverError> {
    match target {
        DeployTarget::Local => Ok(&local::Local),
        DeployTarget::SelfHosted => Ok(&self_hosted::SelfHosted),
        DeployTarget::DigitalOceanApp => Ok(&app_platform::AppPlatform),
        DeployTarget::Kubernetes => Ok(&kubernetes::KUBERNETES),
        DeployTarget::AwsEks => Ok(&kubernetes::AWS_EKS),
        DeployTarget::AwsEcs => Ok(&ecs::AWS_ECS),
        other => Err(DriverError::NotYet {
            broker: broker.to_string(),
            target: other.as_str().to_string(),
            available: AVAILABLE
                .iter()
                .filter_map(|t| for_target(broker, *t).ok())
                .map(|t| t.offer())
                .collect::<Vec<_>>()
                .join(" or "),
        }),
    }
}
