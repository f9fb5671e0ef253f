//! The runtime's provider contract: what a broker backend (NATS JetStream, pgchannel, ...)
//! implements so that the steps and the trigger are written once over it.
//!
//! A provider is an opened, cheaply cloned handle on one broker (a connection, a pool). The
//! loops around it (bulk windows and their results, the trigger's in-flight limit, backoff,
//! re-bind, progress, dead-letter and batch delivery) live in `runtime::steps` and
//! `runtime::trigger` and only see this contract; the single place that chooses a provider
//! is `runtime::modules::broker` (`BrokerModule::dispatch`). Implementations live with their domain code:
//! `crate::nats::provider`, `crate::pg::provider`, `crate::kafka::provider`. `docs/adding-a-provider.md` walks a new one
//! through.
//!
//! The shape fits an offset-log provider too: tokens are opaque strings the provider parses
//! (a partition and offset, say), `settle` may record an ack and commit cumulatively, a nak
//! with a delay may schedule the redelivery inside the plugin, and `Subscription::next` yields
//! what is ready without promising more than one item.

use crate::config::broker::BrokerSpec;
use crate::config::decode;
use crate::kafka::KafkaError;
use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use crate::nats::NatsError;
use crate::pb::eventbus::Message;
use crate::pg::PgError;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::nats::ack::AckKind;

/// One message to publish, built once from the step's config and input (its checks done) and
/// handed to the provider, which maps it onto its wire: NATS headers, or pgchannel columns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutMessage {
    pub subject: String,
    pub payload: Vec<u8>,
    /// Step headers then message headers, the later winning.
    pub headers: BTreeMap<String, String>,
    /// Empty when unset.
    pub correlation_id: String,
    /// De-duplication id within the stream's duplicate window; empty when unset.
    pub message_id: String,
}

/// The correlation and de-duplication ids as NATS headers (the NATS provider's wire; the other
/// providers deliver the ids under these names too).
pub const CORRELATION_HEADER: &str = "Nats-Correlation-Id";
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The Go pgchannel provider's header for the correlation id. Deliveries of providers that keep
/// the id apart (pgchannel, kafka) carry it next to the NATS provider's `Nats-Correlation-Id`, so
/// pipelines written for either keep working.
pub const GO_CORRELATION_HEADER: &str = "X-Correlation-Id";

/// A message's ids apart from its other headers, for providers that store them apart.
pub struct Ids {
    pub headers: BTreeMap<String, String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
}

impl OutMessage {
    /// Takes the ids out of the headers: a header spelled like the NATS correlation or message
    /// id stands for the field when the field is unset.
    pub fn take_ids(&mut self) -> Ids {
        let mut ids = Ids {
            headers: BTreeMap::new(),
            correlation_id: None,
            message_id: None,
        };
        for (name, value) in std::mem::take(&mut self.headers) {
            if name.eq_ignore_ascii_case(CORRELATION_HEADER) {
                ids.correlation_id = Some(value);
            } else if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
                ids.message_id = Some(value);
            } else {
                ids.headers.insert(name, value);
            }
        }
        if !self.correlation_id.is_empty() {
            ids.correlation_id = Some(std::mem::take(&mut self.correlation_id));
        }
        if !self.message_id.is_empty() {
            ids.message_id = Some(std::mem::take(&mut self.message_id));
        }
        ids
    }
}

/// A delivery's headers in our wire shape, the correlation id under the NATS and the Go names.
pub fn delivered_headers(
    headers: &BTreeMap<String, String>,
    correlation_id: Option<&str>,
) -> std::collections::HashMap<String, String> {
    let mut out: std::collections::HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(c) = correlation_id.filter(|c| !c.is_empty()) {
        out.insert(CORRELATION_HEADER.to_string(), c.to_string());
        out.insert(GO_CORRELATION_HEADER.to_string(), c.to_string());
    }
    out
}

/// What the broker said about one stored message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub stream: String,
    pub sequence: String,
    /// The message id was seen within the duplicate window: nothing new was stored.
    pub duplicate: bool,
    /// RFC 3339; the broker's own timestamp where it gives one, else the time of the ack.
    pub acked_at: String,
}

/// A failure of a provider operation, typed by what callers branch on; a provider's own error
/// travels as its source.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("broker {broker:?} is not connected ({detail})")]
    Unavailable { broker: String, detail: String },
    #[error("{op} timed out after {after:?}")]
    TimedOut { op: &'static str, after: Duration },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

impl ProviderError {
    /// A declaration the provider refuses, in the plan's words (its conversion, shared with
    /// wfctl's plan); the component is left to the caller's error, which names the module.
    pub fn refused(e: crate::config::error::ConfigError) -> ProviderError {
        let text = e.to_string();
        let prefix = format!("{}: ", e.component);
        ProviderError::Invalid(text.strip_prefix(&prefix).unwrap_or(&text).to_string())
    }

    /// The stream or consumer does not exist (deleted behind our back, or never created).
    pub fn is_not_found(&self) -> bool {
        match self {
            ProviderError::Nats(e) => e.is_not_found(),
            ProviderError::Pg(PgError::ConsumerNotFound { .. }) => true,
            ProviderError::Kafka(KafkaError::TopicNotFound(_)) => true,
            _ => false,
        }
    }

    /// The message can never be sent as it is (over the broker's size limit): retrying is
    /// pointless.
    pub fn is_too_large(&self) -> bool {
        matches!(self, ProviderError::Nats(e) if e.is_too_large())
    }

    /// A failure that a later attempt may not meet (broker down, timed out), as opposed to a
    /// configuration problem the user must see at Start.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Unavailable { .. } | ProviderError::TimedOut { .. } => true,
            ProviderError::Invalid(_) => false,
            ProviderError::Nats(e) => {
                matches!(
                    e,
                    NatsError::Unavailable { .. } | NatsError::TimedOut { .. }
                )
            }
            ProviderError::Pg(e) => e.is_transient(),
            ProviderError::Kafka(e) => e.is_transient(),
        }
    }
}

/// A declared stream or consumer, for `Provider::ensure`, with the module that declares it
/// (its type and name), so that a provider refusing a setting names the module as plan does.
#[derive(Clone, Copy)]
pub struct Declaration<'a> {
    pub type_name: &'a str,
    pub module: &'a str,
    pub what: Declares<'a>,
}

/// What a `Declaration` declares.
#[derive(Clone, Copy)]
pub enum Declares<'a> {
    Stream(&'a StreamSpec),
    Consumer(&'a ConsumerSpec),
}

/// One consume execution, already checked by the step.
#[derive(Clone, Copy)]
pub struct FetchAsk<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    pub batch: usize,
    /// The budget of the encoded output (`steps::output`): the broker is asked for less payload
    /// so the fields fit; a message over it loses its derived forms, then is given back.
    pub max_bytes: usize,
    pub include: Include,
    pub max_wait: Duration,
}

/// What a trigger binds to.
#[derive(Clone, Copy)]
pub struct BindAsk<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    /// Empty: none asked. An undeclared consumer is created with it.
    pub filter_subject: &'a str,
    /// 0: the consumer's.
    pub max_deliver: i64,
    /// A declared consumer module owns the consumer; otherwise the provider creates it.
    pub declared: bool,
    pub dead_letter_subject: Option<&'a str>,
    /// An undeclared consumer starts at the last message of each subject (a bucket watch: the
    /// current value of every key, then each change) instead of the first message.
    pub last_per_subject: bool,
    /// The trigger promises id order (`max_in_flight: 1`): one active subscriber per consumer.
    /// Otherwise a provider may let subscribers in several processes share the consumer.
    pub ordered: bool,
}

/// What the bound consumer says, needed per delivery.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// How long a delivery stays ours without an ack or an in-progress ack.
    pub ack_wait: Duration,
    /// The delivery that is the last (the smaller positive of trigger and consumer limit);
    /// 0 for unlimited.
    pub max_deliver: i64,
}

/// Where a delivery came from: its token and the facts the trigger logs and dead-letters with.
#[derive(Clone, Debug)]
pub struct Origin {
    pub token: String,
    pub subject: String,
    pub stream: String,
    pub sequence: String,
    pub delivery_count: i32,
}

impl Origin {
    pub fn of(m: &Message) -> Origin {
        Origin {
            token: m.ack_token.clone(),
            subject: m.subject.clone(),
            stream: m.stream.clone(),
            sequence: m.sequence.clone(),
            delivery_count: m.delivery_count,
        }
    }

    /// The headers a dead-lettered copy carries besides the original's own.
    pub fn dead_letter_headers(&self, reason: &str) -> [(&'static str, String); 5] {
        let reason: String = reason
            .chars()
            .take(512)
            .filter(|c| !c.is_control())
            .collect();
        [
            ("Eventbus-Original-Subject", self.subject.clone()),
            ("Eventbus-Original-Stream", self.stream.clone()),
            ("Eventbus-Original-Sequence", self.sequence.clone()),
            ("Eventbus-Delivery-Count", self.delivery_count.to_string()),
            ("Eventbus-Error", reason),
        ]
    }
}

/// One delivered message as the provider holds it until it is settled.
pub trait Delivered: Send + Sync + 'static {
    /// The message in our wire shape, with the payload forms `include` asks for.
    fn to_message(&self, consumer: &str, include: Include) -> Message;
    fn payload_len(&self) -> usize;
}

/// What `Subscription::next` yields.
pub enum Next<D> {
    /// At least one delivery (never more than asked for).
    Items(Vec<D>),
    /// A failure worth a log line; the subscription goes on.
    Failed(String),
    /// The subscription is gone (lost lock, deleted consumer, broker restarted): bind again.
    Rebind(String),
}

/// A bound consumer's stream of deliveries for the trigger.
pub trait Subscription: Send + 'static {
    type Delivery: Delivered;
    /// Waits for the first delivery, then returns up to `max` that are ready. Dropping the
    /// future (stop, batch deadline) loses nothing: what is not returned stays deliverable.
    fn next(&mut self, max: usize) -> impl Future<Output = Next<Self::Delivery>> + Send;
}

/// How a provider is reached from its broker module's config: what the broker module needs of
/// a provider besides its dispatch arm (it keeps the opened handle, type-erased, in one slot).
pub trait Connect: Provider {
    /// Whether StartModule succeeds with no address configured (steps then fail with the
    /// [`Connect::unconfigured`] line until one is set) rather than failing Start.
    const STARTS_UNCONFIGURED: bool = false;

    /// Why the broker cannot be reached as configured (no address anywhere, naming where one
    /// may be set), or None.
    fn unconfigured(spec: &BrokerSpec) -> Option<String>;

    /// Opens the connection (or pool); called once per start, under the broker's open lock.
    fn connect(spec: &BrokerSpec) -> impl Future<Output = Result<Self, ProviderError>> + Send;

    /// Registers `stream`/`consumer` with the consumer-lag refresher (idempotent).
    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str);
}

/// A broker backend, opened. See the module docs.
pub trait Provider: Clone + Send + Sync + 'static {
    type Delivery: Delivered;
    type Binding: Send + 'static;
    type Subscription: Subscription<Delivery = Self::Delivery>;

    /// Settles awaited at once by a bulk ack.
    const ACK_WINDOW: usize;

    /// The bound of one request to the broker (an ack, a dead-letter publish).
    fn request_timeout(&self) -> Duration;

    /// Whether `token` has this provider's ack token shape (no I/O).
    fn check_token(token: &str) -> Result<(), String>;

    /// Waits (bounded) until the broker is reachable; the error names what is down.
    fn ready(&self, bound: Duration) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// Stores one message; `None` timeout means the broker's request timeout.
    fn publish(
        &self,
        msg: OutMessage,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Published, ProviderError>> + Send;

    /// Stores a list in order, at most `window` unconfirmed at once; one result per message in
    /// list order (a failed one carries its rendered error).
    fn publish_list(
        &self,
        msgs: Vec<OutMessage>,
        window: usize,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Vec<Result<Published, String>>> + Send;

    /// One bounded batch from a durable consumer, each message leased to this caller, held to
    /// `ask.max_bytes` of encoded output by `steps::output::Output`.
    fn fetch(
        &self,
        ask: FetchAsk<'_>,
    ) -> impl Future<Output = Result<Vec<Message>, ProviderError>> + Send;

    /// Forgets what `fetch` cached for this consumer (it was deleted behind our back).
    fn forget(&self, stream: &str, durable: &str) -> impl Future<Output = ()> + Send;

    /// Ack, nak (with delay), term or progress by token, confirmed where the broker confirms.
    fn settle(
        &self,
        token: &str,
        kind: AckKind,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// One ack kind on a list of tokens, one result per token in list order (a bulk ack).
    /// Default: `settle` per token, `ACK_WINDOW` at a time; a provider that settles many in
    /// one request (pgchannel: one statement per consumer) overrides it.
    fn settle_list(
        &self,
        tokens: &[&str],
        kind: AckKind,
    ) -> impl Future<Output = Vec<Result<(), ProviderError>>> + Send {
        use futures::StreamExt;
        futures::stream::iter(tokens.iter().copied())
            .map(move |t| self.settle(t, kind))
            .buffered(Self::ACK_WINDOW)
            .collect()
    }

    /// Makes the broker hold the declaration as declared; the outcome, for the log.
    fn ensure(
        &self,
        d: Declaration<'_>,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send;

    /// Whether the stream (and, when given, the consumer) no longer exists; a failed check is
    /// not "gone".
    fn gone(&self, stream: &str, durable: Option<&str>) -> impl Future<Output = bool> + Send;

    /// Binds the trigger's consumer (creating an undeclared one), checks its filter and reads
    /// its limits.
    fn bind(
        &self,
        ask: BindAsk<'_>,
    ) -> impl Future<Output = Result<(Self::Binding, Bound), ProviderError>> + Send;

    /// Starts delivering from a binding; may wait while another process holds the consumer.
    fn subscribe(
        &self,
        binding: Self::Binding,
        ask: BindAsk<'_>,
        batch: usize,
        stop: &CancellationToken,
    ) -> impl Future<Output = Result<Self::Subscription, ProviderError>> + Send;

    /// StopModule and shutdown: drains and closes the connection (or pool); the handle is not
    /// used again.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// The JetStream context key-value steps work through; `None` when the provider has no
    /// key-value buckets (the step refuses, naming the provider).
    fn key_value(&self) -> Option<async_nats::jetstream::Context> {
        None
    }

    /// The JetStream context object-store steps work through; `None` when the provider has no
    /// object stores (the step and the module refuse, naming the provider).
    fn object_store(&self) -> Option<async_nats::jetstream::Context> {
        None
    }

    /// Publishes a copy of `d` to `subject` with the original's headers plus `extra`.
    fn dead_letter(
        &self,
        subject: &str,
        d: &Self::Delivery,
        extra: &[(&'static str, String)],
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
}

/// Which forms of each payload a delivered message carries. Each costs memory and output:
/// bytes (base64 in the host's JSON, 1.34x), text (1x, UTF-8 only), parsed JSON (up to ~6x for
/// arrays of numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Include {
    pub payload: bool,
    pub text: bool,
    pub json: bool,
}

impl Include {
    pub const ALL: Include = Include {
        payload: true,
        text: true,
        json: true,
    };

    pub fn parse(list: &[String]) -> Result<Include, String> {
        if list.is_empty() {
            return Ok(Include::ALL);
        }
        let mut inc = Include {
            payload: false,
            text: false,
            json: false,
        };
        for item in list {
            match item.as_str() {
                "payload" => inc.payload = true,
                "text" => inc.text = true,
                "json" => inc.json = true,
                other => {
                    return Err(format!(
                        "{} is not one of payload, text, json",
                        crate::secret::quote(other)
                    ))
                }
            }
        }
        Ok(inc)
    }

    /// The payload forms of a delivered message: (bytes, text, parsed JSON), each empty when
    /// not asked for; text is empty when the payload is not UTF-8, JSON absent when not JSON.
    pub fn forms(self, payload: &[u8]) -> (Vec<u8>, String, Option<prost_types::Value>) {
        let text = if self.text {
            std::str::from_utf8(payload)
                .map(str::to_string)
                .unwrap_or_default()
        } else {
            String::new()
        };
        let json = if self.json {
            serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .map(|j| decode::json_to_value(&j))
        } else {
            None
        };
        let bytes = if self.payload {
            payload.to_vec()
        } else {
            Vec::new()
        };
        (bytes, text, json)
    }
}

pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs `f` bounded by `after`; a timeout becomes `ProviderError::TimedOut`.
pub async fn bounded<T, E: Into<ProviderError>>(
    op: &'static str,
    after: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, ProviderError> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ProviderError::TimedOut { op, after }),
    }
}
