//! `step.eventbus.consume`: fetch up to `batch_size` messages from a durable pull consumer,
//! waiting at most `max_wait`. The pull consumer handle is bound once per (broker, stream,
//! durable) and reused by every execution, instead of a subscription per call.

use super::{decode_execute, pick, templated, ExecuteInput, StepOutput};
use crate::config::decode::{self, RawConfig};
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::nats::names::check_name;
use crate::nats::{NatsConn, NatsError};
use crate::pb::eventbus::{ConsumeRequest, ConsumeResponse, ConsumeStepConfig, Message};
use crate::runtime::modules::consumer::get_stream;
use crate::runtime::steps::publish::rfc3339;
use crate::runtime::types::StepKind;
use crate::runtime::{Runtime, RuntimeError};
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

pub const MAX_BATCH: i32 = 1000;
/// The default and the largest `max_bytes`: 64 MiB is the largest `max_payload` a server
/// accepts, so one message always fits; a batch never holds more payload than this.
pub const DEFAULT_MAX_BYTES: i64 = 64 * 1024 * 1024;
pub const MAX_MAX_BYTES: i64 = 1024 * 1024 * 1024;

pub use super::message::Include;

fn check_max_bytes(n: i64) -> Result<(), String> {
    if !(0..=MAX_MAX_BYTES).contains(&n) {
        return Err(format!(
            "{n} is out of range (0..={MAX_MAX_BYTES}; 0 means {DEFAULT_MAX_BYTES})"
        ));
    }
    Ok(())
}
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

type PullKey = (String, String, String);

/// Long-lived pull consumer handles, keyed by (broker module, stream, durable).
#[derive(Default)]
pub struct PullCache {
    map: Mutex<HashMap<PullKey, PullConsumer>>,
}

impl PullCache {
    pub async fn get(
        &self,
        broker: &str,
        conn: &NatsConn,
        stream: &str,
        durable: &str,
    ) -> Result<PullConsumer, NatsError> {
        let key = (broker.to_string(), stream.to_string(), durable.to_string());
        if let Some(c) = self.map.lock().await.get(&key) {
            return Ok(c.clone());
        }
        let s = get_stream(conn, stream).await?;
        if crate::runtime::modules::consumer::fetch_consumer_config(&s, durable)
            .await?
            .is_none()
        {
            return Err(NatsError::NotFound {
                what: format!("consumer {durable:?} on stream {stream:?}"),
            });
        }
        let consumer: PullConsumer = s
            .get_consumer(durable)
            .await
            .map_err(|e| NatsError::other("bind consumer", e))?;
        self.map.lock().await.insert(key, consumer.clone());
        Ok(consumer)
    }

    pub async fn forget(&self, broker: &str, stream: &str, durable: &str) {
        self.map.lock().await.remove(&(
            broker.to_string(),
            stream.to_string(),
            durable.to_string(),
        ));
    }

    pub async fn forget_broker(&self, broker: &str) {
        self.map.lock().await.retain(|k, _| k.0 != broker);
    }
}

pub struct ConsumeStep {
    /// `<type> "<name>"`, the prefix of every error this step reports.
    component: String,
}

fn check_batch(n: i32) -> Result<(), String> {
    if !(0..=MAX_BATCH).contains(&n) {
        return Err(format!("{n} is out of range (1..={MAX_BATCH}; 0 means 1)"));
    }
    Ok(())
}

impl ConsumeStep {
    pub fn create(name: &str, raw: RawConfig<'_>) -> Result<Self, RuntimeError> {
        let kind = StepKind::Consume;
        let mut p = Problems::new(kind.type_name(), name);
        match decode::decode::<ConsumeStepConfig>(kind.full_messages().0, raw) {
            Err(lines) => p.raw(lines),
            Ok(c) => {
                if !c.consumer.is_empty() && !templated(&c.consumer) {
                    p.check("consumer", check_name(&c.consumer));
                }
                if !c.stream_name.is_empty() && !templated(&c.stream_name) {
                    p.check("stream_name", check_name(&c.stream_name));
                }
                p.check("batch_size", check_batch(c.batch_size));
                p.check("max_bytes", check_max_bytes(c.max_bytes));
                p.check("include", Include::parse(&c.include).map(|_| ()));
                p.check(
                    "max_wait",
                    check_duration(&c.max_wait, MAX_DURATION).map(|_| ()),
                );
            }
        }
        p.finish(ConsumeStep {
            component: format!("{} {name:?}", kind.type_name()),
        })
        .map_err(Into::into)
    }

    pub async fn execute(
        &self,
        rt: &Runtime,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let component = &self.component;
        let (cfg, inp): (ConsumeStepConfig, ConsumeRequest) =
            decode_execute(StepKind::Consume, &self.component, &input)?;
        let durable = pick(&cfg.consumer, &inp.consumer);
        check_name(&durable).map_err(|e| {
            RuntimeError::failed(
                component,
                format!("consumer (durable name) {e}; set config.consumer"),
            )
        })?;
        let batch = if cfg.batch_size != 0 {
            cfg.batch_size
        } else {
            inp.batch_size
        };
        check_batch(batch)
            .map_err(|e| RuntimeError::failed(component, format!("batch_size {e}")))?;
        let batch = batch.max(1) as usize;
        check_max_bytes(cfg.max_bytes)
            .map_err(|e| RuntimeError::failed(component, format!("max_bytes {e}")))?;
        let limits = Limits {
            batch,
            max_bytes: if cfg.max_bytes == 0 {
                DEFAULT_MAX_BYTES
            } else {
                cfg.max_bytes
            } as usize,
            include: Include::parse(&cfg.include)
                .map_err(|e| RuntimeError::failed(component, format!("include: {e}")))?,
        };
        let bound = |d| {
            check_duration(d, MAX_DURATION)
                .map_err(|e| RuntimeError::failed(component, format!("max_wait {e}")))
        };
        let max_wait = bound(&cfg.max_wait)?
            .or(bound(&inp.max_wait)?)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_MAX_WAIT);
        let mut broker_ref = pick(&cfg.broker_ref, &inp.broker_ref);
        let mut stream = pick(&cfg.stream_name, &inp.stream_name);
        // A declared consumer module supplies stream and broker; several on different
        // streams are ambiguous rather than picked at random (Go defect B14).
        let declared: Vec<_> = rt
            .consumer_modules(&durable)
            .into_iter()
            .filter(|c| stream.is_empty() || c.spec.stream == stream)
            .filter(|c| {
                broker_ref.is_empty()
                    || c.spec.broker_ref.is_empty()
                    || c.spec.broker_ref == broker_ref
            })
            .collect();
        if declared.len() > 1 {
            let streams: Vec<String> = declared
                .iter()
                .map(|c| format!("{}/{}", c.spec.broker_ref, c.spec.stream))
                .collect();
            return Err(RuntimeError::failed(
                component,
                format!("consumer {durable:?} is declared on several streams ({}); set stream_name (and broker_ref)", streams.join(", ")),
            ));
        }
        if let Some(c) = declared.first() {
            if stream.is_empty() {
                stream = c.spec.stream.clone();
            }
            if broker_ref.is_empty() {
                broker_ref = c.spec.broker_ref.clone();
            }
        }
        // From pipeline state it reaches the API subject ($JS.API.CONSUMER.*.<stream>...), so it
        // gets the same rules (and length bound) as a configured one.
        if !stream.is_empty() {
            check_name(&stream)
                .map_err(|e| RuntimeError::failed(component, format!("stream_name {e}")))?;
        }
        if stream.is_empty() {
            return Err(RuntimeError::failed(
                component,
                format!("consumer {durable:?} is not declared as an eventbus.consumer module and no stream_name is set; add the module or set config.stream_name"),
            ));
        }
        let broker = rt.broker(&broker_ref, component)?;
        if broker.is_pg() {
            let ask = crate::runtime::pg::steps::ConsumeAsk {
                stream: &stream,
                durable: &durable,
                batch: limits.batch,
                max_bytes: limits.max_bytes,
                include: limits.include,
                max_wait,
            };
            return crate::runtime::pg::steps::consume(
                component,
                rt,
                &broker,
                declared.first(),
                ask,
            )
            .await;
        }
        if let Some(c) = declared.first() {
            if let Some(s) = rt.stream_module(&c.spec.stream) {
                s.ensure(&broker)
                    .await
                    .map_err(|e| RuntimeError::nats(component, e))?;
            }
            c.ensure(&broker)
                .await
                .map_err(|e| RuntimeError::nats(component, e))?;
        }
        let conn = broker
            .require()
            .await
            .map_err(|e| RuntimeError::nats(component, e))?;
        conn.wait_connected(conn.request_timeout)
            .await
            .map_err(|e| RuntimeError::nats(component, e))?;
        let messages = match fetch(
            rt,
            &broker.spec.name,
            &conn,
            &stream,
            &durable,
            limits,
            max_wait,
        )
        .await
        {
            Err(e) if e.is_not_found() => {
                // Deleted behind our back: forget the handle, recreate a declared consumer once.
                rt.pulls()
                    .forget(&broker.spec.name, &stream, &durable)
                    .await;
                if let Some(c) = declared.first() {
                    c.invalidate().await;
                    c.ensure(&broker)
                        .await
                        .map_err(|e| RuntimeError::nats(component, e))?;
                }
                fetch(
                    rt,
                    &broker.spec.name,
                    &conn,
                    &stream,
                    &durable,
                    limits,
                    max_wait,
                )
                .await
            }
            other => other,
        }
        .map_err(|e| RuntimeError::nats(component, e))?;
        let mut messages = messages;
        crate::telemetry::consumed(&broker.spec, &stream, &durable, &mut messages);
        let out = ConsumeResponse {
            count: messages.len() as i32,
            messages,
        };
        Ok(StepOutput {
            typed: StepKind::Consume.pack_output(&out),
        })
    }
}

/// How much one execution takes: messages, payload bytes (bounded by the server), forms.
#[derive(Clone, Copy)]
struct Limits {
    batch: usize,
    max_bytes: usize,
    include: Include,
}

async fn fetch(
    rt: &Runtime,
    broker: &str,
    conn: &NatsConn,
    stream: &str,
    durable: &str,
    limits: Limits,
    max_wait: Duration,
) -> Result<Vec<Message>, NatsError> {
    let consumer = rt.pulls().get(broker, conn, stream, durable).await?;
    let batch = limits.batch;
    let mut batch_stream = consumer
        .fetch()
        .max_messages(batch)
        .max_bytes(limits.max_bytes)
        .expires(max_wait)
        .messages()
        .await
        .map_err(|e| NatsError::other("fetch", e))?;
    let mut out = Vec::with_capacity(batch);
    // The fetch ends by itself at `max_wait`; the outer bound only guards against a server
    // that never answers.
    let bound = max_wait + conn.request_timeout;
    let collect = async {
        while let Some(m) = batch_stream.next().await {
            match m {
                Ok(m) => out.push(to_message(&m, durable, limits.include)),
                Err(e) => {
                    let text = e.to_string();
                    if text.contains("consumer deleted") || text.contains("not found") {
                        return Err(NatsError::NotFound {
                            what: format!("consumer {durable:?} on stream {stream:?}"),
                        });
                    }
                    tracing::debug!(error = %text, "fetch ended");
                    break;
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(bound, collect).await {
        Ok(r) => r?,
        Err(_) => tracing::debug!("fetch outer bound reached"),
    }
    Ok(out)
}

/// One delivered message in our wire shape (also the base of the trigger payload), with the
/// payload forms `include` asks for.
pub fn to_message(m: &async_nats::jetstream::Message, durable: &str, include: Include) -> Message {
    let mut headers = HashMap::new();
    if let Some(h) = &m.headers {
        for (k, vals) in h.iter() {
            // Multi-valued headers are joined, so the map stays string -> string.
            let joined = vals
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(",");
            headers.insert(k.to_string(), joined);
        }
    }
    let (seq, published, stream, delivered) = match m.info() {
        Ok(i) => (
            i.stream_sequence.to_string(),
            rfc3339(i.published),
            i.stream.to_string(),
            i.delivered as i32,
        ),
        Err(_) => (String::new(), String::new(), String::new(), 0),
    };
    let text = if include.text {
        std::str::from_utf8(&m.payload)
            .ok()
            .map(str::to_string)
            .unwrap_or_default()
    } else {
        String::new()
    };
    let json = if include.json {
        serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .map(|j| decode::json_to_value(&j))
    } else {
        None
    };
    Message {
        subject: m.subject.to_string(),
        payload: if include.payload {
            m.payload.to_vec()
        } else {
            Vec::new()
        },
        headers,
        sequence: seq,
        published_at: published,
        ack_token: m.reply.as_ref().map(|r| r.to_string()).unwrap_or_default(),
        stream,
        consumer: durable.to_string(),
        delivery_count: delivered,
        text,
        json,
        ..Default::default()
    }
}
