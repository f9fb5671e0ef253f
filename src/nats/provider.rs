//! NATS JetStream as a runtime provider (`crate::runtime::provider::Provider`): publish with
//! the two-phase PublishAck, durable pull consumers for consume (bound once, reused) and for the
//! trigger (a pull stream with heartbeats), acks by reply subject, dead-letter copies that keep
//! the original's headers minus its publish directives.

use super::ack::{ack_token, AckKind};
use super::conn::ConnState;
use super::consumer::{fetch_consumer_config, get_stream};
use super::guard::check_ack_token;
use super::wire;
use super::{NatsConn, NatsError};
use crate::config::broker::BrokerSpec;
use crate::error_chain::render;
use crate::pb::eventbus::Message;
use crate::runtime::provider::{
    now_rfc3339, rfc3339, BindAsk, Bound, Connect, Declaration, Declares, Delivered, FetchAsk,
    Include, Next, OutMessage, Provider, ProviderError, Published, Subscription,
};
use crate::runtime::steps::output::{self, Output};
use async_nats::jetstream::consumer::pull::{self, MessagesError, Stream as PullStream};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::Message as JsMessage;
use async_nats::{HeaderMap, HeaderName};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

pub use crate::runtime::provider::{CORRELATION_HEADER, MSG_ID_HEADER};

const HEARTBEAT: Duration = Duration::from_secs(5);
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// A batch of 1 stalls async-nats' pull stream until the request expires (the bench measured
/// ~10 s per message); 2 keeps it flowing, and the trigger's semaphore still bounds what runs.
const MIN_PULL_BATCH: usize = 2;

/// One broker's connection plus the pull consumers consume binds once and reuses.
#[derive(Clone)]
pub struct NatsProvider {
    pub conn: NatsConn,
    pulls: Arc<Mutex<HashMap<(String, String), PullConsumer>>>,
}

impl NatsProvider {
    pub fn new(conn: NatsConn) -> Self {
        NatsProvider {
            conn,
            pulls: Arc::default(),
        }
    }

    async fn pull(&self, stream: &str, durable: &str) -> Result<PullConsumer, NatsError> {
        let key = (stream.to_string(), durable.to_string());
        if let Some(c) = self.pulls.lock().await.get(&key) {
            return Ok(c.clone());
        }
        let s = get_stream(&self.conn, stream).await?;
        if fetch_consumer_config(&s, durable).await?.is_none() {
            return Err(NatsError::NotFound {
                what: format!("consumer {durable:?} on stream {stream:?}"),
            });
        }
        let consumer: PullConsumer = s
            .get_consumer(durable)
            .await
            .map_err(|e| NatsError::other("bind consumer", e))?;
        self.pulls.lock().await.insert(key, consumer.clone());
        Ok(consumer)
    }
}

/// The message's headers as NATS carries them: its own, then correlation and de-duplication
/// ids; the message keeps its subject and payload. Names and values were checked when the
/// message was built (async-nats panics on bad ones); the strings move, none is copied.
fn headers_of(msg: &mut OutMessage) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in std::mem::take(&mut msg.headers) {
        out.insert(k, v);
    }
    if !msg.correlation_id.is_empty() {
        out.insert(CORRELATION, std::mem::take(&mut msg.correlation_id));
    }
    if !msg.message_id.is_empty() {
        out.insert(MSG_ID, std::mem::take(&mut msg.message_id));
    }
    out
}

const CORRELATION: HeaderName = HeaderName::from_static(CORRELATION_HEADER);
const MSG_ID: HeaderName = HeaderName::from_static(MSG_ID_HEADER);

/// A publish within the connection's max_payload, counted as sent: the payload and every
/// header, the ids and trace context the step adds included (the field is the payload, the
/// one a pipeline can shrink).
fn fits(conn: &NatsConn, headers: &HeaderMap, payload: usize) -> Result<(), NatsError> {
    wire::check_fits(
        "payload: the message (payload plus headers, counting the message_id, correlation_id and traceparent/tracestate headers the step adds)",
        headers,
        payload,
        conn.client.max_payload(),
    )
}

fn published(ack: async_nats::jetstream::publish::PublishAck) -> Published {
    Published {
        stream: ack.stream,
        sequence: ack.sequence.to_string(),
        duplicate: ack.duplicate,
        acked_at: now_rfc3339(),
    }
}

impl Connect for NatsProvider {
    // Degraded (no url) is not a Start failure: steps say how to configure one.
    const STARTS_UNCONFIGURED: bool = true;

    fn unconfigured(spec: &BrokerSpec) -> Option<String> {
        spec.resolve_urls().is_empty().then(|| {
            format!(
                "no broker url configured; set dsn on the module, EVENTBUS_{}_URI or NATS_URL",
                super::names::env_key(&spec.name)
            )
        })
    }

    async fn connect(spec: &BrokerSpec) -> Result<Self, ProviderError> {
        let mut settings = spec.conn.clone();
        settings.urls = spec.resolve_urls();
        tracing::info!(broker = %spec.name, servers = %settings.redacted_urls(), "connecting");
        Ok(NatsProvider::new(
            NatsConn::open(&spec.name, &settings).await?,
        ))
    }

    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str) {
        crate::telemetry::lag::watch_nats(broker, &self.conn.js, stream, consumer);
    }
}

impl Provider for NatsProvider {
    type Delivery = JsMessage;
    type Binding = PullConsumer;
    type Subscription = NatsSubscription;

    /// Each is one request/reply on the shared connection.
    const ACK_WINDOW: usize = 256;

    fn request_timeout(&self) -> Duration {
        self.conn.request_timeout
    }

    fn key_value(&self) -> Option<async_nats::jetstream::Context> {
        Some(self.conn.js.clone())
    }

    fn object_store(&self) -> Option<async_nats::jetstream::Context> {
        Some(self.conn.js.clone())
    }

    fn check_token(token: &str) -> Result<(), String> {
        check_ack_token(token)
    }

    async fn ready(&self, bound: Duration) -> Result<(), ProviderError> {
        Ok(self.conn.wait_connected(bound).await?)
    }

    /// A plain fn returning the future: the message becomes what the client sends before
    /// it, so only that lives in the future (which is moved into a box per call).
    fn publish(
        &self,
        msg: OutMessage,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Published, ProviderError>> + Send {
        let conn = &self.conn;
        let timeout = timeout.unwrap_or(conn.request_timeout);
        let mut msg = msg;
        let headers = headers_of(&mut msg);
        let (subject, payload) = (msg.subject, bytes::Bytes::from(msg.payload));
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            conn.wait_connected(timeout).await?;
            fits(conn, &headers, payload.len())?;
            let ack = tokio::time::timeout_at(deadline, async {
                let fut = conn
                    .js
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| NatsError::other("publish", e))?;
                fut.await.map_err(|e| NatsError::other("publish ack", e))
            })
            .await
            .map_err(|_| NatsError::TimedOut {
                op: "publish",
                after: timeout,
            })??;
            Ok(published(ack))
        }
    }

    /// Sends in list order from this one task (so the stream stores the list in order) while
    /// at most `window` acks are awaited. Each message is bounded from its own send, so a
    /// stalled broker fails messages rather than hanging the call.
    async fn publish_list(
        &self,
        msgs: Vec<OutMessage>,
        window: usize,
        timeout: Option<Duration>,
    ) -> Vec<Result<Published, String>> {
        let timeout = timeout.unwrap_or(self.conn.request_timeout);
        if let Err(e) = self.conn.wait_connected(timeout).await {
            let e = render(&e);
            return msgs.iter().map(|_| Err(e.clone())).collect();
        }
        let js = &self.conn.js;
        let timed_out = || NatsError::TimedOut {
            op: "publish",
            after: timeout,
        };
        let mut results = Vec::with_capacity(msgs.len());
        let mut pending = FuturesOrdered::new();
        for mut msg in msgs {
            while pending.len() >= window.max(1) {
                if let Some(r) = pending.next().await {
                    results.push(r);
                }
            }
            let headers = headers_of(&mut msg);
            if let Err(e) = fits(&self.conn, &headers, msg.payload.len()) {
                pending.push_back(futures::future::ready(Err(render(&e))).right_future());
                continue;
            }
            let sent = tokio::time::timeout(
                timeout,
                js.publish_with_headers(msg.subject, headers, msg.payload.into()),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => pending.push_back(
                    async move {
                        match tokio::time::timeout(timeout, ack).await {
                            Ok(Ok(ack)) => Ok(published(ack)),
                            Ok(Err(e)) => Err(render(&NatsError::other("publish ack", e))),
                            Err(_) => Err(render(&timed_out())),
                        }
                    }
                    .left_future(),
                ),
                Ok(Err(e)) => pending.push_back(
                    futures::future::ready(Err(render(&NatsError::other("publish", e))))
                        .right_future(),
                ),
                Err(_) => pending
                    .push_back(futures::future::ready(Err(render(&timed_out()))).right_future()),
            }
        }
        while let Some(r) = pending.next().await {
            results.push(r);
        }
        results
    }

    async fn fetch(&self, ask: FetchAsk<'_>) -> Result<Vec<Message>, ProviderError> {
        let conn = &self.conn;
        conn.wait_connected(conn.request_timeout).await?;
        let (stream, durable) = (ask.stream, ask.durable);
        let consumer = self.pull(stream, durable).await?;
        let max_deliver = consumer.cached_info().config.max_deliver;
        let mut batch_stream = consumer
            .fetch()
            .max_messages(ask.batch)
            .max_bytes(output::fetch_bytes(ask.max_bytes, ask.batch))
            .expires(ask.max_wait)
            .messages()
            .await
            .map_err(|e| NatsError::other("fetch", e))?;
        let mut out = Output::new(ask.max_bytes, ask.batch);
        // The fetch ends by itself at `max_wait`; the outer bound only guards against a server
        // that never answers.
        let bound = ask.max_wait + conn.request_timeout;
        let collect = async {
            while let Some(m) = batch_stream.next().await {
                match m {
                    Ok(m) => {
                        let msg = m.to_message(durable, ask.include);
                        // A nak on the last delivery would end it: that one stays, over budget.
                        let last = max_deliver > 0 && msg.delivery_count as i64 >= max_deliver;
                        if let Some(msg) = out.push(msg, last) {
                            output::give_back(self, &msg).await;
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if text.contains("consumer deleted") || text.contains("not found") {
                            return Err(NatsError::NotFound {
                                what: format!("consumer {durable:?} on stream {stream:?}"),
                            });
                        }
                        tracing::debug!(error = %text, "fetch ended");
                        break;
                    }
                }
            }
            Ok(())
        };
        match tokio::time::timeout(bound, collect).await {
            Ok(r) => r?,
            Err(_) => tracing::debug!("fetch outer bound reached"),
        }
        Ok(out.into_messages())
    }

    async fn forget(&self, stream: &str, durable: &str) {
        self.pulls
            .lock()
            .await
            .remove(&(stream.to_string(), durable.to_string()));
    }

    async fn settle(&self, token: &str, kind: AckKind) -> Result<(), ProviderError> {
        Ok(ack_token(&self.conn.client, token, kind, self.conn.request_timeout).await?)
    }

    async fn ensure(&self, d: Declaration<'_>) -> Result<String, ProviderError> {
        let outcome = match d.what {
            Declares::Stream(s) => s.ensure(&self.conn).await?,
            Declares::Consumer(c) => c.ensure(&self.conn).await?,
        };
        Ok(format!("{outcome:?}"))
    }

    async fn gone(&self, stream: &str, durable: Option<&str>) -> bool {
        match get_stream(&self.conn, stream).await {
            Err(e) => e.is_not_found(),
            Ok(s) => match durable {
                None => false,
                Some(d) => matches!(fetch_consumer_config(&s, d).await, Ok(None)),
            },
        }
    }

    async fn bind(&self, ask: BindAsk<'_>) -> Result<(PullConsumer, Bound), ProviderError> {
        let conn = &self.conn;
        conn.wait_connected(conn.request_timeout.max(Duration::from_secs(2)))
            .await?;
        let stream = get_stream(conn, ask.stream).await?;
        let consumer: PullConsumer = if ask.declared {
            stream
                .get_consumer(ask.durable)
                .await
                .map_err(|e| NatsError::other("bind consumer", e))?
        } else {
            // Not declared: create it if missing with the trigger's own filter (Go B12).
            stream
                .get_or_create_consumer(
                    ask.durable,
                    pull::Config {
                        durable_name: Some(ask.durable.to_string()),
                        filter_subject: ask.filter_subject.to_string(),
                        deliver_policy: if ask.last_per_subject {
                            async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject
                        } else {
                            async_nats::jetstream::consumer::DeliverPolicy::All
                        },
                        ack_policy: AckPolicy::Explicit,
                        max_deliver: if ask.max_deliver > 0 {
                            ask.max_deliver
                        } else {
                            -1
                        },
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| NatsError::other("bind consumer", e))?
        };
        let cfg = &consumer.cached_info().config;
        if !ask.filter_subject.is_empty() {
            let f = ask.filter_subject;
            if cfg.filter_subject != f && cfg.filter_subjects != [f.to_string()] {
                return Err(NatsError::other(
                    "bind consumer",
                    format!(
                        "consumer {:?} filters {:?}, the trigger asks for {f:?}; align the consumer or drop filter_subject",
                        ask.durable,
                        if cfg.filter_subject.is_empty() { cfg.filter_subjects.join(",") } else { cfg.filter_subject.clone() }
                    ),
                )
                .into());
            }
        }
        // The server stops redelivering at the consumer's max_deliver, so a larger trigger value
        // would never reach its last attempt and the message would be dropped, not
        // dead-lettered: the smaller positive limit wins.
        let max_deliver = match (ask.max_deliver, cfg.max_deliver) {
            (t, c) if t > 0 && c > 0 => t.min(c),
            (t, _) if t > 0 => t,
            (_, c) => c,
        };
        let ack_wait = if cfg.ack_wait.is_zero() {
            Duration::from_secs(30)
        } else {
            cfg.ack_wait
        };
        Ok((
            consumer,
            Bound {
                ack_wait,
                max_deliver,
            },
        ))
    }

    async fn subscribe(
        &self,
        consumer: PullConsumer,
        ask: BindAsk<'_>,
        batch: usize,
        _stop: &CancellationToken,
    ) -> Result<NatsSubscription, ProviderError> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch.max(MIN_PULL_BATCH))
            .heartbeat(HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| NatsError::other("pull", e))?;
        Ok(NatsSubscription {
            provider: self.clone(),
            state: self.conn.state_changes(),
            messages,
            leftover: None,
            stream: ask.stream.to_string(),
            durable: ask.durable.to_string(),
        })
    }

    async fn close(&self) {
        self.conn.close().await
    }

    async fn dead_letter(
        &self,
        subject: &str,
        msg: &JsMessage,
        extra: &[(&'static str, String)],
    ) -> Result<(), ProviderError> {
        let kept = dead_letter_headers(msg.headers.as_ref());
        let max = self.conn.client.max_payload();
        let (headers, trimmed) = wire::fit_dead_letter(kept, extra, msg.payload.len(), max)?;
        if trimmed.any() {
            tracing::warn!(subject = %subject, max_payload = max, dropped = trimmed.dropped, truncated = trimmed.truncated, "dead-letter copy trimmed to the server's max_payload: headers left out or shortened");
        }
        let timeout = self.conn.request_timeout;
        let ack = self
            .conn
            .js
            .publish_with_headers(subject.to_string(), headers, msg.payload.clone())
            .await
            .map_err(|e| NatsError::other("dead-letter publish", e))?;
        tokio::time::timeout(timeout, ack)
            .await
            .map_err(|_| NatsError::TimedOut {
                op: "dead-letter publish",
                after: timeout,
            })?
            .map_err(|e| NatsError::other("dead-letter publish", e))?;
        Ok(())
    }
}

/// The trigger's pull stream, and the connection state: a restarted broker may have lost a
/// memory stream and its consumers, which the pull would notice only after two missed
/// heartbeats (~10 s).
pub struct NatsSubscription {
    provider: NatsProvider,
    state: watch::Receiver<ConnState>,
    messages: PullStream,
    /// What the stream yielded past what `next` could return, handed out first next time.
    leftover: Option<Option<Result<JsMessage, MessagesError>>>,
    stream: String,
    durable: String,
}

impl Subscription for NatsSubscription {
    type Delivery = JsMessage;

    async fn next(&mut self, max: usize) -> Next<JsMessage> {
        loop {
            let item = match self.leftover.take() {
                Some(l) => l,
                None => tokio::select! {
                    n = self.messages.next() => n,
                    Ok(()) = self.state.changed() => {
                        let reconnected = *self.state.borrow_and_update() == ConnState::Connected;
                        if reconnected && self.provider.gone(&self.stream, Some(&self.durable)).await {
                            return Next::Rebind("stream or consumer gone after reconnect".into());
                        }
                        continue;
                    }
                },
            };
            return match item {
                Some(Ok(m)) => {
                    let mut out = vec![m];
                    while out.len() < max {
                        match self.messages.next().now_or_never() {
                            Some(Some(Ok(m))) => out.push(m),
                            Some(other) => {
                                self.leftover = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    Next::Items(out)
                }
                Some(Err(e)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                    let rebind = matches!(
                        e.kind(),
                        K::MissingHeartbeat
                            | K::ConsumerDeleted
                            | K::NoResponders
                            | K::RequestLimitExceeded
                    );
                    if rebind {
                        Next::Rebind(e.to_string())
                    } else {
                        Next::Failed(e.to_string())
                    }
                }
                None => Next::Rebind("the pull stream ended".into()),
            };
        }
    }
}

impl Delivered for JsMessage {
    fn to_message(&self, consumer: &str, include: Include) -> Message {
        let mut headers = HashMap::new();
        if let Some(h) = &self.headers {
            for (k, vals) in h.iter() {
                // Multi-valued headers are joined, so the map stays string -> string.
                let joined = vals
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                headers.insert(k.to_string(), joined);
            }
        }
        let (seq, published, stream, delivered) = match self.info() {
            Ok(i) => (
                i.stream_sequence.to_string(),
                rfc3339(i.published),
                i.stream.to_string(),
                i.delivered as i32,
            ),
            Err(_) => (String::new(), String::new(), String::new(), 0),
        };
        let (payload, text, json) = include.forms(&self.payload);
        Message {
            subject: self.subject.to_string(),
            payload,
            headers,
            sequence: seq,
            published_at: published,
            ack_token: self
                .reply
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            stream,
            consumer: consumer.to_string(),
            delivery_count: delivered,
            text,
            json,
            ..Default::default()
        }
    }

    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// Publish-time JetStream directives (de-duplication id, expected stream/sequence, rollup, TTL,
/// batch, schedule, counter) were meant for the original stream: copied onto the dead-letter
/// publish they made it fail (e.g. `Nats-Expected-Stream`) or vanish as a duplicate
/// (`Nats-Msg-Id` in a stream that saw it), and the message was then lost on its last delivery.
/// Every other header travels; the original id is kept as `Eventbus-Original-Msg-Id`.
fn dead_letter_headers(original: Option<&HeaderMap>) -> HeaderMap {
    const DROP: &[&str] = &[
        "nats-msg-id",
        "nats-rollup",
        "nats-ttl",
        "nats-incr",
        "nats-required-api-level",
    ];
    const DROP_PREFIX: &[&str] = &["nats-expected-", "nats-batch-", "nats-schedule"];
    let mut out = HeaderMap::new();
    let Some(original) = original else {
        return out;
    };
    for (name, values) in original.iter() {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if lower == "nats-msg-id" {
            if let Some(v) = values.last() {
                out.insert("Eventbus-Original-Msg-Id", v.as_str());
            }
        }
        if DROP.contains(&lower.as_str()) || DROP_PREFIX.iter().any(|p| lower.starts_with(p)) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_drops_publish_directives_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "id-1");
        h.insert("Nats-Expected-Stream", "JOBS");
        h.insert("Nats-Expected-Last-Sequence", "4");
        h.insert("Nats-Correlation-Id", "c-1");
        h.append("x-k", "a");
        h.append("x-k", "b");
        let out = dead_letter_headers(Some(&h));
        assert!(out.get("Nats-Msg-Id").is_none());
        assert!(out.get("Nats-Expected-Stream").is_none());
        assert!(out.get("Nats-Expected-Last-Sequence").is_none());
        assert_eq!(
            out.get("Eventbus-Original-Msg-Id").unwrap().as_str(),
            "id-1"
        );
        assert_eq!(out.get("Nats-Correlation-Id").unwrap().as_str(), "c-1");
        assert_eq!(out.get_all("x-k").count(), 2);
        assert!(dead_letter_headers(None).is_empty());
    }

    #[test]
    fn headers_carry_the_ids_after_the_message_headers() {
        let mut m = OutMessage {
            subject: "a.b".into(),
            correlation_id: "c-1".into(),
            message_id: "m-1".into(),
            ..Default::default()
        };
        m.headers
            .insert(CORRELATION_HEADER.into(), "overridden".into());
        let h = headers_of(&mut m);
        assert_eq!(h.get(CORRELATION_HEADER).unwrap().as_str(), "c-1");
        assert_eq!(h.get(MSG_ID_HEADER).unwrap().as_str(), "m-1");
    }
}
