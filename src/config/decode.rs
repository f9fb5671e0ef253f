//! Decoding a config exactly once, the way the host encodes it: `typed_config` (an Any holding
//! our message) or a legacy `google.protobuf.Struct`, which we decode with the same strict JSON
//! rules the host applies (unknown keys rejected, lowerCamel or snake_case names, enum names or
//! numbers, top-level string-to-scalar coercion, `_`-prefixed keys dropped).

use crate::pb::EVENTBUS_DESCRIPTOR_SET;
use crate::secret::{quote, QUOTE_MAX};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Number, Value as Json};
use std::sync::LazyLock;

pub static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(EVENTBUS_DESCRIPTOR_SET).map_err(|e| e.to_string()));

pub fn message_descriptor(full_name: &str) -> Result<MessageDescriptor, String> {
    let pool = POOL
        .as_ref()
        .map_err(|e| format!("embedded descriptor set: {e}"))?;
    pool.get_message_by_name(full_name)
        .ok_or_else(|| format!("message {full_name} is not in the embedded descriptor set"))
}

/// Where a config came from; both are optional on the wire.
pub struct RawConfig<'a> {
    pub typed: Option<&'a prost_types::Any>,
    pub legacy: Option<&'a prost_types::Struct>,
}

/// Decodes into `T` (whose full name is `full_name`). The error is a list of one-line problems
/// without the component prefix; the caller adds it.
pub fn decode<T: prost::Message + Default>(
    full_name: &str,
    raw: RawConfig<'_>,
) -> Result<T, Vec<String>> {
    if let Some(any) = raw.typed {
        let url = any.type_url.as_str();
        // `<prefix>/<full name>` or the bare name; compared from the end (no scan for '/').
        let matches = url
            .strip_suffix(full_name)
            .is_some_and(|prefix| prefix.is_empty() || prefix.ends_with('/'));
        if !matches {
            return Err(vec![format!(
                "typed_config holds {}, expected type.googleapis.com/{full_name}",
                quote(url)
            )]);
        }
        return T::decode(any.value.as_slice())
            .map_err(|e| vec![format!("typed_config does not decode as {full_name}: {e}")]);
    }
    match raw.legacy {
        Some(s) => decode_json(full_name, struct_to_json(s)),
        None => Ok(T::default()),
    }
}

/// Strict JSON → message, mirroring the host's YAML → typed conversion.
pub fn decode_json<T: prost::Message + Default>(
    full_name: &str,
    json: Map<String, Json>,
) -> Result<T, Vec<String>> {
    let desc = message_descriptor(full_name).map_err(|e| vec![e])?;
    let json = prepare_top_level(&desc, json)?;
    let dynamic = match DynamicMessage::deserialize(desc.clone(), Json::Object(json.clone())) {
        Ok(m) => m,
        // Decode each key alone to say which fields are wrong (serde stops at the first).
        Err(whole) => {
            let mut problems = Vec::new();
            let mut any_sensitive = false;
            for (key, value) in json {
                any_sensitive |= sensitive(&key);
                let one = Map::from_iter([(key.clone(), value)]);
                if let Err(e) = DynamicMessage::deserialize(desc.clone(), Json::Object(one)) {
                    let text = scrub(&humanize_serde_error(&e.to_string()), sensitive(&key));
                    problems.push(format!("{key}: {text}"));
                }
            }
            if problems.is_empty() {
                problems.push(scrub(
                    &humanize_serde_error(&whole.to_string()),
                    any_sensitive,
                ));
            }
            return Err(problems);
        }
    };
    T::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| vec![format!("re-encode as {full_name}: {e}")])
}

/// Drops `_` keys, rejects unknown keys with the list of valid ones, and applies the host's
/// top-level string coercion for bool and numeric fields.
fn prepare_top_level(
    desc: &MessageDescriptor,
    json: Map<String, Json>,
) -> Result<Map<String, Json>, Vec<String>> {
    let mut out = Map::new();
    let mut problems = Vec::new();
    for (key, value) in json {
        if key.starts_with('_') {
            continue;
        }
        let field = desc
            .get_field_by_name(&key)
            .or_else(|| desc.get_field_by_json_name(&key));
        let Some(field) = field else {
            let valid: Vec<String> = desc.fields().map(|f| f.name().to_string()).collect();
            problems.push(format!(
                "{}: unknown field (valid fields: {})",
                short_key(&key),
                valid.join(", ")
            ));
            continue;
        };
        let value = match (&value, field.kind(), field.is_list() || field.is_map()) {
            (Json::String(s), kind, false) => match coerce_scalar(s, &kind) {
                Coerced::Drop => continue,
                Coerced::Value(v) => v,
                Coerced::Keep => value,
            },
            _ => value,
        };
        out.insert(key, value);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

enum Coerced {
    Keep,
    Drop,
    Value(Json),
}

fn coerce_scalar(s: &str, kind: &Kind) -> Coerced {
    let numeric = matches!(
        kind,
        Kind::Int32
            | Kind::Int64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Sfixed32
            | Kind::Sfixed64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Fixed32
            | Kind::Fixed64
            | Kind::Float
            | Kind::Double
    );
    if s.is_empty() && (numeric || matches!(kind, Kind::Bool)) {
        return Coerced::Drop;
    }
    match kind {
        Kind::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Coerced::Value(Json::Bool(true)),
            "false" | "0" | "no" | "off" => Coerced::Value(Json::Bool(false)),
            _ => Coerced::Keep,
        },
        Kind::Int32
        | Kind::Int64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Sfixed32
        | Kind::Sfixed64 => s
            .parse::<i64>()
            .map(|n| Coerced::Value(Json::Number(n.into())))
            .unwrap_or(Coerced::Keep),
        Kind::Uint32 | Kind::Uint64 | Kind::Fixed32 | Kind::Fixed64 => s
            .parse::<u64>()
            .map(|n| Coerced::Value(Json::Number(n.into())))
            .unwrap_or(Coerced::Keep),
        Kind::Float | Kind::Double => s
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(|n| Coerced::Value(Json::Number(n)))
            .unwrap_or(Coerced::Keep),
        _ => Coerced::Keep,
    }
}

fn humanize_serde_error(text: &str) -> String {
    // prost-reflect reports e.g. "invalid type: integer `1`, expected a string at line 0"; the
    // position is meaningless for a Struct, so drop it.
    let t = text.split(" at line ").next().unwrap_or(text);
    t.to_string()
}

/// Keys whose values are or may carry credentials (auth blocks, urls with userinfo, tokens,
/// seeds): their values never appear in an error, whatever their type.
fn sensitive(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "auth", "dsn", "server", "password", "token", "secret", "seed", "cred", "key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// An unknown key as the error shows it: whole when short, cut otherwise.
fn short_key(key: &str) -> String {
    if key.chars().count() <= QUOTE_MAX {
        key.to_string()
    } else {
        quote(key)
    }
}

/// Rewrites the values a serde error quotes: `"strings"` and `` `numbers` `` are replaced by
/// `***` when `redact`, and cut to [`QUOTE_MAX`] characters otherwise. Back-quoted names
/// (fields, enum values) are kept, so "unknown field `x`, expected one of ..." stays useful.
fn scrub(text: &str, redact: bool) -> String {
    let mut out = String::with_capacity(text.len().min(4 * QUOTE_MAX));
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '"' && c != '`' {
            out.push(c);
            continue;
        }
        let mut inner = String::new();
        let mut escaped = false;
        let mut closed = false;
        for d in chars.by_ref() {
            if c == '"' && !escaped && d == '\\' {
                escaped = true;
                inner.push(d);
                continue;
            }
            if d == c && !escaped {
                closed = true;
                break;
            }
            escaped = false;
            inner.push(d);
        }
        let name = c == '`'
            && inner
                .chars()
                .next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_');
        out.push(c);
        if redact && !name {
            out.push_str("***");
        } else if inner.chars().count() > QUOTE_MAX {
            out.extend(inner.chars().take(QUOTE_MAX));
            out.push_str("...");
        } else {
            out.push_str(&inner);
        }
        if closed {
            out.push(c);
        }
    }
    out
}

pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

pub fn value_to_json(v: &prost_types::Value) -> Json {
    use prost_types::value::Kind as K;
    match &v.kind {
        None | Some(K::NullValue(_)) => Json::Null,
        Some(K::BoolValue(b)) => Json::Bool(*b),
        Some(K::NumberValue(n)) => number_to_json(*n),
        Some(K::StringValue(s)) => Json::String(s.clone()),
        Some(K::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(K::StructValue(s)) => Json::Object(struct_to_json(s)),
    }
}

/// Struct numbers are doubles; whole ones become integers so integer fields accept them.
/// NaN and the infinities become protobuf JSON's strings for them: a float field accepts
/// those, an integer field refuses them (they used to become null, an unset field).
fn number_to_json(n: f64) -> Json {
    if n.is_nan() {
        return Json::String("NaN".into());
    }
    if n.is_infinite() {
        return Json::String(if n > 0.0 { "Infinity" } else { "-Infinity" }.into());
    }
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Json::Number((n as i64).into())
    } else {
        Number::from_f64(n).map(Json::Number).unwrap_or(Json::Null)
    }
}

pub fn json_to_value(j: &Json) -> prost_types::Value {
    use prost_types::value::Kind as K;
    let kind = match j {
        Json::Null => K::NullValue(0),
        Json::Bool(b) => K::BoolValue(*b),
        Json::Number(n) => K::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => K::StringValue(s.clone()),
        Json::Array(a) => K::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => K::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn json_to_struct(o: &Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::eventbus::{ClusterConfig, ConsumerConfig, StreamConfig};
    use serde_json::json;

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn snake_and_camel_names_both_decode() {
        let a: ClusterConfig = decode_json(
            "workflow.plugin.eventbus.v1.ClusterConfig",
            obj(json!({"provider": "nats", "deploy_target": "local"})),
        )
        .unwrap();
        let b: ClusterConfig = decode_json(
            "workflow.plugin.eventbus.v1.ClusterConfig",
            obj(json!({"provider": "nats", "deployTarget": "local"})),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.deploy_target, "local");
    }

    #[test]
    fn unknown_keys_are_rejected_and_underscore_keys_dropped() {
        let err = decode_json::<StreamConfig>(
            "workflow.plugin.eventbus.v1.StreamConfig",
            obj(json!({"name": "S", "subjectz": ["a"], "_config_dir": "/x"})),
        )
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].starts_with("subjectz: unknown field"), "{err:?}");
        assert!(err[0].contains("subjects"), "{err:?}");
    }

    #[test]
    fn enums_by_name_or_number_durations_and_coercion() {
        let c: ConsumerConfig = decode_json(
            "workflow.plugin.eventbus.v1.ConsumerConfig",
            obj(json!({
                "name": "d", "stream_name": "S", "ack_policy": "ACK_POLICY_EXPLICIT",
                "deliver_policy": 3, "max_deliver": "5", "ack_wait": "30s", "max_ack_pending": ""
            })),
        )
        .unwrap();
        assert_eq!(c.ack_policy, 1);
        assert_eq!(c.deliver_policy, 3);
        assert_eq!(c.max_deliver, 5);
        assert_eq!(c.ack_wait.unwrap().seconds, 30);
    }

    #[test]
    fn wrong_value_types_name_their_fields() {
        let err = decode_json::<StreamConfig>(
            "workflow.plugin.eventbus.v1.StreamConfig",
            obj(json!({"name": 2.1, "subjects": "a.>", "max_age": 5, "num_replicas": 1})),
        )
        .unwrap_err();
        assert_eq!(err.len(), 3, "{err:?}");
        for (line, field) in err.iter().zip(["max_age", "name", "subjects"]) {
            assert!(line.starts_with(&format!("{field}: ")), "{line}");
        }
    }

    #[test]
    fn decode_errors_never_echo_credentials_and_cap_other_values() {
        let cluster = "workflow.plugin.eventbus.v1.ClusterConfig";
        for bad in [
            json!({"auth": "s3cr3t-token"}),
            json!({"auth": {"password": 918273645}}),
            json!({"auth": {"token": ["s3cr3t-token"]}}),
            json!({"dsn": 918273645}),
            json!({"servers": "nats://u:s3cr3t-token@h:4222"}),
        ] {
            let err = decode_json::<ClusterConfig>(cluster, obj(bad.clone()))
                .unwrap_err()
                .join("\n");
            assert!(
                !err.contains("s3cr3t") && !err.contains("918273645"),
                "{bad}: {err}"
            );
        }
        let huge = "p".repeat(1 << 20);
        let err =
            decode_json::<ClusterConfig>(cluster, obj(json!({"provider": 1, huge.clone(): 1})))
                .unwrap_err()
                .join("\n");
        assert!(err.len() < 2000, "{} bytes", err.len());
        let err = decode_json::<ClusterConfig>(cluster, obj(json!({"replicas": huge})))
            .unwrap_err()
            .join("\n");
        assert!(err.len() < 1000, "{} bytes", err.len());
    }

    #[test]
    fn nan_and_infinity_are_refused_for_integer_fields() {
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let s = prost_types::Struct {
                fields: [(
                    "max_deliver".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(n)),
                    },
                )]
                .into(),
            };
            let err = decode_json::<ConsumerConfig>(
                "workflow.plugin.eventbus.v1.ConsumerConfig",
                struct_to_json(&s),
            )
            .unwrap_err();
            assert!(err[0].starts_with("max_deliver: "), "{n}: {err:?}");
        }
    }

    #[test]
    fn typed_config_type_url_is_checked() {
        let any = prost_types::Any {
            type_url: "type.googleapis.com/workflow.plugin.eventbus.v1.StreamConfig".into(),
            value: StreamConfig::default().encode_to_vec(),
        };
        let err = decode::<ClusterConfig>(
            "workflow.plugin.eventbus.v1.ClusterConfig",
            RawConfig {
                typed: Some(&any),
                legacy: None,
            },
        )
        .unwrap_err();
        assert!(err[0]
            .contains("expected type.googleapis.com/workflow.plugin.eventbus.v1.ClusterConfig"));
    }
}
