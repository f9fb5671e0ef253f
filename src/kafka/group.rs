//! A consumer is a consumer group on its stream's topic. `GroupSpec` is validated from the
//! same `ConsumerConfig` NATS and pgchannel read:
//!
//! | consumer field | kafka |
//! |---|---|
//! | `name` | `group.id` |
//! | `stream_name` | the topic |
//! | `filter_subject(s)` | applied in the plugin on the subject header; other records are passed over and committed |
//! | `deliver_policy` all / new / by_start_time | where a group without committed offsets starts (earliest, latest, the first offset at or after `opt_start_time`) |
//! | `ack_policy` explicit | one settle per message, commits up to the lowest unsettled offset |
//! | `max_deliver`, `backoff`, `ack_wait`, `max_ack_pending` | kept by the plugin (see `consumer`) |
//!
//! Refused: deliver_policy last and by_start_sequence (no per-topic sequence: offsets are per
//! partition), ack_policy none and all, description.

use crate::config::error::{duration, negative, ConfigError, Problems};
use crate::nats::names::check_filter_subject;
use crate::pb::eventbus::{AckPolicy, ConsumerConfig, DeliverPolicy};
use std::time::Duration;

use super::topic::check_topic_name;
use super::KafkaError;

/// Delivery attempts when the consumer sets none (the Go plugin's default).
pub const DEFAULT_MAX_DELIVER: u32 = 5;
/// How long a handed-out message may stay unsettled before it is redelivered.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long the coordinator waits for a silent member (a crashed process) before it gives
/// the member's partitions to the rest of the group (`session.timeout.ms`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPolicy {
    /// The earliest offset still kept.
    All,
    /// Only records produced after the group first starts.
    New,
    /// The first record with a timestamp at or after this (unix ms).
    ByTime(i64),
}

impl StartPolicy {
    /// `auto.offset.reset` for partitions the plan did not position (added later, or offsets
    /// expired): by_start_time falls back to earliest, so nothing after the time is skipped.
    pub fn auto_offset_reset(self) -> &'static str {
        match self {
            StartPolicy::New => "latest",
            StartPolicy::All | StartPolicy::ByTime(_) => "earliest",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub group: String,
    pub topic: String,
    pub filters: Vec<String>,
    pub start: StartPolicy,
    /// None: unlimited.
    pub max_deliver: Option<u32>,
    pub ack_wait: Duration,
    /// Delay of the n-th redelivery: `backoff[min(n, len) - 1]`; empty: the nak's own delay.
    pub backoff: Vec<Duration>,
    /// Unsettled messages at most (None: unlimited); fetching pauses at the cap.
    pub max_ack_pending: Option<usize>,
}

/// Kafka's group id: any non-empty string; we keep it printable and bounded.
pub fn check_group_id(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.len() > 249 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{} must be at most 249 characters without whitespace (it is the consumer group id)",
            crate::secret::quote(name)
        ));
    }
    Ok(())
}

impl GroupSpec {
    /// A group with the defaults an undeclared consumer gets: from the start, no filter,
    /// max_deliver 5, ack_wait 30 s, no backoff, no pending cap.
    pub fn new(group: impl Into<String>, topic: impl Into<String>) -> GroupSpec {
        GroupSpec {
            group: group.into(),
            topic: topic.into(),
            filters: Vec::new(),
            start: StartPolicy::All,
            max_deliver: Some(DEFAULT_MAX_DELIVER),
            ack_wait: DEFAULT_ACK_WAIT,
            backoff: Vec::new(),
            max_ack_pending: None,
        }
    }

    pub fn validate(
        type_name: &str,
        module: &str,
        c: &ConsumerConfig,
    ) -> Result<GroupSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check("name", check_group_id(&c.name));
        p.check("stream_name", check_topic_name(&c.stream_name));
        let mut filters = c.filter_subjects.clone();
        if !c.filter_subject.is_empty() {
            if !filters.is_empty() {
                p.field(
                    "filter_subject",
                    "set filter_subject or filter_subjects, not both",
                );
            }
            filters.insert(0, c.filter_subject.clone());
        }
        for (i, f) in filters.iter().enumerate() {
            p.check(&format!("filter_subjects[{i}]"), check_filter_subject(f));
        }
        let start = match DeliverPolicy::try_from(c.deliver_policy) {
            Ok(DeliverPolicy::Unspecified | DeliverPolicy::All) => StartPolicy::All,
            Ok(DeliverPolicy::New) => StartPolicy::New,
            Ok(DeliverPolicy::ByStartTime) => match &c.opt_start_time {
                Some(t) if t.seconds >= 0 => {
                    StartPolicy::ByTime(t.seconds * 1000 + i64::from(t.nanos.max(0)) / 1_000_000)
                }
                _ => {
                    p.field("opt_start_time", "is required (RFC 3339, e.g. \"2026-01-01T00:00:00Z\") with DELIVER_POLICY_BY_START_TIME");
                    StartPolicy::All
                }
            },
            Ok(DeliverPolicy::Last | DeliverPolicy::LastPerSubject) => {
                p.field("deliver_policy", "DELIVER_POLICY_LAST and _LAST_PER_SUBJECT have no kafka equivalent (offsets are per partition); use _ALL, _NEW or _BY_START_TIME");
                StartPolicy::All
            }
            Ok(DeliverPolicy::ByStartSequence) => {
                p.field("deliver_policy", "DELIVER_POLICY_BY_START_SEQUENCE has no kafka equivalent (offsets are per partition); use _ALL, _NEW or _BY_START_TIME");
                StartPolicy::All
            }
            Err(_) => {
                p.field(
                    "deliver_policy",
                    "must be DELIVER_POLICY_ALL, _NEW or _BY_START_TIME",
                );
                StartPolicy::All
            }
        };
        if c.opt_start_seq != 0 {
            p.field(
                "opt_start_seq",
                "has no kafka equivalent (offsets are per partition)",
            );
        }
        if c.opt_start_time.is_some() && !matches!(start, StartPolicy::ByTime(_)) {
            p.field(
                "opt_start_time",
                "only applies with deliver_policy DELIVER_POLICY_BY_START_TIME",
            );
        }
        match AckPolicy::try_from(c.ack_policy) {
            Ok(AckPolicy::Unspecified | AckPolicy::Explicit) => {}
            _ => p.field("ack_policy", "kafka consumers settle each message (ACK_POLICY_EXPLICIT); offsets are committed up to the lowest unsettled one"),
        }
        if c.max_deliver < -1 {
            p.field(
                "max_deliver",
                "must be -1 (unlimited), 0 (the default, 5) or a positive count",
            );
        }
        let max_deliver = match c.max_deliver {
            -1 => None,
            0 => Some(DEFAULT_MAX_DELIVER),
            n => Some(n.max(1) as u32),
        };
        if negative(&c.ack_wait) || duration(&c.ack_wait) == Some(Duration::ZERO) {
            p.field("ack_wait", "must be a positive duration such as \"30s\"");
        }
        if c.max_ack_pending < -1 {
            p.field(
                "max_ack_pending",
                "must be -1 (unlimited) or a positive count",
            );
        }
        let backoff: Vec<Duration> = c
            .backoff
            .iter()
            .map(|d| duration(&Some(*d)).unwrap_or_default())
            .collect();
        if c.backoff.iter().any(|d| d.seconds < 0 || d.nanos < 0) {
            p.field("backoff", "entries must not be negative");
        }
        if !c.description.is_empty() {
            p.field("description", "kafka consumer groups have no description");
        }
        let spec = GroupSpec {
            group: c.name.clone(),
            topic: c.stream_name.clone(),
            filters,
            start,
            max_deliver,
            ack_wait: duration(&c.ack_wait)
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_ACK_WAIT),
            backoff,
            max_ack_pending: (c.max_ack_pending > 0).then_some(c.max_ack_pending as usize),
        };
        p.finish(spec)
    }

    /// Delay before the n-th redelivery (n >= 1) given the nak's own delay.
    pub fn redelivery_delay(&self, n: u32, nak_delay: Option<Duration>) -> Duration {
        if let Some(d) = nak_delay {
            return d;
        }
        if self.backoff.is_empty() {
            return Duration::ZERO;
        }
        let i = (n.max(1) as usize).min(self.backoff.len()) - 1;
        self.backoff[i]
    }
}

/// Where a group without a committed offset starts on one partition, from the partition's
/// low/high watermarks and, for by_start_time, the broker's answer to "first offset at or
/// after t" (None: no record that late, so the high watermark). Pure.
pub fn start_offset(policy: StartPolicy, low: i64, high: i64, by_time: Option<i64>) -> i64 {
    match policy {
        StartPolicy::All => low,
        StartPolicy::New => high,
        StartPolicy::ByTime(_) => by_time.map_or(high, |o| o.clamp(low, high)),
    }
}

/// A group's offsets, read and written without joining it. [`super::admin::RdOffsets`] is the
/// real one (blocking calls: run it on the blocking pool); tests use a fake because the test
/// broker answers every offsets-for-time lookup with 0.
pub trait OffsetLookup {
    fn partitions(&self, topic: &str) -> Result<Vec<i32>, KafkaError>;
    /// The group's committed offset per partition (None: none committed).
    fn committed(&self, topic: &str, partitions: &[i32]) -> Result<Vec<Option<i64>>, KafkaError>;
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError>;
    /// The first offset whose timestamp is at or after `ms`; None when there is none.
    fn offset_for_time(
        &self,
        topic: &str,
        partition: i32,
        ms: i64,
    ) -> Result<Option<i64>, KafkaError>;
    fn commit(&self, topic: &str, offsets: &[(i32, i64)]) -> Result<(), KafkaError>;
}

/// Positions a new group (no committed offset on any partition) at its deliver policy by
/// committing its starting offsets, so the start is fixed when the consumer is created, not
/// when it first joins. Returns what was committed; None for an existing group, which keeps
/// its offsets (deliver_policy applies to new groups only, as on NATS).
pub fn position_new_group<L: OffsetLookup + ?Sized>(
    l: &L,
    spec: &GroupSpec,
) -> Result<Option<Vec<(i32, i64)>>, KafkaError> {
    let parts = l.partitions(&spec.topic)?;
    let committed = l.committed(&spec.topic, &parts)?;
    if committed.iter().any(Option::is_some) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let (low, high) = l.watermarks(&spec.topic, p)?;
        let by_time = match spec.start {
            StartPolicy::ByTime(ms) => l.offset_for_time(&spec.topic, p, ms)?,
            _ => None,
        };
        out.push((p, start_offset(spec.start, low, high, by_time)));
    }
    l.commit(&spec.topic, &out)?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(f: impl FnOnce(&mut ConsumerConfig)) -> Result<GroupSpec, ConfigError> {
        let mut c = ConsumerConfig {
            name: "billing".into(),
            stream_name: "orders".into(),
            ..Default::default()
        };
        f(&mut c);
        GroupSpec::validate("eventbus.consumer", "billing", &c)
    }

    #[test]
    fn consumer_fields_map_to_a_group() {
        let g = consumer(|c| {
            c.filter_subject = "orders.*.created".into();
            c.deliver_policy = DeliverPolicy::ByStartTime as i32;
            c.opt_start_time = Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            });
            c.max_deliver = 3;
            c.backoff = vec![
                prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                },
                prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                },
            ];
            c.max_ack_pending = 100;
        })
        .unwrap();
        assert_eq!(g.group, "billing");
        assert_eq!(g.topic, "orders");
        assert_eq!(g.filters, vec!["orders.*.created"]);
        assert_eq!(g.start, StartPolicy::ByTime(1_700_000_000_005));
        assert_eq!(g.max_deliver, Some(3));
        assert_eq!(g.max_ack_pending, Some(100));
        assert_eq!(g.ack_wait, DEFAULT_ACK_WAIT);
        assert_eq!(g.redelivery_delay(1, None), Duration::from_secs(1));
        assert_eq!(g.redelivery_delay(7, None), Duration::from_secs(5));
        assert_eq!(
            g.redelivery_delay(1, Some(Duration::from_millis(10))),
            Duration::from_millis(10)
        );
        let d = consumer(|_| {}).unwrap();
        assert_eq!(
            (d.start, d.max_deliver),
            (StartPolicy::All, Some(DEFAULT_MAX_DELIVER))
        );
        assert_eq!(consumer(|c| c.max_deliver = -1).unwrap().max_deliver, None);
    }

    #[test]
    fn what_kafka_cannot_do_is_refused_one_line_each() {
        let e = consumer(|c| {
            c.deliver_policy = DeliverPolicy::Last as i32;
            c.ack_policy = AckPolicy::None as i32;
            c.opt_start_seq = 4;
            c.description = "d".into();
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 4, "{e}");
        assert!(
            e.problems[0]
                .starts_with("config.deliver_policy: DELIVER_POLICY_LAST and _LAST_PER_SUBJECT have no kafka equivalent"),
            "{e}"
        );
        let e = consumer(|c| c.deliver_policy = DeliverPolicy::ByStartTime as i32).unwrap_err();
        assert!(
            e.to_string().contains("config.opt_start_time: is required"),
            "{e}"
        );
        let e = consumer(|c| c.stream_name = "bad name".into()).unwrap_err();
        assert!(e.to_string().contains("config.stream_name"), "{e}");
    }

    /// (partition, low, high, [(timestamp ms, offset)])
    type FakePartition = (i32, i64, i64, Vec<(i64, i64)>);

    /// A fake offsets layer (the test broker cannot answer offsets-for-time).
    #[derive(Default)]
    struct FakeOffsets {
        committed: std::cell::RefCell<std::collections::BTreeMap<i32, i64>>,
        parts: Vec<FakePartition>,
    }

    impl OffsetLookup for FakeOffsets {
        fn partitions(&self, _: &str) -> Result<Vec<i32>, KafkaError> {
            Ok(self.parts.iter().map(|p| p.0).collect())
        }
        fn committed(&self, _: &str, ps: &[i32]) -> Result<Vec<Option<i64>>, KafkaError> {
            Ok(ps
                .iter()
                .map(|p| self.committed.borrow().get(p).copied())
                .collect())
        }
        fn watermarks(&self, _: &str, p: i32) -> Result<(i64, i64), KafkaError> {
            let x = self.parts.iter().find(|x| x.0 == p).expect("partition");
            Ok((x.1, x.2))
        }
        fn offset_for_time(&self, _: &str, p: i32, ms: i64) -> Result<Option<i64>, KafkaError> {
            let x = self.parts.iter().find(|x| x.0 == p).expect("partition");
            Ok(x.3.iter().find(|(ts, _)| *ts >= ms).map(|(_, o)| *o))
        }
        fn commit(&self, _: &str, offsets: &[(i32, i64)]) -> Result<(), KafkaError> {
            self.committed.borrow_mut().extend(offsets.iter().copied());
            Ok(())
        }
    }

    #[test]
    fn a_new_group_is_positioned_once_at_its_deliver_policy() {
        let fake = || FakeOffsets {
            parts: vec![
                (0, 2, 10, vec![(1000, 2), (2000, 5), (3000, 9)]),
                (1, 0, 4, vec![(500, 0), (900, 3)]),
            ],
            ..Default::default()
        };
        let spec = |start| GroupSpec {
            start,
            ..consumer(|_| {}).unwrap()
        };
        let f = fake();
        let got = position_new_group(&f, &spec(StartPolicy::ByTime(1500))).unwrap();
        assert_eq!(
            got,
            Some(vec![(0, 5), (1, 4)]),
            "partition 1 has nothing that late"
        );
        // Positioned once: an existing group keeps its offsets.
        assert_eq!(
            position_new_group(&f, &spec(StartPolicy::All)).unwrap(),
            None
        );
        assert_eq!(f.committed.borrow().get(&0), Some(&5));
        let f = fake();
        assert_eq!(
            position_new_group(&f, &spec(StartPolicy::All)).unwrap(),
            Some(vec![(0, 2), (1, 0)])
        );
        let f = fake();
        assert_eq!(
            position_new_group(&f, &spec(StartPolicy::New)).unwrap(),
            Some(vec![(0, 10), (1, 4)])
        );
    }

    #[test]
    fn start_offsets_for_a_new_group() {
        assert_eq!(start_offset(StartPolicy::All, 3, 10, None), 3);
        assert_eq!(start_offset(StartPolicy::New, 3, 10, None), 10);
        assert_eq!(start_offset(StartPolicy::ByTime(5), 3, 10, Some(7)), 7);
        assert_eq!(
            start_offset(StartPolicy::ByTime(5), 3, 10, None),
            10,
            "nothing that late"
        );
        assert_eq!(
            start_offset(StartPolicy::ByTime(5), 3, 10, Some(0)),
            3,
            "below the kept range"
        );
        assert_eq!(StartPolicy::ByTime(1).auto_offset_reset(), "earliest");
        assert_eq!(StartPolicy::New.auto_offset_reset(), "latest");
    }
}
