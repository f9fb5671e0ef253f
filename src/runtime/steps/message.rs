//! One outgoing message, shared by the single and the bulk publish: its checks, its headers and
//! its payload, so a rule added here applies to both.

use crate::config::decode;
use crate::nats::guard::{check_header_name, check_header_value, check_publish_target};
use async_nats::HeaderMap;

pub const CORRELATION_HEADER: &str = "Nats-Correlation-Id";
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

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

/// Checks one outgoing message and builds its headers (step or message headers in order, the
/// later winning, then correlation and de-duplication ids). The single and the bulk publish
/// build every message here, so a rule added here guards both.
pub(crate) fn build_message<'a>(
    subject: &str,
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    correlation_id: &str,
    message_id: &str,
) -> Result<HeaderMap, MessageError> {
    let err = |field, problem| MessageError { field, problem };
    check_publish_target(subject).map_err(|p| err("subject", p))?;
    // Every name and value is checked before it reaches async-nats, which panics on a bad one.
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        check_header_name(k).map_err(|p| err("headers:", p))?;
        check_header_value(v).map_err(|p| err("headers:", format!("{k:?} value {p}")))?;
        out.insert(k.as_str(), v.as_str());
    }
    if !correlation_id.is_empty() {
        check_header_value(correlation_id).map_err(|p| err("correlation_id", p))?;
        out.insert(CORRELATION_HEADER, correlation_id);
    }
    if !message_id.is_empty() {
        check_header_value(message_id).map_err(|p| err("message_id", p))?;
        out.insert(MSG_ID_HEADER, message_id);
    }
    Ok(out)
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

pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The forms derived from a payload, in the order they are left out when a message does not
/// fit its output (the consume budget, the host's callback limit): the parsed JSON (up to ~6
/// bytes per payload byte), then the text (a copy). The payload itself is never left out.
pub const DERIVED_FORMS: [&str; 2] = ["json", "text"];

/// Which forms of each payload a delivered message carries. Each costs memory and output:
/// bytes (base64 in the host's JSON, 1.34x), text (1x, UTF-8 only), parsed JSON (up to ~6x for
/// arrays of numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Include {
    pub payload: bool,
    pub text: bool,
    pub json: bool,
}

impl Include {
    pub const ALL: Include = Include {
        payload: true,
        text: true,
        json: true,
    };

    pub fn parse(list: &[String]) -> Result<Include, String> {
        if list.is_empty() {
            return Ok(Include::ALL);
        }
        let mut inc = Include {
            payload: false,
            text: false,
            json: false,
        };
        for item in list {
            match item.as_str() {
                "payload" => inc.payload = true,
                "text" => inc.text = true,
                "json" => inc.json = true,
                other => {
                    return Err(format!(
                        "{} is not one of payload, text, json",
                        crate::secret::quote(other)
                    ))
                }
            }
        }
        Ok(inc)
    }
}

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
