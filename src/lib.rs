//! workflow-plugin-eventbus: a NATS JetStream event bus for the GoCodeAlone workflow engine,
//! served as a go-plugin gRPC subprocess. Faces: `host` (protocol), `runtime` (modules, steps,
//! trigger), `iac` (wfctl provider); config validation both faces share in `config`, shared NATS
//! plumbing in `nats`, the provider x target matrix
//! in `providers`.

pub mod config;
pub mod error_chain;
pub mod host;
pub mod iac;
pub mod kafka;
pub mod logging;
pub mod nats;
pub mod pb;
pub mod pg;
pub mod providers;
pub mod runtime;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
