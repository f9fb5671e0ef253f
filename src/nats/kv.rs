//! `infra.eventbus.kv` / `eventbus.kv`: a JetStream key-value bucket, and what may reach one.
//!
//! The server keeps a bucket as the stream `KV_<bucket>` (subjects `$KV.<bucket>.>`), so a
//! bucket's spec is a `StreamSpec` built by one conversion (`KvSpec::validate`): every bucket
//! setting is one stream setting, planned in place or by replace exactly as that stream setting
//! is. Only names differ: the bucket vocabulary (`history`, `ttl`, ...) is mapped onto the
//! stream's (`max_msgs_per_subject`, `max_age`, ...) by one table, `FIELDS`.
//!
//! Keys are checked here before any subject is built from them: a key is one or more
//! dot-separated tokens of `[-/_=a-zA-Z0-9]`, so a key can never carry a wildcard, whitespace,
//! a line break or an empty token, and the subject `$KV.<bucket>.<key>` stays inside its bucket.

use crate::config::error::{duration, negative, ConfigError, Problems};
use crate::nats::settings::{self, Setting};
use crate::nats::stream::StreamSpec;
use crate::nats::NatsError;
use crate::pb::eventbus::{
    DiscardPolicy, KvBucketConfig, ObjectStoreConfig, StreamCompression, StreamConfig, StreamSource,
};
use crate::secret::quote;
use async_nats::jetstream::stream;
use serde_json::{Map, Value as Json};

/// The most values a bucket keeps per key (the server's limit).
pub const MAX_HISTORY: i32 = 64;
/// The longest key accepted: with `$KV.<bucket>.` in front it stays far below the subject bound.
pub const MAX_KEY_LEN: usize = 512;

/// (bucket setting, stream setting): the one mapping between a key-value bucket's settings and
/// its stream's.
pub const FIELDS: &[(&str, &str)] = &[
    ("bucket", "name"),
    ("description", "description"),
    ("history", "max_msgs_per_subject"),
    ("ttl", "max_age"),
    ("max_value_size", "max_msg_size"),
    ("max_bucket_size", "max_bytes"),
    ("storage", "storage"),
    ("num_replicas", "num_replicas"),
    ("compression", "compression"),
    ("placement", "placement"),
    ("mirror", "mirror"),
    ("sources", "sources"),
    ("republish", "republish"),
    ("limit_marker_ttl", "subject_delete_marker_ttl"),
];

/// The same mapping for an object store's settings.
pub const OBJ_FIELDS: &[(&str, &str)] = &[
    ("bucket", "name"),
    ("description", "description"),
    ("ttl", "max_age"),
    ("max_bucket_size", "max_bytes"),
    ("storage", "storage"),
    ("num_replicas", "num_replicas"),
    ("compression", "compression"),
    ("placement", "placement"),
];

/// How one kind of bucket (key-value or object store) is kept as a stream: the stream name's
/// prefix, the stream settings its own settings are, and what every such stream has.
#[derive(Debug)]
pub struct Vocab {
    pub prefix: &'static str,
    pub fields: &'static [(&'static str, &'static str)],
    /// The stream flags every bucket of this kind has set.
    pub fixed: &'static [&'static str],
    pub subjects: fn(&str) -> Vec<String>,
}

pub static KV: Vocab = Vocab {
    prefix: "KV_",
    fields: FIELDS,
    fixed: &["deny_delete", "allow_rollup_hdrs", "allow_direct"],
    subjects: |b| vec![format!("$KV.{b}.>")],
};

pub static OBJ: Vocab = Vocab {
    prefix: "OBJ_",
    fields: OBJ_FIELDS,
    fixed: &["allow_rollup_hdrs", "allow_direct"],
    subjects: |b| vec![format!("$O.{b}.C.>"), format!("$O.{b}.M.>")],
};

impl PartialEq for Vocab {
    fn eq(&self, other: &Vocab) -> bool {
        self.prefix == other.prefix
    }
}

impl Vocab {
    /// The bucket setting a stream setting shows as (`allow_msg_ttl` is `limit_marker_ttl`'s
    /// switch); the stream name when it is no bucket setting.
    pub fn bucket_field<'a>(&self, stream_field: &'a str) -> &'a str {
        if stream_field == "allow_msg_ttl" {
            return "limit_marker_ttl";
        }
        self.fields
            .iter()
            .find(|(_, s)| *s == stream_field)
            .map_or(stream_field, |(k, _)| k)
    }

    /// The stream setting a bucket setting is.
    pub fn stream_field<'a>(&self, bucket_field: &'a str) -> &'a str {
        self.fields
            .iter()
            .find(|(k, _)| *k == bucket_field)
            .map_or(bucket_field, |(_, s)| s)
    }

    /// The stream that holds bucket `bucket`.
    pub fn stream_name(&self, bucket: &str) -> String {
        format!("{}{bucket}", self.prefix)
    }

    /// The bucket a stream holds, when it is such a bucket's stream.
    pub fn bucket_of<'a>(&self, stream: &'a str) -> Option<&'a str> {
        stream
            .strip_prefix(self.prefix)
            .filter(|b| check_bucket(b).is_ok())
    }
}

/// The stream that holds key-value bucket `bucket`.
pub fn stream_name(bucket: &str) -> String {
    KV.stream_name(bucket)
}

/// The key-value bucket a stream holds, when it is one's.
pub fn bucket_of(stream: &str) -> Option<&str> {
    KV.bucket_of(stream)
}

/// A bucket name: 1 to 64 of `[A-Za-z0-9_-]` (the stream name is `KV_` + it).
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("is required".into());
    }
    if bucket.len() > 64 {
        return Err(format!("{} is longer than 64 bytes", quote(bucket)));
    }
    if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(format!(
            "{} contains {c:?}; bucket names are letters, digits, '_' and '-' (e.g. sessions)",
            quote(bucket)
        ));
    }
    Ok(())
}

/// A key (`wildcards` false) or a key filter (`wildcards` true: `*` as a whole token, `>` as the
/// last one): dot-separated non-empty tokens of `[-/_=a-zA-Z0-9]`, at most [`MAX_KEY_LEN`] bytes.
fn check_key_tokens(key: &str, wildcards: bool) -> Result<(), String> {
    if key.is_empty() {
        return Err("is required".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "{} is {} bytes long; keys are limited to {MAX_KEY_LEN} bytes",
            quote(key),
            key.len()
        ));
    }
    let mut tokens = key.split('.').peekable();
    while let Some(tok) = tokens.next() {
        if tok.is_empty() {
            return Err(format!(
                "{} has an empty token (no leading, trailing or double dots)",
                quote(key)
            ));
        }
        if wildcards && (tok == "*" || (tok == ">" && tokens.peek().is_none())) {
            continue;
        }
        if let Some(c) = tok
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=')))
        {
            let what = if wildcards {
                "key filters are tokens of letters, digits, '-', '/', '_' and '=' joined by '.', with '*' as a token and '>' as the last"
            } else {
                "keys are letters, digits, '-', '/', '_' and '=' joined by '.' (no wildcards, whitespace or control characters)"
            };
            return Err(format!("{} contains {c:?}; {what}", quote(key)));
        }
    }
    Ok(())
}

pub fn check_key(key: &str) -> Result<(), String> {
    check_key_tokens(key, false)
}

pub fn check_key_filter(filter: &str) -> Result<(), String> {
    check_key_tokens(filter, true)
}

/// A validated bucket: its name, and the stream the server keeps it as.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    pub vocab: &'static Vocab,
    pub bucket: String,
    pub stream: StreamSpec,
    /// The bucket settings the config sets beyond the limits (`KV_SETTINGS` keys), for the
    /// server-release checks, in bucket vocabulary.
    pub settings: settings::Settings,
}

/// Bucket settings newer than nats-server 2.9, and how a change applies (as the stream
/// settings they are: `settings::STREAM`).
pub const KV_SETTINGS: &[Setting] = &[
    Setting {
        key: "compression",
        since: Some((2, 10)),
        change: |_, _| true,
        in_place_since: None,
    },
    Setting {
        key: "republish",
        since: None,
        change: |_, _| true,
        in_place_since: Some((2, 10)),
    },
    Setting {
        key: "limit_marker_ttl",
        since: Some((2, 11)),
        change: |_, _| true,
        in_place_since: None,
    },
];

fn kv_source(s: &StreamSource) -> StreamSource {
    let mut s = s.clone();
    if !s.name.starts_with("KV_") {
        s.name = stream_name(&s.name);
    }
    s
}

impl KvSpec {
    pub fn validate(
        type_name: &str,
        module: &str,
        c: &KvBucketConfig,
    ) -> Result<KvSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check("bucket", check_bucket(&c.bucket));
        if !(0..=MAX_HISTORY).contains(&c.history) {
            p.field(
                "history",
                format!(
                    "{} is out of range (1..={MAX_HISTORY}; 0 means 1)",
                    c.history
                ),
            );
        }
        if c.max_value_size < -1 {
            p.field(
                "max_value_size",
                "must be -1 or 0 (unlimited) or a byte count",
            );
        }
        if c.max_bucket_size < -1 {
            p.field(
                "max_bucket_size",
                "must be -1 or 0 (unlimited) or a byte count",
            );
        }
        for (field, d) in [("ttl", &c.ttl), ("limit_marker_ttl", &c.limit_marker_ttl)] {
            if negative(d) {
                p.field(field, "must not be negative");
            }
        }
        if c.mirror.is_some() && !c.sources.is_empty() {
            p.field(
                "sources",
                "must be empty on a mirror (set mirror or sources)",
            );
        }
        if c.limit_marker_ttl.is_some()
            && duration(&c.limit_marker_ttl).is_some_and(|d| d < std::time::Duration::from_secs(1))
        {
            p.field("limit_marker_ttl", "must be at least 1s");
        }
        let copied = c.mirror.is_some() || !c.sources.is_empty();
        let stream_cfg = StreamConfig {
            name: stream_name(&c.bucket),
            subjects: if copied {
                Vec::new()
            } else {
                vec![format!("$KV.{}.>", c.bucket)]
            },
            num_replicas: c.num_replicas,
            max_bytes: c.max_bucket_size,
            max_age: c.ttl,
            storage: c.storage,
            max_msgs_per_subject: c.history.max(1) as i64,
            max_msg_size: c.max_value_size,
            discard: DiscardPolicy::New as i32,
            description: c.description.clone(),
            broker_ref: c.broker_ref.clone(),
            servers: c.servers.clone(),
            prevent_destroy: c.prevent_destroy,
            mirror: c.mirror.as_ref().map(kv_source),
            sources: c.sources.iter().map(kv_source).collect(),
            republish: c.republish.clone(),
            compression: match c.compression {
                Some(true) => StreamCompression::S2 as i32,
                Some(false) => StreamCompression::None as i32,
                None => StreamCompression::Unspecified as i32,
            },
            placement: c.placement.clone(),
            deny_delete: Some(true),
            allow_rollup_hdrs: Some(true),
            allow_direct: Some(true),
            mirror_direct: c.mirror.is_some().then_some(true),
            allow_msg_ttl: c.limit_marker_ttl.is_some().then_some(true),
            subject_delete_marker_ttl: c.limit_marker_ttl,
            ..Default::default()
        };
        let mut kv_settings = Map::new();
        if let Some(on) = c.compression {
            kv_settings.insert("compression".into(), Json::Bool(on));
        }
        if c.republish.is_some() {
            kv_settings.insert("republish".into(), Json::Bool(true));
        }
        if c.limit_marker_ttl.is_some() {
            kv_settings.insert("limit_marker_ttl".into(), Json::Bool(true));
        }
        if !p.is_empty() {
            return Err(p.into_error());
        }
        // What is left to fail is in the copied settings (mirror, sources, republish,
        // placement), under their own names; errors name this resource.
        let stream = StreamSpec::validate(type_name, module, &stream_cfg)?;
        p.finish(KvSpec {
            vocab: &KV,
            bucket: c.bucket.clone(),
            stream,
            settings: kv_settings,
        })
    }

    /// An object store: the stream `OBJ_<bucket>` with its chunk and meta subjects.
    pub fn validate_object_store(
        type_name: &str,
        module: &str,
        c: &ObjectStoreConfig,
    ) -> Result<KvSpec, ConfigError> {
        let mut p = Problems::new(type_name, module);
        p.check("bucket", check_bucket(&c.bucket));
        if c.max_bucket_size < -1 {
            p.field(
                "max_bucket_size",
                "must be -1 or 0 (unlimited) or a byte count",
            );
        }
        if negative(&c.ttl) {
            p.field("ttl", "must not be negative");
        }
        if !p.is_empty() {
            return Err(p.into_error());
        }
        let stream_cfg = StreamConfig {
            name: OBJ.stream_name(&c.bucket),
            subjects: (OBJ.subjects)(&c.bucket),
            num_replicas: c.num_replicas,
            max_bytes: c.max_bucket_size,
            max_age: c.ttl,
            storage: c.storage,
            discard: DiscardPolicy::New as i32,
            description: c.description.clone(),
            broker_ref: c.broker_ref.clone(),
            servers: c.servers.clone(),
            prevent_destroy: c.prevent_destroy,
            compression: match c.compression {
                Some(true) => StreamCompression::S2 as i32,
                Some(false) => StreamCompression::None as i32,
                None => StreamCompression::Unspecified as i32,
            },
            placement: c.placement.clone(),
            allow_rollup_hdrs: Some(true),
            allow_direct: Some(true),
            ..Default::default()
        };
        let mut settings = Map::new();
        if let Some(on) = c.compression {
            settings.insert("compression".into(), Json::Bool(on));
        }
        let stream = StreamSpec::validate(type_name, module, &stream_cfg)?;
        p.finish(KvSpec {
            vocab: &OBJ,
            bucket: c.bucket.clone(),
            stream,
            settings,
        })
    }

    /// The settings this bucket uses that the server (version `server`) is too old for, or
    /// changes it cannot make in place there (`changed`: stream fields an update changes).
    pub fn check_server(&self, changed: &[&str], server: &str) -> Result<(), NatsError> {
        let what = format!("bucket {:?}", self.bucket);
        settings::too_old(KV_SETTINGS, &self.settings, &what, server)?;
        let changed: Vec<&str> = changed.iter().map(|f| self.vocab.bucket_field(f)).collect();
        if let Some((field, (major, minor))) =
            settings::needs_newer_to_change(KV_SETTINGS, &changed, server)
        {
            return Err(NatsError::NotInPlace {
                op: "update bucket",
                detail: format!(
                    "{what}: {field} changes in place from nats-server {major}.{minor} on; the broker runs {server}; delete and recreate the bucket (its keys go with it)"
                ),
            });
        }
        Ok(())
    }
}

impl Vocab {
    /// A stream's outputs (stream vocabulary, `drivers::stream::to_outputs`) as a bucket's.
    pub fn outputs_from_stream(&self, o: &Json) -> Json {
        let mut out = Map::new();
        for (field, st) in self.fields {
            let v = o.get(*st).cloned().unwrap_or(Json::Null);
            let v = match *field {
                "bucket" => Json::String(
                    v.as_str()
                        .map(|s| s.strip_prefix(self.prefix).unwrap_or(s).to_string())
                        .unwrap_or_default(),
                ),
                "compression" => Json::Bool(v.as_str() == Some("STREAM_COMPRESSION_S2")),
                "limit_marker_ttl" if o.get("allow_msg_ttl") != Some(&Json::Bool(true)) => {
                    Json::Null
                }
                _ => v,
            };
            out.insert(field.to_string(), v);
        }
        for k in ["broker", "broker_ref", "prevent_destroy", "bind"] {
            if let Some(v) = o.get(k) {
                out.insert(k.to_string(), v.clone());
            }
        }
        Json::Object(out)
    }

    /// A bucket's outputs back in the stream's vocabulary (what the stream diff reads).
    pub fn outputs_to_stream(&self, o: &Json) -> Json {
        let mut out = Map::new();
        for (field, st) in self.fields {
            let Some(v) = o.get(*field) else { continue };
            let v = match *field {
                "bucket" => Json::String(self.stream_name(v.as_str().unwrap_or_default())),
                "compression" => Json::String(
                    if v.as_bool() == Some(true) {
                        "STREAM_COMPRESSION_S2"
                    } else {
                        "STREAM_COMPRESSION_NONE"
                    }
                    .into(),
                ),
                "limit_marker_ttl" => {
                    out.insert("allow_msg_ttl".into(), Json::Bool(!v.is_null()));
                    v.clone()
                }
                _ => v.clone(),
            };
            out.insert(st.to_string(), v);
        }
        for k in ["broker", "broker_ref", "prevent_destroy", "bind"] {
            if let Some(v) = o.get(k) {
                out.insert(k.to_string(), v.clone());
            }
        }
        // What every such bucket's stream has, as the stream diff compares it.
        out.insert("discard".into(), Json::String("DISCARD_POLICY_NEW".into()));
        for k in self.fixed {
            out.insert(k.to_string(), Json::Bool(true));
        }
        if let Some(b) = o.get("bucket").and_then(Json::as_str) {
            let set = |k: &str| !o.get(k).is_none_or(Json::is_null);
            let copied = set("mirror")
                || o.get("sources")
                    .and_then(Json::as_array)
                    .is_some_and(|s| !s.is_empty());
            if !copied {
                out.insert("subjects".into(), serde_json::json!((self.subjects)(b)));
            }
            if set("mirror") {
                out.insert("mirror_direct".into(), Json::Bool(true));
            }
        }
        Json::Object(out)
    }

    /// Whether a stream config is this kind of bucket's (as `enumerate` tells them from streams).
    pub fn is_bucket_stream(&self, c: &stream::Config) -> bool {
        self.bucket_of(&c.name).is_some()
            && (self.prefix != "KV_" || c.max_messages_per_subject >= 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_leave_their_bucket() {
        for ok in ["a", "orders.1", "a/b=c_d-e", "A.B.C"] {
            assert!(check_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a.*",
            ">",
            "a b",
            "a\r\nPUB x",
            "a\0",
            "$JS.API.STREAM.DELETE.X",
            "a.>",
            "ü",
            "a\tb",
        ] {
            let e = check_key(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(check_key(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_key_filter("orders.*").is_ok());
        assert!(check_key_filter("orders.>").is_ok());
        assert!(check_key_filter(">").is_ok());
        assert!(check_key_filter("a.>.b").is_err());
        assert!(check_key_filter("a..b").is_err());
        assert!(check_key_filter("a*").is_err());
    }

    #[test]
    fn bucket_names_are_checked() {
        assert!(check_bucket("sessions_1-a").is_ok());
        for bad in ["", "a.b", "a b", "a>", "KV/x", "ü"] {
            assert!(check_bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_is_the_stream_the_server_makes_of_it() {
        let c = KvBucketConfig {
            bucket: "cache".into(),
            history: 5,
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            max_value_size: 1024,
            ..Default::default()
        };
        let s = KvSpec::validate("infra.eventbus.kv", "cache", &c).unwrap();
        let n = s.stream.to_nats();
        assert_eq!(n.name, "KV_cache");
        assert_eq!(n.subjects, vec!["$KV.cache.>".to_string()]);
        assert_eq!(n.max_messages_per_subject, 5);
        assert_eq!(n.max_message_size, 1024);
        assert!(n.deny_delete && n.allow_rollup && n.allow_direct);
        assert_eq!(n.discard, stream::DiscardPolicy::New);
        let e = KvSpec::validate(
            "infra.eventbus.kv",
            "x",
            &KvBucketConfig {
                bucket: "a.b".into(),
                history: 65,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bucket") && e.contains("history"), "{e}");
    }

    #[test]
    fn outputs_round_trip_between_vocabularies() {
        let o = serde_json::json!({
            "name": "KV_cache", "max_msgs_per_subject": 5, "max_age": "60s", "max_msg_size": 10,
            "max_bytes": -1, "storage": "STORAGE_TYPE_FILE", "num_replicas": 1, "description": "",
            "compression": "STREAM_COMPRESSION_S2", "placement": null, "mirror": null, "sources": [],
            "republish": null, "subject_delete_marker_ttl": null, "broker": "bus"
        });
        let kv = KV.outputs_from_stream(&o);
        assert_eq!(kv["bucket"], "cache");
        assert_eq!(kv["history"], 5);
        assert_eq!(kv["compression"], true);
        let back = KV.outputs_to_stream(&kv);
        for k in [
            "name",
            "max_msgs_per_subject",
            "max_age",
            "compression",
            "broker",
        ] {
            assert_eq!(back[k], o[k], "{k}");
        }
    }
}

/// One key-value operation of `step.eventbus.kv`, checked (`KvOp::parse`) before it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvAction {
    Get,
    Put,
    Create,
    Delete,
    Purge,
    Keys,
}

impl KvAction {
    pub const NAMES: &'static str = "get, put, create, delete, purge or keys";
    pub fn parse(s: &str) -> Option<KvAction> {
        Some(match s {
            "get" => KvAction::Get,
            "put" => KvAction::Put,
            "create" => KvAction::Create,
            "delete" => KvAction::Delete,
            "purge" => KvAction::Purge,
            "keys" => KvAction::Keys,
            _ => return None,
        })
    }
}

/// What an operation found or did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvOutcome {
    pub found: bool,
    pub value: Vec<u8>,
    pub revision: u64,
    pub operation: &'static str,
    /// RFC 3339 time of the entry (get).
    pub created: Option<time::OffsetDateTime>,
    pub keys: Vec<String>,
}

/// The most keys one `keys` operation returns.
pub const MAX_KEYS: usize = 10_000;

fn op_name(o: async_nats::jetstream::kv::Operation) -> &'static str {
    use async_nats::jetstream::kv::Operation as O;
    match o {
        O::Put => "PUT",
        O::Delete => "DEL",
        O::Purge => "PURGE",
    }
}

/// Runs one checked operation (bucket and key already passed `check_bucket`/`check_key`, the
/// filter `check_key_filter`); `expected` 0 means any revision.
pub async fn run(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    action: KvAction,
    key: &str,
    value: Vec<u8>,
    expected: u64,
    filter: &str,
) -> Result<KvOutcome, NatsError> {
    use async_nats::jetstream::context::KeyValueErrorKind;
    use async_nats::jetstream::kv::UpdateErrorKind;
    use futures::TryStreamExt;
    let store = js.get_key_value(bucket).await.map_err(|e| match e.kind() {
        KeyValueErrorKind::GetBucket => NatsError::NotFound {
            what: format!("bucket {bucket:?}"),
        },
        _ => NatsError::other("open bucket", e),
    })?;
    if matches!(action, KvAction::Put | KvAction::Create) {
        // Put with an expected revision and create (revision 0) send it as a header.
        let rev = match action {
            KvAction::Put if expected == 0 => None,
            KvAction::Put => Some(expected),
            _ => Some(0),
        };
        check_value_fits(&store, js.client().max_payload(), bucket, rev, value.len())?;
    }
    let conflict = |op: &'static str| {
        NatsError::Rejected {
        op,
        code: 10071,
        detail: format!(
            "key {key:?} of bucket {bucket:?} is no longer at revision {expected} (someone wrote it since); get it again and retry with its current revision"
        ),
    }
    };
    let mut out = KvOutcome::default();
    match action {
        KvAction::Get => {
            if let Some(e) = store
                .entry(key)
                .await
                .map_err(|e| NatsError::other("get key", e))?
            {
                out.operation = op_name(e.operation);
                out.found = e.operation == async_nats::jetstream::kv::Operation::Put;
                out.revision = e.revision;
                out.created = Some(e.created);
                if out.found {
                    out.value = e.value.to_vec();
                }
            }
        }
        KvAction::Put if expected > 0 => {
            out.revision = store
                .update(key, value.into(), expected)
                .await
                .map_err(|e| match e.kind() {
                    UpdateErrorKind::WrongLastRevision => conflict("put key"),
                    _ => NatsError::other("put key", e),
                })?;
        }
        KvAction::Put => {
            out.revision = store
                .put(key, value.into())
                .await
                .map_err(|e| NatsError::other("put key", e))?;
        }
        KvAction::Create => {
            use async_nats::jetstream::kv::CreateErrorKind;
            out.revision = store
                .create(key, value.into())
                .await
                .map_err(|e| match e.kind() {
                    CreateErrorKind::AlreadyExists => NatsError::AlreadyExists {
                        what: format!("key {key:?} of bucket {bucket:?} (create only writes a key that holds no value; use put)"),
                    },
                    _ => NatsError::other("create key", e),
                })?;
        }
        KvAction::Delete | KvAction::Purge => {
            let rev = (expected > 0).then_some(expected);
            let (op, r) = if action == KvAction::Delete {
                ("delete key", store.delete_expect_revision(key, rev).await)
            } else {
                ("purge key", store.purge_expect_revision(key, rev).await)
            };
            r.map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => conflict(op),
                _ => NatsError::other(op, e),
            })?;
        }
        KvAction::Keys => {
            let keys = store
                .keys()
                .await
                .map_err(|e| NatsError::other("list keys", e))?;
            let mut keys = keys.map_err(|e| NatsError::other("list keys", e));
            while let Some(k) = keys.try_next().await? {
                if filter.is_empty() || filter == ">" || matches_filter(filter, &k) {
                    out.keys.push(k);
                    if out.keys.len() >= MAX_KEYS {
                        break;
                    }
                }
            }
            out.keys.sort();
        }
    }
    Ok(out)
}

/// Refuses a value its bucket (`max_value_size`) or the server (`max_payload`) would refuse,
/// before it is sent, counted as the server counts it: the value plus the header block the
/// operation sends with it (the expected revision of a put or create).
fn check_value_fits(
    store: &async_nats::jetstream::kv::Store,
    max_payload: usize,
    bucket: &str,
    revision: Option<u64>,
    value: usize,
) -> Result<(), NatsError> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(rev) = revision {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            rev.to_string().as_str(),
        );
    }
    let what = "value (plus the expected-revision header put and create send)";
    super::wire::check_fits(what, &headers, value, max_payload)?;
    let size = super::wire::headers_len(&headers) + value;
    let limit = store.stream.cached_info().config.max_message_size;
    if limit > 0 && size > limit as usize {
        return Err(NatsError::OverLimit {
            what: what.into(),
            size,
            limit: limit as usize,
            limit_name: format!("bucket {bucket:?}'s max_value_size"),
        });
    }
    Ok(())
}

/// Whether `key` matches a key filter (`*` one token, `>` the rest).
pub fn matches_filter(filter: &str, key: &str) -> bool {
    let mut k = key.split('.');
    for f in filter.split('.') {
        match (f, k.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    k.next().is_none()
}
