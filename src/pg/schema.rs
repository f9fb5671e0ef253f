//! Creating and upgrading the schema.
//!
//! Version 1 is the Go plugin's reference schema, created only where missing. Later versions
//! are additive only (nullable columns, indexes, a side table), so the Go plugin's INSERTs,
//! upserts and SELECTs keep working against an upgraded database, and a database the Go
//! plugin wrote is upgraded in place. Column meanings we add:
//!
//! * `eventbus_streams.max_msgs`, `max_bytes`: retention limits (NULL = unlimited);
//!   `duplicate_window_ms`: msg_id de-dup window (NULL = 2 min).
//! * `eventbus_events.msg_id`: de-dup key (NULL for Go rows).
//! * `eventbus_consumers.deliver_policy`, `opt_start_seq`, `opt_start_time`: where the
//!   consumer started (informational after creation); `ack_wait_ms`, `backoff_ms`: leases.
//! * `eventbus_event_deliveries.state`: NULL = delivered and not yet acked (the only state the
//!   Go plugin knows), `acked`, `term` (terminated), `dead` (exceeded max_deliver);
//!   `due_at`: when an unacked row may be delivered again (lease end or nak delay; NULL = now).
//!
//! Several plugin processes may start at once: the whole migration runs in one transaction
//! under a transaction-scoped advisory lock, and every statement is `IF NOT EXISTS`.

use deadpool_postgres::Object;

use super::keys::{LOCK_CLASS, SCHEMA_KEY};
use super::PgError;

/// The schema version this code writes to `eventbus_schema_version`.
pub const SCHEMA_VERSION: i32 = 2;

const V1_GO_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS eventbus_streams (
    name TEXT PRIMARY KEY,
    subjects TEXT[] NOT NULL,
    max_age_seconds BIGINT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE TABLE IF NOT EXISTS eventbus_events (
    id BIGSERIAL PRIMARY KEY,
    stream_name TEXT NOT NULL REFERENCES eventbus_streams(name) ON DELETE RESTRICT,
    subject TEXT NOT NULL,
    headers JSONB NOT NULL DEFAULT '{}'::jsonb,
    payload BYTEA NOT NULL,
    correlation_id TEXT,
    ts TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_eventbus_events_stream_id ON eventbus_events (stream_name, id);
CREATE INDEX IF NOT EXISTS idx_eventbus_events_subject ON eventbus_events (subject);
CREATE TABLE IF NOT EXISTS eventbus_consumers (
    stream_name TEXT NOT NULL REFERENCES eventbus_streams(name) ON DELETE RESTRICT,
    name TEXT NOT NULL,
    position BIGINT NOT NULL DEFAULT 0,
    filter_subject TEXT,
    ack_policy TEXT NOT NULL DEFAULT 'explicit',
    max_deliver INT NOT NULL DEFAULT 5,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (stream_name, name)
);
CREATE TABLE IF NOT EXISTS eventbus_event_deliveries (
    stream_name TEXT NOT NULL,
    consumer_name TEXT NOT NULL,
    event_id BIGINT NOT NULL,
    delivery_count INT NOT NULL DEFAULT 1,
    first_delivered_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_delivered_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (stream_name, consumer_name, event_id),
    FOREIGN KEY (stream_name, consumer_name)
        REFERENCES eventbus_consumers(stream_name, name) ON DELETE RESTRICT,
    FOREIGN KEY (event_id) REFERENCES eventbus_events(id) ON DELETE CASCADE
);
"#;

const V2_ADDITIONS: &str = r#"
ALTER TABLE eventbus_streams
    ADD COLUMN IF NOT EXISTS max_msgs BIGINT,
    ADD COLUMN IF NOT EXISTS max_bytes BIGINT,
    ADD COLUMN IF NOT EXISTS duplicate_window_ms BIGINT;
ALTER TABLE eventbus_events
    ADD COLUMN IF NOT EXISTS msg_id TEXT;
CREATE INDEX IF NOT EXISTS idx_eventbus_events_msg_id
    ON eventbus_events (stream_name, msg_id) WHERE msg_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_eventbus_events_stream_ts ON eventbus_events (stream_name, ts);
ALTER TABLE eventbus_consumers
    ADD COLUMN IF NOT EXISTS deliver_policy TEXT,
    ADD COLUMN IF NOT EXISTS opt_start_seq BIGINT,
    ADD COLUMN IF NOT EXISTS opt_start_time TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS ack_wait_ms BIGINT,
    ADD COLUMN IF NOT EXISTS backoff_ms BIGINT[];
ALTER TABLE eventbus_event_deliveries
    ADD COLUMN IF NOT EXISTS state TEXT,
    ADD COLUMN IF NOT EXISTS due_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS idx_eventbus_event_deliveries_event
    ON eventbus_event_deliveries (event_id);
CREATE TABLE IF NOT EXISTS eventbus_schema_version (
    version INT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
"#;

/// Highest applied version, 0 when our version table is absent (fresh or Go-only database).
async fn current_version(c: &Object) -> Result<i32, PgError> {
    let row = c
        .query_one(
            "SELECT CASE WHEN to_regclass('eventbus_schema_version') IS NULL THEN 0 ELSE -1 END",
            &[],
        )
        .await
        .map_err(|e| PgError::db("schema check", e))?;
    let v: i32 = row.get(0);
    if v == 0 {
        return Ok(0);
    }
    let row = c
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM eventbus_schema_version",
            &[],
        )
        .await
        .map_err(|e| PgError::db("schema check", e))?;
    Ok(row.get(0))
}

/// Creates what is missing and applies additive migrations; a no-op (without DDL, so a
/// role without CREATE works) when the database is current.
pub(crate) async fn ensure(c: &mut Object) -> Result<(), PgError> {
    if current_version(c).await? >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = c
        .transaction()
        .await
        .map_err(|e| PgError::db("schema migration", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &SCHEMA_KEY],
    )
    .await
    .map_err(|e| PgError::db("schema migration lock", e))?;
    tx.batch_execute(V1_GO_TABLES)
        .await
        .map_err(|e| PgError::db("schema migration (Go tables)", e))?;
    tx.batch_execute(V2_ADDITIONS)
        .await
        .map_err(|e| PgError::db("schema migration (v2 additions)", e))?;
    tx.execute(
        "INSERT INTO eventbus_schema_version (version) VALUES (1), ($1) ON CONFLICT DO NOTHING",
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(|e| PgError::db("schema migration (version)", e))?;
    tx.commit()
        .await
        .map_err(|e| PgError::db("schema migration commit", e))?;
    tracing::info!(version = SCHEMA_VERSION, "pgchannel schema ensured");
    Ok(())
}
