//! The producer: idempotent (`enable.idempotence`: acks=all, ordered retries, and the broker
//! drops a retried batch it already has), the subject in a header and as the default record
//! key, correlation id, message id and user headers as record headers. Publish means the
//! broker's acknowledgement was received; every send is bounded by the timeout
//! (`message.timeout.ms` covers librdkafka's own retries).
//!
//! De-duplication, plainly: the idempotent producer removes duplicates that its own retries
//! would create, within one producer session (one producer id). It does not de-duplicate two
//! sends of the same `message_id`, a resend after a plugin restart, or sends from two plugin
//! processes; Kafka has no message-id window like NATS's `Nats-Msg-Id`. `message_id` travels
//! in the `eventbus.msg_id` header for consumers to de-duplicate, and a publish never reports
//! `duplicate`.

use bytes::Bytes;
use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::BTreeMap;
use std::time::Duration;

use super::client::KafkaSettings;
use super::subject::{is_reserved_header, CORRELATION_HEADER, MSG_ID_HEADER, SUBJECT_HEADER};
use super::KafkaError;
use crate::nats::names::check_publish_subject;

/// Bulk publish: messages in flight at most, by default.
pub const DEFAULT_WINDOW: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    pub correlation_id: Option<String>,
    pub msg_id: Option<String>,
    /// Record key; None: the subject (one subject keeps its order within a partition).
    pub key: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker or producer timestamp, unix ms.
    pub timestamp_ms: Option<i64>,
}

impl Outgoing {
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            subject: subject.into(),
            payload: payload.into(),
            ..Default::default()
        }
    }

    /// Local checks before anything is sent: a publishable subject, no reserved header names.
    pub fn check(&self) -> Result<(), KafkaError> {
        check_publish_subject(&self.subject)
            .map_err(|e| KafkaError::invalid(format!("Publish: subject {e}")))?;
        if let Some(h) = self.headers.keys().find(|h| is_reserved_header(h)) {
            return Err(KafkaError::invalid(format!(
                "Publish: header {h:?} is reserved for the plugin (names starting \"eventbus.\")"
            )));
        }
        Ok(())
    }

    /// The record headers: user headers, then subject, correlation id and message id.
    pub(crate) fn record_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len() + 3);
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        h = h.insert(Header {
            key: SUBJECT_HEADER,
            value: Some(self.subject.as_bytes()),
        });
        if let Some(c) = self.correlation_id.as_deref().filter(|c| !c.is_empty()) {
            h = h.insert(Header {
                key: CORRELATION_HEADER,
                value: Some(c.as_bytes()),
            });
        }
        if let Some(m) = self.msg_id.as_deref().filter(|m| !m.is_empty()) {
            h = h.insert(Header {
                key: MSG_ID_HEADER,
                value: Some(m.as_bytes()),
            });
        }
        h
    }
}

#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer,
    timeout: Duration,
}

impl KafkaProducer {
    /// An idempotent producer; `timeout` bounds each send from enqueue to acknowledgement.
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, KafkaError> {
        let mut cc = settings.client_config();
        cc.set("enable.idempotence", "true")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .set(
                "request.timeout.ms",
                timeout.as_millis().clamp(1, 30_000).to_string(),
            );
        // Caller extras win (tests set linger.ms=0 and batch.num.messages=1).
        for (k, v) in &settings.extra {
            cc.set(k, v);
        }
        let inner: FutureProducer = cc
            .create()
            .map_err(|e| KafkaError::client("CreateProducer", e))?;
        Ok(KafkaProducer { inner, timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn publish(&self, topic: &str, m: &Outgoing) -> Result<Published, KafkaError> {
        m.check()?;
        let key: &[u8] = m.key.as_deref().unwrap_or(m.subject.as_bytes());
        self.send(topic, None, key, &m.payload, m.record_headers())
            .await
    }

    /// Many messages, at most `window` unacknowledged at a time, results in list order.
    /// `topic_of` picks each message's topic (None: refused, nothing sent for it).
    pub async fn publish_list<F>(
        &self,
        msgs: &[Outgoing],
        window: usize,
        topic_of: F,
    ) -> Vec<Result<Published, KafkaError>>
    where
        F: Fn(&str) -> Option<String>,
    {
        let window = window.clamp(1, 4096);
        futures::stream::iter(msgs.iter().map(|m| {
            let topic = topic_of(&m.subject);
            async move {
                match topic {
                    Some(t) => self.publish(&t, m).await,
                    None => Err(KafkaError::invalid(format!(
                        "Publish: no stream claims subject {:?}",
                        m.subject
                    ))),
                }
            }
        }))
        .buffered(window)
        .collect()
        .await
    }

    /// One record as given (retry copies and dead letters use it with their own headers).
    pub(crate) async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<Published, KafkaError> {
        let mut rec = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        // The queue wait is part of the same budget; the outer timeout is a backstop in case
        // the delivery report never comes (it should, by message.timeout.ms).
        let send = self.inner.send(rec, self.timeout);
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
            Err(_) => Err(KafkaError::TimedOut("Publish")),
            Ok(Err((e, _))) => Err(KafkaError::client("Publish", e)),
            Ok(Ok(d)) => Ok(Published {
                topic: topic.to_string(),
                partition: d.partition,
                offset: d.offset,
                timestamp_ms: d.timestamp.to_millis(),
            }),
        }
    }

    /// Waits (bounded) for everything queued to be acknowledged.
    pub async fn flush(&self, within: Duration) -> Result<(), KafkaError> {
        let p = self.inner.clone();
        tokio::task::spawn_blocking(move || p.flush(within))
            .await
            .map_err(|_| KafkaError::Cancelled("Flush"))?
            .map_err(|e| KafkaError::client("Flush", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn headers_carry_subject_correlation_and_message_id() {
        let m = Outgoing {
            subject: "orders.created".into(),
            headers: [("traceparent".to_string(), "00-ab-cd-01".to_string())].into(),
            correlation_id: Some("corr-1".into()),
            msg_id: Some("m-1".into()),
            ..Default::default()
        };
        m.check().unwrap();
        let h = m.record_headers();
        let got: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("traceparent".into(), "00-ab-cd-01".into()),
                (SUBJECT_HEADER.into(), "orders.created".into()),
                (CORRELATION_HEADER.into(), "corr-1".into()),
                (MSG_ID_HEADER.into(), "m-1".into()),
            ]
        );
    }

    #[test]
    fn bad_subjects_and_reserved_headers_are_refused_before_sending() {
        let bad = Outgoing {
            subject: "orders.*".into(),
            ..Default::default()
        };
        assert!(bad
            .check()
            .unwrap_err()
            .to_string()
            .contains("Publish: subject"));
        let reserved = Outgoing {
            subject: "a".into(),
            headers: [(SUBJECT_HEADER.to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        let e = reserved.check().unwrap_err().to_string();
        assert!(e.contains("reserved for the plugin"), "{e}");
    }
}
