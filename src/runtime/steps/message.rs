//! One outgoing message, shared by the single and the bulk publish: its checks and its
//! provider-neutral form, built once and handed to the provider, so a rule added here applies
//! to both and to every provider.

use crate::config::decode;
use crate::nats::guard::{check_header_name, check_header_value, check_publish_target};
use crate::runtime::provider::OutMessage;
use std::collections::BTreeMap;

pub use crate::runtime::provider::{now_rfc3339, rfc3339, Include};

/// Why one message cannot be sent: the field at fault and the problem, one line.
#[derive(Debug)]
pub(crate) struct MessageError {
    pub field: &'static str,
    pub problem: String,
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.problem)
    }
}

/// Checks one outgoing message and builds it (step or message headers in order, the later
/// winning, then correlation and de-duplication ids). The single and the bulk publish build
/// every message here, so a rule added here guards both.
pub(crate) fn build_message<'a>(
    subject: String,
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    correlation_id: String,
    message_id: String,
    payload: Vec<u8>,
) -> Result<OutMessage, MessageError> {
    let err = |field, problem| MessageError { field, problem };
    check_publish_target(&subject).map_err(|p| err("subject", p))?;
    // Every name and value is checked before it reaches a client (async-nats panics on a bad one).
    let mut out = BTreeMap::new();
    for (k, v) in headers {
        check_header_name(k).map_err(|p| err("headers:", p))?;
        check_header_value(v).map_err(|p| err("headers:", format!("{k:?} value {p}")))?;
        out.insert(k.clone(), v.clone());
    }
    if !correlation_id.is_empty() {
        check_header_value(&correlation_id).map_err(|p| err("correlation_id", p))?;
    }
    if !message_id.is_empty() {
        check_header_value(&message_id).map_err(|p| err("message_id", p))?;
    }
    Ok(OutMessage {
        subject,
        payload,
        headers: out,
        correlation_id,
        message_id,
    })
}

/// A configured payload as bytes: a string as its UTF-8, any other JSON value as compact JSON;
/// None when unset.
pub(crate) fn payload_of(v: Option<&prost_types::Value>) -> Result<Option<Vec<u8>>, String> {
    match v.and_then(|v| v.kind.as_ref().map(|k| (v, k))) {
        None => Ok(None),
        Some((_, prost_types::value::Kind::StringValue(s))) => Ok(Some(s.clone().into_bytes())),
        Some((v, _)) => serde_json::to_vec(&decode::value_to_json(v))
            .map(Some)
            .map_err(|e| format!("payload: {e}")),
    }
}

/// The forms derived from a payload, in the order they are left out when a message does not
/// fit its output (the consume budget, the host's callback limit): the parsed JSON (up to ~6
/// bytes per payload byte), then the text (a copy). The payload itself is never left out.
pub const DERIVED_FORMS: [&str; 2] = ["json", "text"];

/// A delivered JSON array of about 2n bytes with every form (tests of the size budgets).
#[cfg(test)]
pub(crate) fn json_message(n: usize) -> crate::pb::eventbus::Message {
    let body = format!("[{}1]", "1,".repeat(n));
    let json = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
    crate::pb::eventbus::Message {
        subject: "orders.big".into(),
        text: body.clone(),
        json: Some(decode::json_to_value(&json)),
        payload: body.into_bytes(),
        ack_token: "$JS.ACK.ORDERS.w.1.1.1.1.0".into(),
        ..Default::default()
    }
}
