//! The runtime face over provider pgchannel: what the steps and the trigger do when their
//! broker is a `PgBus` (PostgreSQL tables + LISTEN/NOTIFY, `crate::pg`). The NATS paths stay
//! where they were; each entry point asks `BrokerModule::is_pg()` once and comes here.
//!
//! This file holds the translations both the steps and the trigger use: declared specs to the
//! domain's definitions, deliveries to our `Message`, and ack tokens.

pub mod steps;

use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use crate::pb::eventbus::Message;
use crate::pg::{AckPolicy, AckToken, ConsumerDef, DeliverFrom, Delivery, StreamDef};
use crate::runtime::steps::message::Include;
use crate::runtime::steps::message::{rfc3339, CORRELATION_HEADER};
use async_nats::jetstream::consumer::{self as js_consumer};
use std::collections::HashMap;
use std::time::Duration;

/// The Go pgchannel provider's header for the correlation id. Delivered messages carry it next
/// to our NATS provider's `Nats-Correlation-Id`, so pipelines written for either keep working.
pub const GO_CORRELATION_HEADER: &str = "X-Correlation-Id";

/// JetStream's default duplicate window, used for `message_id` de-duplication too.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// JetStream's default ack wait: how long a delivered row stays leased.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

pub fn stream_def(s: &StreamSpec) -> StreamDef {
    StreamDef {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        max_age: (!s.max_age.is_zero()).then_some(s.max_age),
        max_msgs: (s.max_msgs > 0).then_some(s.max_msgs),
        max_bytes: (s.max_bytes > 0).then_some(s.max_bytes),
        duplicate_window: s.duplicate_window.unwrap_or(DEFAULT_DUPLICATE_WINDOW),
    }
}

pub fn consumer_def(c: &ConsumerSpec) -> ConsumerDef {
    let deliver = match &c.deliver {
        js_consumer::DeliverPolicy::New => DeliverFrom::New,
        js_consumer::DeliverPolicy::Last | js_consumer::DeliverPolicy::LastPerSubject => {
            DeliverFrom::Last
        }
        js_consumer::DeliverPolicy::ByStartSequence { start_sequence } => {
            DeliverFrom::BySeq(i64::try_from(*start_sequence).unwrap_or(i64::MAX))
        }
        js_consumer::DeliverPolicy::ByStartTime { start_time } => DeliverFrom::ByTime(*start_time),
        js_consumer::DeliverPolicy::All => DeliverFrom::All,
    };
    let ack_policy = match c.ack {
        js_consumer::AckPolicy::None => AckPolicy::None,
        js_consumer::AckPolicy::All => AckPolicy::All,
        // FlowControl is a server-internal mode our config never produces.
        _ => AckPolicy::Explicit,
    };
    ConsumerDef {
        stream: c.stream.clone(),
        name: c.durable.clone(),
        filter_subjects: c.filter_subjects.clone(),
        deliver,
        ack_policy,
        // <= 0 (unlimited for NATS) becomes the Go provider's 5 in the domain.
        max_deliver: i32::try_from(c.max_deliver).unwrap_or(i32::MAX),
        ack_wait: c.ack_wait.unwrap_or(DEFAULT_ACK_WAIT),
        backoff: c.backoff.clone(),
    }
}

/// Whether `t` has the pgchannel token shape `<stream>:<consumer>:<id>`; only the shape, so
/// Create can accept a literal pg token before it knows the broker.
pub fn looks_like_token(t: &str) -> bool {
    let parts: Vec<&str> = t.splitn(3, ':').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && !parts[1].is_empty()
        && parts[2].parse::<i64>().is_ok()
}

pub fn parse_token(t: &str) -> Result<AckToken, String> {
    t.parse::<AckToken>().map_err(|e| e.to_string())
}

/// One delivered row in our wire shape (as the NATS `to_message`), with the correlation id
/// under both header names.
pub fn to_message(d: Delivery, include: Include) -> Message {
    let mut headers: HashMap<String, String> = d.headers.into_iter().collect();
    if let Some(c) = d.correlation_id.as_deref().filter(|c| !c.is_empty()) {
        headers.insert(CORRELATION_HEADER.to_string(), c.to_string());
        headers.insert(GO_CORRELATION_HEADER.to_string(), c.to_string());
    }
    let text = if include.text {
        std::str::from_utf8(&d.payload)
            .map(str::to_string)
            .unwrap_or_default()
    } else {
        String::new()
    };
    let json = if include.json {
        serde_json::from_slice::<serde_json::Value>(&d.payload)
            .ok()
            .map(|j| crate::config::decode::json_to_value(&j))
    } else {
        None
    };
    Message {
        subject: d.subject,
        payload: if include.payload {
            d.payload.to_vec()
        } else {
            Vec::new()
        },
        headers,
        sequence: d.token.id.to_string(),
        published_at: rfc3339(d.published_at),
        ack_token: d.token.to_string(),
        stream: d.token.stream,
        consumer: d.token.consumer,
        delivery_count: d.delivery_count,
        text,
        json,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        assert!(looks_like_token("ORDERS:worker:42"));
        assert!(!looks_like_token("$JS.ACK.ORDERS.worker.1.2.3.4.5"));
        assert!(!looks_like_token("ORDERS:worker"));
        assert!(!looks_like_token("ORDERS::42"));
        assert!(!looks_like_token("ORDERS:worker:x"));
    }
}
