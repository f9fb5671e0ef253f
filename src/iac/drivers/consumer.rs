//! `infra.eventbus.consumer`: a durable pull consumer on a stream. Same shape as the stream
//! driver: the runtime's `ConsumerSpec` is the desired side, outputs convert both ways, updates
//! overlay the managed fields on the server's current config.

use super::stream::{broker_key, connect_target, locate, Flags, Located};
use super::{
    decode_config, duration_from_json, duration_json, i64_field, resolve_broker, str_field,
    strings_field, BrokerConn, Ctx, Output, CONSUMER_TYPE,
};
use crate::iac::drivers::{record_placed, Placed};
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::nats::consumer::{fetch_consumer_config, overlay, sync_pause, ConsumerSpec};
use crate::nats::error::lift_api;
use crate::nats::settings;
use crate::nats::stream::{server_version, Change};
use crate::nats::{NatsConn, NatsError};
use crate::pb::eventbus::ConsumerConfig;
use crate::pb::iac::ResourceRef;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use serde::Serialize;
use serde_json::Value as Json;

/// The shared spec alone.
#[cfg(test)]
pub fn decode(name: &str, config_json: &[u8]) -> Result<ConsumerSpec, DriverError> {
    Ok(decode_desired(name, config_json)?.spec)
}

/// A consumer as the IaC face decodes it: the shared spec, which every provider converts
/// from exactly as its runtime does.
#[derive(Clone, Debug)]
pub struct ConsumerDesired {
    pub spec: ConsumerSpec,
}

impl std::ops::Deref for ConsumerDesired {
    type Target = ConsumerSpec;
    fn deref(&self) -> &ConsumerSpec {
        &self.spec
    }
}

/// `decode`, keeping the config (see [`ConsumerDesired`]).
pub fn decode_desired(name: &str, config_json: &[u8]) -> Result<ConsumerDesired, DriverError> {
    let m = super::stream::own_config(CONSUMER_TYPE, name, config_json)?;
    decode_config(
        CONSUMER_TYPE,
        name,
        "ConsumerConfig",
        m,
        |c: ConsumerConfig| {
            Ok(ConsumerDesired {
                spec: ConsumerSpec::validate(CONSUMER_TYPE, name, &c)?,
            })
        },
    )
}

pub fn provider_id(broker: &str, stream: &str, durable: &str) -> String {
    format!("{}/{stream}/{durable}", broker_key(broker))
}

fn deliver_name(d: &DeliverPolicy) -> &'static str {
    match d {
        DeliverPolicy::All => "DELIVER_POLICY_ALL",
        DeliverPolicy::Last => "DELIVER_POLICY_LAST",
        DeliverPolicy::New => "DELIVER_POLICY_NEW",
        DeliverPolicy::ByStartSequence { .. } => "DELIVER_POLICY_BY_START_SEQUENCE",
        DeliverPolicy::ByStartTime { .. } => "DELIVER_POLICY_BY_START_TIME",
        DeliverPolicy::LastPerSubject => "DELIVER_POLICY_LAST_PER_SUBJECT",
    }
}

fn ack_name(a: AckPolicy) -> &'static str {
    match a {
        AckPolicy::Explicit => "ACK_POLICY_EXPLICIT",
        AckPolicy::None => "ACK_POLICY_NONE",
        AckPolicy::All => "ACK_POLICY_ALL",
        _ => "ACK_POLICY_OTHER",
    }
}

fn rfc3339(t: &time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn filters(c: &consumer::Config) -> Vec<String> {
    let mut f = c.filter_subjects.clone();
    if !c.filter_subject.is_empty() {
        f.insert(0, c.filter_subject.clone());
    }
    f
}

/// A consumer's outputs, in the config's vocabulary: every setting the diff compares, where the
/// consumer lives, and the flags Delete needs.
#[derive(Serialize)]
struct ConsumerOutputs<'a> {
    name: &'a str,
    stream_name: &'a str,
    broker: &'a str,
    broker_ref: &'a str,
    filter_subjects: Vec<String>,
    deliver_policy: &'static str,
    opt_start_seq: u64,
    opt_start_time: String,
    ack_policy: &'static str,
    max_deliver: i64,
    ack_wait: Json,
    max_ack_pending: i64,
    backoff: Vec<Json>,
    description: &'a str,
    prevent_destroy: bool,
    bind: bool,
    /// metadata, replay_policy, pull limits, priority groups, ... (`settings::CONSUMER`).
    #[serde(flatten)]
    settings: settings::Settings,
}

/// Server config → outputs.
pub fn to_outputs(c: &consumer::Config, stream: &str, f: &Flags) -> Json {
    let (seq, start) = match &c.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => (*start_sequence, String::new()),
        DeliverPolicy::ByStartTime { start_time } => (0, rfc3339(start_time)),
        _ => (0, String::new()),
    };
    serde_json::to_value(ConsumerOutputs {
        name: c
            .durable_name
            .as_deref()
            .or(c.name.as_deref())
            .unwrap_or_default(),
        stream_name: stream,
        broker: &f.broker,
        broker_ref: &f.broker_ref,
        filter_subjects: filters(c),
        deliver_policy: deliver_name(&c.deliver_policy),
        opt_start_seq: seq,
        opt_start_time: start,
        ack_policy: ack_name(c.ack_policy),
        max_deliver: c.max_deliver,
        ack_wait: duration_json(c.ack_wait),
        max_ack_pending: c.max_ack_pending,
        backoff: c.backoff.iter().map(|d| duration_json(*d)).collect(),
        description: c.description.as_deref().unwrap_or_default(),
        prevent_destroy: f.prevent_destroy,
        bind: f.bind,
        settings: settings::consumer_to_json(c),
    })
    .unwrap_or_default()
}

pub fn observed_from_outputs(o: &Json) -> consumer::Config {
    let deliver = match str_field(o, "deliver_policy") {
        "DELIVER_POLICY_LAST" => DeliverPolicy::Last,
        "DELIVER_POLICY_NEW" => DeliverPolicy::New,
        "DELIVER_POLICY_LAST_PER_SUBJECT" => DeliverPolicy::LastPerSubject,
        "DELIVER_POLICY_BY_START_SEQUENCE" => DeliverPolicy::ByStartSequence {
            start_sequence: o.get("opt_start_seq").and_then(Json::as_u64).unwrap_or(0),
        },
        "DELIVER_POLICY_BY_START_TIME" => time::OffsetDateTime::parse(
            str_field(o, "opt_start_time"),
            &time::format_description::well_known::Rfc3339,
        )
        .map(|start_time| DeliverPolicy::ByStartTime { start_time })
        .unwrap_or(DeliverPolicy::All),
        _ => DeliverPolicy::All,
    };
    let f = strings_field(o, "filter_subjects");
    let (filter_subject, filter_subjects) = match f.as_slice() {
        [one] => (one.clone(), Vec::new()),
        _ => (String::new(), f),
    };
    let desc = str_field(o, "description");
    let name = str_field(o, "name").to_string();
    let mut c = consumer::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        deliver_policy: deliver,
        ack_policy: match str_field(o, "ack_policy") {
            "ACK_POLICY_NONE" => AckPolicy::None,
            "ACK_POLICY_ALL" => AckPolicy::All,
            _ => AckPolicy::Explicit,
        },
        max_deliver: i64_field(o, "max_deliver", -1),
        ack_wait: duration_from_json(o.get("ack_wait")),
        max_ack_pending: i64_field(o, "max_ack_pending", 0),
        backoff: o
            .get("backoff")
            .and_then(Json::as_array)
            .map(|a| a.iter().map(|d| duration_from_json(Some(d))).collect())
            .unwrap_or_default(),
        filter_subject,
        filter_subjects,
        description: (!desc.is_empty()).then(|| desc.to_string()),
        ..Default::default()
    };
    // Outputs written before a setting existed lack its key: left at the server's default.
    let _ = settings::consumer_from_json(&mut c, &settings::from_outputs(settings::CONSUMER, o));
    c
}

pub fn desired_outputs(spec: &ConsumerSpec, broker: &str) -> Json {
    to_outputs(
        &spec.to_nats(),
        &spec.stream,
        &Flags {
            broker: broker.to_string(),
            broker_ref: spec.broker_ref.clone(),
            prevent_destroy: spec.prevent_destroy,
            bind: spec.bind,
        },
    )
}

fn label(resource: &str, stream: &str, durable: &str) -> String {
    format!("{CONSUMER_TYPE} {resource:?} (consumer {durable:?} on stream {stream:?})")
}

async fn get_stream(
    conn: &NatsConn,
    what: &str,
    stream: &str,
) -> Result<Option<async_nats::jetstream::stream::Stream>, DriverError> {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    let got = super::retry(
        || conn.js.get_stream(stream),
        |e: &async_nats::jetstream::context::GetStreamError| matches!(e.kind(), K::Request),
    )
    .await;
    match got {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            K::JetStream(api) if api.error_code() == crate::nats::error::STREAM_NOT_FOUND => {
                Ok(None)
            }
            K::JetStream(api) => Err(DriverError::nats(what, lift_api("get stream", what, &api))),
            _ => Err(DriverError::nats(what, NatsError::other("get stream", e))),
        },
    }
}

fn lift(
    op: &'static str,
    what: &str,
    api: Option<async_nats::jetstream::Error>,
    e: impl std::fmt::Display,
) -> DriverError {
    match api {
        Some(api) => DriverError::nats(what, lift_api(op, what, &api)),
        None => DriverError::nats(what, NatsError::other(op, e)),
    }
}

/// Create-or-adopt, and Update.
pub async fn apply(ctx: &Ctx, resource: &str, spec: &ConsumerSpec) -> Result<Output, DriverError> {
    let what = label(resource, &spec.stream, &spec.durable);
    let state = ctx.state.load()?;
    let b = resolve_broker(
        &what,
        &spec.broker_ref,
        &spec.servers,
        &state,
        &ctx.state.path(),
    )?;
    let conn = ctx.connect(&what, &b).await?;
    let Some(stream) = get_stream(&conn, &what, &spec.stream).await? else {
        return Err(DriverError::refused(
            &what,
            format!(
                "stream {:?} does not exist on broker {:?}; apply the stream first (list it in this consumer's depends_on)",
                spec.stream,
                broker_key(&b.name)
            ),
        ));
    };
    let observed = fetch_consumer_config(&stream, &spec.durable)
        .await
        .map_err(|e| DriverError::nats(&what, e))?;
    spec.check_server(&server_version(&conn))
        .map_err(|e| DriverError::refused(&what, e.to_string()))?;
    let cfg = match observed {
        None if spec.bind => {
            return Err(DriverError::refused(
                &what,
                "bind is set and the consumer does not exist; bind adopts an existing consumer and never creates one",
            ))
        }
        None => {
            use async_nats::jetstream::stream::ConsumerErrorKind as K;
            stream
                .create_consumer(spec.to_nats())
                .await
                .map_err(|e| {
                    let api = match e.kind() {
                        K::JetStream(api) => Some(api),
                        _ => None,
                    };
                    lift("create consumer", &what, api, e)
                })?
                .cached_info()
                .config
                .clone()
        }
        Some(obs) => {
            let diffs = spec.diff(&obs);
            if let Some(bad) = diffs.iter().find(|d| d.change != Change::InPlace) {
                return Err(DriverError::refused(
                    &what,
                    format!(
                        "{} cannot change in place (server has {}, config wants {}); delete the consumer (its position is lost) or keep the old value",
                        bad.field, bad.have, bad.want
                    ),
                ));
            }
            if diffs.is_empty() {
                obs
            } else {
                use async_nats::jetstream::stream::ConsumerUpdateErrorKind as K;
                stream
                    .update_consumer(overlay(spec, obs))
                    .await
                    .map_err(|e| {
                        let api = match e.kind() {
                            K::JetStream(api) => Some(api),
                            _ => None,
                        };
                        lift("update consumer", &what, api, e)
                    })?
                    .cached_info()
                    .config
                    .clone()
            }
        }
    };
    let cfg = if sync_pause(&stream, spec, &cfg)
        .await
        .map_err(|e| DriverError::nats(&what, e))?
    {
        fetch_consumer_config(&stream, &spec.durable)
            .await
            .map_err(|e| DriverError::nats(&what, e))?
            .unwrap_or(cfg)
    } else {
        cfg
    };
    let at = Placed {
        broker: &b.name,
        servers: &spec.servers,
        stream: &spec.stream,
        durable: Some(&spec.durable),
        broker_ref: &spec.broker_ref,
        prevent_destroy: spec.prevent_destroy,
        bind: spec.bind,
        provider_id: provider_id(&b.name, &spec.stream, &spec.durable),
    };
    record_placed(ctx, resource, at, |flags| {
        to_outputs(&cfg, &spec.stream, flags)
    })
}

/// Finds a durable named `name` on any stream of the known brokers (Read with no provider_id).
async fn search(ctx: &Ctx, name: &str) -> Result<Option<Located>, DriverError> {
    if crate::nats::names::check_name(name).is_err() {
        return Ok(None);
    }
    let state = ctx.state.load()?;
    let mut found = Vec::new();
    for (broker, rec) in &state.brokers {
        let b = BrokerConn::from_record(broker, rec);
        let Ok(conn) = ctx.connect(&format!("broker {broker:?}"), &b).await else {
            continue;
        };
        for (_, cfg) in super::stream::list(ctx, broker).await.unwrap_or_default() {
            if let Ok(Some(stream)) = get_stream(&conn, "", &cfg.name).await {
                if let Ok(Some(_)) = fetch_consumer_config(&stream, name).await {
                    found.push((broker.clone(), cfg.name.clone()));
                }
            }
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [(broker, stream)] => Ok(Some(Located {
            broker: broker.clone(),
            stream: stream.clone(),
            durable: name.to_string(),
            flags: Flags {
                broker: broker.clone(),
                ..Default::default()
            },
            ..Default::default()
        })),
        many => Err(DriverError::invalid(
            format!("{CONSUMER_TYPE} {name:?}"),
            format!(
                "a durable of that name exists on several streams ({}); import it by provider_id <broker>/<stream>/{name}",
                many.iter().map(|(b, s)| format!("{b}/{s}")).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

pub async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
    let state = ctx.state.load()?;
    let l = match locate(&state, r, CONSUMER_TYPE) {
        Some(l) => l,
        None => search(ctx, &r.name).await?.ok_or_else(|| {
            DriverError::not_found(format!(
                "{CONSUMER_TYPE} {:?}: no durable consumer of that name on the brokers this provider knows",
                r.name
            ))
        })?,
    };
    let what = label(&r.name, &l.stream, &l.durable);
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = ctx.connect(&what, &b).await?;
    let Some(stream) = get_stream(&conn, &what, &l.stream).await? else {
        return Err(DriverError::not_found(format!(
            "{what}: the stream is gone"
        )));
    };
    match fetch_consumer_config(&stream, &l.durable)
        .await
        .map_err(|e| DriverError::nats(&what, e))?
    {
        None => Err(DriverError::not_found(format!("{what} does not exist"))),
        Some(cfg) => Ok(Output {
            provider_id: provider_id(&b.name, &l.stream, &l.durable),
            outputs: to_outputs(&cfg, &l.stream, &l.flags),
            sensitive: Vec::new(),
            status: "running".into(),
        }),
    }
}

pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some(l) = locate(&state, r, CONSUMER_TYPE) else {
        return Ok(());
    };
    let what = label(&r.name, &l.stream, &l.durable);
    if l.flags.prevent_destroy {
        return Err(DriverError::refused(
            &what,
            "prevent_destroy is set; set prevent_destroy: false and apply before deleting",
        ));
    }
    let forget = |ctx: &Ctx| {
        ctx.state.update(|s| {
            s.resources.remove(&r.name);
        })
    };
    if l.released {
        return Ok(());
    }
    if l.flags.bind {
        tracing::info!(resource = %r.name, "bound consumer released; it stays on the server");
        return super::stream::release(ctx, &r.name);
    }
    if l.servers.is_empty() && !state.brokers.contains_key(&l.broker) {
        tracing::warn!(resource = %r.name, broker = %l.broker, "broker no longer recorded; treating the consumer as gone");
        return forget(ctx);
    }
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = match ctx.connect(&what, &b).await {
        Ok(c) => c,
        // Its broker is gone from its platform, and this resource's data with it.
        Err(e) if e.is_not_found() => return forget(ctx),
        Err(e) => return Err(e),
    };
    if let Some(stream) = get_stream(&conn, &what, &l.stream).await? {
        use async_nats::jetstream::stream::ConsumerErrorKind as K;
        let deleted = super::retry(
            || stream.delete_consumer(&l.durable),
            |e: &async_nats::jetstream::stream::ConsumerError| {
                matches!(e.kind(), K::TimedOut | K::Request)
            },
        )
        .await;
        if let Err(e) = deleted {
            match e.kind() {
                K::JetStream(api) if api.error_code() == crate::nats::error::CONSUMER_NOT_FOUND => {
                }
                K::JetStream(api) => {
                    return Err(DriverError::nats(
                        &what,
                        lift_api("delete consumer", &what, &api),
                    ))
                }
                _ => {
                    return Err(DriverError::nats(
                        &what,
                        NatsError::other("delete consumer", e),
                    ))
                }
            }
        }
    }
    forget(ctx)
}

/// Healthy when the consumer exists; the message carries its lag.
pub async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
    let state = ctx.state.load()?;
    let l = locate(&state, r, CONSUMER_TYPE)
        .ok_or_else(|| DriverError::not_found(format!("{CONSUMER_TYPE} {:?}", r.name)))?;
    let what = label(&r.name, &l.stream, &l.durable);
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = match ctx.connect(&what, &b).await {
        Ok(c) => c,
        Err(e) => return Ok((false, crate::error_chain::render(&e))),
    };
    let Some(stream) = get_stream(&conn, &what, &l.stream).await? else {
        return Ok((false, format!("stream {:?} does not exist", l.stream)));
    };
    match stream.consumer_info(&l.durable).await {
        Ok(info) => Ok((
            true,
            format!(
                "consumer {:?}: lag {} (num_pending), {} awaiting ack, {} redelivered",
                l.durable, info.num_pending, info.num_ack_pending, info.num_redelivered
            ),
        )),
        Err(e) => Ok((false, format!("consumer {:?}: {e}", l.durable))),
    }
}

/// Consumers on every stream of one broker, for import-all.
/// The consumers on `broker`, as the enumerator reports them.
pub async fn enumerate(ctx: &Ctx, broker: &str) -> Result<Vec<(String, Output)>, DriverError> {
    let flags = Flags {
        broker: broker.to_string(),
        broker_ref: broker.to_string(),
        ..Default::default()
    };
    Ok(list(ctx, broker)
        .await?
        .into_iter()
        .map(|(provider_id, stream_name, cfg)| {
            let outputs = to_outputs(&cfg, &stream_name, &flags);
            let durable = str_field(&outputs, "name").to_string();
            let output = Output {
                provider_id,
                outputs,
                sensitive: Vec::new(),
                status: "running".into(),
            };
            (durable, output)
        })
        .collect())
}

pub async fn list(
    ctx: &Ctx,
    broker: &str,
) -> Result<Vec<(String, String, consumer::Config)>, DriverError> {
    use futures::TryStreamExt;
    let state = ctx.state.load()?;
    let what = format!("broker {broker:?}");
    let b = resolve_broker(&what, broker, &[], &state, &ctx.state.path())?;
    let conn = ctx.connect(&what, &b).await?;
    let mut out = Vec::new();
    for (_, scfg) in super::stream::list(ctx, broker).await? {
        let Some(stream) = get_stream(&conn, &what, &scfg.name).await? else {
            continue;
        };
        let infos: Vec<consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| DriverError::nats(&what, NatsError::other("list consumers", e)))?;
        for i in infos {
            out.push((
                provider_id(broker, &scfg.name, &i.name),
                scfg.name.clone(),
                i.config,
            ));
        }
    }
    Ok(out)
}

pub fn diff(spec: &ConsumerSpec, desired_broker: Option<&str>, current: &Json) -> Vec<PlanChange> {
    let want = desired_outputs(spec, desired_broker.unwrap_or_default());
    resource_changes(
        &[
            ("name", Some(&spec.durable)),
            ("stream_name", Some(&spec.stream)),
            ("broker", desired_broker),
        ],
        spec.diff(&observed_from_outputs(current)),
        &want,
        current,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_round_trip_through_the_server_config() {
        for extra in [
            json!({"filter_subject": "orders.created"}),
            json!({"filter_subjects": ["a.x", "b.>"], "deliver_policy": "DELIVER_POLICY_BY_START_SEQUENCE", "opt_start_seq": 42}),
            json!({"deliver_policy": "DELIVER_POLICY_BY_START_TIME", "opt_start_time": "2026-01-02T03:04:05Z"}),
        ] {
            let mut cfg = json!({
                "name": "worker", "stream_name": "ORDERS", "ack_policy": "ACK_POLICY_EXPLICIT",
                "max_deliver": 5, "ack_wait": "45s", "max_ack_pending": 64, "description": "d"
            });
            cfg.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let spec = decode("w", cfg.to_string().as_bytes()).unwrap();
            let out = desired_outputs(&spec, "bus");
            let back = observed_from_outputs(&out);
            assert!(spec.diff(&back).is_empty(), "{cfg}: {:?}", spec.diff(&back));
            assert_eq!(
                to_outputs(
                    &back,
                    "ORDERS",
                    &super::super::stream::flags_from_outputs(&out)
                ),
                out
            );
        }
    }

    #[test]
    fn backoff_round_trips() {
        let spec = decode(
            "w",
            br#"{"name":"w","stream_name":"S","max_deliver":4,"backoff":["1s","2.5s"]}"#,
        )
        .unwrap();
        let out = desired_outputs(&spec, "");
        assert_eq!(out["backoff"], json!(["1s", "2.5s"]));
        assert!(spec.diff(&observed_from_outputs(&out)).is_empty());
    }
}
