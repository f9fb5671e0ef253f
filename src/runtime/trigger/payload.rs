//! The Struct handed to TriggerWorkflow. Every key that is also a field of one of our step input
//! messages has the form the host's strict decoder accepts for that field: `payload` is base64
//! (as the host renders bytes), `headers` a map of strings, `ack_token` and `subject` strings.
//! So trigger -> publish forwards the bytes unchanged and trigger -> ack needs no config.

use crate::pb::eventbus::Message;
use base64::Engine;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use std::collections::BTreeMap;

fn s(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

/// Consumes the message: its strings and parsed JSON move into the Struct (the handler keeps
/// only what it needs afterwards), so a delivery is not copied twice.
pub fn build(m: Message, broker_ref: &str) -> Struct {
    let mut f = BTreeMap::new();
    f.insert(
        "payload".into(),
        s(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
    );
    // `to_message` left `text` empty exactly when the payload is not UTF-8 (or is empty).
    if !m.text.is_empty() || m.payload.is_empty() {
        f.insert("text".into(), s(m.text));
    }
    if let Some(json) = m.json {
        f.insert("json".into(), json);
    }
    let headers = Struct {
        fields: m.headers.into_iter().map(|(k, v)| (k, s(v))).collect(),
    };
    f.insert(
        "headers".into(),
        Value {
            kind: Some(Kind::StructValue(headers)),
        },
    );
    // The delivery's trace context, where the engine's step.trace_extract looks by default.
    if !m.trace_headers.is_empty() {
        let carrier = Struct {
            fields: m
                .trace_headers
                .into_iter()
                .map(|(k, v)| (k, s(v)))
                .collect(),
        };
        f.insert(
            "trace_headers".into(),
            Value {
                kind: Some(Kind::StructValue(carrier)),
            },
        );
    }
    f.insert("subject".into(), s(m.subject));
    f.insert("sequence".into(), s(m.sequence));
    f.insert("published_at".into(), s(m.published_at));
    f.insert("ack_token".into(), s(m.ack_token));
    f.insert("stream".into(), s(m.stream));
    f.insert("consumer".into(), s(m.consumer));
    f.insert(
        "delivery_count".into(),
        Value {
            kind: Some(Kind::NumberValue(m.delivery_count as f64)),
        },
    );
    if !broker_ref.is_empty() {
        f.insert("broker_ref".into(), s(broker_ref));
    }
    Struct { fields: f }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(payload: &[u8]) -> Option<Value> {
        let text = std::str::from_utf8(payload)
            .map(str::to_string)
            .unwrap_or_default();
        let m = Message {
            payload: payload.to_vec(),
            text,
            ..Default::default()
        };
        build(m, "").fields.get("text").cloned()
    }

    #[test]
    fn text_is_present_exactly_for_utf8_payloads() {
        assert_eq!(text_of(b"hello"), Some(s("hello")));
        assert_eq!(text_of(b""), Some(s("")));
        assert_eq!(text_of(&[0xff, 0xfe, 0x00]), None);
    }
}
