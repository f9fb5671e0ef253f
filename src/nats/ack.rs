//! Acknowledging by token (the message's `$JS.ACK.` reply subject), confirmed by the server.

use super::guard::check_ack_token;
use super::NatsError;
use bytes::Bytes;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    Ack,
    Nak(Option<Duration>),
    Term,
    Progress,
}

impl AckKind {
    pub fn name(self) -> &'static str {
        match self {
            AckKind::Ack => "ack",
            AckKind::Nak(_) => "nak",
            AckKind::Term => "term",
            AckKind::Progress => "progress",
        }
    }

    fn body(self) -> Bytes {
        match self {
            AckKind::Ack => Bytes::from_static(b"+ACK"),
            AckKind::Nak(None) => Bytes::from_static(b"-NAK"),
            AckKind::Nak(Some(d)) => Bytes::from(format!("-NAK {{\"delay\":{}}}", d.as_nanos())),
            AckKind::Term => Bytes::from_static(b"+TERM"),
            AckKind::Progress => Bytes::from_static(b"+WPI"),
        }
    }
}

/// Sends the ack as a request so the server confirms it (double ack). `Progress` is fire and
/// forget: the server does not answer it.
pub async fn ack_token(
    client: &async_nats::Client,
    token: &str,
    kind: AckKind,
    timeout: Duration,
) -> Result<(), NatsError> {
    // Only JetStream ack subjects, so a token can never publish elsewhere (Go B17).
    check_ack_token(token).map_err(|e| NatsError::other("ack", e))?;
    if kind == AckKind::Progress {
        client
            .publish(token.to_string(), kind.body())
            .await
            .map_err(|e| NatsError::other("ack", e))?;
        return Ok(());
    }
    match tokio::time::timeout(timeout, client.request(token.to_string(), kind.body())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(NatsError::other("ack", e)),
        Err(_) => Err(NatsError::TimedOut {
            op: "ack confirmation",
            after: timeout,
        }),
    }
}
