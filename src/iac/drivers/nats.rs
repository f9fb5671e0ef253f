//! The NATS provider's IaC face: its drivers per resource kind (`broker`, `stream`,
//! `consumer`) behind the provider seam of `route`.

use super::bus::{BusProvider, Ops};
use super::kv_entry::{self, KvEntrySpec};
use super::{broker, consumer, desired_broker, kv, stream, Ctx, Output};
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::StreamDesired;
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::ProviderState;
use crate::iac::targets::BrokerDesired;
use crate::nats::kv::KvSpec;
use crate::pb::iac::ResourceRef;
use serde_json::Value as Json;

pub(crate) struct Nats;
pub(crate) static NATS: Nats = Nats;
struct Brokers;
struct Streams;
struct Consumers;
/// Key-value buckets or object stores (each kept as a stream).
struct Buckets(&'static crate::nats::kv::Vocab);
static KV_BUCKETS: Buckets = Buckets(&crate::nats::kv::KV);
static OBJECT_STORES: Buckets = Buckets(&crate::nats::kv::OBJ);
struct Entries;

impl BusProvider for Nats {
    fn brokers(&self) -> &dyn Ops<BrokerDesired> {
        &Brokers
    }
    fn streams(&self) -> &dyn Ops<StreamDesired> {
        &Streams
    }
    fn consumers(&self) -> &dyn Ops<ConsumerDesired> {
        &Consumers
    }
    fn buckets(&self) -> Option<&dyn Ops<KvSpec>> {
        Some(&KV_BUCKETS)
    }
    fn object_stores(&self) -> Option<&dyn Ops<KvSpec>> {
        Some(&OBJECT_STORES)
    }
    fn entries(&self) -> Option<&dyn Ops<KvEntrySpec>> {
        Some(&Entries)
    }
}

#[tonic::async_trait]
impl Ops<BrokerDesired> for Brokers {
    fn diff(
        &self,
        _: &str,
        spec: &BrokerDesired,
        _: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        broker::diff(spec, current)
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &BrokerDesired,
    ) -> Result<Output, DriverError> {
        broker::apply(ctx, name, spec).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        broker::read(ctx, r).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        broker::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        broker::health(ctx, r).await
    }
    fn troubleshoot(
        &self,
        ctx: &Ctx,
        r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError> {
        broker::troubleshoot(ctx, r)
    }
}

/// Plan's live check of a stream or consumer on its broker (the stream's and the consumer's
/// `plan_report`).
async fn live_report(
    ctx: &Ctx,
    state: &ProviderState,
    broker_ref: &str,
    servers: &[String],
    target: stream::LiveTarget<'_>,
    changes: Vec<Change>,
) -> Vec<Change> {
    let live = stream::Live {
        broker_ref,
        servers,
        target,
    };
    stream::live_report(ctx, state, Some(live), changes).await
}

#[tonic::async_trait]
impl Ops<StreamDesired> for Streams {
    fn diff(
        &self,
        _: &str,
        spec: &StreamDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        spec.refuse_partitions()?;
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        Ok(stream::diff(spec, b.as_deref(), current))
    }
    async fn plan_report(
        &self,
        ctx: &Ctx,
        spec: &StreamDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let target = stream::LiveTarget::Stream(&spec.name);
        live_report(ctx, state, &spec.broker_ref, &spec.servers, target, changes).await
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &StreamDesired,
    ) -> Result<Output, DriverError> {
        spec.refuse_partitions()?;
        stream::apply(ctx, name, spec).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        stream::read(ctx, r).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        stream::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        stream::health(ctx, r).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        stream::enumerate(ctx, broker).await
    }
    async fn scale(
        &self,
        ctx: &Ctx,
        r: &ResourceRef,
        replicas: i32,
    ) -> Result<Output, DriverError> {
        stream::scale(ctx, r, replicas).await
    }
}

#[tonic::async_trait]
impl Ops<ConsumerDesired> for Consumers {
    fn diff(
        &self,
        _: &str,
        spec: &ConsumerDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        Ok(consumer::diff(spec, b.as_deref(), current))
    }
    async fn plan_report(
        &self,
        ctx: &Ctx,
        spec: &ConsumerDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let target = stream::LiveTarget::Consumer {
            stream: &spec.stream,
            durable: &spec.durable,
        };
        live_report(ctx, state, &spec.broker_ref, &spec.servers, target, changes).await
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &ConsumerDesired,
    ) -> Result<Output, DriverError> {
        consumer::apply(ctx, name, spec).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        consumer::read(ctx, r).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        consumer::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        consumer::health(ctx, r).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        consumer::enumerate(ctx, broker).await
    }
}

#[tonic::async_trait]
impl Ops<KvSpec> for Buckets {
    fn diff(
        &self,
        _: &str,
        spec: &KvSpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        Ok(kv::diff(spec, state, current))
    }
    async fn plan_report(
        &self,
        ctx: &Ctx,
        spec: &KvSpec,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        kv::plan_report(ctx, spec, state, changes).await
    }
    async fn apply(&self, ctx: &Ctx, name: &str, spec: &KvSpec) -> Result<Output, DriverError> {
        kv::apply(ctx, name, spec).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        kv::read(ctx, r, self.0).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        kv::delete(ctx, r, self.0).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        kv::health(ctx, r, self.0).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        kv::enumerate(ctx, broker, self.0).await
    }
}

#[tonic::async_trait]
impl Ops<KvEntrySpec> for Entries {
    fn diff(
        &self,
        _: &str,
        spec: &KvEntrySpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        Ok(kv_entry::diff(spec, b.as_deref(), current))
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &KvEntrySpec,
    ) -> Result<Output, DriverError> {
        kv_entry::apply(ctx, name, spec).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        kv_entry::read(ctx, r).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        kv_entry::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        kv_entry::health(ctx, r).await
    }
}
