//! `infra.eventbus.consumer` / `eventbus.consumer`: validation into a `ConsumerSpec`, the one
//! conversion to a durable pull consumer config, and an idempotent ensure.

use super::stream::{in_place_fields, Change, EnsureOutcome, FieldDiff, FieldDiffs};
use crate::config::error::{duration, negative, ConfigError, Problems};
use crate::nats::error::lift_api;
use crate::nats::names::{check_filter_subject, check_name};
use crate::nats::settings::{self, Settings};
use crate::nats::{NatsConn, NatsError};
use crate::pb::eventbus::{AckPolicy, ConsumerConfig, DeliverPolicy, PriorityPolicy, ReplayPolicy};
use async_nats::jetstream::consumer::{self, pull, IntoConsumerConfig};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerSpec {
    pub durable: String,
    pub stream: String,
    pub filter_subjects: Vec<String>,
    pub deliver: consumer::DeliverPolicy,
    pub ack: consumer::AckPolicy,
    /// -1 = unlimited.
    pub max_deliver: i64,
    pub ack_wait: Option<Duration>,
    pub max_ack_pending: Option<i64>,
    pub backoff: Vec<Duration>,
    pub description: Option<String>,
    pub broker_ref: String,
    pub servers: Vec<String>,
    pub prevent_destroy: bool,
    pub bind: bool,
    /// The JetStream settings beyond the above that the config sets (`settings::CONSUMER`).
    pub settings: Settings,
}

impl ConsumerSpec {
    pub fn validate(
        type_name: &str,
        module: &str,
        c: &ConsumerConfig,
    ) -> Result<ConsumerSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check(
            "name",
            check_name(&c.name).map_err(|e| format!("(durable consumer name) {e}")),
        );
        p.check("stream_name", check_name(&c.stream_name));
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
        let start_time = c.opt_start_time.as_ref().and_then(|t| {
            time::OffsetDateTime::from_unix_timestamp_nanos(
                t.seconds as i128 * 1_000_000_000 + t.nanos as i128,
            )
            .ok()
        });
        let deliver = match DeliverPolicy::try_from(c.deliver_policy) {
            Ok(DeliverPolicy::Unspecified | DeliverPolicy::All) => consumer::DeliverPolicy::All,
            Ok(DeliverPolicy::Last) => consumer::DeliverPolicy::Last,
            Ok(DeliverPolicy::New) => consumer::DeliverPolicy::New,
            Ok(DeliverPolicy::LastPerSubject) => consumer::DeliverPolicy::LastPerSubject,
            Ok(DeliverPolicy::ByStartSequence) => {
                if c.opt_start_seq == 0 {
                    p.field(
                        "opt_start_seq",
                        "is required (> 0) with DELIVER_POLICY_BY_START_SEQUENCE",
                    );
                }
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: c.opt_start_seq,
                }
            }
            Ok(DeliverPolicy::ByStartTime) => match start_time {
                Some(t) => consumer::DeliverPolicy::ByStartTime { start_time: t },
                None => {
                    p.field("opt_start_time", "is required (RFC 3339, e.g. \"2026-01-01T00:00:00Z\") with DELIVER_POLICY_BY_START_TIME");
                    consumer::DeliverPolicy::All
                }
            },
            Err(_) => {
                p.field(
                    "deliver_policy",
                    "must be DELIVER_POLICY_ALL, _LAST, _NEW, _BY_START_SEQUENCE, _BY_START_TIME or _LAST_PER_SUBJECT",
                );
                consumer::DeliverPolicy::All
            }
        };
        let by_seq = matches!(deliver, consumer::DeliverPolicy::ByStartSequence { .. });
        let by_time = matches!(deliver, consumer::DeliverPolicy::ByStartTime { .. });
        if c.opt_start_seq != 0 && !by_seq {
            p.field(
                "opt_start_seq",
                "only applies with deliver_policy DELIVER_POLICY_BY_START_SEQUENCE",
            );
        }
        if c.opt_start_time.is_some() && !by_time {
            p.field(
                "opt_start_time",
                "only applies with deliver_policy DELIVER_POLICY_BY_START_TIME",
            );
        }
        let ack = match AckPolicy::try_from(c.ack_policy) {
            Ok(AckPolicy::Unspecified | AckPolicy::Explicit) => consumer::AckPolicy::Explicit,
            Ok(AckPolicy::None) => consumer::AckPolicy::None,
            Ok(AckPolicy::All) => consumer::AckPolicy::All,
            Err(_) => {
                p.field("ack_policy", "must be ACK_POLICY_EXPLICIT, _NONE or _ALL");
                consumer::AckPolicy::Explicit
            }
        };
        if c.max_deliver < -1 {
            p.field(
                "max_deliver",
                "must be -1 or 0 (unlimited) or a positive count",
            );
        }
        let max_deliver = if c.max_deliver <= 0 {
            -1
        } else {
            c.max_deliver as i64
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
        if c.backoff
            .iter()
            .any(|d| d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0))
        {
            p.field("backoff", "every entry must be a positive duration");
        }
        if !backoff.is_empty() && max_deliver != -1 && max_deliver <= backoff.len() as i64 {
            p.field("backoff", format!("has {} entries, so max_deliver must be greater than that (it is {max_deliver})", backoff.len()));
        }
        if !backoff.is_empty() && c.ack_wait.is_some() {
            p.field(
                "ack_wait",
                "is replaced by backoff on the server; set one of them",
            );
        }
        if ReplayPolicy::try_from(c.replay_policy).is_err() {
            p.field(
                "replay_policy",
                "must be REPLAY_POLICY_INSTANT or REPLAY_POLICY_ORIGINAL",
            );
        }
        let priority = PriorityPolicy::try_from(c.priority_policy);
        if priority.is_err() {
            p.field(
                "priority_policy",
                "must be PRIORITY_POLICY_NONE, _OVERFLOW or _PINNED_CLIENT",
            );
        }
        let grouped = matches!(
            priority,
            Ok(PriorityPolicy::Overflow | PriorityPolicy::PinnedClient)
        );
        if grouped && c.priority_groups.is_empty() {
            p.field(
                "priority_groups",
                "must name at least one group with priority_policy overflow or pinned_client",
            );
        }
        if !grouped && !c.priority_groups.is_empty() {
            p.field(
                "priority_groups",
                "only apply with priority_policy PRIORITY_POLICY_OVERFLOW or _PINNED_CLIENT",
            );
        }
        if c.priority_timeout.is_some() && priority != Ok(PriorityPolicy::PinnedClient) {
            p.field(
                "priority_timeout",
                "only applies with priority_policy PRIORITY_POLICY_PINNED_CLIENT",
            );
        }
        if c.sample_freq.is_some_and(|f| !(0..=100).contains(&f)) {
            p.field("sample_freq", "must be a percentage, 0..=100");
        }
        for (field, n) in [
            ("num_replicas", c.num_replicas as i64),
            ("max_waiting", c.max_waiting as i64),
            ("max_batch", c.max_batch as i64),
            ("max_bytes", c.max_bytes),
        ] {
            if n < 0 {
                p.field(field, "must not be negative (0 leaves the server's value)");
            }
        }
        for (field, d) in [
            ("inactive_threshold", &c.inactive_threshold),
            ("max_expires", &c.max_expires),
            ("priority_timeout", &c.priority_timeout),
        ] {
            if negative(d) {
                p.field(field, "must not be negative");
            }
        }
        let settings = settings::from_config(
            &format!("{}.ConsumerConfig", crate::pb::EVENTBUS_PACKAGE),
            c,
            settings::CONSUMER,
        )
        .and_then(|set| {
            settings::canonical(
                &set,
                settings::consumer_from_json,
                settings::consumer_to_json,
            )
        })
        .unwrap_or_else(|e| {
            let (field, why) = e.split_once(": ").unwrap_or(("", &e));
            p.field(field, why.to_string());
            Settings::new()
        });
        let spec = ConsumerSpec {
            durable: c.name.clone(),
            stream: c.stream_name.clone(),
            filter_subjects: filters,
            deliver,
            ack,
            max_deliver,
            ack_wait: duration(&c.ack_wait),
            max_ack_pending: (c.max_ack_pending != 0).then_some(c.max_ack_pending as i64),
            backoff,
            description: (!c.description.is_empty()).then(|| c.description.clone()),
            broker_ref: c.broker_ref.clone(),
            servers: c.servers.clone(),
            prevent_destroy: c.prevent_destroy,
            bind: c.bind,
            settings,
        };
        p.finish(spec)
    }

    /// The durable's full config: the managed fields and the settings the config sets.
    pub fn to_nats(&self) -> consumer::Config {
        let mut c: consumer::Config = (&self.base_config()).into_consumer_config();
        // Validated at decode; nothing is left to fail.
        let _ = settings::consumer_from_json(&mut c, &self.settings);
        c
    }

    /// What the broker's release (`server`) cannot do for this spec, one line per setting.
    pub fn check_server(&self, server: &str) -> Result<(), NatsError> {
        let what = format!("consumer {:?} on stream {:?}", self.durable, self.stream);
        settings::too_old(settings::CONSUMER, &self.settings, &what, server)
    }

    fn base_config(&self) -> pull::Config {
        let (filter_subject, filter_subjects) = match self.filter_subjects.as_slice() {
            [] => (String::new(), Vec::new()),
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        pull::Config {
            durable_name: Some(self.durable.clone()),
            name: Some(self.durable.clone()),
            description: self.description.clone(),
            deliver_policy: self.deliver,
            ack_policy: self.ack,
            ack_wait: self.ack_wait.unwrap_or_default(),
            max_deliver: self.max_deliver,
            filter_subject,
            filter_subjects,
            max_ack_pending: self.max_ack_pending.unwrap_or_default(),
            backoff: self.backoff.clone(),
            ..Default::default()
        }
    }

    pub fn diff(&self, observed: &consumer::Config) -> Vec<FieldDiff> {
        let mut d = FieldDiffs::default();
        let mut cmp = |field, want, have, change| d.compare(field, want, have, change);
        let mut want_f = self.filter_subjects.clone();
        want_f.sort();
        let mut have_f = observed.filter_subjects.clone();
        if !observed.filter_subject.is_empty() {
            have_f.push(observed.filter_subject.clone());
        }
        have_f.sort();
        cmp(
            "filter_subjects",
            format!("{want_f:?}"),
            format!("{have_f:?}"),
            Change::InPlace,
        );
        cmp(
            "deliver_policy",
            format!("{:?}", self.deliver),
            format!("{:?}", observed.deliver_policy),
            Change::Replace,
        );
        cmp(
            "ack_policy",
            format!("{:?}", self.ack),
            format!("{:?}", observed.ack_policy),
            Change::Replace,
        );
        cmp(
            "max_deliver",
            self.max_deliver.to_string(),
            (if observed.max_deliver <= 0 {
                -1
            } else {
                observed.max_deliver
            })
            .to_string(),
            Change::InPlace,
        );
        if let Some(w) = self.ack_wait {
            cmp(
                "ack_wait",
                format!("{w:?}"),
                format!("{:?}", observed.ack_wait),
                Change::InPlace,
            );
        }
        if let Some(m) = self.max_ack_pending {
            cmp(
                "max_ack_pending",
                m.to_string(),
                observed.max_ack_pending.to_string(),
                Change::InPlace,
            );
        }
        if !self.backoff.is_empty() {
            cmp(
                "backoff",
                format!("{:?}", self.backoff),
                format!("{:?}", observed.backoff),
                Change::InPlace,
            );
        }
        if let Some(desc) = &self.description {
            cmp(
                "description",
                desc.clone(),
                observed.description.clone().unwrap_or_default(),
                Change::InPlace,
            );
        }
        let have = settings::consumer_to_json(observed);
        for (field, want, have, in_place) in
            settings::diff(settings::CONSUMER, &self.settings, &have)
        {
            d.compare(field, want, have, Change::of(in_place));
        }
        d.0
    }

    /// Creates the durable or updates it in place; nothing is sent when it already matches.
    pub async fn ensure(&self, conn: &NatsConn) -> Result<EnsureOutcome, NatsError> {
        let what = format!("consumer {:?} on stream {:?}", self.durable, self.stream);
        let stream = get_stream(conn, &self.stream).await?;
        let observed = fetch_consumer_config(&stream, &self.durable).await?;
        self.check_server(&crate::nats::stream::server_version(conn))?;
        let Some(observed) = observed else {
            stream
                .create_consumer(self.to_nats())
                .await
                .map_err(|e| lift_consumer("create consumer", &what, e))?;
            return Ok(EnsureOutcome::Created);
        };
        let Some(fields) = in_place_fields("update consumer", &what, self.diff(&observed), |_| {
            "delete the consumer (its position is lost) or keep the old value".to_string()
        })?
        else {
            return Ok(EnsureOutcome::Unchanged);
        };
        let updated = stream
            .update_consumer(overlay(self, observed))
            .await
            .map_err(|e| NatsError::other("update consumer", format!("{what}: {e}")))?
            .cached_info()
            .config
            .clone();
        sync_pause(&stream, self, &updated).await?;
        Ok(EnsureOutcome::Updated(fields))
    }
}

/// Makes the server's `pause_until` the spec's, through the consumer pause API (an update
/// carrying a new `pause_until` is accepted and ignored). `true` when it sent a change.
pub async fn sync_pause(
    stream: &async_nats::jetstream::stream::Stream,
    spec: &ConsumerSpec,
    have: &consumer::Config,
) -> Result<bool, NatsError> {
    let Some(want) = spec.settings.get("pause_until") else {
        return Ok(false);
    };
    if settings::consumer_to_json(have).get("pause_until") == Some(want) {
        return Ok(false);
    }
    let sent = match settings::parse_time(want) {
        Ok(until) => stream.pause_consumer(&spec.durable, until).await,
        Err(_) => stream.resume_consumer(&spec.durable).await,
    };
    sent.map_err(|e| {
        NatsError::other(
            "pause consumer",
            format!("consumer {:?}: {e}", spec.durable),
        )
    })?;
    Ok(true)
}

pub async fn get_stream(
    conn: &NatsConn,
    name: &str,
) -> Result<async_nats::jetstream::stream::Stream, NatsError> {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    conn.js.get_stream(name).await.map_err(|e| match e.kind() {
        K::JetStream(api) => lift_api("get stream", &format!("stream {name:?}"), &api),
        _ => NatsError::other("get stream", e),
    })
}

pub async fn fetch_consumer_config(
    stream: &async_nats::jetstream::stream::Stream,
    durable: &str,
) -> Result<Option<consumer::Config>, NatsError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as K;
    match stream.consumer_info(durable).await {
        Ok(info) => Ok(Some(info.config)),
        Err(e) => match e.kind() {
            K::NotFound => Ok(None),
            K::JetStream(api) if api.error_code() == crate::nats::error::CONSUMER_NOT_FOUND => {
                Ok(None)
            }
            K::JetStream(api) => Err(lift_api(
                "consumer info",
                &format!("consumer {durable:?}"),
                &api,
            )),
            _ => Err(NatsError::other("consumer info", e)),
        },
    }
}

fn lift_consumer(
    op: &'static str,
    what: &str,
    e: async_nats::jetstream::stream::ConsumerError,
) -> NatsError {
    use async_nats::jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::JetStream(api) => lift_api(op, what, &api),
        K::TimedOut => NatsError::TimedOut {
            op,
            after: Duration::ZERO,
        },
        _ => NatsError::other(op, e),
    }
}

/// Settings the config does not manage (sources, mirrors, metadata, ...) are kept, so an
/// update never undoes what an operator set out of band. The managed, user-set fields of `spec` over the server's current config.
pub fn overlay(spec: &ConsumerSpec, mut c: consumer::Config) -> consumer::Config {
    let want = spec.to_nats();
    c.filter_subject = want.filter_subject;
    c.filter_subjects = want.filter_subjects;
    c.max_deliver = want.max_deliver;
    if spec.ack_wait.is_some() {
        c.ack_wait = want.ack_wait;
    }
    if spec.max_ack_pending.is_some() {
        c.max_ack_pending = want.max_ack_pending;
    }
    if !spec.backoff.is_empty() {
        c.backoff = want.backoff;
    }
    if spec.description.is_some() {
        c.description = want.description;
    }
    let _ = settings::consumer_from_json(&mut c, &spec.settings);
    c
}
