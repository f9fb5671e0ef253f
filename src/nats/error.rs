//! async-nats failures lifted once into the kinds callers branch on.

use async_nats::jetstream::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists with a different configuration")]
    AlreadyExists { what: String },
    #[error("broker {broker:?} is not connected ({detail})")]
    Unavailable { broker: String, detail: String },
    #[error("{op} timed out after {after:?}")]
    TimedOut {
        op: &'static str,
        after: std::time::Duration,
    },
    #[error("{op} rejected by the server: {detail} (jetstream error code {code})")]
    Rejected {
        op: &'static str,
        code: u64,
        detail: String,
    },
    /// The plugin's own refusal, before anything is sent: the change would need a replace.
    #[error("{op} refused: {detail}")]
    NotInPlace { op: &'static str, detail: String },
    /// A setting the broker's nats-server release does not know (one line per setting).
    #[error("{detail}")]
    ServerTooOld { detail: String },
    #[error("{op} failed: {detail}")]
    Other { op: &'static str, detail: String },
    #[error("invalid connection settings: {0}")]
    Settings(String),
    /// Refused before it is sent: over the connection's `max_payload` (see `nats::wire`).
    #[error("{what} is {size} bytes as sent (payload {payload} + headers {}), over the server's max_payload of {limit} bytes", .size - .payload)]
    TooLarge {
        what: String,
        size: usize,
        payload: usize,
        limit: usize,
    },
    /// Refused before it is sent: over a limit of the bucket it is written to (`limit_name`
    /// says which, e.g. `bucket "cache"'s max_value_size`).
    #[error("{what} is {size} bytes as sent, over {limit_name} of {limit} bytes")]
    OverLimit {
        what: String,
        size: usize,
        limit: usize,
        limit_name: String,
    },
}

impl NatsError {
    pub fn other(op: &'static str, e: impl std::fmt::Display) -> Self {
        NatsError::Other {
            op,
            detail: e.to_string(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, NatsError::NotFound { .. })
    }

    /// Over the server's `max_payload`: no retry can send it.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            NatsError::TooLarge { .. } | NatsError::OverLimit { .. }
        )
    }
}

pub const STREAM_NOT_FOUND: ErrorCode = ErrorCode::STREAM_NOT_FOUND;
pub const CONSUMER_NOT_FOUND: ErrorCode = ErrorCode::CONSUMER_NOT_FOUND;

/// Lifts a JetStream API error (`code` from the server) into our kinds.
pub fn lift_api(op: &'static str, what: &str, err: &async_nats::jetstream::Error) -> NatsError {
    let code = err.error_code();
    if code == STREAM_NOT_FOUND || code == CONSUMER_NOT_FOUND {
        NatsError::NotFound {
            what: what.to_string(),
        }
    } else if code == ErrorCode::STREAM_NAME_EXIST || code == ErrorCode::CONSUMER_NAME_EXIST {
        NatsError::AlreadyExists {
            what: what.to_string(),
        }
    } else {
        NatsError::Rejected {
            op,
            code: code.0,
            detail: err.to_string(),
        }
    }
}
