//! `infra.eventbus.stream` / `eventbus.stream`: validation into a `StreamSpec`, the one
//! conversion to the server's stream config, and an idempotent ensure (create or update in
//! place, no update when nothing the user set differs: Go defect B10).

use crate::config::error::{duration, negative, ConfigError, Problems};
use crate::nats::error::lift_api;
use crate::nats::names::{check_filter_subject, check_name};
use crate::nats::settings::{self, Settings};
use crate::nats::{NatsConn, NatsError};
use crate::pb::eventbus::{
    DiscardPolicy, RetentionPolicy, StorageType, StreamCompression, StreamConfig,
};
use async_nats::jetstream::stream;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: stream::RetentionPolicy,
    pub storage: stream::StorageType,
    pub replicas: usize,
    pub max_bytes: i64,
    pub max_msgs: i64,
    pub max_msgs_per_subject: i64,
    pub max_msg_size: i32,
    pub max_age: Duration,
    pub discard: stream::DiscardPolicy,
    pub duplicate_window: Option<Duration>,
    pub description: Option<String>,
    pub broker_ref: String,
    pub servers: Vec<String>,
    pub prevent_destroy: bool,
    pub bind: bool,
    /// The JetStream settings beyond the above that the config sets (`settings::STREAM`).
    pub settings: Settings,
}

/// 0 and negative limits all mean "unlimited"; the server stores -1.
fn limit(v: i64) -> i64 {
    if v <= 0 {
        -1
    } else {
        v
    }
}

impl StreamSpec {
    pub fn validate(
        type_name: &str,
        module: &str,
        c: &StreamConfig,
    ) -> Result<StreamSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check("name", check_name(&c.name));
        if c.mirror.is_some() && !c.subjects.is_empty() {
            p.field(
                "subjects",
                "must be empty on a mirror (it stores what its origin stores)",
            );
        } else if c.subjects.is_empty() && c.mirror.is_none() && c.sources.is_empty() {
            p.field(
                "subjects",
                "must contain at least one subject, e.g. [\"orders.>\"] (or set mirror or sources)",
            );
        }
        if c.mirror_direct == Some(true) && c.mirror.is_none() {
            p.field("mirror_direct", "only applies to a mirror (set mirror)");
        }
        if c.discard_new_per_subject == Some(true)
            && (DiscardPolicy::try_from(c.discard) != Ok(DiscardPolicy::New)
                || c.max_msgs_per_subject <= 0)
        {
            p.field(
                "discard_new_per_subject",
                "needs discard DISCARD_POLICY_NEW and max_msgs_per_subject > 0",
            );
        }
        if c.subject_delete_marker_ttl.is_some() && c.allow_msg_ttl != Some(true) {
            p.field("subject_delete_marker_ttl", "needs allow_msg_ttl: true");
        }
        if StreamCompression::try_from(c.compression).is_err() {
            p.field(
                "compression",
                "must be STREAM_COMPRESSION_NONE or STREAM_COMPRESSION_S2",
            );
        }
        let settings = settings::from_config(
            &format!("{}.StreamConfig", crate::pb::EVENTBUS_PACKAGE),
            c,
            settings::STREAM,
        )
        .and_then(|set| {
            settings::canonical(&set, settings::stream_from_json, settings::stream_to_json)
        })
        .unwrap_or_else(|e| {
            let (field, why) = e.split_once(": ").unwrap_or(("", &e));
            p.field(field, why.to_string());
            Settings::new()
        });
        for (i, s) in c.subjects.iter().enumerate() {
            p.check(&format!("subjects[{i}]"), check_filter_subject(s));
        }
        let retention = match RetentionPolicy::try_from(c.retention_policy) {
            Ok(RetentionPolicy::Unspecified | RetentionPolicy::Limits) => {
                stream::RetentionPolicy::Limits
            }
            Ok(RetentionPolicy::Interest) => stream::RetentionPolicy::Interest,
            Ok(RetentionPolicy::Workqueue) => stream::RetentionPolicy::WorkQueue,
            Err(_) => {
                p.field(
                    "retention_policy",
                    "must be RETENTION_POLICY_LIMITS, _INTEREST or _WORKQUEUE",
                );
                stream::RetentionPolicy::Limits
            }
        };
        let storage = match StorageType::try_from(c.storage) {
            Ok(StorageType::Memory) => stream::StorageType::Memory,
            Ok(_) => stream::StorageType::File,
            Err(_) => {
                p.field(
                    "storage",
                    "must be STORAGE_TYPE_FILE or STORAGE_TYPE_MEMORY",
                );
                stream::StorageType::File
            }
        };
        let discard = match DiscardPolicy::try_from(c.discard) {
            Ok(DiscardPolicy::New) => stream::DiscardPolicy::New,
            Ok(_) => stream::DiscardPolicy::Old,
            Err(_) => {
                p.field(
                    "discard",
                    "must be DISCARD_POLICY_OLD or DISCARD_POLICY_NEW",
                );
                stream::DiscardPolicy::Old
            }
        };
        if c.num_replicas < 0 || c.num_replicas > 5 {
            p.field(
                "num_replicas",
                format!("{} is out of range (1..=5; 0 means 1)", c.num_replicas),
            );
        }
        for (field, d) in [
            ("max_age", &c.max_age),
            ("duplicate_window", &c.duplicate_window),
            ("ack_wait", &c.ack_wait),
        ] {
            if negative(d) {
                p.field(field, "must not be negative");
            }
        }
        let max_age = duration(&c.max_age).unwrap_or_default();
        let dup = duration(&c.duplicate_window).filter(|d| !d.is_zero());
        if let Some(d) = dup {
            if !max_age.is_zero() && d > max_age {
                p.field(
                    "duplicate_window",
                    format!("{d:?} exceeds max_age {max_age:?}; the server refuses that"),
                );
            }
        }
        if c.ack_wait.is_some() {
            tracing::warn!(stream = %c.name, "stream ack_wait has no effect; set ack_wait on the consumer");
        }
        if c.max_msg_size < -1 {
            p.field("max_msg_size", "must be -1 (unlimited) or a byte count");
        }
        if c.partitions != 0 {
            p.field(
                "partitions",
                "applies to provider kafka only (a topic's partition count)",
            );
        }
        if !c.broker_ref.is_empty() {
            p.check(
                "broker_ref",
                check_name(&c.broker_ref).map_err(|e| format!("broker module name {e}")),
            );
        }
        let spec = StreamSpec {
            name: c.name.clone(),
            subjects: c.subjects.clone(),
            retention,
            storage,
            replicas: c.num_replicas.max(1) as usize,
            max_bytes: limit(c.max_bytes),
            max_msgs: limit(c.max_msgs),
            max_msgs_per_subject: limit(c.max_msgs_per_subject),
            max_msg_size: if c.max_msg_size == 0 {
                -1
            } else {
                c.max_msg_size
            },
            max_age,
            discard,
            duplicate_window: dup,
            description: (!c.description.is_empty()).then(|| c.description.clone()),
            broker_ref: c.broker_ref.clone(),
            servers: c.servers.clone(),
            prevent_destroy: c.prevent_destroy,
            bind: c.bind,
            settings,
        };
        p.finish(spec)
    }

    pub fn to_nats(&self) -> stream::Config {
        let mut c = self.base_config();
        // Validated at decode; nothing is left to fail.
        let _ = settings::stream_from_json(&mut c, &self.settings);
        c
    }

    fn base_config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            retention: self.retention,
            storage: self.storage,
            num_replicas: self.replicas,
            max_bytes: self.max_bytes,
            max_messages: self.max_msgs,
            max_messages_per_subject: self.max_msgs_per_subject,
            max_message_size: self.max_msg_size,
            max_age: self.max_age,
            discard: self.discard,
            duplicate_window: self.duplicate_window.unwrap_or_default(),
            description: self.description.clone(),
            ..Default::default()
        }
    }

    /// Fields whose desired value differs from the server's, compared after the server's own
    /// normalisation (limits of 0 become -1, duplicate window defaults to 2 min or max_age).
    pub fn diff(&self, observed: &stream::Config) -> Vec<FieldDiff> {
        let mut d = FieldDiffs::default();
        let mut cmp = |field, want, have, change| d.compare(field, want, have, change);
        let mut want_subjects = self.subjects.clone();
        want_subjects.sort();
        let mut have_subjects = observed.subjects.clone();
        have_subjects.sort();
        cmp(
            "subjects",
            format!("{want_subjects:?}"),
            format!("{have_subjects:?}"),
            Change::InPlace,
        );
        // Limits <-> interest changes in place (nats-server >= 2.10; `check_server` refuses
        // it on older ones); to or from work queue never does.
        let workqueue = stream::RetentionPolicy::WorkQueue;
        cmp(
            "retention_policy",
            format!("{:?}", self.retention),
            format!("{:?}", observed.retention),
            if self.retention == workqueue || observed.retention == workqueue {
                Change::Replace
            } else {
                Change::InPlace
            },
        );
        cmp(
            "storage",
            format!("{:?}", self.storage),
            format!("{:?}", observed.storage),
            Change::Replace,
        );
        cmp(
            "num_replicas",
            self.replicas.to_string(),
            observed.num_replicas.max(1).to_string(),
            Change::InPlace,
        );
        cmp(
            "max_bytes",
            self.max_bytes.to_string(),
            limit(observed.max_bytes).to_string(),
            Change::InPlace,
        );
        cmp(
            "max_msgs",
            self.max_msgs.to_string(),
            limit(observed.max_messages).to_string(),
            Change::InPlace,
        );
        cmp(
            "max_msgs_per_subject",
            self.max_msgs_per_subject.to_string(),
            limit(observed.max_messages_per_subject).to_string(),
            Change::InPlace,
        );
        cmp(
            "max_msg_size",
            self.max_msg_size.to_string(),
            (if observed.max_message_size == 0 {
                -1
            } else {
                observed.max_message_size
            })
            .to_string(),
            Change::InPlace,
        );
        cmp(
            "max_age",
            format!("{:?}", self.max_age),
            format!("{:?}", observed.max_age),
            Change::InPlace,
        );
        cmp(
            "discard",
            format!("{:?}", self.discard),
            format!("{:?}", observed.discard),
            Change::InPlace,
        );
        if let Some(w) = self.duplicate_window {
            cmp(
                "duplicate_window",
                format!("{w:?}"),
                format!("{:?}", observed.duplicate_window),
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
        let have = settings::stream_to_json(observed);
        for (field, want, have, in_place) in settings::diff(settings::STREAM, &self.settings, &have)
        {
            d.compare(field, want, have, Change::of(in_place));
        }
        d.0
    }

    /// What the broker's release (`server`, its reported version) cannot do for this spec: a
    /// setting newer than it, or (before 2.10) a retention change in place. One line each.
    pub fn check_server(
        &self,
        observed: Option<&stream::Config>,
        server: &str,
    ) -> Result<(), NatsError> {
        let what = format!("stream {:?}", self.name);
        settings::too_old(settings::STREAM, &self.settings, &what, server)?;
        let Some(o) = observed else {
            return Ok(());
        };
        let changed: Vec<&str> = self.diff(o).iter().map(|d| d.field).collect();
        let late = if changed.contains(&"retention_policy") && !retention_in_place(server) {
            Some(("retention_policy", settings::RETENTION_IN_PLACE_SINCE))
        } else {
            settings::needs_newer_to_change(settings::STREAM, &changed, server)
        };
        match late {
            Some((field, (major, minor))) => Err(NatsError::NotInPlace {
                op: "update stream",
                detail: format!(
                    "{what}: {field} changes in place from nats-server {major}.{minor} on; the broker runs {server}; {}",
                    Change::Replace.remedy()
                ),
            }),
            None => Ok(()),
        }
    }

    /// Creates the stream or updates it in place; sends nothing when it already matches.
    pub async fn ensure(&self, conn: &NatsConn) -> Result<EnsureOutcome, NatsError> {
        let what = format!("stream {:?}", self.name);
        let observed = fetch_stream_config(conn, &self.name).await?;
        self.check_server(observed.as_ref(), &server_version(conn))?;
        let Some(observed) = observed else {
            conn.js
                .create_stream(self.to_nats())
                .await
                .map_err(|e| lift_create("create stream", &what, e))?;
            return Ok(EnsureOutcome::Created);
        };
        let Some(fields) = in_place_fields("update stream", &what, self.diff(&observed), |d| {
            d.change.remedy().to_string()
        })?
        else {
            return Ok(EnsureOutcome::Unchanged);
        };
        conn.js
            .update_stream(overlay(self, observed))
            .await
            .map_err(|e| lift_create("update stream", &what, e))?;
        Ok(EnsureOutcome::Updated(fields))
    }
}

/// Settings the config does not manage (sources, mirrors, metadata, ...) are kept, so an
/// update never undoes what an operator set out of band. The managed fields of `spec` written over the server's current config.
pub fn overlay(spec: &StreamSpec, mut c: stream::Config) -> stream::Config {
    let want = spec.to_nats();
    c.subjects = want.subjects;
    c.num_replicas = want.num_replicas;
    c.max_bytes = want.max_bytes;
    c.max_messages = want.max_messages;
    c.max_messages_per_subject = want.max_messages_per_subject;
    c.max_message_size = want.max_message_size;
    c.max_age = want.max_age;
    c.discard = want.discard;
    if spec.duplicate_window.is_some() {
        c.duplicate_window = want.duplicate_window;
    }
    if spec.description.is_some() {
        c.description = want.description;
    }
    if matches!(
        (c.retention, want.retention),
        (
            stream::RetentionPolicy::Limits | stream::RetentionPolicy::Interest,
            stream::RetentionPolicy::Limits | stream::RetentionPolicy::Interest
        )
    ) {
        c.retention = want.retention;
    }
    let _ = settings::stream_from_json(&mut c, &spec.settings);
    c
}

/// The reported release of the server `conn` talks to ("" before the first connect).
pub fn server_version(conn: &NatsConn) -> String {
    conn.client.server_info().version
}

/// Whether a server of this release changes retention limits <-> interest in place.
pub fn retention_in_place(server: &str) -> bool {
    settings::parse_version(server).is_none_or(|v| v >= settings::RETENTION_IN_PLACE_SINCE)
}

/// The server's config of a stream, or `None` when it does not exist.
pub async fn fetch_stream_config(
    conn: &NatsConn,
    name: &str,
) -> Result<Option<stream::Config>, NatsError> {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    match conn.js.get_stream(name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| NatsError::other("stream info", e))?;
            Ok(Some(info.config.clone()))
        }
        Err(e) => match e.kind() {
            K::JetStream(api) if api.error_code() == crate::nats::error::STREAM_NOT_FOUND => {
                Ok(None)
            }
            K::JetStream(api) => Err(lift_api("get stream", &format!("stream {name:?}"), &api)),
            _ => Err(NatsError::other("get stream", e)),
        },
    }
}

fn lift_create(
    op: &'static str,
    what: &str,
    e: async_nats::jetstream::context::CreateStreamError,
) -> NatsError {
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::JetStream(api) => lift_api(op, what, &api),
        K::TimedOut => NatsError::TimedOut {
            op,
            after: Duration::ZERO,
        },
        _ => NatsError::other(op, e),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    InPlace,
    Replace,
    Refused,
}

impl Change {
    /// In place, or else a replace.
    pub fn of(in_place: bool) -> Change {
        if in_place {
            Change::InPlace
        } else {
            Change::Replace
        }
    }

    pub fn remedy(self) -> &'static str {
        match self {
            Change::InPlace => "",
            Change::Replace => {
                "delete and recreate the resource (its messages are lost) or keep the old value"
            }
            Change::Refused => {
                "the server never allows this change; create a new stream under another name"
            }
        }
    }
}

/// Collects the fields whose desired and observed values differ.
#[derive(Default)]
pub struct FieldDiffs(pub Vec<FieldDiff>);

impl FieldDiffs {
    pub fn compare(&mut self, field: &'static str, want: String, have: String, change: Change) {
        if want != have {
            self.0.push(FieldDiff {
                field,
                want,
                have,
                change,
            });
        }
    }
}

/// The one rule of every ensure: no difference means nothing to send; a difference the server
/// cannot apply in place is refused naming the field and the remedy; otherwise the changed
/// fields are updated in place (`Some(fields)`).
pub fn in_place_fields(
    op: &'static str,
    what: &str,
    diffs: Vec<FieldDiff>,
    remedy: impl Fn(&FieldDiff) -> String,
) -> Result<Option<Vec<&'static str>>, NatsError> {
    if diffs.is_empty() {
        return Ok(None);
    }
    if let Some(bad) = diffs.iter().find(|d| d.change != Change::InPlace) {
        return Err(NatsError::NotInPlace {
            op,
            detail: format!(
                "{what}: {} cannot change in place (server has {}, config wants {}); {}",
                bad.field,
                bad.have,
                bad.want,
                remedy(bad)
            ),
        });
    }
    Ok(Some(diffs.into_iter().map(|d| d.field).collect()))
}

#[derive(Clone, Debug, PartialEq)]
pub struct FieldDiff {
    pub field: &'static str,
    pub want: String,
    pub have: String,
    pub change: Change,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EnsureOutcome {
    Created,
    Updated(Vec<&'static str>),
    Unchanged,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_partitions_are_refused_for_nats_and_pgchannel_streams() {
        let c = StreamConfig {
            name: "orders".into(),
            subjects: vec!["orders.>".into()],
            partitions: 3,
            ..Default::default()
        };
        let e = StreamSpec::validate("eventbus.stream", "orders", &c).unwrap_err();
        assert_eq!(
            e.problems,
            vec!["config.partitions: applies to provider kafka only (a topic's partition count)"]
        );
    }
}
