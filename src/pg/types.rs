//! Definitions, tokens and results of the pg domain layer.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::PgError;

/// NATS's default de-duplication window.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Lease of a delivered message when the consumer gives no ack_wait (NATS's default).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// The Go plugin's (and its schema's) max_deliver default.
pub const DEFAULT_MAX_DELIVER: i32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Updated,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDef {
    pub name: String,
    pub subjects: Vec<String>,
    /// Stored in whole seconds (the Go column); sub-second ages round up to 1 s.
    pub max_age: Option<Duration>,
    pub max_msgs: Option<i64>,
    pub max_bytes: Option<i64>,
    /// Zero means the default (2 min), as in NATS.
    pub duplicate_window: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverFrom {
    All,
    New,
    Last,
    BySeq(i64),
    ByTime(time::OffsetDateTime),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPolicy {
    Explicit,
    None,
    All,
}

impl AckPolicy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AckPolicy::Explicit => "explicit",
            AckPolicy::None => "none",
            AckPolicy::All => "all",
        }
    }
    pub(crate) fn from_db(s: &str) -> AckPolicy {
        match s {
            "none" => AckPolicy::None,
            "all" => AckPolicy::All,
            _ => AckPolicy::Explicit,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerDef {
    pub stream: String,
    pub name: String,
    /// Literal subjects or `prefix.>`; an entry may itself be a comma list (the Go syntax).
    /// `*` wildcards are refused. Stored comma-joined in the Go `filter_subject` column.
    pub filter_subjects: Vec<String>,
    /// Where a new consumer starts; changing it on an existing consumer keeps its position.
    pub deliver: DeliverFrom,
    pub ack_policy: AckPolicy,
    /// `<= 0` means 5, as in the Go plugin.
    pub max_deliver: i32,
    /// Lease of a delivered message before it is redelivered; zero means 30 s.
    pub ack_wait: Duration,
    /// When non-empty, the lease of the n-th delivery is `backoff[min(n, len) - 1]`.
    pub backoff: Vec<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchOpts {
    pub batch: usize,
    pub max_wait: Duration,
    pub max_bytes: Option<usize>,
    /// Where a message goes once it exceeds max_deliver (copied, then terminated).
    pub dead_letter_subject: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct SubOpts {
    pub dead_letter_subject: Option<String>,
    pub cancel: tokio_util::sync::CancellationToken,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub payload: bytes::Bytes,
    pub headers: BTreeMap<String, String>,
    pub correlation_id: Option<String>,
    /// De-duplication key within the stream's duplicate window (`Nats-Msg-Id` semantics).
    pub msg_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub stream: String,
    pub id: i64,
    pub ts: time::OffsetDateTime,
    /// The msg_id was seen within the window: nothing stored, `id`/`ts` are the original's.
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub token: AckToken,
    pub subject: String,
    pub payload: bytes::Bytes,
    /// As stored; the runtime adds the correlation-id headers.
    pub headers: BTreeMap<String, String>,
    pub correlation_id: Option<String>,
    pub published_at: time::OffsetDateTime,
    /// 1 on first delivery; carries on from a Go-written count.
    pub delivery_count: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AckToken {
    pub stream: String,
    pub consumer: String,
    pub id: i64,
}

impl fmt::Display for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.stream, self.consumer, self.id)
    }
}

impl FromStr for AckToken {
    type Err = PgError;
    /// `<stream>:<consumer>:<id>`. Stream names cannot contain `:`; the id is after the last
    /// `:`, so the consumer part is everything between.
    fn from_str(t: &str) -> Result<AckToken, PgError> {
        let bad = || PgError::MalformedToken(t.to_string());
        let (stream, rest) = t.split_once(':').ok_or_else(bad)?;
        let (consumer, id) = rest.rsplit_once(':').ok_or_else(bad)?;
        if stream.is_empty() || consumer.is_empty() {
            return Err(bad());
        }
        let id: i64 = id.parse().map_err(|_| bad())?;
        if id <= 0 {
            return Err(bad());
        }
        Ok(AckToken {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            id,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOp {
    Ack,
    /// Redeliver after the delay (now when None).
    Nak(Option<Duration>),
    /// Never redeliver.
    Term,
    /// Still working: extend the lease by the consumer's ack_wait.
    Progress,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub events: u64,
    pub deliveries: u64,
}

/// Stream names are identifiers in the NOTIFY channel, as the Go plugin required.
pub fn validate_stream_name(name: &str) -> Result<(), PgError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(PgError::invalid(format!(
            "stream name {name:?} is invalid: use letters, digits and _ only (it names the \
             NOTIFY channel eventbus_<name>)"
        )));
    }
    // NOTIFY channel names are identifiers: at most 63 bytes including "eventbus_".
    if name.len() > 54 {
        return Err(PgError::invalid(format!(
            "stream name {name:?} is too long: at most 54 characters (the NOTIFY channel \
             eventbus_<name> is limited to 63)"
        )));
    }
    Ok(())
}

/// NOTIFY channel of a stream, as the Go plugin names it.
pub fn notify_channel(stream: &str) -> String {
    format!("eventbus_{}", stream.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_use_the_go_text() {
        let t: AckToken = "ORDERS:worker:42".parse().unwrap();
        assert_eq!(
            (t.stream.as_str(), t.consumer.as_str(), t.id),
            ("ORDERS", "worker", 42)
        );
        assert_eq!(t.to_string(), "ORDERS:worker:42");
        let e = "nope".parse::<AckToken>().unwrap_err().to_string();
        assert_eq!(
            e,
            "pgchannel: Ack: malformed ackToken \"nope\" (want \"<stream>:<consumer>:<id>\")"
        );
        assert!("a:b:x".parse::<AckToken>().is_err());
        assert!("a::1".parse::<AckToken>().is_err());
    }

    #[test]
    fn stream_names_follow_the_go_rule() {
        assert!(validate_stream_name("ORDERS_v2").is_ok());
        let e = validate_stream_name("BMW-Fulfillment")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BMW-Fulfillment") && e.contains("letters, digits and _"),
            "{e}"
        );
        assert_eq!(notify_channel("Orders"), "eventbus_orders");
    }
}
