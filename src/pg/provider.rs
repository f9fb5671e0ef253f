//! pgchannel (PostgreSQL tables + LISTEN/NOTIFY) as a runtime provider
//! (`crate::runtime::provider::Provider`), over the `PgBus` API: a message's correlation and
//! message ids go straight to their columns, deliveries come back with the correlation id
//! under both header names, tokens are `<stream>:<consumer>:<id>`.
//!
//! A trigger with `max_in_flight: 1` holds the consumer's advisory lock on its own connection:
//! one active subscriber per consumer across processes; the others wait for the lock and take
//! over when the holder dies (its session ends, the lock goes with it, and its leased rows come
//! back when their lease runs out). Each batch is one row, the lowest deliverable id, so
//! pipelines see a consumer's events in id order. With `max_in_flight` > 1 no order is promised
//! and triggers compete: any number of processes share the consumer, each leasing a batch
//! ahead (see `Subscription::lease_ahead`).

use super::{
    AckOp, AckPolicy, AckToken, ConsumerDef, DeliverFrom, Delivery, FetchOpts, Outgoing, PgBus,
    PgSettings, Publisher, Settler, SubOpts, DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER,
};
use crate::config::broker::{BrokerSpec, DEFAULT_REQUEST_TIMEOUT};
use crate::error_chain::render;
use crate::pb::eventbus::Message;
use crate::runtime::provider::{
    bounded, delivered_headers, rfc3339, AckKind, BindAsk, Bound, Connect, Declaration, Declares,
    Delivered, FetchAsk, Include, Next, OutMessage, Provider, ProviderError, Published,
    Subscription,
};
use crate::runtime::steps::output::{self, Output};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::runtime::provider::GO_CORRELATION_HEADER;

/// Messages per publish transaction in a bulk publish: one round trip each, and a bounded
/// transaction (a 10 000-message list is 20 of them, not one huge lock holder).
const PUBLISH_CHUNK: usize = 500;

/// Whether `t` has the pgchannel token shape `<stream>:<consumer>:<id>`.
pub fn check_token(t: &str) -> Result<(), String> {
    t.parse::<AckToken>().map(|_| ()).map_err(|e| e.to_string())
}

/// The message split the way the pgchannel tables keep it: the correlation id in its own
/// column, the message id as the de-duplication key, the rest as the headers JSON. A header
/// spelled like either id stands for it when the field is unset.
fn outgoing(mut msg: OutMessage) -> Outgoing {
    let ids = msg.take_ids();
    Outgoing {
        subject: msg.subject,
        payload: msg.payload.into(),
        headers: ids.headers,
        correlation_id: ids.correlation_id,
        msg_id: ids.message_id,
    }
}

fn published(p: super::Published) -> Published {
    Published {
        sequence: p.id.to_string(),
        // The database's timestamp of the row, as the Go provider reported it.
        acked_at: rfc3339(p.ts),
        stream: p.stream,
        duplicate: p.duplicate,
    }
}

fn ack_op(kind: AckKind) -> AckOp {
    match kind {
        AckKind::Ack => AckOp::Ack,
        AckKind::Nak(d) => AckOp::Nak(d),
        AckKind::Term => AckOp::Term,
        AckKind::Progress => AckOp::Progress,
    }
}

/// One broker's pool, and the coalescer its single settles go through (a trigger's pipelines
/// ack concurrently: their acks share statements, each still awaits its own outcome).
#[derive(Clone)]
pub struct PgProvider {
    pub bus: PgBus,
    settler: Settler,
    publisher: Publisher,
}

impl Connect for PgProvider {
    fn unconfigured(spec: &BrokerSpec) -> Option<String> {
        spec.resolve_pg_dsn().is_none().then(|| {
            format!(
                "no Postgres dsn: set dsn on the module or {} in the environment",
                spec.pg_env_var()
            )
        })
    }

    async fn connect(spec: &BrokerSpec) -> Result<Self, ProviderError> {
        let unavailable = |detail: String| ProviderError::Unavailable {
            broker: spec.name.clone(),
            detail,
        };
        let Some(cfg) = &spec.pg else {
            return Err(unavailable("not a pgchannel broker".into()));
        };
        let dsn = spec.resolve_pg_dsn().ok_or_else(|| {
            unavailable(Self::unconfigured(spec).unwrap_or_else(|| "no Postgres dsn".into()))
        })?;
        let settings = PgSettings {
            broker: spec.name.clone(),
            dsn: dsn.expose().to_string(),
            max_conns: cfg.max_conns,
            poll_interval: cfg.poll_interval,
            connect_timeout: cfg.connect_timeout,
        };
        tracing::info!(broker = %spec.name, dsn = %settings.redacted_dsn(), "connecting to PostgreSQL");
        let bus = PgBus::connect(settings).await?;
        let p = PgProvider {
            settler: bus.settler(),
            publisher: bus.publisher(),
            bus,
        };
        crate::telemetry::connection(&spec.name, "pgchannel", true);
        Ok(p)
    }

    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str) {
        crate::telemetry::lag::watch_pg(broker, &self.bus, stream, consumer);
    }
}

impl Provider for PgProvider {
    type Delivery = Delivery;
    type Binding = ();
    type Subscription = super::Subscription;

    /// Each takes a pooled connection.
    const ACK_WINDOW: usize = 16;

    fn request_timeout(&self) -> Duration {
        DEFAULT_REQUEST_TIMEOUT
    }

    fn check_token(token: &str) -> Result<(), String> {
        check_token(token)
    }

    async fn ready(&self, _bound: Duration) -> Result<(), ProviderError> {
        // The pool was opened (and the schema ensured) when the provider was.
        Ok(())
    }

    /// One transaction, shared with the publishes in flight beside it (see `Publisher`),
    /// bounded by the step's timeout.
    async fn publish(
        &self,
        msg: OutMessage,
        timeout: Option<Duration>,
    ) -> Result<Published, ProviderError> {
        let timeout = timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let msg = outgoing(msg);
        bounded("publish", timeout, self.publisher.publish(msg))
            .await
            .map(published)
    }

    /// The list in order, `PUBLISH_CHUNK` per transaction (the window of the database); a
    /// chunk that fails fails each of its messages (nothing of it was stored).
    async fn publish_list(
        &self,
        msgs: Vec<OutMessage>,
        _window: usize,
        timeout: Option<Duration>,
    ) -> Vec<Result<Published, String>> {
        let timeout = timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let msgs: Vec<Outgoing> = msgs.into_iter().map(outgoing).collect();
        let mut out = Vec::with_capacity(msgs.len());
        for chunk in msgs.chunks(PUBLISH_CHUNK) {
            match bounded("publish", timeout, self.bus.publish(chunk)).await {
                Ok(done) if done.len() == chunk.len() => {
                    out.extend(done.into_iter().map(|p| Ok(published(p))))
                }
                Ok(other) => {
                    let e = format!(
                        "publish returned {} results for {} messages",
                        other.len(),
                        chunk.len()
                    );
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                }
                Err(e) => {
                    let e = render(&e);
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                }
            }
        }
        out
    }

    /// Rows leased to this caller inside a transaction, so concurrent consumers never share one.
    async fn fetch(&self, ask: FetchAsk<'_>) -> Result<Vec<Message>, ProviderError> {
        let opts = FetchOpts {
            batch: ask.batch,
            max_wait: ask.max_wait,
            max_bytes: Some(output::fetch_bytes(ask.max_bytes, ask.batch)),
            dead_letter_subject: None,
        };
        // The fetch ends by itself at max_wait; the outer bound only guards against a database
        // that stops answering mid-call.
        let bound = ask.max_wait + DEFAULT_REQUEST_TIMEOUT;
        let rows = bounded(
            "fetch",
            bound,
            self.bus.fetch(ask.stream, ask.durable, opts),
        )
        .await?;
        let mut out = Output::new(ask.max_bytes, rows.len());
        for d in &rows {
            // Past max_deliver the database dead-letters a row, so one given back is not lost.
            if let Some(m) = out.push(d.to_message(ask.durable, ask.include), false) {
                output::give_back(self, &m).await;
            }
        }
        Ok(out.into_messages())
    }

    async fn forget(&self, _stream: &str, _durable: &str) {}

    async fn settle(&self, token: &str, kind: AckKind) -> Result<(), ProviderError> {
        let tok = token.parse::<AckToken>()?;
        bounded(
            "ack",
            DEFAULT_REQUEST_TIMEOUT,
            self.settler.settle(&tok, ack_op(kind)),
        )
        .await
    }

    async fn settle_list(&self, tokens: &[&str], kind: AckKind) -> Vec<Result<(), ProviderError>> {
        let parsed: Vec<Result<AckToken, ProviderError>> = tokens
            .iter()
            .map(|t| t.parse::<AckToken>().map_err(ProviderError::from))
            .collect();
        let valid: Vec<AckToken> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .cloned()
            .collect();
        let settled = match tokio::time::timeout(
            DEFAULT_REQUEST_TIMEOUT,
            self.bus.settle_many(&valid, ack_op(kind)),
        )
        .await
        {
            Ok(r) => r
                .into_iter()
                .map(|r| r.map_err(ProviderError::from))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut settled = settled.into_iter();
        parsed
            .into_iter()
            .map(|p| {
                p.and_then(|_| {
                    settled.next().unwrap_or(Err(ProviderError::TimedOut {
                        op: "ack",
                        after: DEFAULT_REQUEST_TIMEOUT,
                    }))
                })
            })
            .collect()
    }

    async fn ensure(&self, d: Declaration<'_>) -> Result<String, ProviderError> {
        let outcome = match d.what {
            Declares::Stream(s) => {
                let def = super::spec::stream_def(d.type_name, d.module, s)
                    .map_err(ProviderError::refused)?;
                self.bus.ensure_stream(&def).await?
            }
            Declares::Consumer(c) => {
                let def = super::spec::consumer_def(d.type_name, d.module, c)
                    .map_err(ProviderError::refused)?;
                self.bus.ensure_consumer(&def).await?
            }
        };
        Ok(format!("{outcome:?}"))
    }

    async fn gone(&self, stream: &str, durable: Option<&str>) -> bool {
        match self.bus.stream(stream).await {
            Ok(None) => true,
            Err(_) => false,
            Ok(Some(_)) => match durable {
                None => false,
                Some(d) => matches!(self.bus.consumer(stream, d).await, Ok(None)),
            },
        }
    }

    /// An undeclared consumer is created with the trigger's own filter; then the consumer's
    /// limits are read back.
    async fn bind(&self, ask: BindAsk<'_>) -> Result<((), Bound), ProviderError> {
        let def = match self.bus.consumer(ask.stream, ask.durable).await? {
            Some(d) => d,
            None if !ask.declared => {
                let d = ConsumerDef {
                    stream: ask.stream.to_string(),
                    name: ask.durable.to_string(),
                    filter_subjects: if ask.filter_subject.is_empty() {
                        Vec::new()
                    } else {
                        vec![ask.filter_subject.to_string()]
                    },
                    deliver: DeliverFrom::All,
                    ack_policy: AckPolicy::Explicit,
                    max_deliver: i32::try_from(ask.max_deliver).unwrap_or(i32::MAX),
                    ack_wait: DEFAULT_ACK_WAIT,
                    backoff: Vec::new(),
                };
                self.bus.ensure_consumer(&d).await?;
                d
            }
            None => {
                return Err(ProviderError::Invalid(format!(
                    "consumer {:?} on stream {:?} does not exist",
                    ask.durable, ask.stream
                )))
            }
        };
        if !ask.filter_subject.is_empty()
            && !def.filter_subjects.is_empty()
            && def.filter_subjects != [ask.filter_subject.to_string()]
        {
            return Err(ProviderError::Invalid(format!(
                "consumer {:?} filters {:?}, the trigger asks for {:?}; align the consumer or drop filter_subject",
                ask.durable,
                def.filter_subjects.join(","),
                ask.filter_subject
            )));
        }
        let consumer_max = if def.max_deliver > 0 {
            def.max_deliver as i64
        } else {
            DEFAULT_MAX_DELIVER as i64
        };
        // The smaller positive limit wins, as with NATS: past the consumer's limit the bus
        // stops delivering, so a larger trigger value would never reach its last attempt.
        let max_deliver = if ask.max_deliver > 0 {
            ask.max_deliver.min(consumer_max)
        } else {
            consumer_max
        };
        let ack_wait = if def.ack_wait.is_zero() {
            DEFAULT_ACK_WAIT
        } else {
            def.ack_wait
        };
        Ok((
            (),
            Bound {
                ack_wait,
                max_deliver,
            },
        ))
    }

    /// Ordered (`max_in_flight: 1`): waits while another process holds this consumer, and
    /// leases one row at a time, the lowest deliverable id. Otherwise a competing subscriber
    /// that leases `batch` rows ahead: subscribers in any number of processes share the
    /// consumer's work.
    async fn subscribe(
        &self,
        _binding: (),
        ask: BindAsk<'_>,
        batch: usize,
        stop: &CancellationToken,
    ) -> Result<super::Subscription, ProviderError> {
        let opts = SubOpts {
            dead_letter_subject: ask.dead_letter_subject.map(str::to_string),
            cancel: stop.clone(),
        };
        let sub = if ask.ordered {
            self.bus.subscribe(ask.stream, ask.durable, opts).await?
        } else {
            self.bus
                .subscribe_competing(ask.stream, ask.durable, opts)
                .await?
                .lease_ahead(batch)
        };
        tracing::info!(stream = %ask.stream, consumer = %ask.durable, ordered = ask.ordered, "subscribed (pgchannel)");
        Ok(sub)
    }

    async fn close(&self) {
        crate::telemetry::connection(&self.bus.settings().broker, "pgchannel", false);
        self.bus.close().await
    }

    async fn dead_letter(
        &self,
        subject: &str,
        d: &Delivery,
        extra: &[(&'static str, String)],
    ) -> Result<(), ProviderError> {
        let mut headers = d.headers.clone();
        for (k, v) in extra {
            headers.insert(k.to_string(), v.clone());
        }
        let msg = Outgoing {
            subject: subject.to_string(),
            payload: d.payload.clone(),
            headers,
            correlation_id: d.correlation_id.clone(),
            msg_id: None,
        };
        bounded(
            "dead-letter publish",
            DEFAULT_REQUEST_TIMEOUT,
            self.bus.publish(std::slice::from_ref(&msg)),
        )
        .await
        .map(|_| ())
    }
}

impl Subscription for super::Subscription {
    type Delivery = Delivery;

    async fn next(&mut self, max: usize) -> Next<Delivery> {
        match self.next_batch(max).await {
            Ok(rows) => Next::Items(rows),
            Err(e) => Next::Rebind(render(&ProviderError::from(e))),
        }
    }
}

impl Delivered for Delivery {
    /// Our wire shape (as the NATS one), with the correlation id under both header names.
    fn to_message(&self, _consumer: &str, include: Include) -> Message {
        let headers = delivered_headers(&self.headers, self.correlation_id.as_deref());
        let (payload, text, json) = include.forms(&self.payload);
        Message {
            subject: self.subject.clone(),
            payload,
            headers,
            sequence: self.token.id.to_string(),
            published_at: rfc3339(self.published_at),
            ack_token: self.token.to_string(),
            stream: self.token.stream.clone(),
            consumer: self.token.consumer.clone(),
            delivery_count: self.delivery_count,
            text,
            json,
            ..Default::default()
        }
    }

    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        assert!(check_token("ORDERS:worker:42").is_ok());
        assert!(check_token("$JS.ACK.ORDERS.worker.1.2.3.4.5").is_err());
        assert!(check_token("ORDERS:worker").is_err());
        assert!(check_token("ORDERS::42").is_err());
        assert!(check_token("ORDERS:worker:x").is_err());
    }

    #[test]
    fn ids_go_to_their_columns() {
        let mut m = OutMessage {
            subject: "jobs.a".into(),
            correlation_id: "c-1".into(),
            ..Default::default()
        };
        m.headers.insert("x-k".into(), "v".into());
        m.headers.insert("nats-msg-id".into(), "m-1".into());
        let o = outgoing(m);
        assert_eq!(o.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(o.msg_id.as_deref(), Some("m-1"));
        assert_eq!(o.headers.len(), 1);
    }
}
