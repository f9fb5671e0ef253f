//! Kafka as a runtime provider (`crate::runtime::provider::Provider`), over the domain layer:
//! one idempotent producer, one admin client and one group member per (topic, group) per
//! process, shared by `step.eventbus.consume` and the trigger.
//!
//! * **Streams are topics**: a publish goes to the topic of the first declared stream whose
//!   `subjects` match the subject (the streams this process ensured: declare the stream module
//!   beside the publishing pipeline). The subject travels in the `eventbus.subject` header and
//!   is the record key.
//! * **Sequence** is the record's offset on partition 0 and `<partition>:<offset>` on the
//!   others (offsets are per partition); a redelivery (a retry copy) reports its original's.
//!   Tokens are `<topic>:<partition>:<offset>:<epoch>:<group>`.
//! * **Settling** is local to the group member that handed the message out (its offsets are
//!   committed up to the lowest unsettled one): a token settled in another process is refused
//!   with a line saying the message comes again. Nak, `max_deliver`, `ack_wait` and rebalances
//!   are the domain consumer's (`super::consumer`).
//! * **No de-duplication by message id** (see `super` docs): a publish never reports
//!   `duplicate`.

use super::consumer::{AckOp, AckToken, ConsumerOpts, DeadLetter, Delivery, KafkaGroupConsumer};
use super::group::{GroupSpec, DEFAULT_MAX_DELIVER};
use super::producer::{KafkaProducer, Outgoing};
use super::subject::pick_topic;
use super::topic::{TopicAdmin, TopicDefaults};
use super::{KafkaError, KafkaSettings};
use crate::config::broker::BrokerSpec;
use crate::error_chain::render;
use crate::nats::provider::MSG_ID_HEADER;
use crate::pb::eventbus::Message;
use crate::runtime::provider::{
    bounded, delivered_headers, now_rfc3339, AckKind, BindAsk, Bound, Connect, Declaration,
    Declares, Delivered, FetchAsk, Include, Next, OutMessage, Provider, ProviderError, Published,
    Subscription,
};
use crate::runtime::steps::output::{self, Output};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long one wait of a subscription lasts before it looks at held retries and ack_wait
/// deadlines again (a record arriving ends it at once).
const SUB_SLICE: Duration = Duration::from_millis(250);

/// One broker module's clients.
#[derive(Clone)]
pub struct KafkaProvider {
    inner: Arc<Inner>,
}

struct Inner {
    broker: String,
    settings: KafkaSettings,
    producer: KafkaProducer,
    admin: super::admin::RdAdmin,
    timeout: Duration,
    defaults: TopicDefaults,
    /// Declared streams, first declared first: (topic, subject patterns).
    streams: Mutex<Vec<(String, Vec<String>)>>,
    /// Declared consumers by (topic, group).
    groups: Mutex<HashMap<(String, String), GroupSpec>>,
    /// Live group members by (topic, group).
    members: Mutex<HashMap<(String, String), Arc<KafkaGroupConsumer>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `<offset>` on partition 0, `<partition>:<offset>` elsewhere.
pub fn sequence(partition: i32, offset: i64) -> String {
    if partition == 0 {
        offset.to_string()
    } else {
        format!("{partition}:{offset}")
    }
}

fn ms_rfc3339(ms: Option<i64>) -> String {
    ms.and_then(|ms| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    })
    .map(crate::runtime::provider::rfc3339)
    .unwrap_or_else(now_rfc3339)
}

/// The message as the kafka producer takes it; a header spelled like the NATS correlation or
/// message id stands for it when the field is unset.
fn outgoing(mut msg: OutMessage) -> Outgoing {
    let ids = msg.take_ids();
    Outgoing {
        subject: msg.subject,
        payload: msg.payload.into(),
        headers: ids.headers,
        correlation_id: ids.correlation_id,
        msg_id: ids.message_id,
        key: None,
    }
}

fn published(p: super::Published) -> Published {
    Published {
        sequence: sequence(p.partition, p.offset),
        acked_at: ms_rfc3339(p.timestamp_ms),
        stream: p.topic,
        duplicate: false,
    }
}

fn op(kind: AckKind) -> AckOp {
    match kind {
        AckKind::Ack => AckOp::Ack,
        AckKind::Nak(d) => AckOp::Nak(d),
        AckKind::Term => AckOp::Term,
        AckKind::Progress => AckOp::Progress,
    }
}

/// Whether `t` has the kafka token shape.
pub fn check_token(t: &str) -> Result<(), String> {
    t.parse::<AckToken>().map(|_| ()).map_err(|e| e.to_string())
}

impl KafkaProvider {
    fn topic_of(&self, subject: &str) -> Option<String> {
        let streams = lock(&self.inner.streams);
        pick_topic(
            streams.iter().map(|(t, s)| (t.as_str(), s.as_slice())),
            subject,
        )
        .map(str::to_string)
    }

    fn no_stream(subject: &str) -> KafkaError {
        KafkaError::invalid(format!(
            "Publish: no stream declared in this process claims subject {subject:?} (kafka picks the topic by the subjects of the eventbus.stream modules; declare the stream)"
        ))
    }

    /// The group member for (topic, group), made on first use.
    fn member(
        &self,
        spec: GroupSpec,
        opts: ConsumerOpts,
    ) -> Result<Arc<KafkaGroupConsumer>, KafkaError> {
        let key = (spec.topic.clone(), spec.group.clone());
        let mut members = lock(&self.inner.members);
        if let Some(m) = members.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(KafkaGroupConsumer::new(
            &self.inner.settings,
            spec,
            opts,
            self.inner.producer.clone(),
        )?);
        members.insert(key, m.clone());
        Ok(m)
    }

    /// The declared group spec, else the defaults an undeclared consumer gets.
    fn group(&self, topic: &str, group: &str) -> GroupSpec {
        lock(&self.inner.groups)
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
            .unwrap_or_else(|| GroupSpec::new(group, topic))
    }

    /// Drops a member (its partitions go back to the group, unsettled messages come again):
    /// closing blocks on the broker, so it runs on the blocking pool.
    fn drop_member(&self, topic: &str, group: &str) {
        let m = lock(&self.inner.members).remove(&(topic.to_string(), group.to_string()));
        if let Some(m) = m {
            tokio::task::spawn_blocking(move || {
                let _ = m.commit_now();
                drop(m);
            });
        }
    }

    async fn topic_exists(&self, topic: &str) -> Result<bool, ProviderError> {
        let d = bounded(
            "describe topic",
            self.inner.timeout,
            self.inner.admin.describe(topic),
        )
        .await?;
        Ok(d.is_some())
    }

    async fn send(
        &self,
        topic: &str,
        m: &Outgoing,
        timeout: Duration,
    ) -> Result<Published, ProviderError> {
        bounded("publish", timeout, self.inner.producer.publish(topic, m))
            .await
            .map(published)
    }
}

impl Connect for KafkaProvider {
    fn unconfigured(spec: &BrokerSpec) -> Option<String> {
        match &spec.kafka {
            Some(k) => k.resolve_brokers().err(),
            None => Some("not a kafka broker".into()),
        }
    }

    async fn connect(spec: &BrokerSpec) -> Result<Self, ProviderError> {
        let unavailable = |detail: String| ProviderError::Unavailable {
            broker: spec.name.clone(),
            detail,
        };
        let Some(cfg) = &spec.kafka else {
            return Err(unavailable("not a kafka broker".into()));
        };
        let settings = KafkaSettings::new(cfg.clone()).map_err(|e| unavailable(e.to_string()))?;
        let timeout = spec.conn.request_timeout;
        tracing::info!(broker = %spec.name, brokers = %settings.brokers.join(","), "connecting to kafka");
        let producer = KafkaProducer::new(&settings, timeout)?;
        let admin = super::admin::RdAdmin::new(&settings, timeout)?;
        let p = KafkaProvider {
            inner: Arc::new(Inner {
                broker: spec.name.clone(),
                defaults: TopicDefaults::from(cfg),
                settings,
                producer,
                admin,
                timeout,
                streams: Mutex::default(),
                groups: Mutex::default(),
                members: Mutex::default(),
            }),
        };
        crate::telemetry::connection(&spec.name, "kafka", true);
        Ok(p)
    }

    /// Pending: records past the group's committed offsets (read from the cluster); ack
    /// pending: what this process's member of the group holds unsettled.
    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str) {
        let inner = Arc::downgrade(&self.inner);
        let key = (stream.to_string(), consumer.to_string());
        crate::telemetry::lag::watch_kafka(
            broker,
            &self.inner.settings,
            stream,
            consumer,
            move || {
                inner.upgrade().map_or(0, |i| {
                    lock(&i.members)
                        .get(&key)
                        .map_or(0, |m| m.unsettled() as u64)
                })
            },
        );
    }
}

impl Provider for KafkaProvider {
    type Delivery = Delivery;
    type Binding = GroupSpec;
    type Subscription = KafkaSubscription;

    /// Settles are local bookkeeping plus an asynchronous commit.
    const ACK_WINDOW: usize = 64;

    fn request_timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn check_token(token: &str) -> Result<(), String> {
        check_token(token)
    }

    /// A metadata request answered within `bound`.
    async fn ready(&self, bound: Duration) -> Result<(), ProviderError> {
        let admin = self.inner.admin.clone();
        let r = tokio::time::timeout(
            bound,
            tokio::task::spawn_blocking(move || admin.reachable(bound)),
        )
        .await;
        match r {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ProviderError::Unavailable {
                broker: self.inner.broker.clone(),
                detail: e.to_string(),
            }),
            _ => Err(ProviderError::Unavailable {
                broker: self.inner.broker.clone(),
                detail: format!("no metadata answer within {bound:?}"),
            }),
        }
    }

    async fn publish(
        &self,
        msg: OutMessage,
        timeout: Option<Duration>,
    ) -> Result<Published, ProviderError> {
        let timeout = timeout.unwrap_or(self.inner.timeout);
        let m = outgoing(msg);
        let topic = self
            .topic_of(&m.subject)
            .ok_or_else(|| Self::no_stream(&m.subject))?;
        self.send(&topic, &m, timeout).await
    }

    /// The list through the producer's window: order is kept per partition (the idempotent
    /// producer never reorders), each message bounded by the timeout.
    async fn publish_list(
        &self,
        msgs: Vec<OutMessage>,
        window: usize,
        timeout: Option<Duration>,
    ) -> Vec<Result<Published, String>> {
        use futures::StreamExt;
        let timeout = timeout.unwrap_or(self.inner.timeout);
        let jobs: Vec<(Outgoing, Option<String>)> = msgs
            .into_iter()
            .map(outgoing)
            .map(|m| {
                let t = self.topic_of(&m.subject);
                (m, t)
            })
            .collect();
        futures::stream::iter(jobs.into_iter().map(|(m, topic)| {
            let me = self.clone();
            async move {
                let Some(topic) = topic else {
                    return Err(render(&ProviderError::from(Self::no_stream(&m.subject))));
                };
                me.send(&topic, &m, timeout).await.map_err(|e| render(&e))
            }
        }))
        .buffered(window.clamp(1, 4096))
        .collect()
        .await
    }

    async fn fetch(&self, ask: FetchAsk<'_>) -> Result<Vec<Message>, ProviderError> {
        let spec = self.group(ask.stream, ask.durable);
        let member = self.member(spec, ConsumerOpts::default())?;
        let got = bounded(
            "fetch",
            ask.max_wait + self.inner.timeout,
            member.fetch(ask.batch, ask.max_wait),
        )
        .await?;
        let mut out = Output::new(ask.max_bytes, got.len());
        for d in &got {
            if let Some(m) = out.push(d.to_message(ask.durable, ask.include), false) {
                output::give_back(self, &m).await;
            }
        }
        Ok(out.into_messages())
    }

    async fn forget(&self, stream: &str, durable: &str) {
        self.drop_member(stream, durable);
    }

    async fn settle(&self, token: &str, kind: AckKind) -> Result<(), ProviderError> {
        let tok = token.parse::<AckToken>()?;
        let member = lock(&self.inner.members)
            .get(&(tok.topic.clone(), tok.group.clone()))
            .cloned();
        let Some(member) = member else {
            return Err(KafkaError::Settle(format!(
                "consumer group {:?} on topic {:?} has no member in this process (it was stopped or rebalanced); the message will be delivered again",
                tok.group, tok.topic
            ))
            .into());
        };
        bounded("ack", self.inner.timeout, member.settle(&tok, op(kind))).await
    }

    async fn ensure(&self, d: Declaration<'_>) -> Result<String, ProviderError> {
        match d.what {
            Declares::Stream(s) => {
                let mut spec =
                    super::spec::topic_spec(d.type_name, d.module, s, self.inner.defaults)
                        .map_err(ProviderError::refused)?;
                // An existing topic keeps its partition count (raised only through wfctl).
                if let Some(seen) = bounded(
                    "describe topic",
                    self.inner.timeout,
                    self.inner.admin.describe(&spec.name),
                )
                .await?
                {
                    spec.partitions = spec.partitions.max(seen.partitions);
                }
                let outcome = bounded(
                    "ensure topic",
                    self.inner.timeout.saturating_mul(2),
                    super::topic::ensure(&self.inner.admin, &spec),
                )
                .await?;
                let mut streams = lock(&self.inner.streams);
                streams.retain(|(t, _)| *t != spec.name);
                streams.push((spec.name.clone(), spec.subjects.clone()));
                Ok(format!("{outcome:?}"))
            }
            Declares::Consumer(c) => {
                let spec = super::spec::group_spec(d.type_name, d.module, c)
                    .map_err(ProviderError::refused)?;
                if !self.topic_exists(&spec.topic).await? {
                    return Err(ProviderError::Invalid(format!(
                        "stream {:?} does not exist (declare it, or create the topic)",
                        spec.topic
                    )));
                }
                let (settings, timeout, s2) = (
                    self.inner.settings.clone(),
                    self.inner.timeout,
                    spec.clone(),
                );
                let placed = bounded(
                    "position consumer group",
                    timeout.saturating_mul(3),
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let l = super::admin::RdOffsets::new(&settings, &s2.group, timeout)?;
                            super::group::position_new_group(&l, &s2)
                        })
                        .await
                        .map_err(|_| KafkaError::Cancelled("position consumer group"))?
                    },
                )
                .await?;
                lock(&self.inner.groups).insert((spec.topic.clone(), spec.group.clone()), spec);
                Ok(match placed {
                    Some(at) => format!("Created (group positioned at {at:?})"),
                    None => "Adopted".into(),
                })
            }
        }
    }

    async fn gone(&self, stream: &str, _durable: Option<&str>) -> bool {
        // A group without members or offsets is made again by its first member: only a topic
        // can be gone.
        matches!(self.topic_exists(stream).await, Ok(false))
    }

    async fn bind(&self, ask: BindAsk<'_>) -> Result<(GroupSpec, Bound), ProviderError> {
        let declared = lock(&self.inner.groups)
            .get(&(ask.stream.to_string(), ask.durable.to_string()))
            .cloned();
        let spec = match declared {
            Some(s) => s,
            None if ask.declared => {
                return Err(ProviderError::Invalid(format!(
                    "consumer {:?} on stream {:?} is declared but was not ensured",
                    ask.durable, ask.stream
                )))
            }
            None => {
                if !self.topic_exists(ask.stream).await? {
                    return Err(ProviderError::Invalid(format!(
                        "stream {:?} does not exist (declare it, or create the topic)",
                        ask.stream
                    )));
                }
                let mut s = GroupSpec::new(ask.durable, ask.stream);
                if !ask.filter_subject.is_empty() {
                    s.filters = vec![ask.filter_subject.to_string()];
                }
                s
            }
        };
        if !ask.filter_subject.is_empty()
            && !spec.filters.is_empty()
            && spec.filters != [ask.filter_subject.to_string()]
        {
            return Err(ProviderError::Invalid(format!(
                "consumer {:?} filters {:?}, the trigger asks for {:?}; align the consumer or drop filter_subject",
                ask.durable,
                spec.filters.join(","),
                ask.filter_subject
            )));
        }
        let consumer_max = spec.max_deliver.map_or(0, i64::from);
        let max_deliver = match (ask.max_deliver > 0, consumer_max > 0) {
            (true, true) => ask.max_deliver.min(consumer_max),
            (true, false) => ask.max_deliver,
            (false, true) => consumer_max,
            (false, false) if ask.declared => 0,
            (false, false) => i64::from(DEFAULT_MAX_DELIVER),
        };
        let mut spec = spec;
        if max_deliver > 0 {
            spec.max_deliver = Some(u32::try_from(max_deliver).unwrap_or(u32::MAX));
        }
        let bound = Bound {
            ack_wait: spec.ack_wait,
            max_deliver,
        };
        Ok((spec, bound))
    }

    /// The process's member of the group (Kafka gives each partition to one member: with
    /// `max_in_flight: 1` a partition's records are handled one at a time, in offset order).
    async fn subscribe(
        &self,
        spec: GroupSpec,
        ask: BindAsk<'_>,
        _batch: usize,
        _stop: &CancellationToken,
    ) -> Result<KafkaSubscription, ProviderError> {
        let dead_letter = match ask.dead_letter_subject {
            Some(s) => Some(DeadLetter {
                topic: self.topic_of(s).ok_or_else(|| Self::no_stream(s))?,
                subject: s.to_string(),
            }),
            None => None,
        };
        let member = self.member(spec, ConsumerOpts { dead_letter })?;
        tracing::info!(stream = %ask.stream, consumer = %ask.durable, ordered = ask.ordered, "subscribed (kafka)");
        Ok(KafkaSubscription {
            provider: self.clone(),
            member,
        })
    }

    async fn close(&self) {
        crate::telemetry::connection(&self.inner.broker, "kafka", false);
        let members: Vec<Arc<KafkaGroupConsumer>> =
            lock(&self.inner.members).drain().map(|(_, m)| m).collect();
        let bound = self.inner.timeout;
        let closing = tokio::task::spawn_blocking(move || {
            for m in members {
                if let Err(e) = m.commit_now() {
                    tracing::warn!(error = %e, "commit at close failed; settled messages may be delivered again");
                }
            }
        });
        let _ = tokio::time::timeout(bound, closing).await;
        if let Err(e) = self.inner.producer.flush(bound).await {
            tracing::warn!(error = %e, "producer flush at close failed");
        }
    }

    async fn dead_letter(
        &self,
        subject: &str,
        d: &Delivery,
        extra: &[(&'static str, String)],
    ) -> Result<(), ProviderError> {
        let topic = self
            .topic_of(subject)
            .ok_or_else(|| Self::no_stream(subject))?;
        let mut headers = d.headers.clone();
        for (k, v) in extra {
            headers.insert(k.to_string(), v.clone());
        }
        let m = Outgoing {
            subject: subject.to_string(),
            payload: d.payload.clone(),
            headers,
            correlation_id: d.correlation_id.clone(),
            msg_id: d.msg_id.clone(),
            key: None,
        };
        self.send(&topic, &m, self.inner.timeout).await.map(|_| ())
    }
}

/// A trigger's view of its group member.
pub struct KafkaSubscription {
    provider: KafkaProvider,
    member: Arc<KafkaGroupConsumer>,
}

impl Subscription for KafkaSubscription {
    type Delivery = Delivery;

    /// Waits in slices so that held retries and expired deliveries are handed out when due;
    /// a failure that no retry will heal (the topic is gone) drops the member: the trigger
    /// binds again and a fresh member joins.
    async fn next(&mut self, max: usize) -> Next<Delivery> {
        loop {
            match self.member.fetch(max, SUB_SLICE).await {
                Ok(items) if items.is_empty() => continue,
                Ok(items) => return Next::Items(items),
                Err(e) => {
                    let spec = self.member.spec();
                    self.provider.drop_member(&spec.topic, &spec.group);
                    return Next::Rebind(render(&ProviderError::from(e)));
                }
            }
        }
    }
}

impl Delivered for Delivery {
    /// Our wire shape, the correlation id under the NATS and the Go names, the message id
    /// under the NATS one.
    fn to_message(&self, consumer: &str, include: Include) -> Message {
        let mut headers = delivered_headers(&self.headers, self.correlation_id.as_deref());
        if let Some(m) = self.msg_id.as_deref().filter(|m| !m.is_empty()) {
            headers.insert(MSG_ID_HEADER.to_string(), m.to_string());
        }
        let (payload, text, json) = include.forms(&self.payload);
        Message {
            subject: self.subject.clone(),
            payload,
            headers,
            sequence: match self.origin {
                Some((p, o)) => sequence(p, o),
                None => sequence(self.token.partition, self.token.offset),
            },
            published_at: ms_rfc3339(self.timestamp_ms),
            ack_token: self.token.to_string(),
            stream: self.token.topic.clone(),
            consumer: consumer.to_string(),
            delivery_count: i32::try_from(self.delivery_count).unwrap_or(i32::MAX),
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
        assert!(check_token("JOBS:0:42:3:runner").is_ok());
        assert!(check_token("JOBS:0:42:3:group:with:colons").is_ok());
        assert!(check_token("JOBS:runner:42").is_err(), "a pgchannel token");
        assert!(check_token("$JS.ACK.ORDERS.worker.1.2.3.4.5").is_err());
        assert!(check_token("JOBS:-1:42:3:runner").is_err());
        assert!(check_token(":0:42:3:runner").is_err());
    }

    #[test]
    fn sequences_are_offsets_with_the_partition_beyond_zero() {
        assert_eq!(sequence(0, 17), "17");
        assert_eq!(sequence(3, 17), "3:17");
    }

    #[test]
    fn ids_go_to_their_headers() {
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
        assert_eq!(o.key, None, "the subject is the key");
    }
}
