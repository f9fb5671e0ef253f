//! `infra.eventbus.stream`: a JetStream stream on a broker.
//!
//! The desired side is the runtime's own `StreamSpec` (same strict decode, same validation, same
//! diff), so wfctl and the runtime module can never disagree about a config. Outputs are the
//! server's config after create/update, in config vocabulary, and convert back into the
//! server's config type for the diff (`to_outputs` / `observed_from_outputs`, round-trip
//! tested). An update starts from the server's current config and overlays only the managed
//! fields, so settings this provider does not manage (sources, mirrors, deny_delete, ...) are
//! kept.

use super::{
    config_object, decode_config, duration_from_json, duration_json, i64_field, resolve_broker,
    str_field, strings_field, BrokerConn, Ctx, Output, STREAM_TYPE,
};
use crate::iac::drivers::Placed;
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::iac::state::ProviderState;
use crate::nats::error::lift_api;
use crate::nats::settings;
use crate::nats::stream::{fetch_stream_config, overlay, server_version, Change, StreamSpec};
use crate::nats::NatsError;
use crate::pb::eventbus::StreamConfig;
use crate::pb::iac::ResourceRef;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use serde::Serialize;
use serde_json::Value as Json;

/// wfctl may inject an environment's `provider` into every infra.* config (docs/iac-host.md §1.1);
/// routing already happened through `iac_provider`, so it is dropped before the strict decode.
pub const WFCTL_INJECTED: &[&str] = &["provider"];

/// The shared spec alone (partitions refused, as every provider but kafka does).
#[cfg(test)]
pub fn decode(name: &str, config_json: &[u8]) -> Result<StreamSpec, DriverError> {
    let d = decode_desired(name, config_json)?;
    d.refuse_partitions()?;
    Ok(d.spec)
}

/// A stream as the IaC face decodes it: the spec every provider shares, and the config it was
/// validated from, for a provider whose settings the shared spec does not carry (kafka's
/// `partitions`, replication left to the broker's default). `partitions` is validated by the
/// provider that has it; the others refuse it with the shared spec's own line.
#[derive(Clone, Debug)]
pub struct StreamDesired {
    pub spec: StreamSpec,
    pub config: StreamConfig,
    /// The resource name, for errors.
    pub resource: String,
}

impl std::ops::Deref for StreamDesired {
    type Target = StreamSpec;
    fn deref(&self) -> &StreamSpec {
        &self.spec
    }
}

impl StreamDesired {
    /// For providers without partitions: the shared spec's refusal of `partitions`.
    pub fn refuse_partitions(&self) -> Result<(), DriverError> {
        if self.config.partitions == 0 {
            return Ok(());
        }
        StreamSpec::validate(STREAM_TYPE, &self.resource, &self.config)?;
        Ok(())
    }
}

/// A stream's or consumer's config object without the keys wfctl injects.
pub fn own_config(
    type_name: &str,
    name: &str,
    config_json: &[u8],
) -> Result<serde_json::Map<String, Json>, DriverError> {
    let mut m = config_object(&format!("{type_name} {name:?}"), config_json)?;
    for k in WFCTL_INJECTED {
        m.remove(*k);
    }
    Ok(m)
}

/// `decode`, keeping the config (see [`StreamDesired`]).
pub fn decode_desired(name: &str, config_json: &[u8]) -> Result<StreamDesired, DriverError> {
    let m = own_config(STREAM_TYPE, name, config_json)?;
    decode_config(STREAM_TYPE, name, "StreamConfig", m, |c: StreamConfig| {
        let shared = StreamConfig {
            partitions: 0,
            ..c.clone()
        };
        Ok(StreamDesired {
            spec: StreamSpec::validate(STREAM_TYPE, name, &shared)?,
            config: c,
            resource: name.to_string(),
        })
    })
}

pub fn provider_id(broker: &str, stream: &str) -> String {
    format!("{}/{stream}", broker_key(broker))
}

pub fn broker_key(broker: &str) -> &str {
    if broker.is_empty() {
        "servers"
    } else {
        broker
    }
}

pub fn retention_name(r: RetentionPolicy) -> &'static str {
    match r {
        RetentionPolicy::Limits => "RETENTION_POLICY_LIMITS",
        RetentionPolicy::Interest => "RETENTION_POLICY_INTEREST",
        RetentionPolicy::WorkQueue => "RETENTION_POLICY_WORKQUEUE",
    }
}

fn retention_from(s: &str) -> RetentionPolicy {
    match s {
        "RETENTION_POLICY_INTEREST" => RetentionPolicy::Interest,
        "RETENTION_POLICY_WORKQUEUE" => RetentionPolicy::WorkQueue,
        _ => RetentionPolicy::Limits,
    }
}

fn storage_name(s: StorageType) -> &'static str {
    match s {
        StorageType::File => "STORAGE_TYPE_FILE",
        StorageType::Memory => "STORAGE_TYPE_MEMORY",
    }
}

fn discard_name(d: DiscardPolicy) -> &'static str {
    match d {
        DiscardPolicy::Old => "DISCARD_POLICY_OLD",
        DiscardPolicy::New => "DISCARD_POLICY_NEW",
    }
}

/// Flags that live in the provider's records, not on the server (every provider's).
pub use super::tail::Flags;

/// A stream's outputs, in the config's vocabulary: every setting the diff compares, where the
/// stream lives, and the flags Delete needs.
#[derive(Serialize)]
struct StreamOutputs<'a> {
    name: &'a str,
    broker: &'a str,
    broker_ref: &'a str,
    subjects: &'a [String],
    retention_policy: &'static str,
    storage: &'static str,
    num_replicas: usize,
    max_bytes: i64,
    max_msgs: i64,
    max_msgs_per_subject: i64,
    max_msg_size: i32,
    max_age: Json,
    discard: &'static str,
    duplicate_window: Json,
    description: &'a str,
    prevent_destroy: bool,
    bind: bool,
    /// mirror, sources, republish, metadata, ... (`settings::STREAM`), in config vocabulary.
    #[serde(flatten)]
    settings: settings::Settings,
}

/// Server config → outputs.
pub fn to_outputs(c: &stream::Config, f: &Flags) -> Json {
    serde_json::to_value(StreamOutputs {
        name: &c.name,
        broker: &f.broker,
        broker_ref: &f.broker_ref,
        subjects: &c.subjects,
        retention_policy: retention_name(c.retention),
        storage: storage_name(c.storage),
        num_replicas: c.num_replicas.max(1),
        max_bytes: c.max_bytes,
        max_msgs: c.max_messages,
        max_msgs_per_subject: c.max_messages_per_subject,
        max_msg_size: c.max_message_size,
        max_age: duration_json(c.max_age),
        discard: discard_name(c.discard),
        duplicate_window: duration_json(c.duplicate_window),
        description: c.description.as_deref().unwrap_or_default(),
        prevent_destroy: f.prevent_destroy,
        bind: f.bind,
        settings: settings::stream_to_json(c),
    })
    .unwrap_or_default()
}

/// Outputs → the server config they describe (managed fields only; the rest default).
pub fn observed_from_outputs(o: &Json) -> stream::Config {
    let desc = str_field(o, "description");
    let mut c = stream::Config {
        name: str_field(o, "name").to_string(),
        subjects: strings_field(o, "subjects"),
        retention: retention_from(str_field(o, "retention_policy")),
        storage: if str_field(o, "storage") == "STORAGE_TYPE_MEMORY" {
            StorageType::Memory
        } else {
            StorageType::File
        },
        num_replicas: i64_field(o, "num_replicas", 1).max(1) as usize,
        max_bytes: i64_field(o, "max_bytes", -1),
        max_messages: i64_field(o, "max_msgs", -1),
        max_messages_per_subject: i64_field(o, "max_msgs_per_subject", -1),
        max_message_size: i64_field(o, "max_msg_size", -1) as i32,
        max_age: duration_from_json(o.get("max_age")),
        discard: if str_field(o, "discard") == "DISCARD_POLICY_NEW" {
            DiscardPolicy::New
        } else {
            DiscardPolicy::Old
        },
        duplicate_window: duration_from_json(o.get("duplicate_window")),
        description: (!desc.is_empty()).then(|| desc.to_string()),
        ..Default::default()
    };
    // Outputs written before a setting existed lack its key: left at the server's default.
    let _ = settings::stream_from_json(&mut c, &settings::from_outputs(settings::STREAM, o));
    c
}

#[cfg(test)]
pub fn flags_from_outputs(o: &Json) -> Flags {
    use super::bool_field;
    Flags {
        broker: str_field(o, "broker").to_string(),
        broker_ref: str_field(o, "broker_ref").to_string(),
        prevent_destroy: bool_field(o, "prevent_destroy"),
        bind: bool_field(o, "bind"),
    }
}

/// What the outputs would be if the server held exactly the spec (for plan display).
pub fn desired_outputs(spec: &StreamSpec, broker: &str) -> Json {
    to_outputs(
        &spec.to_nats(),
        &Flags {
            broker: broker.to_string(),
            broker_ref: spec.broker_ref.clone(),
            prevent_destroy: spec.prevent_destroy,
            bind: spec.bind,
        },
    )
}

fn lift_create(
    op: &'static str,
    what: &str,
    e: async_nats::jetstream::context::CreateStreamError,
) -> DriverError {
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    let n = match e.kind() {
        K::JetStream(api) => lift_api(op, what, &api),
        K::TimedOut => NatsError::TimedOut {
            op,
            after: std::time::Duration::ZERO,
        },
        _ => NatsError::other(op, e),
    };
    DriverError::nats(what, n)
}

fn label(resource: &str, stream: &str) -> String {
    shaped_label(&STREAM_SHAPE, resource, stream)
}

fn shaped_label(shape: &Shape, resource: &str, stream: &str) -> String {
    format!("{} {resource:?} (stream {stream:?})", shape.type_name)
}

/// Create-or-adopt, and Update: makes the server hold `spec`, in place. A missing stream is
/// created (unless `bind`); a change the server cannot make in place is refused by name.
pub async fn apply(ctx: &Ctx, resource: &str, spec: &StreamSpec) -> Result<Output, DriverError> {
    let check =
        |observed: Option<&stream::Config>, server: &str| spec.check_server(observed, server);
    apply_as(ctx, resource, spec, &STREAM_SHAPE, &check).await
}

/// How a resource type kept as a stream shows itself: a stream, or a key-value bucket (the
/// stream `KV_<bucket>`): its type name and its outputs.
pub struct Shape {
    pub type_name: &'static str,
    pub outputs: fn(&stream::Config, &Flags) -> Json,
}

pub const STREAM_SHAPE: Shape = Shape {
    type_name: STREAM_TYPE,
    outputs: to_outputs,
};

/// What the broker's release cannot do for a spec (`StreamSpec::check_server`, or a bucket's).
pub type ServerCheck<'a> =
    dyn Fn(Option<&stream::Config>, &str) -> Result<(), NatsError> + Send + Sync + 'a;

/// `apply` for any resource type kept as a stream (`shape`).
pub async fn apply_as(
    ctx: &Ctx,
    resource: &str,
    spec: &StreamSpec,
    shape: &Shape,
    check: &ServerCheck<'_>,
) -> Result<Output, DriverError> {
    let what = shaped_label(shape, resource, &spec.name);
    let state = ctx.state.load()?;
    let b = resolve_broker(
        &what,
        &spec.broker_ref,
        &spec.servers,
        &state,
        &ctx.state.path(),
    )?;
    let conn = ctx.connect(&what, &b).await?;
    let observed = fetch_stream_config(&conn, &spec.name)
        .await
        .map_err(|e| DriverError::nats(&what, e))?;
    check(observed.as_ref(), &server_version(&conn))
        .map_err(|e| DriverError::refused(&what, e.to_string()))?;
    let cfg = match observed {
        None if spec.bind => {
            return Err(DriverError::refused(
                &what,
                format!(
                    "bind is set and the stream does not exist on broker {:?}; bind adopts an \
                     existing stream and never creates one (remove bind to let the provider create it)",
                    broker_key(&b.name)
                ),
            ))
        }
        None => conn
            .js
            .create_stream(spec.to_nats())
            .await
            .map_err(|e| lift_create("create stream", &what, e))?
            .cached_info()
            .config
            .clone(),
        Some(obs) => {
            let diffs = spec.diff(&obs);
            if let Some(bad) = diffs.iter().find(|d| d.change != Change::InPlace) {
                return Err(DriverError::refused(
                    &what,
                    format!(
                        "{} cannot change in place (server has {}, config wants {}); {}",
                        bad.field,
                        bad.have,
                        bad.want,
                        bad.change.remedy()
                    ),
                ));
            }
            if diffs.is_empty() {
                obs
            } else {
                conn.js
                    .update_stream(overlay(spec, obs))
                    .await
                    .map_err(|e| lift_create("update stream", &what, e))?
                    .config
            }
        }
    };
    let at = Placed {
        broker: &b.name,
        servers: &spec.servers,
        stream: &spec.name,
        durable: None,
        broker_ref: &spec.broker_ref,
        prevent_destroy: spec.prevent_destroy,
        bind: spec.bind,
        provider_id: provider_id(&b.name, &spec.name),
    };
    crate::iac::drivers::tail::record_placed_as(ctx, resource, at, shape.type_name, |flags| {
        (shape.outputs)(&cfg, flags)
    })
}

/// Where a stream (or consumer) lives, from the provider's record or from its provider_id.
#[derive(Clone, Debug, Default)]
pub struct Located {
    pub broker: String,
    pub servers: Vec<String>,
    pub stream: String,
    pub durable: String,
    pub flags: Flags,
    pub released: bool,
}

/// By record (name and type must match, and provider_id when given), else by parsing the
/// provider_id (`broker/STREAM` or `broker/STREAM/durable`).
pub fn locate(state: &ProviderState, r: &ResourceRef, type_name: &str) -> Option<Located> {
    if let Some(rec) = state.resources.get(&r.name) {
        if rec.type_name == type_name
            && (r.provider_id.is_empty() || r.provider_id == rec.provider_id)
        {
            return Some(Located {
                broker: rec.broker.clone(),
                servers: rec.servers.clone(),
                stream: rec.stream.clone(),
                durable: rec.durable.clone(),
                flags: Flags {
                    broker: rec.broker.clone(),
                    broker_ref: str_field(&rec.outputs, "broker_ref").to_string(),
                    prevent_destroy: rec.prevent_destroy,
                    bind: rec.bind,
                },
                released: rec.released,
            });
        }
    }
    if r.provider_id.is_empty() {
        return None;
    }
    let parts: Vec<&str> = if type_name == super::CONSUMER_TYPE {
        r.provider_id.rsplitn(3, '/').collect()
    } else {
        r.provider_id.rsplitn(2, '/').collect()
    };
    let (broker, stream, durable) = match parts.as_slice() {
        [stream, broker] => (*broker, *stream, ""),
        [durable, stream, broker] => (*broker, *stream, *durable),
        _ => return None,
    };
    let broker = if broker == "servers" { "" } else { broker };
    Some(Located {
        broker: broker.to_string(),
        servers: Vec::new(),
        stream: stream.to_string(),
        durable: durable.to_string(),
        flags: Flags {
            broker: broker.to_string(),
            broker_ref: broker.to_string(),
            ..Default::default()
        },
        released: false,
    })
}

pub fn connect_target(
    ctx: &Ctx,
    what: &str,
    l: &Located,
    state: &ProviderState,
) -> Result<BrokerConn, DriverError> {
    resolve_broker(what, &l.broker, &l.servers, state, &ctx.state.path())
}

/// Finds a stream named `name` on the brokers this provider knows (Read with no provider_id).
pub async fn search(ctx: &Ctx, name: &str) -> Result<Option<Located>, DriverError> {
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
        if let Ok(Some(_)) = fetch_stream_config(&conn, name).await {
            found.push(broker.clone());
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(Located {
            broker: one.clone(),
            stream: name.to_string(),
            flags: Flags {
                broker: one.clone(),
                ..Default::default()
            },
            ..Default::default()
        })),
        many => Err(DriverError::invalid(
            format!("{STREAM_TYPE} {name:?}"),
            format!(
                "a stream of that name exists on several brokers ({}); import it by provider_id <broker>/{name}",
                many.join(", ")
            ),
        )),
    }
}

pub async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
    read_as(ctx, r, &STREAM_SHAPE, &r.name).await
}

/// `read` for any resource type kept as a stream; `search` names the stream to look for on
/// every known broker when neither record nor provider_id says where it is.
pub async fn read_as(
    ctx: &Ctx,
    r: &ResourceRef,
    shape: &Shape,
    search_for: &str,
) -> Result<Output, DriverError> {
    let state = ctx.state.load()?;
    let located = match locate(&state, r, shape.type_name) {
        Some(l) => l,
        None => search(ctx, search_for).await?.ok_or_else(|| {
            DriverError::not_found(format!(
                "{} {:?}: no stream {search_for:?} on the brokers this provider knows",
                shape.type_name, r.name
            ))
        })?,
    };
    let what = shaped_label(shape, &r.name, &located.stream);
    let b = connect_target(ctx, &what, &located, &state)?;
    let conn = ctx.connect(&what, &b).await?;
    match fetch_stream_config(&conn, &located.stream)
        .await
        .map_err(|e| DriverError::nats(&what, e))?
    {
        None => Err(DriverError::not_found(format!(
            "{what} does not exist on broker {:?}",
            broker_key(&b.name)
        ))),
        Some(cfg) => Ok(Output {
            provider_id: provider_id(&b.name, &located.stream),
            outputs: (shape.outputs)(&cfg, &located.flags),
            sensitive: Vec::new(),
            status: "running".into(),
        }),
    }
}

/// Idempotent: a stream that is already gone, or whose broker and record are both gone, is
/// deleted. `prevent_destroy` refuses; `bind` only forgets (the provider did not create it).
pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    delete_as(ctx, r, &STREAM_SHAPE).await
}

/// `delete` for any resource type kept as a stream.
pub async fn delete_as(ctx: &Ctx, r: &ResourceRef, shape: &Shape) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some(l) = locate(&state, r, shape.type_name) else {
        return Ok(());
    };
    let what = shaped_label(shape, &r.name, &l.stream);
    if l.flags.prevent_destroy {
        return Err(DriverError::refused(
            &what,
            "prevent_destroy is set; set prevent_destroy: false and apply before deleting",
        ));
    }
    let forget = |ctx: &Ctx| {
        ctx.state.update(|s| {
            s.resources.remove(&r.name);
            let stream_id = provider_id(&l.broker, &l.stream);
            s.resources.retain(|_, rec| {
                !(rec.type_name == super::CONSUMER_TYPE
                    && rec.provider_id.starts_with(&format!("{stream_id}/")))
            });
        })
    };
    if l.released {
        return Ok(());
    }
    if l.flags.bind {
        tracing::info!(resource = %r.name, "bound stream released; it stays on the server");
        return release(ctx, &r.name);
    }
    if l.servers.is_empty() && !state.brokers.contains_key(&l.broker) {
        tracing::warn!(resource = %r.name, broker = %l.broker, "broker no longer recorded; treating the stream as gone");
        return forget(ctx);
    }
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = match ctx.connect(&what, &b).await {
        Ok(c) => c,
        // Its broker is gone from its platform, and this resource's data with it.
        Err(e) if e.is_not_found() => return forget(ctx),
        Err(e) => return Err(e),
    };
    use async_nats::jetstream::context::DeleteStreamErrorKind as K;
    let deleted = super::retry(
        || conn.js.delete_stream(&l.stream),
        |e: &async_nats::jetstream::context::DeleteStreamError| matches!(e.kind(), K::Request),
    )
    .await;
    if let Err(e) = deleted {
        match e.kind() {
            K::JetStream(api) if api.error_code() == crate::nats::error::STREAM_NOT_FOUND => {}
            K::JetStream(api) => {
                return Err(DriverError::nats(
                    &what,
                    lift_api("delete stream", &what, &api),
                ))
            }
            _ => {
                return Err(DriverError::nats(
                    &what,
                    NatsError::other("delete stream", e),
                ))
            }
        }
    }
    forget(ctx)
}

/// The start of every provider's Delete of a recorded stream or consumer: refused while
/// `prevent_destroy` is set, nothing left to do once released, a bound one only released
/// (`kept` is the log line saying what stays). `Ok(true)`: delete it on the broker.
pub fn delete_gate(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    what: &str,
    kept: &str,
) -> Result<bool, DriverError> {
    if l.flags.prevent_destroy {
        return Err(DriverError::refused(
            what,
            "prevent_destroy is set; set prevent_destroy: false and apply before deleting",
        ));
    }
    if l.released {
        return Ok(false);
    }
    if l.flags.bind {
        tracing::info!(resource = %r.name, "{kept}");
        release(ctx, &r.name)?;
        return Ok(false);
    }
    Ok(true)
}

/// Adds the plan's `destroys` entry (not forced: it annotates the forced fields) when a
/// replace deletes something.
pub fn push_destroys(changes: &mut Vec<PlanChange>, notes: &[String]) {
    if !notes.is_empty() {
        changes.push(PlanChange {
            path: "destroys".into(),
            old: Json::String(notes.join("; ")),
            new: Json::Null,
            force_new: false,
        });
    }
}

/// Marks a bound resource as released: it stays on the server and later Deletes (wfctl
/// retries a whole group when any delete failed) do nothing.
pub fn release(ctx: &Ctx, name: &str) -> Result<(), DriverError> {
    ctx.state.update(|s| {
        if let Some(rec) = s.resources.get_mut(name) {
            rec.released = true;
        }
    })
}

/// Changes `num_replicas` in place (ResourceDriver.Scale).
pub async fn scale(ctx: &Ctx, r: &ResourceRef, replicas: i32) -> Result<Output, DriverError> {
    if !(1..=5).contains(&replicas) {
        return Err(DriverError::invalid(
            format!("{STREAM_TYPE} {:?}", r.name),
            format!("replicas {replicas} is out of range (1..=5)"),
        ));
    }
    let state = ctx.state.load()?;
    let l = locate(&state, r, STREAM_TYPE)
        .ok_or_else(|| DriverError::not_found(format!("{STREAM_TYPE} {:?}", r.name)))?;
    let what = label(&r.name, &l.stream);
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = ctx.connect(&what, &b).await?;
    let mut cfg = fetch_stream_config(&conn, &l.stream)
        .await
        .map_err(|e| DriverError::nats(&what, e))?
        .ok_or_else(|| DriverError::not_found(what.clone()))?;
    cfg.num_replicas = replicas as usize;
    let cfg = conn
        .js
        .update_stream(cfg)
        .await
        .map_err(|e| lift_create("update stream", &what, e))?
        .config;
    let outputs = to_outputs(&cfg, &l.flags);
    ctx.state.update(|s| {
        if let Some(rec) = s.resources.get_mut(&r.name) {
            rec.outputs = outputs.clone();
        }
    })?;
    Ok(Output {
        provider_id: provider_id(&b.name, &l.stream),
        outputs,
        sensitive: Vec::new(),
        status: "running".into(),
    })
}

pub async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
    health_as(ctx, r, &STREAM_SHAPE).await
}

/// `health` for any resource type kept as a stream.
pub async fn health_as(
    ctx: &Ctx,
    r: &ResourceRef,
    shape: &Shape,
) -> Result<(bool, String), DriverError> {
    let state = ctx.state.load()?;
    let l = locate(&state, r, shape.type_name)
        .ok_or_else(|| DriverError::not_found(format!("{} {:?}", shape.type_name, r.name)))?;
    let what = shaped_label(shape, &r.name, &l.stream);
    let b = connect_target(ctx, &what, &l, &state)?;
    let conn = match ctx.connect(&what, &b).await {
        Ok(c) => c,
        Err(e) => return Ok((false, crate::error_chain::render(&e))),
    };
    match conn.js.get_stream(&l.stream).await {
        Ok(mut s) => match s.info().await {
            Ok(info) => Ok((
                true,
                format!(
                    "stream {:?}: {} messages, {} bytes, {} consumers",
                    l.stream, info.state.messages, info.state.bytes, info.state.consumer_count
                ),
            )),
            Err(e) => Ok((false, format!("stream info: {e}"))),
        },
        Err(e) => Ok((false, format!("stream {:?}: {e}", l.stream))),
    }
}

/// Streams on one broker, for import-all.
/// The streams on `broker`, as the enumerator reports them.
pub async fn enumerate(ctx: &Ctx, broker: &str) -> Result<Vec<(String, Output)>, DriverError> {
    let flags = Flags {
        broker: broker.to_string(),
        broker_ref: broker.to_string(),
        ..Default::default()
    };
    Ok(list(ctx, broker)
        .await?
        .into_iter()
        .map(|(provider_id, cfg)| {
            let output = Output {
                provider_id,
                outputs: to_outputs(&cfg, &flags),
                sensitive: Vec::new(),
                status: "running".into(),
            };
            (cfg.name, output)
        })
        .collect())
}

pub async fn list(ctx: &Ctx, broker: &str) -> Result<Vec<(String, stream::Config)>, DriverError> {
    use futures::TryStreamExt;
    let state = ctx.state.load()?;
    let what = format!("broker {broker:?}");
    let b = resolve_broker(&what, broker, &[], &state, &ctx.state.path())?;
    let conn = ctx.connect(&what, &b).await?;
    let infos: Vec<stream::Info> = conn
        .js
        .streams()
        .try_collect()
        .await
        .map_err(|e| DriverError::nats(&what, NatsError::other("list streams", e)))?;
    Ok(infos
        .into_iter()
        .map(|i| (provider_id(broker, &i.config.name), i.config))
        .collect())
}

/// What a plan-time read of the live broker is about.
pub enum LiveTarget<'a> {
    Stream(&'a str),
    Consumer { stream: &'a str, durable: &'a str },
}

/// Where the resource a plan-time read is about lives (`None`: not on a NATS broker).
pub struct Live<'a> {
    pub broker_ref: &'a str,
    pub servers: &'a [String],
    pub target: LiveTarget<'a>,
}

/// How long Diff waits for the live broker before saying it could not ask.
const PLAN_READ_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// Diff's read of the live broker, for streams and consumers: a change the broker's release
/// cannot make in place is forced to a replace (nats-server versions from `table`, and the
/// stream retention rule), and every replace gets a `destroys` entry naming what it deletes
/// (messages, bytes, consumers and their positions). Nothing to replace: no I/O at all.
pub async fn live_report(
    ctx: &Ctx,
    state: &ProviderState,
    live: Option<Live<'_>>,
    mut changes: Vec<PlanChange>,
) -> Vec<PlanChange> {
    let Some(Live {
        broker_ref,
        servers,
        target,
    }) = live
    else {
        return changes;
    };
    let (what, table) = match &target {
        LiveTarget::Stream(name) => (label(name, name), settings::STREAM),
        LiveTarget::Consumer { stream, durable } => (
            format!(
                "{} consumer {durable:?} on stream {stream:?}",
                super::CONSUMER_TYPE
            ),
            settings::CONSUMER,
        ),
    };
    let what = what.as_str();
    let is_stream = matches!(target, LiveTarget::Stream(_));
    let sensitive = |path: &str| {
        (is_stream && path == "retention_policy")
            || table
                .iter()
                .any(|s| s.key == path && s.in_place_since.is_some())
    };
    if !changes.iter().any(|c| c.force_new || sensitive(&c.path)) {
        return changes;
    }
    let read = async {
        let b = resolve_broker(what, broker_ref, servers, state, &ctx.state.path())?;
        let conn = ctx.connect(what, &b).await?;
        let loss = match target {
            LiveTarget::Stream(name) => crate::nats::loss::stream_loss(&conn, name).await,
            LiveTarget::Consumer { stream, durable } => {
                crate::nats::loss::consumer_loss(&conn, stream, durable).await
            }
        }
        .map_err(|e| DriverError::nats(what, e))?;
        Ok::<_, DriverError>((server_version(&conn), loss, conn))
    };
    let mut notes = Vec::new();
    match tokio::time::timeout(PLAN_READ_BOUND, read).await {
        Ok(Ok((version, loss, conn))) => {
            for c in changes
                .iter_mut()
                .filter(|c| !c.force_new && sensitive(&c.path))
            {
                let late = if is_stream && c.path == "retention_policy" {
                    (!crate::nats::stream::retention_in_place(&version))
                        .then_some(settings::RETENTION_IN_PLACE_SINCE)
                } else {
                    settings::needs_newer_to_change(table, &[c.path.as_str()], &version)
                        .map(|(_, v)| v)
                };
                if let Some((major, minor)) = late {
                    c.force_new = true;
                    notes.push(format!(
                        "{} changes in place only from nats-server {major}.{minor} on and the broker runs {version}: a replace",
                        c.path
                    ));
                }
            }
            if changes.iter().any(|c| c.force_new) {
                notes.extend(loss);
            } else if let LiveTarget::Stream(name) = target {
                // In place, but the switch to interest removes what no consumer still needs.
                let to_interest = changes
                    .iter()
                    .any(|c| c.path == "retention_policy" && c.new == "RETENTION_POLICY_INTEREST");
                let read = crate::nats::loss::interest_loss(&conn, name);
                if to_interest {
                    if let Ok(Ok(Some(n))) = tokio::time::timeout(PLAN_READ_BOUND, read).await {
                        notes.push(n);
                    }
                }
            }
        }
        Ok(Err(e)) if changes.iter().any(|c| c.force_new) => notes.push(format!(
            "unknown: the broker could not be read to count what the replace deletes ({e})"
        )),
        Err(_) if changes.iter().any(|c| c.force_new) => notes.push(format!(
            "unknown: the broker did not answer within {PLAN_READ_BOUND:?} to count what the replace deletes"
        )),
        _ => {}
    }
    push_destroys(&mut changes, &notes);
    changes
}

/// `desired_broker`: the broker the spec resolves to, when that can be decided.
pub fn diff(spec: &StreamSpec, desired_broker: Option<&str>, current: &Json) -> Vec<PlanChange> {
    let want = desired_outputs(spec, desired_broker.unwrap_or_default());
    resource_changes(
        &[("name", Some(&spec.name)), ("broker", desired_broker)],
        spec.diff(&observed_from_outputs(current)),
        &want,
        current,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(json: Json) -> StreamSpec {
        decode("orders-stream", json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn outputs_round_trip_through_the_server_config() {
        let s = spec(json!({
            "name": "ORDERS", "subjects": ["orders.>", "refunds.*"], "retention_policy": "RETENTION_POLICY_INTEREST",
            "storage": "STORAGE_TYPE_MEMORY", "num_replicas": 3, "max_bytes": 1048576, "max_msgs": 10,
            "max_msgs_per_subject": 2, "max_msg_size": 1024, "max_age": "3600s", "discard": "DISCARD_POLICY_NEW",
            "duplicate_window": "1.5s", "description": "orders", "broker_ref": "bus", "prevent_destroy": true
        }));
        let out = desired_outputs(&s, "bus");
        let back = observed_from_outputs(&out);
        assert!(s.diff(&back).is_empty(), "{:?}", s.diff(&back));
        assert_eq!(to_outputs(&back, &flags_from_outputs(&out)), out);
        assert_eq!(out["max_age"], "3600s");
        assert_eq!(out["retention_policy"], "RETENTION_POLICY_INTEREST");
    }

    #[test]
    fn server_json_with_unknown_fields_decodes_and_diffs_clean() {
        // A future server adds fields the client does not know: they are ignored, not drift.
        let server = json!({
            "name": "ORDERS", "subjects": ["orders.>"], "retention": "limits", "max_consumers": -1,
            "max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msgs_per_subject": -1, "max_msg_size": -1,
            "discard": "old", "storage": "file", "num_replicas": 1, "duplicate_window": 120000000000u64,
            "allow_direct": true, "deny_delete": true, "some_future_field": {"x": 1}, "metadata": {"a": "b"}
        });
        let cfg: stream::Config = serde_json::from_value(server).unwrap();
        let s = spec(json!({"name": "ORDERS", "subjects": ["orders.>"]}));
        assert!(s.diff(&cfg).is_empty());
        let out = to_outputs(&cfg, &Flags::default());
        assert!(s.diff(&observed_from_outputs(&out)).is_empty());
        // Overlay keeps what the provider does not manage.
        let merged = overlay(&s, cfg);
        assert!(merged.deny_delete && merged.allow_direct);
    }

    #[test]
    fn injected_provider_key_is_tolerated_but_typos_are_not() {
        assert!(decode(
            "s",
            br#"{"name":"S","subjects":["a.>"],"provider":"nats","iac_provider":"eb","depends_on":["bus"]}"#
        )
        .is_ok());
        let e = decode("s", br#"{"name":"S","subjects":["a.>"],"max_agee":"1s"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_agee") && e.contains("unknown field"), "{e}");
    }

    #[test]
    fn provider_ids_parse_back() {
        let st = ProviderState::default();
        let r = ResourceRef {
            name: "x".into(),
            r#type: STREAM_TYPE.into(),
            provider_id: provider_id("bus", "ORDERS"),
        };
        let l = locate(&st, &r, STREAM_TYPE).unwrap();
        assert_eq!((l.broker.as_str(), l.stream.as_str()), ("bus", "ORDERS"));
        let r = ResourceRef {
            provider_id: "bus/ORDERS/worker".into(),
            ..r
        };
        let l = locate(&st, &r, super::super::CONSUMER_TYPE).unwrap();
        assert_eq!(l.durable, "worker");
    }
}
