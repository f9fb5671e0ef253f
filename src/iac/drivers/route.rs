//! The provider-level dispatch: which event-bus provider serves a call. A broker is NATS (on
//! one of the deploy targets in `iac::targets`) or pgchannel (an adopted PostgreSQL database,
//! `drivers::pg`); a stream or consumer is served by its broker's provider, which the broker's
//! record in the provider state says (`BrokerRecord::provider`). This file is the only place
//! that makes that choice (`on`, the one match over providers), as `targets::for_target` is
//! the only place that chooses a deploy target.
//!
//! Each provider's IaC face is a `BusProvider`: its drivers per resource kind (`Ops`), over the
//! specs every provider shares. The resource kinds' `Driver` impls below only decide the
//! provider and forward; adding a provider is its folder (an `impl BusProvider`) plus one arm
//! in `on`.

use super::bus::BusProvider;
use super::bus::Ops;
use super::kv_entry::KvEntrySpec;
use super::{broker, Ctx, Driver, Kind, Output};
use super::{
    BrokerDriver, BucketDriver, ConsumerDriver, StreamDriver, CONSUMER_TYPE, KV_TYPE,
    OBJECT_STORE_TYPE, STREAM_TYPE,
};
use super::{KvEntryDriver, KV_ENTRY_TYPE};
use crate::iac::drivers::consumer::ConsumerDesired;
use crate::iac::drivers::stream::StreamDesired;
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::ProviderState;
use crate::iac::targets::BrokerDesired;
use crate::nats::kv::KvSpec;
use crate::pb::iac::ResourceRef;
use crate::providers::Provider;
use serde_json::Value as Json;

/// The provider's implementation: the one match over providers in the IaC face. Providers
/// without an IaC face of their own are refused when their broker config is validated, so
/// they never reach here; should one, it is served as NATS, whose drivers name what is wrong.
fn on(p: Provider) -> &'static dyn BusProvider {
    match p {
        Provider::Pgchannel => &super::pg::PGCHANNEL,
        Provider::Kafka => &super::kafka::KAFKA,
        Provider::Nats | Provider::Kinesis => &super::nats::NATS,
    }
}

/// By the broker a stream or consumer spec names (or the only broker recorded); explicit
/// `servers` are NATS. For a Diff whose broker the provider state no longer records, the
/// persisted outputs say which provider they describe (`provider`, absent for NATS).
fn by_spec(
    state: &ProviderState,
    broker_ref: &str,
    servers: &[String],
    current: &Json,
) -> Provider {
    if servers.iter().any(|s| !s.trim().is_empty()) {
        return Provider::Nats;
    }
    super::broker_name(broker_ref, state)
        .and_then(|b| state.brokers.get(&b))
        .map(|rec| rec.provider())
        .or_else(|| {
            current
                .get("provider")
                .and_then(Json::as_str)
                .and_then(Provider::parse)
        })
        .unwrap_or(Provider::Nats)
}

/// By the recorded (or provider_id-named) location of an existing stream or consumer.
fn by_ref(ctx: &Ctx, r: &ResourceRef, type_name: &str) -> Result<Provider, DriverError> {
    let state = ctx.state.load()?;
    Ok(super::stream::locate(&state, r, type_name)
        .filter(|l| l.servers.is_empty())
        .and_then(|l| state.brokers.get(&l.broker).map(|rec| rec.provider()))
        .unwrap_or(Provider::Nats))
}

/// By a recorded broker: its own name, or the one a broker resource reference names.
fn by_broker(ctx: &Ctx, broker: &str) -> Result<Provider, DriverError> {
    let state = ctx.state.load()?;
    Ok(state
        .brokers
        .get(broker)
        .map_or(Provider::Nats, |rec| rec.provider()))
}

fn by_broker_ref(ctx: &Ctx, r: &ResourceRef) -> Result<Provider, DriverError> {
    let state = ctx.state.load()?;
    Ok(broker::record_for(&state, r).map_or(Provider::Nats, |(_, rec)| rec.provider()))
}

impl Driver for BrokerDriver {
    type Spec = BrokerDesired;
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
        "desired_counts",
        "dsn",
        "schema_version",
        "brokers",
    ];
    fn decode(name: &str, config_json: &[u8]) -> Result<Self::Spec, DriverError> {
        broker::decode(name, config_json)
    }
    /// Unsupported targets fail here, at plan time.
    fn diff(
        name: &str,
        spec: &Self::Spec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        on(spec.spec.provider)
            .brokers()
            .diff(name, spec, state, current)
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &Self::Spec) -> Result<Output, DriverError> {
        on(spec.spec.provider)
            .brokers()
            .apply(ctx, name, spec)
            .await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        on(by_broker_ref(ctx, r)?).brokers().read(ctx, r).await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        on(by_broker_ref(ctx, r)?).brokers().delete(ctx, r).await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        on(by_broker_ref(ctx, r)?).brokers().health(ctx, r).await
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
        on(by_broker_ref(ctx, r)?).brokers().troubleshoot(ctx, r)
    }
}

impl Driver for StreamDriver {
    type Spec = StreamDesired;
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
        "partitions",
    ];
    fn decode(name: &str, config_json: &[u8]) -> Result<StreamDesired, DriverError> {
        super::stream::decode_desired(name, config_json)
    }
    /// On a pgchannel broker, NATS-only settings are refused here, at plan time.
    fn diff(
        name: &str,
        spec: &StreamDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        on(by_spec(state, &spec.broker_ref, &spec.servers, current))
            .streams()
            .diff(name, spec, state, current)
    }
    async fn plan_report(
        ctx: &Ctx,
        spec: &StreamDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        on(by_spec(state, &spec.broker_ref, &spec.servers, &Json::Null))
            .streams()
            .plan_report(ctx, spec, state, changes)
            .await
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &StreamDesired) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        on(by_spec(
            &state,
            &spec.broker_ref,
            &spec.servers,
            &Json::Null,
        ))
        .streams()
        .apply(ctx, name, spec)
        .await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        on(by_ref(ctx, r, STREAM_TYPE)?)
            .streams()
            .read(ctx, r)
            .await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        on(by_ref(ctx, r, STREAM_TYPE)?)
            .streams()
            .delete(ctx, r)
            .await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        on(by_ref(ctx, r, STREAM_TYPE)?)
            .streams()
            .health(ctx, r)
            .await
    }
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        on(by_broker(ctx, b)?).streams().enumerate(ctx, b).await
    }
    async fn scale(ctx: &Ctx, r: &ResourceRef, replicas: i32) -> Result<Output, DriverError> {
        on(by_ref(ctx, r, STREAM_TYPE)?)
            .streams()
            .scale(ctx, r, replicas)
            .await
    }
}

impl Driver for ConsumerDriver {
    type Spec = ConsumerDesired;
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
    fn decode(name: &str, config_json: &[u8]) -> Result<ConsumerDesired, DriverError> {
        super::consumer::decode_desired(name, config_json)
    }
    fn diff(
        name: &str,
        spec: &ConsumerDesired,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        on(by_spec(state, &spec.broker_ref, &spec.servers, current))
            .consumers()
            .diff(name, spec, state, current)
    }
    async fn plan_report(
        ctx: &Ctx,
        spec: &ConsumerDesired,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        on(by_spec(state, &spec.broker_ref, &spec.servers, &Json::Null))
            .consumers()
            .plan_report(ctx, spec, state, changes)
            .await
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &ConsumerDesired) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        on(by_spec(
            &state,
            &spec.broker_ref,
            &spec.servers,
            &Json::Null,
        ))
        .consumers()
        .apply(ctx, name, spec)
        .await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        on(by_ref(ctx, r, CONSUMER_TYPE)?)
            .consumers()
            .read(ctx, r)
            .await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        on(by_ref(ctx, r, CONSUMER_TYPE)?)
            .consumers()
            .delete(ctx, r)
            .await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        on(by_ref(ctx, r, CONSUMER_TYPE)?)
            .consumers()
            .health(ctx, r)
            .await
    }
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        on(by_broker(ctx, b)?).consumers().enumerate(ctx, b).await
    }
}

/// A provider's key-value buckets (`OBJECT` false) or object stores, or one line saying it has
/// none.
fn buckets<const OBJECT: bool>(
    p: Provider,
    what: &str,
) -> Result<&'static dyn Ops<KvSpec>, DriverError> {
    let ops = if OBJECT {
        on(p).object_stores()
    } else {
        on(p).buckets()
    };
    ops.ok_or_else(|| {
        DriverError::refused(
            what,
            format!(
                "provider {} has no {}; {} needs a NATS broker",
                p.as_str(),
                if OBJECT {
                    "object stores"
                } else {
                    "key-value buckets"
                },
                BucketDriver::<OBJECT>::TYPE_NAME
            ),
        )
    })
}

impl<const OBJECT: bool> BucketDriver<OBJECT> {
    const TYPE_NAME: &'static str = if OBJECT { OBJECT_STORE_TYPE } else { KV_TYPE };
    fn what(name: &str) -> String {
        format!("{} {name:?}", Self::TYPE_NAME)
    }
}

impl<const OBJECT: bool> Driver for BucketDriver<OBJECT> {
    type Spec = KvSpec;
    const KIND: Kind = if OBJECT { Kind::ObjectStore } else { Kind::Kv };
    const TIER: i32 = 2;
    const DRIFT_KEYS: &'static [&'static str] = if OBJECT {
        &[
            "ttl",
            "max_bucket_size",
            "storage",
            "num_replicas",
            "description",
            "compression",
            "placement",
        ]
    } else {
        &[
            "history",
            "ttl",
            "max_value_size",
            "max_bucket_size",
            "storage",
            "num_replicas",
            "description",
            "compression",
            "placement",
            "mirror",
            "sources",
            "republish",
            "limit_marker_ttl",
        ]
    };
    fn decode(name: &str, config_json: &[u8]) -> Result<KvSpec, DriverError> {
        if OBJECT {
            super::kv::decode_object_store(name, config_json)
        } else {
            super::kv::decode(name, config_json)
        }
    }
    fn diff(
        name: &str,
        spec: &KvSpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let s = &spec.stream;
        let p = by_spec(state, &s.broker_ref, &s.servers, current);
        buckets::<OBJECT>(p, &Self::what(name))?.diff(name, spec, state, current)
    }
    async fn plan_report(
        ctx: &Ctx,
        spec: &KvSpec,
        state: &ProviderState,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let s = &spec.stream;
        let p = by_spec(state, &s.broker_ref, &s.servers, &Json::Null);
        match buckets::<OBJECT>(p, "") {
            Ok(b) => b.plan_report(ctx, spec, state, changes).await,
            Err(_) => changes,
        }
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &KvSpec) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        let s = &spec.stream;
        let p = by_spec(&state, &s.broker_ref, &s.servers, &Json::Null);
        buckets::<OBJECT>(p, &Self::what(name))?
            .apply(ctx, name, spec)
            .await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let p = by_ref(ctx, r, Self::TYPE_NAME)?;
        buckets::<OBJECT>(p, &Self::what(&r.name))?
            .read(ctx, r)
            .await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let p = by_ref(ctx, r, Self::TYPE_NAME)?;
        buckets::<OBJECT>(p, &Self::what(&r.name))?
            .delete(ctx, r)
            .await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let p = by_ref(ctx, r, Self::TYPE_NAME)?;
        buckets::<OBJECT>(p, &Self::what(&r.name))?
            .health(ctx, r)
            .await
    }
    /// None on a broker whose provider has no buckets of this kind.
    async fn enumerate(ctx: &Ctx, b: &str) -> Result<Vec<(String, Output)>, DriverError> {
        match buckets::<OBJECT>(by_broker(ctx, b)?, "") {
            Ok(k) => k.enumerate(ctx, b).await,
            Err(_) => Ok(Vec::new()),
        }
    }
}

/// A provider's bucket keys, or one line saying it has none.
fn entries(p: Provider, what: &str) -> Result<&'static dyn Ops<KvEntrySpec>, DriverError> {
    on(p).entries().ok_or_else(|| {
        DriverError::refused(
            what,
            format!(
                "provider {} has no key-value buckets; {KV_ENTRY_TYPE} needs a NATS broker",
                p.as_str()
            ),
        )
    })
}

impl Driver for KvEntryDriver {
    type Spec = KvEntrySpec;
    const KIND: Kind = Kind::KvEntry;
    const TIER: i32 = 2;
    const DRIFT_KEYS: &'static [&'static str] = &["value"];
    fn decode(name: &str, config_json: &[u8]) -> Result<KvEntrySpec, DriverError> {
        super::kv_entry::decode(name, config_json)
    }
    fn diff(
        name: &str,
        spec: &KvEntrySpec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<Change>, DriverError> {
        let what = format!("{KV_ENTRY_TYPE} {name:?}");
        entries(
            by_spec(state, &spec.broker_ref, &spec.servers, current),
            &what,
        )?
        .diff(name, spec, state, current)
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &KvEntrySpec) -> Result<Output, DriverError> {
        let state = ctx.state.load()?;
        let what = format!("{KV_ENTRY_TYPE} {name:?}");
        entries(
            by_spec(&state, &spec.broker_ref, &spec.servers, &Json::Null),
            &what,
        )?
        .apply(ctx, name, spec)
        .await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        let what = format!("{KV_ENTRY_TYPE} {:?}", r.name);
        entries(by_ref(ctx, r, KV_ENTRY_TYPE)?, &what)?
            .read(ctx, r)
            .await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        let what = format!("{KV_ENTRY_TYPE} {:?}", r.name);
        entries(by_ref(ctx, r, KV_ENTRY_TYPE)?, &what)?
            .delete(ctx, r)
            .await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        let what = format!("{KV_ENTRY_TYPE} {:?}", r.name);
        entries(by_ref(ctx, r, KV_ENTRY_TYPE)?, &what)?
            .health(ctx, r)
            .await
    }
    /// Keys are not enumerated: a bucket may hold millions; import them by provider_id.
    async fn enumerate(_: &Ctx, _: &str) -> Result<Vec<(String, Output)>, DriverError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgchannel_refuses_buckets_in_one_line_through_the_seam() {
        let e = buckets::<false>(Provider::Pgchannel, "infra.eventbus.kv \"cache\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("pgchannel") && e.contains("no key-value buckets") && !e.contains('\n'),
            "{e}"
        );
        assert!(buckets::<false>(Provider::Nats, "x").is_ok());
        let e = buckets::<true>(Provider::Pgchannel, "o")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no object stores"), "{e}");
    }
}
