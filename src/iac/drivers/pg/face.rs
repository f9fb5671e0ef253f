//! The pgchannel provider's IaC face: its drivers per resource kind behind the provider seam
//! of `drivers::route`. Each finds its broker's database in the provider state.

use super::{broker, consumer, stream};
use crate::iac::drivers::bus::{BusProvider, Ops};
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::StreamDesired;
use crate::iac::drivers::stream::{locate, Located};
use crate::iac::drivers::{broker::record_for, desired_broker, Ctx, Output};
use crate::iac::drivers::{CONSUMER_TYPE, STREAM_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::{BrokerRecord, PgRecord, ProviderState};
use crate::iac::targets::BrokerDesired;
use crate::pb::iac::ResourceRef;
use serde_json::Value as Json;

pub(crate) struct Pgchannel;
pub(crate) static PGCHANNEL: Pgchannel = Pgchannel;
struct Brokers;
struct Streams;
struct Consumers;

impl BusProvider for Pgchannel {
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

/// The recorded pgchannel broker a broker reference names.
fn recorded(
    ctx: &Ctx,
    r: &ResourceRef,
) -> Result<Option<(String, BrokerRecord, PgRecord)>, DriverError> {
    let state = ctx.state.load()?;
    Ok(record_for(&state, r).and_then(|(name, rec)| {
        let pg = rec.pg.clone()?;
        Some((name.clone(), rec.clone(), pg))
    }))
}

/// Where a recorded stream or consumer is, and its broker's database.
fn located(
    ctx: &Ctx,
    r: &ResourceRef,
    type_name: &str,
) -> Result<(Located, PgRecord), DriverError> {
    let state = ctx.state.load()?;
    locate(&state, r, type_name)
        .and_then(|l| {
            let pg = state.brokers.get(&l.broker)?.pg.clone()?;
            Some((l, pg))
        })
        .ok_or_else(|| DriverError::not_found(format!("{type_name} {:?}", r.name)))
}

/// The database of the pgchannel broker a spec names.
fn database(ctx: &Ctx, broker_ref: &str) -> Result<(String, PgRecord), DriverError> {
    let state = ctx.state.load()?;
    crate::iac::drivers::broker_name(broker_ref, &state)
        .and_then(|b| {
            let pg = state.brokers.get(&b)?.pg.clone()?;
            Some((b, pg))
        })
        .ok_or_else(|| DriverError::not_found(format!("pgchannel broker {broker_ref:?}")))
}

fn by_broker(ctx: &Ctx, broker: &str) -> Result<PgRecord, DriverError> {
    let state = ctx.state.load()?;
    state
        .brokers
        .get(broker)
        .and_then(|b| b.pg.clone())
        .ok_or_else(|| DriverError::not_found(format!("pgchannel broker {broker:?}")))
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
        match recorded(ctx, r)? {
            Some((name, rec, pg)) => broker::read(ctx, &name, &rec, &pg).await,
            None => Err(DriverError::not_found(format!(
                "infra.eventbus {:?}",
                r.name
            ))),
        }
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        broker::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        match recorded(ctx, r)? {
            Some((name, rec, pg)) => broker::health(ctx, &name, &rec, &pg).await,
            None => Err(DriverError::not_found(format!(
                "infra.eventbus {:?}",
                r.name
            ))),
        }
    }
    fn troubleshoot(&self, _: &Ctx, _: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
        Err(DriverError::Unsupported(
            "Troubleshoot of a pgchannel broker (the database's own logs are the operator's)"
                .into(),
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
        spec.refuse_partitions()?;
        let b = desired_broker(&spec.broker_ref, &spec.servers, state);
        stream::diff(name, spec, b.as_deref(), current)
    }
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &StreamDesired,
    ) -> Result<Output, DriverError> {
        spec.refuse_partitions()?;
        let (broker, pg) = database(ctx, &spec.broker_ref)?;
        stream::apply(ctx, name, spec, &broker, &pg).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let (l, pg) = located(ctx, r, STREAM_TYPE)?;
        stream::read(ctx, r, &l, &pg).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let (l, pg) = located(ctx, r, STREAM_TYPE)?;
        stream::delete(ctx, r, &l, &pg).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let (l, pg) = located(ctx, r, STREAM_TYPE)?;
        stream::health(ctx, r, &l, &pg).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        stream::enumerate(ctx, broker, &by_broker(ctx, broker)?).await
    }
    async fn scale(&self, _: &Ctx, _: &ResourceRef, _: i32) -> Result<Output, DriverError> {
        Err(DriverError::Unsupported(
            "Scale of a pgchannel stream (its events are rows in one database; replicate the database instead)".into(),
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
    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        spec: &ConsumerDesired,
    ) -> Result<Output, DriverError> {
        let (broker, pg) = database(ctx, &spec.broker_ref)?;
        consumer::apply(ctx, name, spec, &broker, &pg).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let (l, pg) = located(ctx, r, CONSUMER_TYPE)?;
        consumer::read(ctx, r, &l, &pg).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let (l, pg) = located(ctx, r, CONSUMER_TYPE)?;
        consumer::delete(ctx, r, &l, &pg).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let (l, pg) = located(ctx, r, CONSUMER_TYPE)?;
        consumer::health(ctx, r, &l, &pg).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        consumer::enumerate(ctx, broker, &by_broker(ctx, broker)?).await
    }
}
