//! The runtime face over provider pgchannel: what the steps and the trigger do when their
//! broker is a `PgBus` (PostgreSQL tables + LISTEN/NOTIFY, `crate::pg`). The NATS paths stay
//! where they were; each entry point asks `BrokerModule::is_pg()` once and comes here.
//!
//! This file holds the translations both the steps and the trigger use: deliveries to our
//! `Message`, and ack tokens (declared specs become the domain's rows in `crate::pg::spec`).

pub mod steps;

use crate::pb::eventbus::Message;
use crate::pg::{AckToken, Delivery};
use crate::runtime::steps::message::Include;
use crate::runtime::steps::message::{rfc3339, CORRELATION_HEADER};
use std::collections::HashMap;

/// The Go pgchannel provider's header for the correlation id. Delivered messages carry it next
/// to our NATS provider's `Nats-Correlation-Id`, so pipelines written for either keep working.
pub const GO_CORRELATION_HEADER: &str = "X-Correlation-Id";

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
