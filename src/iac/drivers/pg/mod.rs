//! The pgchannel provider's side of the IaC drivers. A pgchannel broker is not a deploy
//! target (nothing is provisioned: the database is adopted), so it does not go through
//! `iac::targets`; instead `drivers::route` asks each stream's or consumer's broker record
//! which provider it is and calls that provider's face (`face`: these drivers). The rows themselves are kept by
//! `crate::pg` (the domain the runtime face uses too), so the IaC face and the runtime agree on
//! what a stream or consumer row is.
//!
//! - `broker`: adopt a database (connect, create the schema if missing), record its dsn.
//! - `stream`, `consumer`: rows, with create-or-adopt, update in place, read, delete, drift.
//! - `spec`: config → row, refusing settings only NATS has; row ↔ outputs.
//! - `conns`: one pool per database per plugin process.

pub mod broker;
pub mod conns;
pub mod consumer;
mod face;
pub mod spec;
pub mod stream;

pub(crate) use face::PGCHANNEL;
