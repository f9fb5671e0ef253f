//! The kafka provider's IaC face: a broker adopts a Kafka cluster (`deploy_target:
//! self_hosted`), a stream is a topic, a consumer is a consumer group on it. The domain
//! (`crate::kafka`: topic and group conversions, the admin and offsets layers) is the one the
//! runtime face uses, so wfctl and the runtime agree on what a topic or group is.
//!
//! - `broker`: validate the kafka config, reach the cluster, record its servers and security.
//! - `stream`, `consumer`: topics and groups, with create-or-adopt, update in place, replace
//!   where Kafka forbids the change (with what it destroys), read, delete, drift.
//! - `conns`: one admin client per cluster per plugin process.

mod broker;
mod conns;
mod consumer;
mod stream;

use crate::iac::drivers::bus::{BusProvider, Ops};
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::{locate, Located, StreamDesired};
use crate::iac::drivers::{broker::record_for, desired_broker, Ctx, Output};
use crate::iac::drivers::{CONSUMER_TYPE, STREAM_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::{BrokerRecord, KafkaRecord, ProviderState};
use crate::iac::targets::BrokerDesired;
use crate::pb::iac::ResourceRef;
use serde_json::Value as Json;

/// ValidatePlan's check of a kafka broker: its deploy target and its kafka section.
pub(crate) fn broker_refused(name: &str, d: &BrokerDesired) -> Option<DriverError> {
    broker::check(name, d).err()
}

/// ValidatePlan's check of a stream on a kafka broker: what the topic conversion refuses.
pub(crate) fn stream_refused(name: &str, d: &StreamDesired) -> Option<DriverError> {
    stream::topic_spec(name, d, &KafkaRecord::default()).err()
}

/// ValidatePlan's check of a consumer on a kafka broker: what the group conversion refuses.
pub(crate) fn consumer_refused(name: &str, d: &ConsumerDesired) -> Option<DriverError> {
    consumer::group_spec(name, d).err()
}

pub(crate) struct Kafka;
pub(crate) static KAFKA: Kafka = Kafka;
struct Brokers;
struct Streams;
struct Consumers;

impl BusProvider for Kafka {
    fn brokers(&self) -> &dyn Ops<BrokerDesired> {
        &Brokers
    }
    fn streams(&self) -> &dyn Ops<StreamDesired> {
        &Streams
    }
    fn consumers(&self) -> &dyn Ops<ConsumerDesired> {
        &Consumers
    }
}

/// The recorded kafka broker a broker reference names.
fn recorded(
    ctx: &Ctx,
    r: &ResourceRef,
) -> Result<(String, BrokerRecord, KafkaRecord), DriverError> {
    let state = ctx.state.load()?;
    record_for(&state, r)
        .and_then(|(name, rec)| Some((name.clone(), rec.clone(), rec.kafka.clone()?)))
        .ok_or_else(|| DriverError::not_found(format!("infra.eventbus {:?}", r.name)))
}

/// Where a recorded topic or group is, its cluster, and its recorded outputs.
fn located(
    ctx: &Ctx,
    r: &ResourceRef,
    type_name: &str,
) -> Result<(Located, KafkaRecord, Json), DriverError> {
    let state = ctx.state.load()?;
    locate(&state, r, type_name)
        .and_then(|l| {
            let k = state.brokers.get(&l.broker)?.kafka.clone()?;
            let recorded = state
                .resources
                .get(&r.name)
                .filter(|rec| rec.type_name == type_name)
                .map(|rec| rec.outputs.clone())
                .unwrap_or(Json::Null);
            Some((l, k, recorded))
        })
        .ok_or_else(|| DriverError::not_found(format!("{type_name} {:?}", r.name)))
}

/// The cluster of the kafka broker a spec names.
fn cluster(state: &ProviderState, broker_ref: &str) -> Option<(String, KafkaRecord)> {
    crate::iac::drivers::broker_name(broker_ref, state)
        .and_then(|b| Some((b.clone(), state.brokers.get(&b)?.kafka.clone()?)))
}

fn cluster_or_err(ctx: &Ctx, broker_ref: &str) -> Result<(String, KafkaRecord), DriverError> {
    cluster(&ctx.state.load()?, broker_ref)
        .ok_or_else(|| DriverError::not_found(format!("kafka broker {broker_ref:?}")))
}

/// The topics or groups this provider records on `broker`, read live.
async fn enumerate_recorded(
    ctx: &Ctx,
    broker: &str,
    type_name: &str,
    ops: &dyn Ops<impl Sync>,
) -> Result<Vec<(String, Output)>, DriverError> {
    let state = ctx.state.load()?;
    let mut out = Vec::new();
    for (name, rec) in &state.resources {
        if rec.type_name != type_name || rec.broker != broker || !rec.servers.is_empty() {
            continue;
        }
        let r = ResourceRef {
            name: name.clone(),
            r#type: type_name.into(),
            provider_id: rec.provider_id.clone(),
        };
        match ops.read(ctx, &r).await {
            Ok(o) => out.push((name.clone(), o)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn health_of(r: Result<Output, DriverError>, what: &str) -> Result<(bool, String), DriverError> {
    match r {
        Ok(_) => Ok((true, format!("{what} (running)"))),
        Err(e) if e.is_not_found() => Err(e),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}

#[tonic::async_trait]
impl Ops<BrokerDesired> for Brokers {
    fn diff(
        &self,
        name: &str,
        spec: &BrokerDesired,
        _: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        broker::diff(name, spec, current)
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
        let (name, rec, k) = recorded(ctx, r)?;
        broker::read(ctx, &name, &rec, &k).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        broker::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let (name, rec, k) = recorded(ctx, r)?;
        broker::health(ctx, &name, &rec, &k).await
    }
    fn troubleshoot(&self, _: &Ctx, _: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
        Err(DriverError::Unsupported(
            "Troubleshoot of a kafka broker (the cluster's own logs are the operator's)".into(),
        ))
    }
}

#[tonic::async_trait]
impl Ops<StreamDesired> for Streams {
    fn diff(
        &self,
        name: &str,
        spec: &StreamDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        stream::diff(name, spec, state, b.as_deref(), current)
    }
    async fn plan_report(
        &self,
        ctx: &Ctx,
        spec: &StreamDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let b = cluster(state, &spec.broker_ref);
        stream::plan_report(ctx, state, b, &spec.name, changes).await
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &StreamDesired,
    ) -> Result<Output, DriverError> {
        let (broker, k) = cluster_or_err(ctx, &spec.broker_ref)?;
        stream::apply(ctx, name, spec, &broker, &k).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let (l, k, recorded) = located(ctx, r, STREAM_TYPE)?;
        stream::read(ctx, r, &l, &k, &recorded).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let (l, k, _) = located(ctx, r, STREAM_TYPE)?;
        stream::delete(ctx, r, &l, &k).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let what = format!("kafka topic {:?}", r.name);
        health_of(self.read(ctx, r).await, &what)
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        enumerate_recorded(ctx, broker, STREAM_TYPE, self).await
    }
    async fn scale(&self, _: &Ctx, _: &ResourceRef, _: i32) -> Result<Output, DriverError> {
        Err(DriverError::Unsupported(
            "Scale of a kafka topic (raise partitions in its config and apply; its replication factor changes only by replace)".into(),
        ))
    }
}

#[tonic::async_trait]
impl Ops<ConsumerDesired> for Consumers {
    fn diff(
        &self,
        name: &str,
        spec: &ConsumerDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        consumer::diff(name, spec, b.as_deref(), current)
    }
    async fn plan_report(
        &self,
        _: &Ctx,
        spec: &ConsumerDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let b = cluster(state, &spec.broker_ref);
        consumer::plan_report(&spec.durable, &spec.stream, b, changes).await
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &ConsumerDesired,
    ) -> Result<Output, DriverError> {
        let (broker, k) = cluster_or_err(ctx, &spec.broker_ref)?;
        consumer::apply(ctx, name, spec, &broker, &k).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let (l, k, recorded) = located(ctx, r, CONSUMER_TYPE)?;
        consumer::read(ctx, r, &l, &k, &recorded).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let (l, k, _) = located(ctx, r, CONSUMER_TYPE)?;
        consumer::delete(ctx, r, &l, &k).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let what = format!("kafka consumer group {:?}", r.name);
        health_of(self.read(ctx, r).await, &what)
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        enumerate_recorded(ctx, broker, CONSUMER_TYPE, self).await
    }
}

#[cfg(test)]
mod tests;
