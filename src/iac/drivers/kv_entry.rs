//! `infra.eventbus.kv_entry`: one key of a key-value bucket, holding a declared value.
//!
//! The bucket and the key are the entry's identity (a change is a replace: the old key is
//! deleted, the new one written); the value changes in place (a new revision of the key).
//! Outputs carry the value and its revision; drift compares the value. The bucket must exist
//! (an `infra.eventbus.kv` applied first, or one made elsewhere): an entry never creates one.

use super::{resolve_broker, str_field, Ctx, Output, KV_ENTRY_TYPE};
use crate::iac::drivers::tail::{record_placed_as, Placed};
use crate::iac::error::DriverError;
use crate::iac::plan::{field, Change};
use crate::iac::state::ProviderState;
use crate::nats::kv::{self, KvAction};
use crate::nats::names::check_name;
use crate::nats::NatsError;
use crate::pb::eventbus::KvEntryConfig;
use crate::pb::iac::ResourceRef;
use serde_json::{json, Value as Json};

#[derive(Clone, Debug, PartialEq)]
pub struct KvEntrySpec {
    pub bucket: String,
    pub key: String,
    pub value: String,
    pub broker_ref: String,
    pub servers: Vec<String>,
}

pub fn decode(name: &str, config_json: &[u8]) -> Result<KvEntrySpec, DriverError> {
    let what = format!("{KV_ENTRY_TYPE} {name:?}");
    let mut m = super::config_object(&what, config_json)?;
    for k in super::stream::WFCTL_INJECTED {
        m.remove(*k);
    }
    super::decode_config(
        KV_ENTRY_TYPE,
        name,
        "KvEntryConfig",
        m,
        |c: KvEntryConfig| {
            let mut p = crate::config::error::Problems::new(KV_ENTRY_TYPE, name);
            p.check("bucket", kv::check_bucket(&c.bucket));
            p.check("key", kv::check_key(&c.key));
            if !c.broker_ref.is_empty() {
                p.check("broker_ref", check_name(&c.broker_ref));
            }
            Ok(p.finish(KvEntrySpec {
                bucket: c.bucket,
                key: c.key,
                value: c.value,
                broker_ref: c.broker_ref,
                servers: c.servers,
            })?)
        },
    )
}

pub fn provider_id(broker: &str, bucket: &str, key: &str) -> String {
    format!("{}/{bucket}/{key}", super::stream::broker_key(broker))
}

fn outputs(broker: &str, broker_ref: &str, bucket: &str, key: &str, value: &str, rev: u64) -> Json {
    json!({"bucket": bucket, "key": key, "value": value, "revision": rev, "broker": broker,
        "broker_ref": broker_ref})
}

pub fn diff(spec: &KvEntrySpec, desired_broker: Option<&str>, current: &Json) -> Vec<Change> {
    let mut out = Vec::new();
    let mut cmp = |path: &str, want: &str, force_new: bool| {
        let have = field(current, path);
        if have.as_str().unwrap_or_default() != want {
            out.push(Change {
                path: path.into(),
                old: have,
                new: Json::String(want.into()),
                force_new,
            });
        }
    };
    cmp("bucket", &spec.bucket, true);
    cmp("key", &spec.key, true);
    if let Some(b) = desired_broker {
        cmp("broker", b, true);
    }
    cmp("value", &spec.value, false);
    out
}

fn label(resource: &str, bucket: &str, key: &str) -> String {
    format!("{KV_ENTRY_TYPE} {resource:?} (key {key:?} of bucket {bucket:?})")
}

async fn run(
    ctx: &Ctx,
    what: &str,
    b: &super::BrokerConn,
    bucket: &str,
    action: KvAction,
    key: &str,
    value: Vec<u8>,
) -> Result<kv::KvOutcome, DriverError> {
    let conn = ctx.connect(what, b).await?;
    let after = b.settings.request_timeout;
    match tokio::time::timeout(after, kv::run(&conn.js, bucket, action, key, value, 0, "")).await {
        Ok(r) => r.map_err(|e| DriverError::nats(what, e)),
        Err(_) => Err(DriverError::nats(
            what,
            NatsError::TimedOut {
                op: "key-value operation",
                after,
            },
        )),
    }
}

/// Writes the value unless the key already holds it (no new revision for a no-op apply).
pub async fn apply(ctx: &Ctx, resource: &str, spec: &KvEntrySpec) -> Result<Output, DriverError> {
    let what = label(resource, &spec.bucket, &spec.key);
    let state = ctx.state.load()?;
    let b = resolve_broker(
        &what,
        &spec.broker_ref,
        &spec.servers,
        &state,
        &ctx.state.path(),
    )?;
    let (bucket, key) = (&spec.bucket, &spec.key);
    let now = run(ctx, &what, &b, bucket, KvAction::Get, key, Vec::new()).await;
    let now = match now {
        Err(e) if e.is_not_found() => {
            return Err(DriverError::refused(
                &what,
                format!(
                    "bucket {bucket:?} does not exist on broker {:?}; apply its infra.eventbus.kv first (depends_on)",
                    super::stream::broker_key(&b.name)
                ),
            ))
        }
        other => other?,
    };
    let revision = if now.found && now.value == spec.value.as_bytes() {
        now.revision
    } else {
        let v = spec.value.clone().into_bytes();
        run(ctx, &what, &b, bucket, KvAction::Put, key, v)
            .await?
            .revision
    };
    let stream = kv::stream_name(bucket);
    let at = Placed {
        broker: &b.name,
        servers: &spec.servers,
        stream: &stream,
        durable: Some(key),
        broker_ref: &spec.broker_ref,
        prevent_destroy: false,
        bind: false,
        provider_id: provider_id(&b.name, bucket, key),
    };
    record_placed_as(ctx, resource, at, KV_ENTRY_TYPE, |f| {
        outputs(&f.broker, &f.broker_ref, bucket, key, &spec.value, revision)
    })
}

/// Where an entry lives: its record, else its provider_id `<broker>/<bucket>/<key>`.
struct Located {
    broker: String,
    servers: Vec<String>,
    broker_ref: String,
    bucket: String,
    key: String,
}

fn locate(state: &ProviderState, r: &ResourceRef) -> Option<Located> {
    if let Some(rec) = state.resources.get(&r.name) {
        if rec.type_name == KV_ENTRY_TYPE
            && (r.provider_id.is_empty() || r.provider_id == rec.provider_id)
        {
            return Some(Located {
                broker: rec.broker.clone(),
                servers: rec.servers.clone(),
                broker_ref: str_field(&rec.outputs, "broker_ref").to_string(),
                bucket: kv::bucket_of(&rec.stream).unwrap_or_default().to_string(),
                key: rec.durable.clone(),
            });
        }
    }
    let mut parts = r.provider_id.splitn(3, '/');
    let (broker, bucket, key) = (parts.next()?, parts.next()?, parts.next()?);
    let broker = if broker == "servers" { "" } else { broker };
    Some(Located {
        broker: broker.to_string(),
        servers: Vec::new(),
        broker_ref: broker.to_string(),
        bucket: bucket.to_string(),
        key: key.to_string(),
    })
}

pub async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
    let state = ctx.state.load()?;
    let l = locate(&state, r).ok_or_else(|| {
        DriverError::not_found(format!(
            "{KV_ENTRY_TYPE} {:?}: not recorded; import it by provider_id <broker>/<bucket>/<key>",
            r.name
        ))
    })?;
    let what = label(&r.name, &l.bucket, &l.key);
    let b = resolve_broker(&what, &l.broker, &l.servers, &state, &ctx.state.path())?;
    let got = run(ctx, &what, &b, &l.bucket, KvAction::Get, &l.key, Vec::new()).await;
    let got = match got {
        Err(e) if e.is_not_found() => None,
        other => Some(other?),
    };
    match got {
        Some(g) if g.found => Ok(Output {
            provider_id: provider_id(&b.name, &l.bucket, &l.key),
            outputs: outputs(
                &b.name,
                &l.broker_ref,
                &l.bucket,
                &l.key,
                &String::from_utf8_lossy(&g.value),
                g.revision,
            ),
            sensitive: Vec::new(),
            status: "running".into(),
        }),
        _ => Err(DriverError::not_found(format!("{what} holds no value"))),
    }
}

/// Idempotent: a key, bucket or broker that is already gone is deleted.
pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some(l) = locate(&state, r) else {
        return Ok(());
    };
    let forget = |ctx: &Ctx| {
        ctx.state.update(|s| {
            s.resources.remove(&r.name);
        })
    };
    if l.servers.is_empty() && !state.brokers.contains_key(&l.broker) {
        return forget(ctx);
    }
    let what = label(&r.name, &l.bucket, &l.key);
    let b = resolve_broker(&what, &l.broker, &l.servers, &state, &ctx.state.path())?;
    match run(
        ctx,
        &what,
        &b,
        &l.bucket,
        KvAction::Delete,
        &l.key,
        Vec::new(),
    )
    .await
    {
        Err(e) if e.is_not_found() => {}
        other => {
            other?;
        }
    }
    forget(ctx)
}

pub async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
    match read(ctx, r).await {
        Ok(o) => Ok((true, format!("revision {}", o.outputs["revision"]))),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}
