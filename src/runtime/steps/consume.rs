//! `step.eventbus.consume`: fetch up to `batch_size` messages from a durable pull consumer,
//! waiting at most `max_wait`. The pull consumer handle is bound once per (broker, stream,
//! durable) and reused by every execution, instead of a subscription per call.

use super::{decode_execute, pick, templated, ExecuteInput, StepOutput};
use crate::config::decode::{self, RawConfig};
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::nats::names::check_name;
use crate::pb::eventbus::{ConsumeRequest, ConsumeResponse, ConsumeStepConfig};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::modules::ConsumerModule;
use crate::runtime::provider::FetchAsk;
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_BATCH: i32 = 1000;
/// The default `max_bytes`: the encoded output (every form of every message) one execution
/// returns at most, so also about what it holds in memory. A single message larger than that
/// (a server accepts up to 64 MiB) still comes, alone, without its derived forms.
pub const DEFAULT_MAX_BYTES: i64 = 64 * 1024 * 1024;
pub const MAX_MAX_BYTES: i64 = 1024 * 1024 * 1024;

pub use crate::runtime::provider::Include;

fn check_max_bytes(n: i64) -> Result<(), String> {
    if !(0..=MAX_MAX_BYTES).contains(&n) {
        return Err(format!(
            "{n} is out of range (0..={MAX_MAX_BYTES}; 0 means {DEFAULT_MAX_BYTES})"
        ));
    }
    Ok(())
}
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

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
        rt: &Registry,
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
        let declared = rt.declared_consumers(&durable, &stream, &broker_ref);
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
        let ask = FetchAsk {
            stream: &stream,
            durable: &durable,
            batch: limits.batch,
            max_bytes: limits.max_bytes,
            include: limits.include,
            max_wait,
        };
        broker
            .dispatch(Consume {
                component,
                rt,
                declared: declared.first(),
                ask,
            })
            .await
    }
}

/// How much one execution takes: messages, output bytes (all forms, as encoded), forms.
#[derive(Clone, Copy)]
struct Limits {
    batch: usize,
    max_bytes: usize,
    include: Include,
}

/// One bounded batch on the broker's provider: the declared stream and consumer ensured first;
/// a consumer deleted behind our back is forgotten and, when declared, recreated once.
struct Consume<'a> {
    component: &'a str,
    rt: &'a Registry,
    declared: Option<&'a Arc<ConsumerModule>>,
    ask: FetchAsk<'a>,
}

impl ForProvider for Consume<'_> {
    type Out = Result<StepOutput, RuntimeError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        let failed = |e| RuntimeError::broker(self.component, e);
        let p = P::open(broker).await.map_err(failed)?;
        let p = &*p;
        if let Some(c) = self.declared {
            if let Some(s) = self.rt.stream_module(&c.spec.stream) {
                s.ensure_on(p).await.map_err(failed)?;
            }
            c.ensure_on(p).await.map_err(failed)?;
        }
        let messages = match p.fetch(self.ask).await {
            Err(e) if e.is_not_found() => {
                p.forget(self.ask.stream, self.ask.durable).await;
                if let Some(c) = self.declared {
                    c.invalidate().await;
                    c.ensure_on(p).await.map_err(failed)?;
                }
                p.fetch(self.ask).await
            }
            other => other,
        }
        .map_err(failed)?;
        let mut messages = messages;
        crate::telemetry::consumed(
            &broker.spec,
            self.ask.stream,
            self.ask.durable,
            &mut messages,
        );
        let out = ConsumeResponse {
            count: messages.len() as i32,
            messages,
        };
        Ok(StepOutput {
            typed: StepKind::Consume.pack_output(&out),
        })
    }
}
