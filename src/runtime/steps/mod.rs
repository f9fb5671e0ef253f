//! Pipeline steps. Each step keeps its Create-time config (validated where no template is
//! involved); at Execute the host sends the config again with templates resolved plus the
//! pipeline state filtered to the input message, and fields set in config win over input.

pub mod ack;
pub mod ack_bulk;
pub mod bucket;
pub mod bulk;
pub mod consume;
pub mod execute;
pub mod kv;
pub mod message;
pub mod object;
pub mod output;
pub mod publish;
pub mod publish_bulk;

use super::error::RuntimeError;
use super::registry::Registry;
use super::types::StepKind;
use crate::config::decode::RawConfig;

pub(crate) use execute::{decode_execute, pick, templated};
pub use execute::{ExecuteInput, StepOutput};

pub enum Step {
    Publish(publish::PublishStep),
    Consume(consume::ConsumeStep),
    Ack(ack::AckStep),
    Kv(kv::KvStep),
    Object(object::ObjectStep),
}

impl Step {
    pub fn create(kind: StepKind, name: &str, raw: RawConfig<'_>) -> Result<Step, RuntimeError> {
        Ok(match kind {
            StepKind::Publish => Step::Publish(publish::PublishStep::create(name, raw)?),
            StepKind::Consume => Step::Consume(consume::ConsumeStep::create(name, raw)?),
            StepKind::Ack => Step::Ack(ack::AckStep::create(name, raw)?),
            StepKind::Kv => Step::Kv(kv::KvStep::create(name, raw)?),
            StepKind::Object => Step::Object(object::ObjectStep::create(name, raw)?),
        })
    }

    pub fn kind(&self) -> StepKind {
        match self {
            Step::Publish(_) => StepKind::Publish,
            Step::Consume(_) => StepKind::Consume,
            Step::Ack(_) => StepKind::Ack,
            Step::Kv(_) => StepKind::Kv,
            Step::Object(_) => StepKind::Object,
        }
    }

    pub async fn execute(
        &self,
        rt: &Registry,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        match self {
            Step::Publish(s) => s.execute(rt, input).await,
            // Boxed: consume's future is the largest (its pull loop) and would set the size
            // that every publish and ack future pays to move.
            Step::Consume(s) => Box::pin(s.execute(rt, input)).await,
            Step::Ack(s) => s.execute(rt, input).await,
            // Boxed like consume: the per-message steps keep their small futures.
            Step::Kv(s) => Box::pin(s.execute(rt, input)).await,
            Step::Object(s) => Box::pin(s.execute(rt, input)).await,
        }
    }
}
