//! The JetStream settings beyond the Go plugin's (mirror, sources, republish, metadata, pull
//! limits, priority groups, ...), for streams and consumers alike: one table per resource with
//! each setting's config key, the nats-server release that brought it, and how the server
//! takes a change; and the one conversion between the config's vocabulary (JSON with the
//! config's key names, enum names, `"30s"` durations, RFC 3339 times) and async-nats' types.
//!
//! A spec keeps the settings its config sets as a JSON object in that vocabulary
//! (`Settings`); IaC outputs carry every setting in the same form, so the diff, drift and
//! import compare one representation.

use crate::nats::NatsError;
use async_nats::jetstream::{consumer, stream};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::time::Duration;

/// The settings a config sets, canonical (what `*_to_json` would write for the same values).
pub type Settings = Map<String, Json>;

/// Whether the server takes a change of one setting in place (else the resource is replaced),
/// given (want, have) in config vocabulary.
type Classify = fn(&Json, &Json) -> bool;

pub struct Setting {
    pub key: &'static str,
    /// The first nats-server release that honours it; `None`: every release we support (2.9+).
    pub since: Option<(u64, u64)>,
    pub change: Classify,
    /// An in-place change needs this release (older ones refuse it: a replace there).
    pub in_place_since: Option<(u64, u64)>,
}

fn in_place(_: &Json, _: &Json) -> bool {
    true
}

fn replace(_: &Json, _: &Json) -> bool {
    false
}

/// Settable in place, never cleared: the server refuses true -> false.
fn one_way(want: &Json, have: &Json) -> bool {
    !(have.as_bool() == Some(true) && want.as_bool() != Some(true))
}

const V2_10: Option<(u64, u64)> = Some((2, 10));
const V2_11: Option<(u64, u64)> = Some((2, 11));

const fn s(key: &'static str, since: Option<(u64, u64)>, change: Classify) -> Setting {
    Setting {
        key,
        since,
        change,
        in_place_since: None,
    }
}

/// A setting older releases only take at creation.
const fn later(key: &'static str, version: (u64, u64)) -> Setting {
    Setting {
        key,
        since: None,
        change: in_place,
        in_place_since: Some(version),
    }
}

/// Stream settings, as nats-server's stream update check treats them.
pub const STREAM: &[Setting] = &[
    // A mirror is fixed at creation (removing it promotes the mirror, but an unset mirror is
    // left alone here, so only a changed one is ever planned).
    s("mirror", None, replace),
    s("sources", None, in_place),
    s("subject_transform", V2_10, in_place),
    later("republish", (2, 10)),
    s("compression", V2_10, in_place),
    s("placement", None, in_place),
    s("metadata", V2_10, in_place),
    s("deny_delete", None, one_way),
    s("deny_purge", None, one_way),
    s("allow_rollup_hdrs", None, in_place),
    s("allow_direct", None, in_place),
    // The server keeps a mirror's direct get as created (it follows the origin's allow_direct);
    // an update that changes it is accepted and ignored.
    s("mirror_direct", None, replace),
    s("discard_new_per_subject", None, in_place),
    // Refused before nats-server 2.14 ("can not change MaxConsumers").
    later("max_consumers", (2, 14)),
    s("consumer_limits", V2_10, in_place),
    s("allow_msg_ttl", V2_11, one_way),
    s("subject_delete_marker_ttl", V2_11, in_place),
];

/// Consumer settings, as nats-server's consumer update check treats them.
pub const CONSUMER: &[Setting] = &[
    s("metadata", V2_10, in_place),
    s("replay_policy", None, replace),
    s("sample_freq", None, in_place),
    s("headers_only", None, in_place),
    s("inactive_threshold", None, in_place),
    s("num_replicas", None, in_place),
    s("mem_storage", None, replace),
    s("max_waiting", None, replace),
    s("max_batch", None, in_place),
    s("max_expires", None, in_place),
    s("max_bytes", None, in_place),
    s("pause_until", V2_11, in_place),
    s("priority_policy", V2_11, in_place),
    s("priority_groups", V2_11, in_place),
    s("priority_timeout", V2_11, in_place),
];

/// Retention limits <-> interest changes in place from this release on (a replace before).
pub const RETENTION_IN_PLACE_SINCE: (u64, u64) = (2, 10);

/// `major.minor` of a server's reported version ("2.9.10", "2.12.0-beta.1").
pub fn parse_version(v: &str) -> Option<(u64, u64)> {
    let mut it = v.trim().trim_start_matches('v').split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The settings `set` uses that the server (version `server`) is too old for: one line each.
pub fn too_old(
    table: &[Setting],
    set: &Settings,
    what: &str,
    server: &str,
) -> Result<(), NatsError> {
    let Some(have) = parse_version(server) else {
        return Ok(());
    };
    let lines: Vec<String> = table
        .iter()
        .filter(|st| set.contains_key(st.key))
        .filter_map(|st| {
            let need = st.since?;
            (have < need).then(|| {
                format!(
                    "{what}: {} needs nats-server {}.{} or newer; the broker runs {server}",
                    st.key, need.0, need.1
                )
            })
        })
        .collect();
    if lines.is_empty() {
        Ok(())
    } else {
        Err(NatsError::ServerTooOld {
            detail: lines.join("; "),
        })
    }
}

/// The first of `changed` (setting keys an update would change) that the server (version
/// `server`) cannot change in place, with the release that can.
pub fn needs_newer_to_change(
    table: &[Setting],
    changed: &[&str],
    server: &str,
) -> Option<(&'static str, (u64, u64))> {
    let have = parse_version(server)?;
    table.iter().find_map(|st| {
        let need = st.in_place_since?;
        (changed.contains(&st.key) && have < need).then_some((st.key, need))
    })
}

/// The config's message, as JSON in config vocabulary, keeping only `table`'s keys that are set.
pub fn from_config<M: prost::Message>(
    full_name: &str,
    msg: &M,
    table: &[Setting],
) -> Result<Settings, String> {
    let desc = crate::config::decode::message_descriptor(full_name)?;
    let dynamic = prost_reflect::DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| e.to_string())?;
    let opts = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    let all = dynamic
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| e.to_string())?;
    let Json::Object(all) = all else {
        return Ok(Settings::new());
    };
    Ok(all
        .into_iter()
        .filter(|(k, _)| table.iter().any(|st| st.key == k))
        .collect())
}

/// The differing settings of `want` against `have` (both config vocabulary): (key, want, have,
/// in place); keys `want` does not set are not compared.
pub fn diff<'a>(
    table: &'a [Setting],
    want: &Settings,
    have: &Settings,
) -> Vec<(&'a str, String, String, bool)> {
    table
        .iter()
        .filter_map(|st| {
            let w = want.get(st.key)?;
            let h = have.get(st.key).unwrap_or(&Json::Null);
            (w != h).then(|| (st.key, text(w), text(h), (st.change)(w, h)))
        })
        .collect()
}

fn text(j: &Json) -> String {
    match j {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn duration_text(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

/// `"1.5s"`, `"90s"`, `"0.000000001s"` (the forms `duration_text` and the config write).
pub fn parse_duration(j: &Json) -> Result<Duration, String> {
    let s = j
        .as_str()
        .ok_or_else(|| format!("{j} is not a duration such as \"30s\""))?;
    let body = s
        .trim()
        .strip_suffix('s')
        .ok_or_else(|| format!("{s:?} is not a duration such as \"30s\""))?;
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    let secs: u64 = secs
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as \"30s\""))?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: u32 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as \"30s\""))?;
    Ok(Duration::new(secs, nanos))
}

fn time_text(t: &time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn parse_time(j: &Json) -> Result<time::OffsetDateTime, String> {
    let s = j.as_str().unwrap_or_default();
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{j} is not an RFC 3339 time such as \"2026-01-01T00:00:00Z\""))
}

/// The user's metadata: the server adds its own `_nats.*` keys, which are not config.
fn user_metadata(m: &HashMap<String, String>) -> Json {
    let mut user: Vec<(&String, &String)> =
        m.iter().filter(|(k, _)| !k.starts_with("_nats.")).collect();
    user.sort();
    Json::Object(
        user.into_iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect(),
    )
}

/// The user's keys over the server's own `_nats.*` ones.
fn merge_metadata(into: &mut HashMap<String, String>, j: &Json) -> Result<(), String> {
    let Json::Object(m) = j else {
        return Err("must be a map of strings".into());
    };
    into.retain(|k, _| k.starts_with("_nats."));
    for (k, v) in m {
        let v = v
            .as_str()
            .ok_or_else(|| format!("value of {k:?} must be a string"))?;
        into.insert(k.clone(), v.to_string());
    }
    Ok(())
}

fn wire<T: serde::Serialize>(v: &T) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

fn from_wire<T: serde::de::DeserializeOwned>(j: &Json) -> Result<T, String> {
    serde_json::from_value(j.clone()).map_err(|e| e.to_string())
}

fn compression_name(c: &Option<stream::Compression>) -> &'static str {
    match c {
        Some(stream::Compression::S2) => "STREAM_COMPRESSION_S2",
        _ => "STREAM_COMPRESSION_NONE",
    }
}

/// Every stream setting of the table, in config vocabulary.
pub fn stream_to_json(c: &stream::Config) -> Settings {
    let limits = c.consumer_limits.as_ref().map_or(Json::Null, |l| {
        json!({
            "inactive_threshold": duration_text(l.inactive_threshold),
            "max_ack_pending": l.max_ack_pending,
        })
    });
    let obj = json!({
        "mirror": c.mirror.as_ref().map_or(Json::Null, wire),
        "sources": c.sources.as_ref().map_or(json!([]), wire),
        "subject_transform": c.subject_transform.as_ref().map_or(Json::Null, wire),
        "republish": c.republish.as_ref().map_or(Json::Null, wire),
        "compression": compression_name(&c.compression),
        "placement": c.placement.as_ref().filter(|p| p.cluster.is_some() || !p.tags.is_empty()).map_or(Json::Null, wire),
        "metadata": user_metadata(&c.metadata),
        "deny_delete": c.deny_delete,
        "deny_purge": c.deny_purge,
        "allow_rollup_hdrs": c.allow_rollup,
        "allow_direct": c.allow_direct,
        "mirror_direct": c.mirror_direct,
        "discard_new_per_subject": c.discard_new_per_subject,
        "max_consumers": if c.max_consumers <= 0 { -1 } else { c.max_consumers },
        "consumer_limits": limits,
        "allow_msg_ttl": c.allow_message_ttl,
        "subject_delete_marker_ttl": c.subject_delete_marker_ttl.map_or(Json::Null, |d| Json::String(duration_text(d))),
    });
    match obj {
        Json::Object(m) => m,
        _ => Settings::new(),
    }
}

/// Writes the settings `set` holds onto `c`; an error names the key.
pub fn stream_from_json(c: &mut stream::Config, set: &Settings) -> Result<(), String> {
    for (k, v) in set {
        let r: Result<(), String> = (|| {
            let null = v.is_null();
            match k.as_str() {
                "mirror" => c.mirror = if null { None } else { Some(from_wire(v)?) },
                "sources" => {
                    let list: Vec<stream::Source> = if null { Vec::new() } else { from_wire(v)? };
                    c.sources = (!list.is_empty()).then_some(list);
                }
                "subject_transform" => {
                    c.subject_transform = if null { None } else { Some(from_wire(v)?) }
                }
                "republish" => c.republish = if null { None } else { Some(from_wire(v)?) },
                "compression" => {
                    c.compression = Some(match v.as_str() {
                        Some("STREAM_COMPRESSION_S2") => stream::Compression::S2,
                        _ => stream::Compression::None,
                    })
                }
                "placement" => c.placement = if null { None } else { Some(from_wire(v)?) },
                "metadata" => merge_metadata(&mut c.metadata, v)?,
                "deny_delete" => c.deny_delete = v.as_bool().unwrap_or(false),
                "deny_purge" => c.deny_purge = v.as_bool().unwrap_or(false),
                "allow_rollup_hdrs" => c.allow_rollup = v.as_bool().unwrap_or(false),
                "allow_direct" => c.allow_direct = v.as_bool().unwrap_or(false),
                "mirror_direct" => c.mirror_direct = v.as_bool().unwrap_or(false),
                "discard_new_per_subject" => {
                    c.discard_new_per_subject = v.as_bool().unwrap_or(false)
                }
                "max_consumers" => {
                    let n = v.as_i64().unwrap_or(-1);
                    c.max_consumers = if n <= 0 {
                        -1
                    } else {
                        i32::try_from(n).unwrap_or(i32::MAX)
                    };
                }
                "consumer_limits" => {
                    c.consumer_limits = if null {
                        None
                    } else {
                        Some(stream::ConsumerLimits {
                            inactive_threshold: match v.get("inactive_threshold") {
                                Some(d) => parse_duration(d)?,
                                None => Duration::ZERO,
                            },
                            max_ack_pending: v
                                .get("max_ack_pending")
                                .and_then(Json::as_i64)
                                .unwrap_or(0),
                        })
                    }
                }
                "allow_msg_ttl" => c.allow_message_ttl = v.as_bool().unwrap_or(false),
                "subject_delete_marker_ttl" => {
                    c.subject_delete_marker_ttl = if null { None } else { Some(parse_duration(v)?) }
                }
                _ => {}
            }
            Ok(())
        })();
        r.map_err(|e| format!("{k}: {e}"))?;
    }
    Ok(())
}

fn replay_name(r: consumer::ReplayPolicy) -> &'static str {
    match r {
        consumer::ReplayPolicy::Original => "REPLAY_POLICY_ORIGINAL",
        _ => "REPLAY_POLICY_INSTANT",
    }
}

fn priority_name(p: &consumer::PriorityPolicy) -> &'static str {
    match p {
        consumer::PriorityPolicy::Overflow => "PRIORITY_POLICY_OVERFLOW",
        consumer::PriorityPolicy::PinnedClient => "PRIORITY_POLICY_PINNED_CLIENT",
        consumer::PriorityPolicy::Prioritized => "PRIORITY_POLICY_PRIORITIZED",
        consumer::PriorityPolicy::None => "PRIORITY_POLICY_NONE",
    }
}

/// Every consumer setting of the table, in config vocabulary.
pub fn consumer_to_json(c: &consumer::Config) -> Settings {
    let obj = json!({
        "metadata": user_metadata(&c.metadata),
        "replay_policy": replay_name(c.replay_policy),
        "sample_freq": c.sample_frequency,
        "headers_only": c.headers_only,
        "inactive_threshold": duration_text(c.inactive_threshold),
        "num_replicas": c.num_replicas,
        "mem_storage": c.memory_storage,
        "max_waiting": c.max_waiting,
        "max_batch": c.max_batch,
        "max_expires": duration_text(c.max_expires),
        "max_bytes": c.max_bytes,
        "pause_until": c.pause_until.as_ref().map_or(Json::Null, |t| Json::String(time_text(t))),
        "priority_policy": priority_name(&c.priority_policy),
        "priority_groups": c.priority_groups,
        "priority_timeout": duration_text(c.priority_timeout),
    });
    match obj {
        Json::Object(m) => m,
        _ => Settings::new(),
    }
}

/// Writes the settings `set` holds onto `c`; an error names the key.
pub fn consumer_from_json(c: &mut consumer::Config, set: &Settings) -> Result<(), String> {
    for (k, v) in set {
        let r: Result<(), String> = (|| {
            let int = || v.as_i64().unwrap_or(0);
            match k.as_str() {
                "metadata" => merge_metadata(&mut c.metadata, v)?,
                "replay_policy" => {
                    c.replay_policy = match v.as_str() {
                        Some("REPLAY_POLICY_ORIGINAL") => consumer::ReplayPolicy::Original,
                        _ => consumer::ReplayPolicy::Instant,
                    }
                }
                "sample_freq" => {
                    c.sample_frequency = u8::try_from(int()).map_err(|_| "must be 0..=100")?
                }
                "headers_only" => c.headers_only = v.as_bool().unwrap_or(false),
                "inactive_threshold" => c.inactive_threshold = parse_duration(v)?,
                "num_replicas" => c.num_replicas = usize::try_from(int()).unwrap_or(0),
                "mem_storage" => c.memory_storage = v.as_bool().unwrap_or(false),
                "max_waiting" => c.max_waiting = int(),
                "max_batch" => c.max_batch = int(),
                "max_expires" => c.max_expires = parse_duration(v)?,
                "max_bytes" => c.max_bytes = int(),
                "pause_until" => {
                    c.pause_until = if v.is_null() {
                        None
                    } else {
                        Some(parse_time(v)?)
                    }
                }
                "priority_policy" => {
                    c.priority_policy = match v.as_str() {
                        Some("PRIORITY_POLICY_OVERFLOW") => consumer::PriorityPolicy::Overflow,
                        Some("PRIORITY_POLICY_PINNED_CLIENT") => {
                            consumer::PriorityPolicy::PinnedClient
                        }
                        Some("PRIORITY_POLICY_PRIORITIZED") => {
                            consumer::PriorityPolicy::Prioritized
                        }
                        _ => consumer::PriorityPolicy::None,
                    }
                }
                "priority_groups" => c.priority_groups = from_wire(v)?,
                "priority_timeout" => c.priority_timeout = parse_duration(v)?,
                _ => {}
            }
            Ok(())
        })();
        r.map_err(|e| format!("{k}: {e}"))?;
    }
    Ok(())
}

/// `set` in canonical form: the keys it holds, as `to_json` writes them back after `from_json`.
pub fn canonical<C: Default>(
    set: &Settings,
    from_json: fn(&mut C, &Settings) -> Result<(), String>,
    to_json: fn(&C) -> Settings,
) -> Result<Settings, String> {
    let mut c = C::default();
    from_json(&mut c, set)?;
    let all = to_json(&c);
    Ok(set
        .keys()
        .map(|k| (k.clone(), all.get(k).cloned().unwrap_or(Json::Null)))
        .collect())
}

/// The settings of `table` held in IaC outputs (other keys dropped).
pub fn from_outputs(table: &[Setting], o: &Json) -> Settings {
    table
        .iter()
        .filter_map(|st| Some((st.key.to_string(), o.get(st.key)?.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_old_servers_are_named() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("v2.12.0-beta.1"), Some((2, 12)));
        let mut set = Settings::new();
        set.insert("allow_msg_ttl".into(), Json::Bool(true));
        set.insert("deny_delete".into(), Json::Bool(true));
        let e = too_old(STREAM, &set, "stream \"S\"", "2.10.3")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("allow_msg_ttl needs nats-server 2.11") && e.contains("2.10.3"),
            "{e}"
        );
        assert!(!e.contains("deny_delete"), "{e}");
        assert!(too_old(STREAM, &set, "s", "2.11.0").is_ok());
    }

    #[test]
    fn every_stream_and_consumer_setting_round_trips() {
        let stream_set: Settings = serde_json::from_value(json!({
            "mirror": {"name": "UP", "opt_start_seq": 5, "filter_subject": "a.>",
                       "external": {"api": "$JS.hub.API", "deliver": "dlv"}},
            "sources": [{"name": "A", "opt_start_time": "2026-01-01T00:00:00Z",
                         "subject_transforms": [{"src": "a.>", "dest": "b.>"}]}],
            "subject_transform": {"src": "x.>", "dest": "y.>"},
            "republish": {"src": "x.>", "dest": "r.>", "headers_only": true},
            "compression": "STREAM_COMPRESSION_S2",
            "placement": {"cluster": "east", "tags": ["ssd"]},
            "metadata": {"team": "orders"},
            "deny_delete": true, "deny_purge": false, "allow_rollup_hdrs": true,
            "allow_direct": true, "mirror_direct": false, "discard_new_per_subject": true,
            "max_consumers": 10,
            "consumer_limits": {"inactive_threshold": "30s", "max_ack_pending": 100},
            "allow_msg_ttl": true, "subject_delete_marker_ttl": "1.5s"
        }))
        .unwrap();
        let canon = canonical(&stream_set, stream_from_json, stream_to_json).unwrap();
        assert_eq!(canon, stream_set);
        let consumer_set: Settings = serde_json::from_value(json!({
            "metadata": {"a": "b"}, "replay_policy": "REPLAY_POLICY_ORIGINAL", "sample_freq": 50,
            "headers_only": true, "inactive_threshold": "3600s", "num_replicas": 1,
            "mem_storage": true, "max_waiting": 64, "max_batch": 10, "max_expires": "5s",
            "max_bytes": 1024, "pause_until": "2030-01-01T00:00:00Z",
            "priority_policy": "PRIORITY_POLICY_PINNED_CLIENT", "priority_groups": ["g"],
            "priority_timeout": "90s"
        }))
        .unwrap();
        let canon = canonical(&consumer_set, consumer_from_json, consumer_to_json).unwrap();
        assert_eq!(canon, consumer_set);
        assert_eq!(STREAM.len(), stream_to_json(&Default::default()).len());
        assert_eq!(CONSUMER.len(), consumer_to_json(&Default::default()).len());
    }

    #[test]
    fn one_way_flags_replace_only_when_cleared() {
        let (t, f) = (Json::Bool(true), Json::Bool(false));
        assert!(one_way(&t, &f));
        assert!(!one_way(&f, &t));
    }

    #[test]
    fn server_metadata_keys_are_not_config() {
        let mut c = stream::Config::default();
        c.metadata.insert("_nats.level".into(), "1".into());
        c.metadata.insert("team".into(), "x".into());
        assert_eq!(stream_to_json(&c)["metadata"], json!({"team": "x"}));
        let mut set = Settings::new();
        set.insert("metadata".into(), json!({"team": "y"}));
        stream_from_json(&mut c, &set).unwrap();
        assert_eq!(c.metadata.get("_nats.level").map(String::as_str), Some("1"));
        assert_eq!(c.metadata.get("team").map(String::as_str), Some("y"));
    }
}
