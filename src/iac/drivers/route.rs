//! The provider-level dispatch: which event-bus provider serves a call. A broker is NATS (on
//! one of the deploy targets in `iac::targets`) or pgchannel (an adopted PostgreSQL database,
//! `drivers::pg`); a stream or consumer is served by its broker's provider, which the broker's
//! record in the provider state says (`BrokerRecord::pg`). This file is the only place that
//! makes that choice, as `targets::for_target` is the only place that chooses a deploy target.
//!
//! Each resource kind's `Driver` impl lives here, forwarding to the NATS driver modules
//! (`broker`, `stream`, `consumer`) or to their pgchannel counterparts.

use super::pg;
use super::{broker, consumer, stream, Ctx, Driver, Kind, Output};
use super::{BrokerDriver, ConsumerDriver, StreamDriver, CONSUMER_TYPE, STREAM_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::{PgRecord, ProviderState};
use crate::nats::consumer::ConsumerSpec;
use crate::nats::stream::StreamSpec;
use crate::pb::iac::ResourceRef;
use serde_json::Value as Json;

/// Which provider a stream or consumer is on.
enum On {
    Nats,
    /// The broker's name and how to reach its database.
    Pg(String, PgRecord),
}

/// By the broker a spec names (or the only broker recorded); explicit `servers` are NATS.
fn on_spec(state: &ProviderState, broker_ref: &str, servers: &[String]) -> On {
    if servers.iter().any(|s| !s.trim().is_empty()) {
        return On::Nats;
    }
    super::broker_name(broker_ref, state)
        .and_then(|b| {
            let pg = state.brokers.get(&b)?.pg.clone()?;
            Some(On::Pg(b, pg))
        })
        .unwrap_or(On::Nats)
}

/// By the recorded (or provider_id-named) location of an existing stream or consumer.
fn on_ref(
    state: &ProviderState,
    r: &ResourceRef,
    type_name: &str,
) -> Option<(stream::Located, PgRecord)> {
    let l = stream::locate(state, r, type_name)?;
    if !l.servers.is_empty() {
        return None;
    }
    let pg = state.brokers.get(&l.broker)?.pg.clone()?;
    Some((l, pg))
}

/// By a broker's name.
fn on_broker(state: &ProviderState, broker: &str) -> Option<PgRecord> {
    state.brokers.get(broker)?.pg.clone()
}

/// Persisted outputs of a pgchannel stream or consumer say so, for a Diff whose broker the
/// provider state no longer records.
fn outputs_are_pg(current: &Json) -> bool {
    current.get("provider").and_then(Json::as_str) == Some(pg::spec::PROVIDER)
}

impl Driver for BrokerDriver {
    type Spec = broker::BrokerDesired;
    const KIND: Kind = Kind::Broker;
    const TIER: i32 = 1;
    const SENSITIVE: &'static [&'static str] = &["token", "password"];
    /// Where clients reach it, and what a target that runs servers for us reports of them
    /// (absent keys compare equal).
    const DRIFT_KEYS: &'static [&'static str] = &[
        "url",
        "version",
        "replicas",
        "image",
        "instance_size",
        "http_port",
        "config_sha256",
        "dsn",
        "schema_version",
    ];
    fn decode(name: &str, config_json: &[u8]) -> Result<Self::Spec, DriverError> {
        broker::decode(name, config_json)
    }
    /// Unsupported targets fail here, at plan time.
    fn diff(
        name: &str,
        spec: &Self::Spec,
        _: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        if pg::broker::is_pg(spec) {
            pg::broker::diff(name, spec, current)
        } else {
            broker::diff(spec, current)
        }
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &Self::Spec) -> Result<Output, DriverError> {
        if pg::broker::is_pg(spec) {
            pg::broker::apply(ctx, name, spec).await
        } else {
            broker::apply(ctx, name, spec).await
        }
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        if let Some((name, rec)) = broker::record_for(&state, r) {
            if let Some(pgr) = &rec.pg {
                return pg::broker::read(ctx, name, rec, pgr).await;
            }
        }
        broker::read(ctx, r).await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let state = ctx.state.load()?;
        match broker::record_for(&state, r) {
            Some((_, rec)) if rec.pg.is_some() => pg::broker::delete(ctx, r).await,
            _ => broker::delete(ctx, r).await,
        }
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let state = ctx.state.load()?;
        if let Some((name, rec)) = broker::record_for(&state, r) {
            if let Some(pgr) = &rec.pg {
                return pg::broker::health(ctx, name, rec, pgr).await;
            }
        }
        broker::health(ctx, r).await
    }
    /// The broker itself, when it answers.
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        let r = ResourceRef {
            name: b.to_string(),
            r#type: super::BROKER_TYPE.into(),
            provider_id: b.to_string(),
        };
        Ok(vec![(b.to_string(), Self::read(ctx, &r).await?)])
    }
    async fn scale(_: &Ctx, _: &ResourceRef, _: i32) -> Result<Output, DriverError> {
        Err(DriverError::Unsupported(
            "Scale of infra.eventbus (replicas of a local broker change by replace; set replicas and apply)".into(),
        ))
    }
    fn troubleshoot(ctx: &Ctx, r: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
        let state = ctx.state.load()?;
        if broker::record_for(&state, r).is_some_and(|(_, rec)| rec.pg.is_some()) {
            return Err(DriverError::Unsupported(
                "Troubleshoot of a pgchannel broker (the database's own logs are the operator's)"
                    .into(),
            ));
        }
        broker::troubleshoot(ctx, r)
    }
}

impl Driver for StreamDriver {
    type Spec = StreamSpec;
    const KIND: Kind = Kind::Stream;
    const TIER: i32 = 2;
    const OPERATIONS: &'static [&'static str] = &["create", "read", "update", "delete", "scale"];
    const DRIFT_KEYS: &'static [&'static str] = &[
        "subjects",
        "retention_policy",
        "storage",
        "num_replicas",
        "max_bytes",
        "max_msgs",
        "max_msgs_per_subject",
        "max_msg_size",
        "max_age",
        "discard",
        "duplicate_window",
        "description",
        "mirror",
        "sources",
        "subject_transform",
        "republish",
        "compression",
        "placement",
        "metadata",
        "deny_delete",
        "deny_purge",
        "allow_rollup_hdrs",
        "allow_direct",
        "mirror_direct",
        "discard_new_per_subject",
        "max_consumers",
        "consumer_limits",
        "allow_msg_ttl",
        "subject_delete_marker_ttl",
    ];
    fn decode(name: &str, config_json: &[u8]) -> Result<StreamSpec, DriverError> {
        stream::decode(name, config_json)
    }
    /// On a pgchannel broker, NATS-only settings are refused here, at plan time.
    fn diff(
        name: &str,
        spec: &StreamSpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = super::desired_broker(&spec.broker_ref, &spec.servers, state);
        match on_spec(state, &spec.broker_ref, &spec.servers) {
            On::Pg(broker, _) => pg::stream::diff(name, spec, Some(&broker), current),
            On::Nats if outputs_are_pg(current) => {
                pg::stream::diff(name, spec, b.as_deref(), current)
            }
            On::Nats => Ok(stream::diff(spec, b.as_deref(), current)),
        }
    }
    async fn plan_report(
        ctx: &Ctx,
        spec: &StreamSpec,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let live = matches!(on_spec(state, &spec.broker_ref, &spec.servers), On::Nats).then_some(
            stream::Live {
                broker_ref: &spec.broker_ref,
                servers: &spec.servers,
                target: stream::LiveTarget::Stream(&spec.name),
            },
        );
        stream::live_report(ctx, state, live, changes).await
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &StreamSpec) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        match on_spec(&state, &spec.broker_ref, &spec.servers) {
            On::Pg(broker, pgr) => pg::stream::apply(ctx, name, spec, &broker, &pgr).await,
            On::Nats => stream::apply(ctx, name, spec).await,
        }
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, STREAM_TYPE) {
            Some((l, pgr)) => pg::stream::read(ctx, r, &l, &pgr).await,
            None => stream::read(ctx, r).await,
        }
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, STREAM_TYPE) {
            Some((l, pgr)) => pg::stream::delete(ctx, r, &l, &pgr).await,
            None => stream::delete(ctx, r).await,
        }
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, STREAM_TYPE) {
            Some((l, pgr)) => pg::stream::health(ctx, r, &l, &pgr).await,
            None => stream::health(ctx, r).await,
        }
    }
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        let state = ctx.state.load()?;
        match on_broker(&state, b) {
            Some(pgr) => pg::stream::enumerate(ctx, b, &pgr).await,
            None => stream::enumerate(ctx, b).await,
        }
    }
    async fn scale(ctx: &Ctx, r: &ResourceRef, replicas: i32) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        if on_ref(&state, r, STREAM_TYPE).is_some() {
            return Err(DriverError::Unsupported(
                "Scale of a pgchannel stream (its events are rows in one database; replicate the database instead)".into(),
            ));
        }
        stream::scale(ctx, r, replicas).await
    }
}

impl Driver for ConsumerDriver {
    type Spec = ConsumerSpec;
    const KIND: Kind = Kind::Consumer;
    const TIER: i32 = 2;
    const DRIFT_KEYS: &'static [&'static str] = &[
        "filter_subjects",
        "deliver_policy",
        "ack_policy",
        "max_deliver",
        "ack_wait",
        "max_ack_pending",
        "backoff",
        "description",
        "metadata",
        "replay_policy",
        "sample_freq",
        "headers_only",
        "inactive_threshold",
        "num_replicas",
        "mem_storage",
        "max_waiting",
        "max_batch",
        "max_expires",
        "max_bytes",
        "pause_until",
        "priority_policy",
        "priority_groups",
        "priority_timeout",
    ];
    fn decode(name: &str, config_json: &[u8]) -> Result<ConsumerSpec, DriverError> {
        consumer::decode(name, config_json)
    }
    fn diff(
        name: &str,
        spec: &ConsumerSpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let b = super::desired_broker(&spec.broker_ref, &spec.servers, state);
        match on_spec(state, &spec.broker_ref, &spec.servers) {
            On::Pg(broker, _) => pg::consumer::diff(name, spec, Some(&broker), current),
            On::Nats if outputs_are_pg(current) => {
                pg::consumer::diff(name, spec, b.as_deref(), current)
            }
            On::Nats => Ok(consumer::diff(spec, b.as_deref(), current)),
        }
    }
    async fn plan_report(
        ctx: &Ctx,
        spec: &ConsumerSpec,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let target = stream::LiveTarget::Consumer {
            stream: &spec.stream,
            durable: &spec.durable,
        };
        let live = matches!(on_spec(state, &spec.broker_ref, &spec.servers), On::Nats).then_some(
            stream::Live {
                broker_ref: &spec.broker_ref,
                servers: &spec.servers,
                target,
            },
        );
        stream::live_report(ctx, state, live, changes).await
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &ConsumerSpec) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        match on_spec(&state, &spec.broker_ref, &spec.servers) {
            On::Pg(broker, pgr) => pg::consumer::apply(ctx, name, spec, &broker, &pgr).await,
            On::Nats => consumer::apply(ctx, name, spec).await,
        }
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, CONSUMER_TYPE) {
            Some((l, pgr)) => pg::consumer::read(ctx, r, &l, &pgr).await,
            None => consumer::read(ctx, r).await,
        }
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, CONSUMER_TYPE) {
            Some((l, pgr)) => pg::consumer::delete(ctx, r, &l, &pgr).await,
            None => consumer::delete(ctx, r).await,
        }
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let state = ctx.state.load()?;
        match on_ref(&state, r, CONSUMER_TYPE) {
            Some((l, pgr)) => pg::consumer::health(ctx, r, &l, &pgr).await,
            None => consumer::health(ctx, r).await,
        }
    }
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        let state = ctx.state.load()?;
        match on_broker(&state, b) {
            Some(pgr) => pg::consumer::enumerate(ctx, b, &pgr).await,
            None => consumer::enumerate(ctx, b).await,
        }
    }
}
