//! pgchannel: PostgreSQL as the event bus (domain layer; no gRPC, no runtime types).
//!
//! Data stays in the Go plugin's four tables (`eventbus_streams`, `eventbus_events`,
//! `eventbus_consumers`, `eventbus_event_deliveries`) so a database written by the Go plugin
//! keeps working and the Go plugin can still run against one we upgraded: everything we add
//! is a nullable column, an index or a side table (see `schema`).
//!
//! Modules: `settings` (DSN, TLS, redaction), `types` (definitions and tokens), `filter`
//! (subject filters and their SQL), `schema` (create/upgrade), `bus` (PgBus: streams,
//! consumers, publish, fetch, prune), `lease` (the claim of deliverable rows shared by
//! fetch and subscribe), `settle` (ack/nak/term/progress of one or many tokens), `sql` (the
//! position advance), `listen` (dedicated connections for LISTEN and advisory locks),
//! `subscribe` (one active subscriber per consumer).
//!
//! Delivery model: a consumer's unsettled messages are the events above its `position` that
//! match its filter and have no settled delivery row. Handing one out writes (or bumps) its
//! delivery row with a lease (`due_at`); until the lease ends (ack_wait, or the backoff entry
//! for that delivery) nobody else gets it. Ack/term settle the row, nak moves `due_at`,
//! progress extends it. `position` trails the first unsettled event, so the Go plugin's
//! `id > position` poll still sees exactly what is left.
//!
//! Go behaviours deliberately not kept (B16 and related):
//! * `FOR UPDATE SKIP LOCKED` outside a transaction (no lock at all): rows are claimed by an
//!   upsert on the delivery row in one statement instead, and concurrent fetchers of one
//!   consumer skip each other's rows by statement-scoped advisory try-locks (see `lease` for
//!   why not SKIP LOCKED on the shared event rows).
//! * An ack of any id settled it, delivered or not: a token settles only a delivery its
//!   consumer holds (see `settle`).
//! * Cumulative acks: acks settle one message; only ack_policy `all` settles up to the id.
//! * A failing message blocking its consumer for max_deliver x poll_interval: a nak'd or
//!   leased message waits alone; later ones keep flowing.
//! * Silent skip past max_deliver on subscribe, none on consume: both dead-letter (copy to
//!   the dead-letter subject's stream when given) and settle the row as `dead`.
//! * deliver_policy, ack_policy, max_age ignored: all honoured; max_msgs/max_bytes added.
//! * Unbounded growth of events and delivery rows: a bounded prune runs every 30 s.
//! * `*` filters accepted and passed to SQL: refused when the consumer is defined; `%`, `_`
//!   and `\` in a `prefix.>` filter no longer act as LIKE wildcards.
//! * Malformed poll_interval silently 1 s: an error (`PgSettings::with_poll_interval_str`).
//! * Schema never created: created if missing and upgraded additively (see `schema`).
//! * Publish subjects with wildcards or empty tokens were stored: refused.
//!
//! Mixed fleets: while a Go plugin still publishes into the same database it does not take
//! the per-stream publish lock, so a position advanced by us could pass one of its rows that
//! commits late (the Go plugin's own cursor had the same race). Run one generation at a time.

mod advance;
mod bus;
mod coalesce;
mod core;
mod error;
mod filter;
mod keys;
mod lag;
mod lease;
mod listen;
pub mod provider;
mod schema;
mod settings;
mod settle;
pub mod spec;
mod sql;
mod subscribe;
mod types;

pub use advance::PRUNE_BATCH;
pub use bus::PgBus;
pub use coalesce::Publisher;
pub use error::PgError;
pub use filter::{parse_filters, SubjectFilter};
pub use keys::consumer_lock_key;
pub use lag::Lag;
pub use schema::SCHEMA_VERSION;
pub use settings::{parse_go_duration, PgSettings, SslMode};
pub use settle::Settler;
pub use subscribe::Subscription;
pub use types::{
    notify_channel, validate_stream_name, AckOp, AckPolicy, AckToken, ConsumerDef, DeliverFrom,
    Delivery, Ensured, FetchOpts, Outgoing, PruneReport, Published, StreamDef, SubOpts,
    DEFAULT_ACK_WAIT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_DELIVER,
};
