//! The pg layer's one error type. Every variant renders as one line that names what failed;
//! none carries the DSN, so no password can leak through an error.

#[derive(Clone, Debug, thiserror::Error)]
pub enum PgError {
    /// Bad settings or definitions: `<what>: <why, and what is valid>`.
    #[error("pgchannel: {0}")]
    Invalid(String),
    #[error("pgchannel: Publish: no stream claims subject \"{0}\" (publish before EnsureStream?)")]
    NoStream(String),
    #[error("pgchannel: stream \"{0}\" not found")]
    StreamNotFound(String),
    #[error("pgchannel: consumer \"{consumer}\" on stream \"{stream}\" not found")]
    ConsumerNotFound { stream: String, consumer: String },
    /// Quoted at most [`crate::secret::QUOTE_MAX`] characters: a 100 KB token was echoed whole.
    #[error("pgchannel: Ack: malformed ackToken {} (want \"<stream>:<consumer>:<id>\")", crate::secret::quote(.0))]
    MalformedToken(String),
    /// An ack token naming a message the consumer was never handed (another consumer's
    /// delivery, or a forged id): nothing is settled.
    #[error(
        "pgchannel: Ack: message {id} of stream \"{stream}\" was not delivered to consumer \"{consumer}\"; nothing settled"
    )]
    NotDelivered {
        stream: String,
        consumer: String,
        id: i64,
    },
    /// An ack token naming a message the stream does not hold (never published, or removed
    /// by retention).
    #[error("pgchannel: Ack: stream \"{stream}\" has no message {id} (never published, or removed by retention)")]
    NoMessage { stream: String, id: i64 },
    /// A database or connection failure during `op`; `transient` when retrying (on a fresh
    /// connection) may succeed: connection lost, server shutting down or starting up.
    #[error("pgchannel: {op}: {msg}")]
    Db {
        op: &'static str,
        msg: String,
        transient: bool,
    },
    /// The subscription's dedicated connection (and so its advisory lock) is gone.
    #[error("pgchannel: subscription to {stream}/{consumer} lost: {msg}")]
    Lost {
        stream: String,
        consumer: String,
        msg: String,
    },
    #[error("pgchannel: {0}: cancelled")]
    Cancelled(&'static str),
}

impl PgError {
    pub fn invalid(msg: impl Into<String>) -> PgError {
        PgError::Invalid(msg.into())
    }

    /// Whether a retry on a fresh connection may succeed (the caller decides whether it is
    /// safe: nothing committed, or idempotent).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PgError::Db {
                transient: true,
                ..
            } | PgError::Lost { .. }
        )
    }

    pub(crate) fn db(op: &'static str, e: tokio_postgres::Error) -> PgError {
        let transient = transient_pg(&e);
        PgError::Db {
            op,
            msg: describe(&e),
            transient,
        }
    }

    pub(crate) fn pool(op: &'static str, e: deadpool_postgres::PoolError) -> PgError {
        use deadpool_postgres::PoolError as P;
        let (msg, transient) = match e {
            P::Backend(e) => (describe(&e), true),
            P::Timeout(t) => (format!("no connection within the timeout ({t:?})"), true),
            P::Closed => ("the connection pool is closed".to_string(), false),
            other => (other.to_string(), true),
        };
        PgError::Db { op, msg, transient }
    }
}

/// Postgres errors that mean "this connection/server is going away or not yet there".
fn transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 08: connection exception; 57P01-03: admin/crash shutdown, cannot connect now;
            // 40001/40P01: serialization failure / deadlock (the statement may be retried).
            code.starts_with("08")
                || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
        }
        // No server response at all: I/O, connect or TLS failure.
        None => true,
    }
}

/// One line: the server's message (with its SQLSTATE) or the client error and its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
