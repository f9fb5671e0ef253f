//! The consume step's output held to its byte budget (`max_bytes`), counted on the encoded
//! ConsumeResponse the step returns, the bytes the host receives and the plugin holds while
//! building them. The budget used to bound only the payload the server sent, and a batch of
//! JSON arrays then returned 7.5x that (the parsed form takes up to ~6 bytes of protobuf per
//! payload byte): 503 MB from 64 MiB of payload, and 1.7 GB of RSS. Now a message that does not
//! fit loses its derived forms first (json, then text; named in its `omitted`), and one that
//! does not fit even then is given back to the server for redelivery.

use super::message::DERIVED_FORMS;
use crate::pb::eventbus::{ConsumeResponse, Message};
use crate::runtime::provider::{AckKind, Provider};

/// The `count` field at its largest: a two-byte key and a varint of up to 10 bytes.
const COUNT_FIELD: usize = 12;

/// What a message adds to the output beyond what a server or database counts against a
/// fetch's byte limit (its payload, subject and headers): the ack token, stream and consumer
/// names, sequence, time, delivery count and the field keys and lengths. Typical messages take
/// about 200 bytes; the fetch leaves this much room per message (at most a quarter of the
/// budget) so that the payloads it brings fit with their fields.
const PER_MESSAGE: usize = 512;

/// The byte limit to ask the server (or database) for, so what it sends fits `budget` once
/// converted, with the payload form at least.
pub fn fetch_bytes(budget: usize, batch: usize) -> usize {
    budget - batch.saturating_mul(PER_MESSAGE).min(budget / 4)
}

/// The bytes one message adds to the encoded response (an element of field 1).
fn entry_len(m: &Message) -> usize {
    use prost::Message as _;
    let n = m.encoded_len();
    prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(n as u64) + n
}

/// Leaves derived forms out of `m`, in order, while it takes more than `room`; its size.
fn shrink(m: &mut Message, room: usize) -> usize {
    let mut n = entry_len(m);
    for form in DERIVED_FORMS {
        if n <= room {
            break;
        }
        let had = match form {
            "json" => m.json.take().is_some(),
            _ => !std::mem::take(&mut m.text).is_empty(),
        };
        if had {
            m.omitted.push(form.to_string());
            n = entry_len(m);
        }
    }
    n
}

/// The messages of one execution, within `limit` encoded bytes.
pub struct Output {
    limit: usize,
    used: usize,
    messages: Vec<Message>,
}

impl Output {
    pub fn new(limit: usize, capacity: usize) -> Self {
        Output {
            limit,
            used: COUNT_FIELD,
            messages: Vec::with_capacity(capacity),
        }
    }

    /// Adds `m`, without its derived forms if only that makes it fit. Gives it back (Some)
    /// when it does not fit even so; the first message is always taken (a message larger than
    /// the budget must not block its consumer), as is one the caller cannot give back (`keep`:
    /// its last delivery).
    pub fn push(&mut self, mut m: Message, keep: bool) -> Option<Message> {
        // The trace context the step adds after the fetch (`telemetry::consumed`) is counted
        // too: same size now, its span ids filled in then.
        if m.trace_headers.is_empty() {
            m.trace_headers = crate::telemetry::trace::carrier_for_sizing(&m.headers);
        }
        let n = shrink(&mut m, self.limit.saturating_sub(self.used));
        if self.used + n > self.limit && !self.messages.is_empty() && !keep {
            return Some(m);
        }
        self.used += n;
        self.messages.push(m);
        None
    }

    /// The messages taken, for a provider's fetch.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }

    pub fn into_response(self) -> ConsumeResponse {
        ConsumeResponse {
            count: self.messages.len() as i32,
            messages: self.messages,
        }
    }
}

/// Gives a message over the budget back to its broker for the next call, at once (a failed
/// nak only delays it: it comes back after its lease).
pub async fn give_back<P: Provider>(p: &P, m: &Message) {
    if let Err(e) = p.settle(&m.ack_token, AckKind::Nak(None)).await {
        tracing::debug!(error = %e, "nak of a message over the consume budget failed; it comes back after its lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::steps::message::json_message;
    use prost::Message as _;

    /// Finding 8 of issue 19: the output, not the payload, is what the budget bounds.
    #[test]
    fn the_encoded_output_stays_within_the_budget() {
        let limit = 1_000_000;
        let mut out = Output::new(limit, 100);
        let mut back = 0;
        for _ in 0..100 {
            // ~50 KB of payload each, ~350 KB with its parsed form.
            if out.push(json_message(25_000), false).is_some() {
                back += 1;
            }
        }
        let resp = out.into_response();
        assert!(resp.encoded_len() <= limit, "{}", resp.encoded_len());
        assert_eq!(resp.count as usize + back, 100);
        // Two whole (~375 KB each), two without their parsed form, the rest given back.
        assert_eq!(resp.count, 4);
        assert!(resp.messages[0].json.is_some() && resp.messages[1].json.is_some());
        for m in &resp.messages[2..] {
            assert!(m.json.is_none() && m.omitted == ["json"]);
            assert!(!m.payload.is_empty() && !m.text.is_empty());
        }
    }

    #[test]
    fn the_first_message_is_always_taken_and_a_kept_one_too() {
        let mut out = Output::new(1000, 2);
        assert!(out.push(json_message(10_000), false).is_none());
        assert!(out.push(json_message(10_000), false).is_some());
        assert!(out.push(json_message(10_000), true).is_none());
        let resp = out.into_response();
        assert_eq!(resp.count, 2);
        assert_eq!(resp.messages[0].omitted, ["json", "text"]);
    }

    /// Issue 21: `trace_headers` were added after the output was fitted (~80 B per message
    /// over `max_bytes`); they are counted now.
    #[test]
    fn the_budget_counts_the_trace_headers_added_after_the_fetch() {
        let limit = 5_000;
        let mut out = Output::new(limit, 100);
        for i in 0..100u64 {
            let mut m = Message {
                subject: "orders.created".into(),
                payload: vec![b'p'; 100],
                ack_token: format!("$JS.ACK.ORDERS.worker.1.{i}.{i}.1700000000000000000.0"),
                ..Default::default()
            };
            m.headers.insert(
                "traceparent".into(),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01", i + 1),
            );
            m.headers.insert("tracestate".into(), "vendor=abc".into());
            if out.push(m, false).is_some() {
                break;
            }
        }
        let mut resp = out.into_response();
        assert!(resp.count > 5, "{}", resp.count);
        for m in &mut resp.messages {
            // What `telemetry::consumed` does once the fetch returns.
            drop(crate::telemetry::trace::deliver(m, "bus", "nats", ""));
            assert_eq!(m.trace_headers.len(), 2, "{:?}", m.trace_headers);
        }
        assert!(
            resp.encoded_len() <= limit,
            "{} > {limit}",
            resp.encoded_len()
        );
    }

    #[test]
    fn fetch_bytes_leaves_room_for_the_fields() {
        assert_eq!(fetch_bytes(64 << 20, 1000), (64 << 20) - 512_000);
        assert_eq!(fetch_bytes(1000, 10), 750);
    }
}
