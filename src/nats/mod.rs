//! Shared NATS plumbing: names, auth → ConnectOptions, the per-broker connection, error lifting.
//! Only this folder and the runtime/IaC domain code talk to async-nats; gRPC services never do.

pub mod ack;
pub mod conn;
pub mod consumer;
pub mod error;
pub mod guard;
pub mod kv;
pub mod loss;
pub mod names;
pub mod object;
pub mod provider;
pub mod server_conf;
pub mod settings;
pub mod stream;
pub mod wire;

pub use conn::{ConnSettings, NatsConn};
pub use error::NatsError;
