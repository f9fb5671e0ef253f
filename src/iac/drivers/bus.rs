//! The provider seam of the IaC face: what one event-bus provider's drivers are. NATS
//! (`drivers::nats`) and pgchannel (`drivers::pg`) implement it; `drivers::route` chooses one
//! per call.

use super::kv_entry::KvEntrySpec;
use super::{Ctx, Output};
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::StreamDesired;
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::ProviderState;
use crate::iac::targets::BrokerDesired;
use crate::nats::kv::KvSpec;
use crate::pb::iac::ResourceRef;
use serde_json::Value as Json;

/// One provider's driver for one resource kind (spec type `S`, shared by every provider).
/// Each looks up in the provider state what it needs of its broker.
#[tonic::async_trait]
pub(crate) trait Ops<S: Sync>: Sync {
    /// No I/O: the provider state only resolves which broker a stream or consumer names.
    fn diff(
        &self,
        name: &str,
        spec: &S,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError>;
    /// Diff's look at the live broker (after `diff`): a provider may force a change its
    /// broker cannot make in place to a replace, and say what a replace destroys. Default:
    /// the changes as `diff` made them, no I/O.
    async fn plan_report(
        &self,
        _ctx: &Ctx,
        _spec: &S,
        _state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        changes
    }
    async fn apply(&self, ctx: &Ctx, name: &str, spec: &S) -> Result<Output, DriverError>;
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError>;
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError>;
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError>;
    /// What of this kind lives on the recorded broker `broker` (streams and consumers; a
    /// broker enumerates itself, `BrokerDriver`).
    async fn enumerate(
        &self,
        _ctx: &Ctx,
        _broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        Ok(Vec::new())
    }
    /// Streams only.
    async fn scale(
        &self,
        _ctx: &Ctx,
        _r: &ResourceRef,
        _replicas: i32,
    ) -> Result<Output, DriverError> {
        Err(DriverError::Unsupported("Scale".into()))
    }
    /// Brokers only.
    fn troubleshoot(
        &self,
        _ctx: &Ctx,
        _r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError> {
        Err(DriverError::Unsupported("Troubleshoot".into()))
    }
}

/// A provider's IaC face: its drivers for brokers, streams and consumers.
pub(crate) trait BusProvider: Sync {
    fn brokers(&self) -> &dyn Ops<BrokerDesired>;
    fn streams(&self) -> &dyn Ops<StreamDesired>;
    fn consumers(&self) -> &dyn Ops<ConsumerDesired>;
    /// Key-value buckets; `None` when the provider has none (`route` refuses them, one line).
    fn buckets(&self) -> Option<&dyn Ops<KvSpec>> {
        None
    }
    /// Object stores; `None` when the provider has none.
    fn object_stores(&self) -> Option<&dyn Ops<KvSpec>> {
        None
    }
    /// Keys of key-value buckets; `None` with `buckets`.
    fn entries(&self) -> Option<&dyn Ops<KvEntrySpec>> {
        None
    }
}
