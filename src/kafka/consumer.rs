//! A consumer group member with per-message settlement on top of cumulative offsets.
//!
//! * **Fetch** reads records of the group's topic; records whose subject does not match the
//!   filters, and retry copies meant for another group, are passed over (their offsets count
//!   as settled, so they get committed). Every other record is tracked as unsettled until acked.
//! * **Commit** goes up to the lowest unsettled offset per partition ([`OffsetTracker`]),
//!   after each settle and before a partition is given up.
//! * **Nak** re-produces the record to the same topic and partition with the delivery count
//!   raised, `eventbus.not_before` (now + the delay: the nak's own, else the consumer's backoff
//!   entry) and `eventbus.retry_group` (other groups pass over it); once the broker has the
//!   copy, the original counts as settled. A fetch that meets the copy before its time holds it
//!   and hands it out when due. The count and the delay are on the record, so both survive a
//!   plugin restart; a crash between delivery and settle redelivers the original with its
//!   count unchanged (at least once: that delivery is not counted).
//! * **max_deliver**: a nak (or an `ack_wait` expiry) of the last allowed delivery copies the
//!   record to the dead-letter topic, when one is given, and settles it; without one it is
//!   dropped with a warning (as `term`).
//! * **ack_wait**: a message handed out and neither settled nor progressed within ack_wait is
//!   treated as a nak without delay at the next fetch. **Progress** extends that deadline.
//! * **Rebalance**: before partitions are revoked, what is settled is committed (sent before
//!   the unassignment, without blocking the poll) and everything unsettled of those partitions is dropped; the next owner reads it again from
//!   the committed offset. A settle of a dropped message fails with a clear line (the message
//!   will come again), never acks something else.
//!
//! Ordering: records of one partition are handed out in offset order; a nak'd record comes
//! back after the records behind it (the copy is appended), as with a NATS nak.

use bytes::Bytes;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::KafkaSettings;
use super::group::GroupSpec;
use super::offsets::{OffsetTracker, SettleError, TopicPartition};
use super::producer::KafkaProducer;
use super::subject::*;
use super::KafkaError;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AckToken {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub epoch: u64,
    pub group: String,
}

impl fmt::Display for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}",
            self.topic, self.partition, self.offset, self.epoch, self.group
        )
    }
}

impl FromStr for AckToken {
    type Err = KafkaError;
    /// Topic names cannot hold `:`; the group (last) may.
    fn from_str(t: &str) -> Result<Self, KafkaError> {
        let bad = || KafkaError::MalformedToken(crate::secret::quote(t));
        let mut it = t.splitn(5, ':');
        let (Some(topic), Some(p), Some(o), Some(e), Some(group)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        if topic.is_empty() || group.is_empty() {
            return Err(bad());
        }
        Ok(AckToken {
            topic: topic.to_string(),
            partition: p.parse().ok().filter(|p: &i32| *p >= 0).ok_or_else(bad)?,
            offset: o.parse().ok().filter(|o: &i64| *o >= 0).ok_or_else(bad)?,
            epoch: e.parse().map_err(|_| bad())?,
            group: group.to_string(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOp {
    Ack,
    /// Redeliver after the delay (None: the consumer's backoff, else at once).
    Nak(Option<Duration>),
    /// Never redeliver.
    Term,
    /// Still working: extend ack_wait.
    Progress,
}

/// One handed-out message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub token: AckToken,
    pub subject: String,
    pub payload: Bytes,
    /// User headers only (the plugin's `eventbus.*` ones are in the fields).
    pub headers: BTreeMap<String, String>,
    pub correlation_id: Option<String>,
    pub msg_id: Option<String>,
    pub key: Option<Bytes>,
    pub timestamp_ms: Option<i64>,
    /// 1 on first delivery.
    pub delivery_count: u32,
    /// Partition and offset of the record this one is a retry copy of (None: the original).
    pub origin: Option<(i32, i64)>,
}

/// Where a message goes once it has used up max_deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    /// The subject the copy carries (its header and key).
    pub subject: String,
}

/// A record as read, kept until it is settled (a nak re-produces it).
#[derive(Clone, Debug)]
struct Record {
    tp: TopicPartition,
    offset: i64,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Vec<(String, Bytes)>,
    timestamp_ms: Option<i64>,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Header subject, else the key as UTF-8 (a record written by another client), else "".
    fn subject(&self) -> String {
        self.header(SUBJECT_HEADER)
            .map(str::to_string)
            .or_else(|| {
                self.key
                    .as_ref()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }

    /// The first record of this one's retry chain, when it is a copy.
    fn origin(&self) -> Option<(i32, i64)> {
        let (p, o) = self.header(ORIGIN_HEADER)?.split_once(':')?;
        Some((p.parse().ok()?, o.parse().ok()?))
    }

    fn prior_deliveries(&self) -> u32 {
        self.header(DELIVERY_COUNT_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

#[derive(Debug)]
struct Pending {
    epoch: u64,
    rec: Record,
    count: u32,
    /// Handed out: the ack_wait deadline. Held: when it may be handed out.
    due: Instant,
    handed: bool,
}

#[derive(Debug, Default)]
struct State {
    tracker: OffsetTracker,
    pending: HashMap<(TopicPartition, i64), Pending>,
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn tp_of(e: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>) -> TopicPartition {
    TopicPartition::new(e.topic(), e.partition())
}

/// The rebalance and commit hooks: they share the tracker with the consumer handle.
pub struct GroupContext {
    state: Arc<Mutex<State>>,
    group: String,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = r else { return };
        let mut commit = TopicPartitionList::new();
        let mut dropped = 0usize;
        {
            let mut st = lock(&self.state);
            for e in tpl.elements() {
                let tp = tp_of(&e);
                if let Some(p) = st.tracker.revoke(&tp) {
                    let _ = commit.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(p));
                }
                let before = st.pending.len();
                st.pending.retain(|(t, _), _| *t != tp);
                dropped += before - st.pending.len();
            }
        }
        // Asynchronous: this runs inside the member's poll (a tokio worker, or the only thread
        // of a current-thread runtime), and a synchronous commit there blocked it for as long
        // as the broker took during a rebalance. librdkafka completes commits sent before the
        // unassignment before the member rejoins.
        if commit.count() > 0 {
            if let Err(e) = c.commit(&commit, CommitMode::Async) {
                tracing::warn!(group = %self.group, error = %e, "commit before revoke failed; settled messages of the revoked partitions may be delivered again");
            }
        }
        tracing::info!(group = %self.group, partitions = tpl.count(), unsettled_dropped = dropped, "partitions revoked");
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                let mut st = lock(&self.state);
                for e in tpl.elements() {
                    st.tracker.assign(tp_of(&e), None);
                }
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance error")
            }
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                let mut st = lock(&self.state);
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        st.tracker.committed(&tp_of(&e), o);
                    }
                }
            }
            // Nothing new to commit: benign.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "offset commit failed; retried with the next settle")
            }
        }
    }
}

/// Options beyond the group spec.
#[derive(Clone, Debug, Default)]
pub struct ConsumerOpts {
    pub dead_letter: Option<DeadLetter>,
}

pub struct KafkaGroupConsumer {
    spec: GroupSpec,
    opts: ConsumerOpts,
    consumer: StreamConsumer<GroupContext>,
    state: Arc<Mutex<State>>,
    producer: KafkaProducer,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl KafkaGroupConsumer {
    /// Joins the group on `spec.topic` (the join completes during the first fetch).
    /// `producer` writes retry copies and dead letters.
    pub fn new(
        settings: &KafkaSettings,
        spec: GroupSpec,
        opts: ConsumerOpts,
        producer: KafkaProducer,
    ) -> Result<Self, KafkaError> {
        let state = Arc::new(Mutex::new(State::default()));
        let mut cc = settings.client_config();
        cc.set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", spec.start.auto_offset_reset())
            .set("partition.assignment.strategy", "range,roundrobin")
            .set(
                "session.timeout.ms",
                super::group::SESSION_TIMEOUT.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "1000");
        for (k, v) in &settings.extra {
            if !k.starts_with("linger") && !k.starts_with("batch.") {
                cc.set(k, v);
            }
        }
        let consumer: StreamConsumer<GroupContext> = cc
            .create_with_context(GroupContext {
                state: state.clone(),
                group: spec.group.clone(),
            })
            .map_err(|e| KafkaError::client("CreateConsumer", e))?;
        consumer
            .subscribe(&[&spec.topic])
            .map_err(|e| KafkaError::client("Subscribe", e))?;
        Ok(KafkaGroupConsumer {
            spec,
            opts,
            consumer,
            state,
            producer,
        })
    }

    pub fn spec(&self) -> &GroupSpec {
        &self.spec
    }

    /// Unsettled messages (handed out or held).
    pub fn unsettled(&self) -> usize {
        lock(&self.state).tracker.unsettled()
    }

    /// Partitions currently assigned to this member.
    pub fn assigned(&self) -> Vec<TopicPartition> {
        lock(&self.state).tracker.assigned()
    }

    /// Up to `max` messages within `max_wait` (returns early once any are ready and no more
    /// come at once). Expired and due retries come first.
    pub async fn fetch(&self, max: usize, max_wait: Duration) -> Result<Vec<Delivery>, KafkaError> {
        let deadline = Instant::now() + max_wait;
        self.expire().await;
        let mut out = self.take_due(max);
        while out.len() < max {
            if let Some(cap) = self.spec.max_ack_pending {
                if self.unsettled() >= cap {
                    break;
                }
            }
            let now = Instant::now();
            // Once something is ready, only wait briefly for more.
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(now)
            } else {
                Duration::from_millis(5).min(deadline.saturating_duration_since(now))
            };
            if wait.is_zero() {
                break;
            }
            let msg = match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    let err = KafkaError::client("Fetch", e);
                    if out.is_empty() && !err.is_transient() {
                        return Err(err);
                    }
                    tracing::debug!(group = %self.spec.group, error = %err, "fetch error");
                    break;
                }
                Ok(Ok(m)) => Record {
                    tp: TopicPartition::new(m.topic(), m.partition()),
                    offset: m.offset(),
                    key: m.key().map(Bytes::copy_from_slice),
                    payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        Bytes::copy_from_slice(h.value.unwrap_or_default()),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    timestamp_ms: m.timestamp().to_millis(),
                },
            };
            self.admit(msg).await;
            out.extend(self.take_due(max - out.len()));
        }
        Ok(out)
    }

    /// Decides what one read record is: passed over, held until its time, dead-lettered, or
    /// ready to hand out. A ready record is only marked handed out by `take_due`, with no await
    /// between that and returning it, so a fetch dropped at any await loses nothing: what it
    /// did not return is handed out by the next one.
    async fn admit(&self, rec: Record) {
        let subject = rec.subject();
        let foreign_retry = rec
            .header(RETRY_GROUP_HEADER)
            .is_some_and(|g| g != self.spec.group);
        let filtered = !any_matches(&self.spec.filters, &subject);
        if foreign_retry || filtered {
            let passed = lock(&self.state).tracker.pass_over(&rec.tp, rec.offset);
            if passed {
                self.commit_settled();
            }
            return;
        }
        let count = rec.prior_deliveries().saturating_add(1);
        let now = Instant::now();
        let due = rec
            .header(NOT_BEFORE_HEADER)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|ms| ms - now_ms())
            .filter(|wait| *wait > 0)
            .map_or(now, |wait| now + Duration::from_millis(wait as u64));
        let over = self.spec.max_deliver.is_some_and(|m| count > m);
        let epoch = {
            let mut st = lock(&self.state);
            let Some(epoch) = st.tracker.track(&rec.tp, rec.offset) else {
                return; // read just before its partition was revoked: the next owner reads it
            };
            // Out of deliveries already (the limit was lowered since this copy was written):
            // kept as handed out, so a failed dead-letter is retried when ack_wait runs out.
            let (handed, due) = if over {
                (true, now + self.spec.ack_wait)
            } else {
                (false, due)
            };
            st.pending.insert(
                (rec.tp.clone(), rec.offset),
                Pending {
                    epoch,
                    rec: rec.clone(),
                    count,
                    due,
                    handed,
                },
            );
            epoch
        };
        if over {
            let token = self.token(&rec, epoch);
            if let Err(e) = self.give_up(&token, "max_deliver exceeded").await {
                tracing::warn!(group = %self.spec.group, error = %e, "dead-letter failed; retried after ack_wait");
            }
        }
    }

    fn token(&self, rec: &Record, epoch: u64) -> AckToken {
        AckToken {
            topic: rec.tp.topic.clone(),
            partition: rec.tp.partition,
            offset: rec.offset,
            epoch,
            group: self.spec.group.clone(),
        }
    }

    fn delivery(&self, rec: &Record, epoch: u64, count: u32, subject: String) -> Delivery {
        let mut headers = BTreeMap::new();
        for (k, v) in &rec.headers {
            if !is_reserved_header(k) {
                headers.insert(k.clone(), String::from_utf8_lossy(v).into_owned());
            }
        }
        Delivery {
            token: self.token(rec, epoch),
            subject,
            payload: rec.payload.clone(),
            headers,
            correlation_id: rec.header(CORRELATION_HEADER).map(str::to_string),
            msg_id: rec.header(MSG_ID_HEADER).map(str::to_string),
            key: rec.key.clone(),
            timestamp_ms: rec.timestamp_ms,
            delivery_count: count,
            origin: rec.origin(),
        }
    }

    /// Held records whose time has come, handed out now.
    fn take_due(&self, max: usize) -> Vec<Delivery> {
        if max == 0 {
            return Vec::new();
        }
        let now = Instant::now();
        let mut st = lock(&self.state);
        let mut due: Vec<(TopicPartition, i64)> = st
            .pending
            .iter()
            .filter(|(_, p)| !p.handed && p.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        due.sort();
        due.truncate(max);
        let mut out = Vec::with_capacity(due.len());
        for k in due {
            if let Some(p) = st.pending.get_mut(&k) {
                p.handed = true;
                p.due = now + self.spec.ack_wait;
                let subject = p.rec.subject();
                out.push(self.delivery(&p.rec, p.epoch, p.count, subject));
            }
        }
        out
    }

    /// Handed-out messages past ack_wait: a nak without delay each.
    async fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<AckToken> = {
            let st = lock(&self.state);
            st.pending
                .values()
                .filter(|p| p.handed && p.due <= now)
                .map(|p| self.token(&p.rec, p.epoch))
                .collect()
        };
        for t in expired {
            tracing::debug!(group = %self.spec.group, token = %t, "ack_wait expired; redelivering");
            if let Err(e) = self.settle(&t, AckOp::Nak(None)).await {
                tracing::warn!(group = %self.spec.group, error = %e, "redelivery after ack_wait failed; retried at the next fetch");
            }
        }
    }

    /// Settles one message.
    pub async fn settle(&self, token: &AckToken, op: AckOp) -> Result<(), KafkaError> {
        if token.group != self.spec.group {
            return Err(KafkaError::Settle(format!(
                "token belongs to consumer group {:?}, not {:?}",
                token.group, self.spec.group
            )));
        }
        let tp = TopicPartition::new(&token.topic, token.partition);
        let key = (tp.clone(), token.offset);
        let (rec, count) = {
            let mut st = lock(&self.state);
            let Some(p) = st.pending.get_mut(&key).filter(|p| p.epoch == token.epoch) else {
                let why = match st.tracker.epoch(&tp) {
                    None => SettleError::NotAssigned,
                    Some(cur) if cur != token.epoch => SettleError::StaleEpoch { current: cur },
                    Some(_) => SettleError::NotPending,
                };
                return Err(KafkaError::Settle(why.to_string()));
            };
            match op {
                AckOp::Progress => {
                    p.due = Instant::now() + self.spec.ack_wait;
                    return Ok(());
                }
                AckOp::Ack | AckOp::Term => {
                    st.pending.remove(&key);
                    st.tracker
                        .settle(&tp, token.epoch, token.offset)
                        .map_err(|e| KafkaError::Settle(e.to_string()))?;
                    drop(st);
                    if op == AckOp::Term {
                        tracing::info!(group = %self.spec.group, token = %token, "message terminated");
                    }
                    self.commit_settled();
                    return Ok(());
                }
                AckOp::Nak(_) => (p.rec.clone(), p.count),
            }
        };
        let AckOp::Nak(delay) = op else {
            unreachable!("handled above")
        };
        if self.spec.max_deliver.is_some_and(|m| count >= m) {
            return self.give_up(token, "max_deliver reached").await;
        }
        let wait = self.spec.redelivery_delay(count, delay);
        let mut h = OwnedHeaders::new_with_capacity(rec.headers.len() + 4);
        for (k, v) in &rec.headers {
            if k != DELIVERY_COUNT_HEADER && k != NOT_BEFORE_HEADER && k != RETRY_GROUP_HEADER {
                h = h.insert(Header {
                    key: k,
                    value: Some(v.as_ref()),
                });
            }
        }
        let origin = format!("{}:{}", rec.tp.partition, rec.offset);
        if rec.origin().is_none() {
            h = h.insert(Header {
                key: ORIGIN_HEADER,
                value: Some(origin.as_bytes()),
            });
        }
        let count_s = count.to_string();
        let nb = (now_ms() + wait.as_millis() as i64).to_string();
        h = h
            .insert(Header {
                key: DELIVERY_COUNT_HEADER,
                value: Some(count_s.as_bytes()),
            })
            .insert(Header {
                key: NOT_BEFORE_HEADER,
                value: Some(nb.as_bytes()),
            })
            .insert(Header {
                key: RETRY_GROUP_HEADER,
                value: Some(self.spec.group.as_bytes()),
            });
        let key_bytes = rec.key.clone().unwrap_or_default();
        self.producer
            .send(
                &rec.tp.topic,
                Some(rec.tp.partition),
                &key_bytes,
                &rec.payload,
                h,
            )
            .await?;
        self.finish(&tp, token)
    }

    /// Dead-letters (or drops) a message that is out of deliveries, then settles it.
    async fn give_up(&self, token: &AckToken, reason: &str) -> Result<(), KafkaError> {
        let tp = TopicPartition::new(&token.topic, token.partition);
        let rec = {
            let st = lock(&self.state);
            match st.pending.get(&(tp.clone(), token.offset)) {
                Some(p) => p.rec.clone(),
                None => return Err(KafkaError::Settle(SettleError::NotPending.to_string())),
            }
        };
        match &self.opts.dead_letter {
            Some(dl) => {
                let mut h = OwnedHeaders::new_with_capacity(rec.headers.len() + 6);
                for (k, v) in &rec.headers {
                    if k != SUBJECT_HEADER
                        && k != NOT_BEFORE_HEADER
                        && k != RETRY_GROUP_HEADER
                        && k != ORIGIN_HEADER
                    {
                        h = h.insert(Header {
                            key: k,
                            value: Some(v.as_ref()),
                        });
                    }
                }
                let (p, o) = (tp.partition.to_string(), token.offset.to_string());
                h = h
                    .insert(Header {
                        key: SUBJECT_HEADER,
                        value: Some(dl.subject.as_bytes()),
                    })
                    .insert(Header {
                        key: DLQ_TOPIC_HEADER,
                        value: Some(tp.topic.as_bytes()),
                    })
                    .insert(Header {
                        key: DLQ_PARTITION_HEADER,
                        value: Some(p.as_bytes()),
                    })
                    .insert(Header {
                        key: DLQ_OFFSET_HEADER,
                        value: Some(o.as_bytes()),
                    })
                    .insert(Header {
                        key: DLQ_GROUP_HEADER,
                        value: Some(self.spec.group.as_bytes()),
                    })
                    .insert(Header {
                        key: DLQ_REASON_HEADER,
                        value: Some(reason.as_bytes()),
                    });
                self.producer
                    .send(&dl.topic, None, dl.subject.as_bytes(), &rec.payload, h)
                    .await?;
                tracing::info!(group = %self.spec.group, token = %token, dead_letter_topic = %dl.topic, reason, "message dead-lettered");
            }
            None => {
                tracing::warn!(group = %self.spec.group, token = %token, reason, "message dropped (no dead-letter topic)")
            }
        }
        self.finish(&tp, token)
    }

    fn finish(&self, tp: &TopicPartition, token: &AckToken) -> Result<(), KafkaError> {
        {
            let mut st = lock(&self.state);
            // The partition may have moved while the copy was written: then the original is
            // read again by its next owner (a duplicate, never a loss).
            if st
                .pending
                .get(&(tp.clone(), token.offset))
                .is_some_and(|p| p.epoch == token.epoch)
            {
                st.pending.remove(&(tp.clone(), token.offset));
            }
            st.tracker
                .settle(tp, token.epoch, token.offset)
                .map_err(|e| KafkaError::Settle(e.to_string()))?;
        }
        self.commit_settled();
        Ok(())
    }

    /// Commits every partition whose point moved (asynchronously; the commit callback records
    /// the result).
    fn commit_settled(&self) {
        let points = lock(&self.state).tracker.commit_points();
        if points.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, o) in &points {
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(group = %self.spec.group, error = %e, "offset commit not sent; retried with the next settle");
        }
    }

    /// Commits what is settled and waits for the broker's answer, e.g. before shutting down.
    /// Blocks the calling thread for that round trip (bounded by librdkafka's request timeout).
    pub fn commit_now(&self) -> Result<(), KafkaError> {
        let points = lock(&self.state).tracker.commit_points();
        if points.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, o) in &points {
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o));
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| KafkaError::client("Commit", e))?;
        let mut st = lock(&self.state);
        for (tp, o) in &points {
            st.tracker.committed(tp, *o);
        }
        Ok(())
    }
}
