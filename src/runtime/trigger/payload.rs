//! The Struct handed to TriggerWorkflow. Every key that is also a field of one of our step input
//! messages has the form the host's strict decoder accepts for that field: `payload` is base64
//! (as the host renders bytes), `headers` a map of strings, `ack_token` and `subject` strings.
//! So trigger -> publish forwards the bytes unchanged and trigger -> ack needs no config.
//!
//! Sizes are those of the encoded TriggerWorkflow request, what the host's callback server
//! measures against its limit: a call over it fails the run (`h2 protocol error`), so every
//! message a run carries has been fitted here first.

use super::TriggerCall;
use crate::pb::eventbus::Message;
use crate::runtime::steps::message::DERIVED_FORMS;
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
    // A key-value bucket's change (a trigger watching a bucket): which key, and what happened.
    if let Some((bucket, key)) = m
        .subject
        .strip_prefix("$KV.")
        .and_then(|rest| rest.split_once('.'))
    {
        f.insert("bucket".into(), s(bucket));
        f.insert("key".into(), s(key));
        let op = m.headers.get("KV-Operation").map_or("PUT", String::as_str);
        f.insert("operation".into(), s(op));
        f.insert("revision".into(), s(m.sequence.clone()));
    } else if let Some((bucket, _)) = m
        .subject
        .strip_prefix("$O.")
        .and_then(|rest| rest.split_once(".M."))
    {
        // An object store's change (a trigger watching a store): the metadata record says
        // which object, and whether it was stored or deleted.
        #[derive(serde::Deserialize)]
        struct Meta {
            name: String,
            #[serde(default)]
            deleted: bool,
            #[serde(default)]
            size: u64,
        }
        if let Ok(meta) = serde_json::from_slice::<Meta>(&m.payload) {
            f.insert("bucket".into(), s(bucket));
            f.insert("object".into(), s(meta.name));
            f.insert(
                "operation".into(),
                s(if meta.deleted { "DEL" } else { "PUT" }),
            );
            f.insert("size".into(), s(meta.size.to_string()));
        }
    }
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
    if !m.omitted.is_empty() {
        f.insert(
            "omitted".into(),
            list(m.omitted.into_iter().map(s).collect()),
        );
    }
    Struct { fields: f }
}

pub fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(prost_types::ListValue { values })),
    }
}

/// The bytes of the TriggerWorkflowRequest carrying `call` (fields 1-3; the host ignores
/// `typed_data`, which we never set), as the host's server counts them.
pub fn call_bytes(call: &TriggerCall) -> usize {
    head_bytes(&call.trigger_type, &call.action) + data_bytes(&call.data)
}

/// The request's bytes besides its data.
pub fn head_bytes(trigger_type: &str, action: &str) -> usize {
    let text = |tag, v: &str| {
        if v.is_empty() {
            0
        } else {
            prost::encoding::key_len(tag)
                + prost::encoding::encoded_len_varint(v.len() as u64)
                + v.len()
        }
    };
    text(1, trigger_type) + text(2, action)
}

/// The bytes the data adds to the request (field 3 with its length prefix).
pub fn data_bytes(data: &Struct) -> usize {
    prost::encoding::message::encoded_len(3, data)
}

/// The bytes one entry of a batch's `messages` list adds to the call.
pub fn entry_bytes(entry: &Struct) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    use prost::Message as _;
    // A Value holding the Struct (field 5), as one element of ListValue.values (field 1).
    let inner = entry.encoded_len();
    let value = key_len(5) + encoded_len_varint(inner as u64) + inner;
    key_len(1) + encoded_len_varint(value as u64) + value
}

/// A message whose data cannot fit the host's limit even without its derived forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The smallest size reached (bytes of the call).
    pub size: usize,
    pub limit: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "message too large for the engine callback: the pipeline data is {} bytes even without its text and json forms, the host accepts {}; consume it with step.eventbus.consume instead",
            self.size, self.limit
        )
    }
}

/// Leaves derived forms out of one message's data until `size(data)` is at most `limit`, and
/// names them under `omitted` (a field of Message, so the entry still feeds the ack step).
pub fn fit(
    data: &mut Struct,
    limit: usize,
    size: impl Fn(&Struct) -> usize,
) -> Result<(), TooLarge> {
    let mut now = size(data);
    let mut omitted = Vec::new();
    for form in DERIVED_FORMS {
        if now <= limit {
            break;
        }
        if data.fields.remove(form).is_some() {
            omitted.push(s(form));
            data.fields.insert("omitted".into(), list(omitted.clone()));
            now = size(data);
        }
    }
    if now <= limit {
        Ok(())
    } else {
        Err(TooLarge { size: now, limit })
    }
}

/// A one-message call, fitted to the host's limit when it has one.
pub fn message_call(
    trigger_type: &str,
    mut data: Struct,
    limit: Option<usize>,
) -> Result<TriggerCall, TooLarge> {
    const ACTION: &str = "message";
    if let Some(limit) = limit {
        let head = head_bytes(trigger_type, ACTION);
        fit(&mut data, limit, |d| head + data_bytes(d))?;
    }
    Ok(TriggerCall {
        trigger_type: trigger_type.to_string(),
        action: ACTION.into(),
        data,
    })
}

pub const BATCH_ACTION: &str = "batch";

/// The data of a batch run: `count`, `messages` (entries built without `broker_ref`, so each
/// decodes as a Message for the ack step) and `broker_ref` once at the top.
pub fn batch_data(entries: Vec<Struct>, broker_ref: &str) -> Struct {
    let mut data = Struct::default();
    data.fields.insert(
        "count".into(),
        Value {
            kind: Some(Kind::NumberValue(entries.len() as f64)),
        },
    );
    let values = entries
        .into_iter()
        .map(|e| Value {
            kind: Some(Kind::StructValue(e)),
        })
        .collect();
    data.fields.insert("messages".into(), list(values));
    if !broker_ref.is_empty() {
        data.fields.insert("broker_ref".into(), s(broker_ref));
    }
    data
}

/// How a batch's runs are sized: exactly for an empty run, plus each entry's own bytes.
pub struct BatchSizer {
    empty: usize,
    limit: Option<usize>,
}

/// What the four length prefixes around the list (ListValue in Value, Value in the map entry,
/// the entry in the Struct, the Struct in the request) can grow by as entries are added: at
/// most 4 bytes each below 32 GiB.
const PREFIX_GROWTH: usize = 16;

impl BatchSizer {
    pub fn new(trigger_type: &str, broker_ref: &str, limit: Option<usize>) -> Self {
        let empty = head_bytes(trigger_type, BATCH_ACTION)
            + data_bytes(&batch_data(Vec::new(), broker_ref));
        BatchSizer { empty, limit }
    }

    /// An upper bound of the call's bytes for entries of `entries` bytes in total.
    fn bound(&self, entries: usize) -> usize {
        self.empty + entries + PREFIX_GROWTH
    }

    /// Fits one entry so that it can go in a run on its own (see [`fit`]).
    pub fn fit_entry(&self, entry: &mut Struct) -> Result<(), TooLarge> {
        match self.limit {
            None => Ok(()),
            Some(limit) => fit(entry, limit, |e| self.bound(entry_bytes(e))),
        }
    }

    /// Splits fitted entries into runs, in order, each call within the limit; a batch that
    /// fits goes out as one run.
    pub fn runs(
        &self,
        trigger_type: &str,
        broker_ref: &str,
        entries: Vec<Struct>,
    ) -> Vec<(usize, TriggerCall)> {
        let mut runs = Vec::new();
        let mut run: Vec<Struct> = Vec::new();
        let mut bytes = 0;
        let call = |run: Vec<Struct>| {
            (
                run.len(),
                TriggerCall {
                    trigger_type: trigger_type.to_string(),
                    action: BATCH_ACTION.into(),
                    data: batch_data(run, broker_ref),
                },
            )
        };
        for e in entries {
            let n = entry_bytes(&e);
            let full = self.limit.is_some_and(|l| self.bound(bytes + n) > l);
            if full && !run.is_empty() {
                runs.push(call(std::mem::take(&mut run)));
                bytes = 0;
            }
            bytes += n;
            run.push(e);
        }
        if !run.is_empty() {
            runs.push(call(run));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::steps::message::json_message;

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
    fn call_bytes_is_the_encoded_request() {
        use prost::Message as _;
        for (tt, action, n) in [
            ("pipeline:x", "message", 3),
            ("", "", 0),
            ("t", "batch", 70_000),
        ] {
            let call = TriggerCall {
                trigger_type: tt.into(),
                action: action.into(),
                data: build(json_message(n), "bus"),
            };
            let req = crate::pb::plugin::TriggerWorkflowRequest {
                trigger_type: call.trigger_type.clone(),
                action: call.action.clone(),
                data: Some(call.data.clone()),
                typed_data: None,
            };
            assert_eq!(call_bytes(&call), req.encoded_len(), "{tt:?} {n}");
        }
    }

    #[test]
    fn entry_bytes_is_what_a_list_element_adds() {
        use prost::Message as _;
        let entries: Vec<Struct> = [0, 10, 70_000]
            .into_iter()
            .map(|n| build(json_message(n), ""))
            .collect();
        let as_list = |es: &[Struct]| prost_types::ListValue {
            values: es
                .iter()
                .map(|e| Value {
                    kind: Some(Kind::StructValue(e.clone())),
                })
                .collect(),
        };
        let sum: usize = entries.iter().map(entry_bytes).sum();
        assert_eq!(as_list(&entries).encoded_len(), sum);
    }

    #[test]
    fn fit_leaves_out_json_then_text_and_never_the_payload() {
        // 600 KB of JSON array: ~4.7 MB with every form, under 1 MB with the payload alone.
        let data = build(json_message(300_000), "bus");
        let limit = 4 * 1024 * 1024;
        let full = message_call("t", data.clone(), None).unwrap();
        assert!(call_bytes(&full) > limit, "{}", call_bytes(&full));
        let call = message_call("t", data.clone(), Some(limit)).unwrap();
        assert!(call_bytes(&call) <= limit);
        let f = &call.data.fields;
        assert!(f.get("json").is_none());
        assert!(
            f.contains_key("text") && f.contains_key("payload"),
            "text still fits"
        );
        assert_eq!(f.get("omitted"), Some(&list(vec![s("json")])));
        // Tighter: the text goes too; the payload stays.
        let call = message_call("t", data.clone(), Some(900_000)).unwrap();
        let f = &call.data.fields;
        assert!(f.get("text").is_none() && f.contains_key("payload"));
        assert_eq!(f.get("omitted"), Some(&list(vec![s("json"), s("text")])));
        // Nothing fits: the smallest size is reported.
        let e = message_call("t", data, Some(1000)).err().unwrap();
        assert!(e.size > 800_000 && e.limit == 1000, "{e}");
        // Under the limit nothing is touched.
        let small = build(json_message(3), "");
        let call = message_call("t", small.clone(), Some(limit)).unwrap();
        assert_eq!(call.data, small);
    }

    /// Finding 1 of issue 19: 20 messages of 100 KB of JSON (2 MB, under the batch's 2 MiB
    /// payload cap) made ~4.7 MB of data. Split, every run fits, nothing is dropped, in order.
    #[test]
    fn a_batch_over_the_limit_is_split_into_runs_that_fit() {
        let limit = 4 * 1024 * 1024;
        let sizer = BatchSizer::new("pipeline:b", "bus", Some(limit));
        let entries: Vec<Struct> = (0..20)
            .map(|i| {
                let mut m = json_message(50_000);
                m.sequence = i.to_string();
                let mut e = build(m, "");
                sizer.fit_entry(&mut e).unwrap();
                e
            })
            .collect();
        let total: usize = entries.iter().map(entry_bytes).sum();
        assert!(total > limit, "{total}");
        assert!(entries.iter().all(|e| !e.fields.contains_key("omitted")));
        let runs = sizer.runs("pipeline:b", "bus", entries);
        assert!(runs.len() >= 2, "{}", runs.len());
        let mut seqs = Vec::new();
        for (n, call) in &runs {
            assert!(call_bytes(call) <= limit, "{}", call_bytes(call));
            let Some(Kind::ListValue(l)) = call.data.fields["messages"].kind.clone() else {
                panic!("no messages")
            };
            assert_eq!(l.values.len(), *n);
            assert_eq!(
                call.data.fields["count"],
                Value {
                    kind: Some(Kind::NumberValue(*n as f64))
                }
            );
            for v in l.values {
                let Some(Kind::StructValue(e)) = v.kind else {
                    panic!()
                };
                seqs.push(e.fields["sequence"].clone());
            }
        }
        let want: Vec<Value> = (0..20).map(|i| s(i.to_string())).collect();
        assert_eq!(seqs, want);
        // No limit: one run.
        let entries = vec![build(json_message(3), ""), build(json_message(3), "")];
        assert_eq!(
            BatchSizer::new("t", "", None).runs("t", "", entries).len(),
            1
        );
    }

    #[test]
    fn a_batch_entry_too_big_alone_loses_its_derived_forms() {
        let limit = 4 * 1024 * 1024;
        let sizer = BatchSizer::new("pipeline:b", "bus", Some(limit));
        let mut e = build(json_message(300_000), "");
        sizer.fit_entry(&mut e).unwrap();
        assert_eq!(e.fields.get("omitted"), Some(&list(vec![s("json")])));
        let runs = sizer.runs("pipeline:b", "bus", vec![e]);
        assert_eq!(runs.len(), 1);
        assert!(call_bytes(&runs[0].1) <= limit);
    }

    #[test]
    fn text_is_present_exactly_for_utf8_payloads() {
        assert_eq!(text_of(b"hello"), Some(s("hello")));
        assert_eq!(text_of(b""), Some(s("")));
        assert_eq!(text_of(&[0xff, 0xfe, 0x00]), None);
    }
}
