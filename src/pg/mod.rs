//! pgchannel: PostgreSQL as the event bus (domain layer; no gRPC, no runtime types).
//!
//! Data stays in the Go plugin's four tables (`eventbus_streams`, `eventbus_events`,
//! `eventbus_consumers`, `eventbus_event_deliveries`) so a database written by the Go plugin
//! keeps working and the Go plugin can still run against one we upgraded: everything we add
//! is a nullable column, an index or a side table (see `schema`).
//!
//! Modules: `settings` (DSN, TLS, redaction), `types` (definitions and tokens), `filter`
//! (subject filters and their SQL), `schema` (create/upgrade), `bus` (PgBus: streams,
//! consumers, publish, fetch, ack, prune), `lease` (the claim of deliverable rows shared by
//! fetch and subscribe), `listen` (dedicated connections for LISTEN and advisory locks),
//! `subscribe` (one active subscriber per consumer).

mod bus;
mod core;
mod error;
mod filter;
mod keys;
mod lease;
mod listen;
mod schema;
mod settings;
mod sql;
mod subscribe;
mod types;

pub use bus::{PgBus, PRUNE_BATCH};
pub use error::PgError;
pub use filter::{parse_filters, SubjectFilter};
pub use keys::consumer_lock_key;
pub use schema::SCHEMA_VERSION;
pub use settings::{parse_go_duration, PgSettings, SslMode};
pub use subscribe::Subscription;
pub use types::{
    notify_channel, validate_stream_name, AckOp, AckPolicy, AckToken, ConsumerDef, DeliverFrom,
    Delivery, Ensured, FetchOpts, Outgoing, PruneReport, Published, StreamDef, SubOpts,
    DEFAULT_ACK_WAIT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_DELIVER,
};
