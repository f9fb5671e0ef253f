//! The gRPC codec of every service: prost, except that an `ExecuteStepRequest` loses the
//! pipeline state the plugin never reads before prost sees it.
//!
//! Why: prost refuses messages nested deeper than 100 levels, and a `google.protobuf.Struct`
//! costs three levels per JSON object (Struct, map entry value, Value). Pipeline state 32
//! objects deep therefore failed to decode, while the Go host encodes up to 10,000 levels. The
//! limit is a compile-time constant in prost and lifting it would let a hostile request
//! overflow the stack, so instead the request is trimmed on the wire, without recursion:
//! `trigger_data`, `step_outputs` and `metadata` are never read by any step, and `current` only
//! when the host sent no `typed_input`, and then only the entries named like a field of one of
//! our step input messages (what `steps::decode_execute` keeps). Whatever depth the rest of the
//! state has, it is skipped over by length.

use crate::pb::plugin::ExecuteStepRequest;
use crate::runtime::types::StepKind;
use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use std::any::TypeId;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::OnceLock;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Field numbers of `ExecuteStepRequest` (plugin.proto).
const TRIGGER_DATA: u64 = 2;
const STEP_OUTPUTS: u64 = 3;
const CURRENT: u64 = 4;
const METADATA: u64 = 5;
const TYPED_INPUT: u64 = 8;

const WIRE_VARINT: u64 = 0;
const WIRE_I64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_I32: u64 = 5;

#[derive(Debug, Clone)]
pub struct PluginCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PluginCodec<T, U> {
    fn default() -> Self {
        PluginCodec(PhantomData)
    }
}

impl<T, U> Codec for PluginCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = PluginDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        PluginDecoder(ProstDecoder::default())
    }
}

#[derive(Debug, Clone)]
pub struct PluginDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for PluginDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() != TypeId::of::<ExecuteStepRequest>() {
            return self.0.decode(buf);
        }
        let raw = buf.copy_to_bytes(buf.remaining());
        let trimmed = trim_execute_step(&raw).map_err(|e| {
            Status::invalid_argument(format!("ExecuteStepRequest is not valid protobuf: {e}"))
        })?;
        U::decode(trimmed)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("ExecuteStepRequest: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// One field as it stands on the wire: its number, wire type and every byte of it.
struct Field<'a> {
    number: u64,
    wire: u64,
    raw: &'a [u8],
    /// The payload of a length-delimited field.
    body: &'a [u8],
}

fn varint(b: &mut &[u8]) -> Result<u64, &'static str> {
    prost::encoding::decode_varint(b).map_err(|_| "bad varint")
}

/// Splits a message into its top-level fields without looking inside any of them.
fn fields(mut rest: &[u8]) -> impl Iterator<Item = Result<Field<'_>, &'static str>> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let start = rest;
        let one = (|| {
            let key = varint(&mut rest)?;
            let (number, wire) = (key >> 3, key & 7);
            let mut body: &[u8] = &[];
            match wire {
                WIRE_VARINT => {
                    varint(&mut rest)?;
                }
                WIRE_I64 | WIRE_I32 => {
                    let n = if wire == WIRE_I64 { 8 } else { 4 };
                    if rest.len() < n {
                        return Err("truncated field");
                    }
                    rest.advance(n);
                }
                WIRE_LEN => {
                    let len = usize::try_from(varint(&mut rest)?).map_err(|_| "bad length")?;
                    if rest.len() < len {
                        return Err("truncated field");
                    }
                    body = &rest[..len];
                    rest.advance(len);
                }
                _ => return Err("unsupported wire type"),
            }
            let used = start.len() - rest.len();
            Ok(Field {
                number,
                wire,
                raw: &start[..used],
                body,
            })
        })();
        if one.is_err() {
            rest = &[];
        }
        Some(one)
    })
}

/// The request without the state nobody reads (see the module comment).
fn trim_execute_step(raw: &Bytes) -> Result<Bytes, &'static str> {
    // One walk: everything but the unread state is copied as it comes; `current` is held back
    // until it is known whether `typed_input` (which may come after it) makes it unread too.
    // Field order does not matter in protobuf, and the held occurrences keep theirs.
    let mut has_typed_input = false;
    let mut current = Vec::new();
    let mut out = Vec::with_capacity(raw.len());
    for f in fields(raw) {
        let f = f?;
        match f.number {
            TRIGGER_DATA | STEP_OUTPUTS | METADATA => {}
            CURRENT => current.push(f),
            n => {
                has_typed_input |= n == TYPED_INPUT;
                out.put_slice(f.raw);
            }
        }
    }
    if !has_typed_input {
        for f in current {
            if f.wire != WIRE_LEN {
                // Not a Struct on the wire: left for prost to refuse.
                out.put_slice(f.raw);
                continue;
            }
            let kept = trim_struct(f.body)?;
            prost::encoding::encode_key(
                CURRENT as u32,
                prost::encoding::WireType::LengthDelimited,
                &mut out,
            );
            prost::encoding::encode_varint(kept.len() as u64, &mut out);
            out.put_slice(&kept);
        }
    }
    Ok(Bytes::from(out))
}

/// A `Struct` with only the entries whose key names a field of a step input message.
fn trim_struct(body: &[u8]) -> Result<Vec<u8>, &'static str> {
    let wanted = input_field_names();
    let mut out = Vec::new();
    for entry in fields(body) {
        let entry = entry?;
        // Struct.fields = 1, a map entry {key = 1, value = 2}.
        if entry.number != 1 || entry.wire != WIRE_LEN {
            continue;
        }
        let mut key = None;
        for part in fields(entry.body) {
            let part = part?;
            if part.number == 1 && part.wire == WIRE_LEN {
                key = Some(part.body);
            }
        }
        let keep = key
            .and_then(|k| std::str::from_utf8(k).ok())
            .is_some_and(|k| wanted.contains(k));
        if keep {
            out.put_slice(entry.raw);
        }
    }
    Ok(out)
}

/// Field names (proto and JSON spelling) of every step input message.
fn input_field_names() -> &'static HashSet<String> {
    static NAMES: OnceLock<HashSet<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names = HashSet::new();
        if let Ok(pool) = prost_reflect::DescriptorPool::decode(crate::pb::EVENTBUS_DESCRIPTOR_SET)
        {
            for kind in [StepKind::Publish, StepKind::Consume, StepKind::Ack] {
                let (_, input) = kind.full_messages();
                if let Some(m) = pool.get_message_by_name(input) {
                    for f in m.fields() {
                        names.insert(f.name().to_string());
                        names.insert(f.json_name().to_string());
                    }
                }
            }
        }
        names
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{value::Kind, Struct, Value};

    fn s(pairs: &[(&str, Value)]) -> Struct {
        Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    fn text(t: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(t.into())),
        }
    }

    #[test]
    fn unread_state_is_dropped_and_current_keeps_input_fields_only() {
        let req = ExecuteStepRequest {
            handle_id: "h".into(),
            trigger_data: Some(s(&[("x", text("1"))])),
            metadata: Some(s(&[("y", text("2"))])),
            current: Some(s(&[("subject", text("a.b")), ("other", text("z"))])),
            ..Default::default()
        };
        let out = trim_execute_step(&Bytes::from(req.encode_to_vec())).unwrap();
        let back = ExecuteStepRequest::decode(out).unwrap();
        assert_eq!(back.handle_id, "h");
        assert!(back.trigger_data.is_none() && back.metadata.is_none());
        let cur = back.current.unwrap();
        assert!(cur.fields.contains_key("subject"), "{cur:?}");
        assert!(!cur.fields.contains_key("other"), "{cur:?}");
    }

    #[test]
    fn with_typed_input_current_goes_too() {
        let req = ExecuteStepRequest {
            current: Some(s(&[("subject", text("a.b"))])),
            typed_input: Some(prost_types::Any::default()),
            ..Default::default()
        };
        let out = trim_execute_step(&Bytes::from(req.encode_to_vec())).unwrap();
        let back = ExecuteStepRequest::decode(out).unwrap();
        assert!(back.current.is_none() && back.typed_input.is_some());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for raw in [&b"\x0a\xff"[..], b"\x0b", b"\x22\x05ab", b"\xff\xff\xff"] {
            assert!(trim_execute_step(&Bytes::copy_from_slice(raw)).is_err());
        }
    }
}
