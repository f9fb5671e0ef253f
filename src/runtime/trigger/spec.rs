//! `trigger.eventbus.subscribe` config: the Go plugin's keys and aliases, read from the Struct the
//! host sends, validated into a [`TriggerSpec`].

use crate::config::decode;
use crate::config::error::Problems;
use crate::nats::guard::{check_publish_target, MAX_DURATION};
use crate::nats::names::{check_filter_subject, check_name};
use crate::runtime::error::RuntimeError;
use crate::runtime::registry::Registry;
use crate::runtime::steps::message::Include;
use crate::runtime::types::TRIGGER_TYPE;
use crate::secret::quote;
use serde_json::Value as Json;
use std::time::Duration;

pub const DEFAULT_BATCH_SIZE: usize = 100;
pub const DEFAULT_MAX_BATCH_WAIT: Duration = Duration::from_millis(500);
/// Concurrent batch runs when max_in_flight is unset: a few runs overlap the next batch's
/// fetch with the current pipeline without holding thousands of messages.
pub const DEFAULT_BATCH_IN_FLIGHT: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deliver {
    Message,
    Batch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    Auto,
    Manual,
}

#[derive(Clone, Debug)]
pub struct TriggerSpec {
    /// The CreateTrigger `name` (the host's workflowType), echoed as `trigger_type`.
    pub workflow_type: String,
    pub durable: String,
    pub stream: String,
    pub broker_ref: String,
    pub filter_subject: String,
    pub max_in_flight: usize,
    pub batch_size: usize,
    pub ack_mode: AckMode,
    pub dead_letter_subject: Option<String>,
    pub nak_delay: Duration,
    pub max_deliver: i64,
    /// One message per run (default) or batches of up to `batch_size`.
    pub deliver: Deliver,
    /// How long a started batch waits to fill.
    pub max_batch_wait: Duration,
    /// A declared consumer module exists for this durable (it owns the consumer's settings).
    pub declared: bool,
    /// The payload forms each message's data carries (as the consume step's `include`).
    pub include: Include,
    /// A key-value bucket this trigger watches (its stream and key filter are derived from it).
    pub kv_bucket: Option<String>,
    /// An object store this trigger watches (its stream and metadata subjects derived from it).
    pub object_bucket: Option<String>,
}

pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
pub const MAX_IN_FLIGHT: usize = 1024;
pub const DEFAULT_NAK_DELAY: Duration = Duration::from_secs(1);

const KNOWN_KEYS: &[&str] = &[
    "name",
    "consumer",
    "broker_ref",
    "bus",
    "stream_name",
    "filter_subject",
    "max_in_flight",
    "ack_mode",
    "dead_letter_subject",
    "batch_size",
    "nak_delay",
    "max_deliver",
    "workflowType",
    "workflow_type",
    "deliver",
    "max_batch_wait",
    "include",
    "kv_bucket",
    "keys",
    "object_bucket",
];

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "bool",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "list",
        Json::Object(_) => "map",
    }
}

impl TriggerSpec {
    pub fn from_struct(
        registry: &Registry,
        name: &str,
        config: Option<&prost_types::Struct>,
    ) -> Result<TriggerSpec, RuntimeError> {
        let map = config.map(decode::struct_to_json).unwrap_or_default();
        let mut p = Problems::new(TRIGGER_TYPE, name);
        let mut string = |key: &str| -> Option<String> {
            match map.get(key) {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(other) => {
                    p.field(key, format!("must be a string, got {}", type_name(other)));
                    None
                }
            }
        };
        // Canonical key wins when non-empty; the alias is used otherwise (Go v0.3.1 rule).
        let either = |canon: Option<String>, alias: Option<String>| {
            canon
                .filter(|s| !s.is_empty())
                .or(alias)
                .unwrap_or_default()
        };
        let durable = {
            let c = string("name");
            let a = string("consumer");
            either(c, a)
        };
        let mut broker_ref = {
            let c = string("broker_ref");
            let a = string("bus");
            either(c, a)
        };
        let mut stream = string("stream_name").unwrap_or_default();
        let mut filter_subject = string("filter_subject").unwrap_or_default();
        let kv_bucket = string("kv_bucket").filter(|b| !b.is_empty());
        let object_bucket = string("object_bucket").filter(|b| !b.is_empty());
        let keys = string("keys").unwrap_or_default();
        let ack_mode_s = string("ack_mode").unwrap_or_default();
        let dlq = string("dead_letter_subject").unwrap_or_default();
        let nak_delay_s = string("nak_delay").unwrap_or_default();
        let deliver_s = string("deliver").unwrap_or_default();
        let batch_wait_s = string("max_batch_wait").unwrap_or_default();
        let _ = string("workflowType");
        let _ = string("workflow_type");
        let deliver = match deliver_s.as_str() {
            "" | "message" => Deliver::Message,
            "batch" => Deliver::Batch,
            other => {
                p.field("deliver", format!("{} is not valid; use message (one message per pipeline run, the default) or batch (up to batch_size messages per run)", quote(other)));
                Deliver::Message
            }
        };
        let mut int = |key: &str, default: i64| -> i64 {
            match map.get(key) {
                None | Some(Json::Null) => default,
                Some(Json::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or(default),
                Some(Json::String(s)) if s.trim().parse::<i64>().is_ok() => {
                    s.trim().parse().unwrap_or(default)
                }
                Some(other) => {
                    p.field(
                        key,
                        format!("must be a whole number, got {}", type_name(other)),
                    );
                    default
                }
            }
        };
        let batched = deliver == Deliver::Batch;
        let max_in_flight = int(
            "max_in_flight",
            if batched {
                DEFAULT_BATCH_IN_FLIGHT
            } else {
                DEFAULT_MAX_IN_FLIGHT
            } as i64,
        );
        let batch_size = int("batch_size", 0);
        let max_deliver = int("max_deliver", 0);
        let include = match map.get("include") {
            None | Some(Json::Null) => Include::ALL,
            Some(Json::Array(items)) => {
                let names: Option<Vec<String>> = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect();
                match names.map(|n| Include::parse(&n)) {
                    Some(Ok(inc)) => inc,
                    Some(Err(e)) => {
                        p.field("include", e);
                        Include::ALL
                    }
                    None => {
                        p.field("include", "must be a list of payload, text, json");
                        Include::ALL
                    }
                }
            }
            Some(other) => {
                p.field(
                    "include",
                    format!(
                        "must be a list of payload, text, json, got {}",
                        type_name(other)
                    ),
                );
                Include::ALL
            }
        };
        for key in map.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) && !key.starts_with('_') {
                p.field(
                    key,
                    format!("unknown key (valid keys: {})", KNOWN_KEYS.join(", ")),
                );
            }
        }
        if !(1..=MAX_IN_FLIGHT as i64).contains(&max_in_flight) {
            p.field(
                "max_in_flight",
                format!("{max_in_flight} is out of range (1..={MAX_IN_FLIGHT})"),
            );
        }
        if !(0..=1000).contains(&batch_size) {
            p.field(
                "batch_size",
                format!("{batch_size} is out of range (1..=1000; 0 picks one from max_in_flight)"),
            );
        }
        if max_deliver < 0 {
            p.field(
                "max_deliver",
                "must be 0 (use the consumer's) or a positive count",
            );
        }
        let ack_mode = match ack_mode_s.as_str() {
            "" | "auto" => AckMode::Auto,
            "manual" => AckMode::Manual,
            other => {
                p.field("ack_mode", format!("{} is not valid; use auto (ack after the pipeline succeeds) or manual (step.eventbus.ack)", quote(other)));
                AckMode::Auto
            }
        };
        let max_batch_wait = if batch_wait_s.is_empty() {
            DEFAULT_MAX_BATCH_WAIT
        } else {
            match parse_duration(&batch_wait_s) {
                Some(d) if d <= Duration::from_secs(60) => d,
                _ => {
                    p.field(
                        "max_batch_wait",
                        format!(
                            "{} is not a duration of at most 1m such as \"200ms\" or \"1s\"",
                            quote(&batch_wait_s)
                        ),
                    );
                    DEFAULT_MAX_BATCH_WAIT
                }
            }
        };
        if !batched && !batch_wait_s.is_empty() {
            p.field("max_batch_wait", "only applies with deliver: batch");
        }
        let nak_delay = if nak_delay_s.is_empty() {
            DEFAULT_NAK_DELAY
        } else {
            match parse_duration(&nak_delay_s) {
                Some(d) => d,
                None => {
                    p.field(
                        "nak_delay",
                        format!(
                            "{} is not a duration of at most 24h such as \"500ms\", \"2s\" or \"1m\"",
                            quote(&nak_delay_s)
                        ),
                    );
                    DEFAULT_NAK_DELAY
                }
            }
        };
        if !dlq.is_empty() {
            p.check("dead_letter_subject", check_publish_target(&dlq));
        }
        // A watched bucket's stream is derived from its name, checked as a bucket name (one line,
        // not a second about the stream named after it).
        let derived = kv_bucket.is_some() || object_bucket.is_some();
        if let Some(bucket) = &kv_bucket {
            // A bucket watch: its stream, and its keys as the filter (checked as keys, so a
            // filter can never reach past the bucket's subjects).
            p.check("kv_bucket", crate::nats::kv::check_bucket(bucket));
            if !keys.is_empty() {
                p.check("keys", crate::nats::kv::check_key_filter(&keys));
            }
            for (field, set) in [
                ("stream_name", &stream),
                ("filter_subject", &filter_subject),
            ] {
                if !set.is_empty() {
                    p.field(field, "is derived from kv_bucket (and keys); remove it");
                }
            }
            stream = crate::nats::kv::stream_name(bucket);
            filter_subject = format!(
                "$KV.{bucket}.{}",
                if keys.is_empty() { ">" } else { keys.as_str() }
            );
        } else if !keys.is_empty() {
            p.field("keys", "only applies with kv_bucket");
        }
        if let Some(bucket) = &object_bucket {
            // An object store watch: its stream, and every object's metadata record.
            p.check("object_bucket", crate::nats::kv::check_bucket(bucket));
            if kv_bucket.is_some() {
                p.field(
                    "object_bucket",
                    "cannot be set with kv_bucket; one trigger watches one bucket",
                );
            } else {
                for (field, set) in [
                    ("stream_name", &stream),
                    ("filter_subject", &filter_subject),
                ] {
                    if !set.is_empty() {
                        p.field(field, "is derived from object_bucket; remove it");
                    }
                }
            }
            stream = crate::nats::kv::OBJ.stream_name(bucket);
            filter_subject = format!("$O.{bucket}.M.>");
        }
        if !filter_subject.is_empty() && kv_bucket.is_none() && object_bucket.is_none() {
            p.check("filter_subject", check_filter_subject(&filter_subject));
        }
        // Inherit stream (and broker) from a declared consumer module with this durable name.
        let declared = registry.declared_consumers(&durable, &stream, &broker_ref);
        if durable.is_empty() {
            p.field(
                "name",
                "is required: the durable consumer to read (alias: consumer)",
            );
        } else {
            p.check("name", check_name(&durable));
            match declared.as_slice() {
                [] => {}
                [one] => {
                    if stream.is_empty() {
                        stream = one.spec.stream.clone();
                    }
                    if broker_ref.is_empty() {
                        broker_ref = one.spec.broker_ref.clone();
                    }
                    if !filter_subject.is_empty()
                        && !one.spec.filter_subjects.is_empty()
                        && one.spec.filter_subjects != [filter_subject.clone()]
                    {
                        p.field(
                            "filter_subject",
                            format!(
                                "{filter_subject:?} differs from the filter of the declared consumer module {:?} ({:?}); remove it here or change the module",
                                one.module, one.spec.filter_subjects
                            ),
                        );
                    }
                }
                many => {
                    p.field(
                        "stream_name",
                        format!(
                        "consumer {durable:?} is declared on several streams ({}); set stream_name",
                        many.iter().map(|c| c.spec.stream.clone()).collect::<Vec<_>>().join(", ")
                    ),
                    )
                }
            }
        }
        if stream.is_empty() && !durable.is_empty() {
            p.field(
                "stream_name",
                format!(
                    "is required: no eventbus.consumer module declares {}, so name its stream",
                    quote(&durable)
                ),
            );
        } else if !stream.is_empty() && !derived {
            p.check("stream_name", check_name(&stream));
        }
        let max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT as i64) as usize;
        let spec = TriggerSpec {
            workflow_type: name.to_string(),
            durable,
            stream,
            broker_ref,
            filter_subject,
            max_in_flight,
            batch_size: if batch_size > 0 {
                batch_size as usize
            } else if batched {
                DEFAULT_BATCH_SIZE
            } else {
                max_in_flight.min(256)
            },
            ack_mode,
            dead_letter_subject: (!dlq.is_empty()).then_some(dlq),
            nak_delay,
            max_deliver,
            deliver,
            max_batch_wait,
            declared: declared.len() == 1,
            include,
            kv_bucket,
            object_bucket,
        };
        p.finish(spec).map_err(Into::into)
    }
}

/// `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds; protobuf's `"1.5s"` form too. At
/// most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    // Bounded before the conversion, which panics on overflow ("1e300s" reached it).
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
}
