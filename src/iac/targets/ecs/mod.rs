//! The `aws.ecs` deploy target: a JetStream cluster on ECS Fargate, one ECS service (desired
//! count 1) per node, provisioned through the AWS APIs with the official AWS SDK for Rust.
//!
//! Facts this target is built on (the platform, not a choice of ours):
//! - A Fargate task has no stable name or address, so each node is a service of its own
//!   whose task registers in a Cloud Map service of its own: `nats-<i>.<namespace>` is the
//!   node's route address, and its `server_name` is fixed in its task definition.
//! - A volume ECS manages for a task (EBS) is created with the task and deleted with it, like
//!   the task's ephemeral storage: durability comes from R3/R5 replication, with a node
//!   replaced only once the previous one has caught up. R1 loses everything on every
//!   replacement and must be acknowledged; EFS survives tasks but is NFS, which the NATS team
//!   does not support for JetStream, and must be acknowledged as such.
//! - A service's deployment never runs two tasks of one node (maximum 100 %, minimum 0 %).
//!
//! `config` validates the `aws:` section, `render` builds each node's nats.conf (the shared
//! renderer), secret and task definition, `ops` makes the AWS calls, `aws` holds the clients
//! and retries, `error` says what AWS errors mean, `ec2` makes the few EC2 calls.

pub mod aws;
pub mod config;
pub mod ec2;
pub mod error;
pub mod ops;
pub mod record;
pub mod render;
mod target;

pub use config::{settings, EcsNames, EcsSettings, LoadBalancer, Storage};
pub use target::{AwsEcs, AWS_ECS};
