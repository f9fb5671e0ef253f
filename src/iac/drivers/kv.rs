//! `infra.eventbus.kv` and `infra.eventbus.object_store`: a JetStream key-value bucket or object
//! store on a NATS broker (one `Vocab` each, `crate::nats::kv`).
//!
//! A bucket is the stream `KV_<bucket>` (`crate::nats::kv`), so this driver is the stream
//! driver in the bucket's vocabulary: apply, read, delete and health are the stream's
//! (`stream::*_as` with the bucket's `Shape`), the diff is the stream diff of the bucket's
//! stream with its paths named as bucket settings, and the plan's live check (a setting the
//! broker's release cannot change in place, what a replace deletes) is the stream's too.

use super::stream::{self, Shape};
use super::{desired_broker, Ctx, Output, KV_TYPE, OBJECT_STORE_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::Change;
use crate::iac::state::ProviderState;
use crate::nats::kv::{KvSpec, Vocab, KV, OBJ};
use crate::pb::eventbus::{KvBucketConfig, ObjectStoreConfig};
use crate::pb::iac::ResourceRef;
use async_nats::jetstream::stream::Config as StreamConfig;
use serde_json::Value as Json;

pub fn decode(name: &str, config_json: &[u8]) -> Result<KvSpec, DriverError> {
    let what = format!("{KV_TYPE} {name:?}");
    let mut m = super::config_object(&what, config_json)?;
    for k in stream::WFCTL_INJECTED {
        m.remove(*k);
    }
    super::decode_config(KV_TYPE, name, "KvBucketConfig", m, |c: KvBucketConfig| {
        Ok(KvSpec::validate(KV_TYPE, name, &c)?)
    })
}

pub fn decode_object_store(name: &str, config_json: &[u8]) -> Result<KvSpec, DriverError> {
    let what = format!("{OBJECT_STORE_TYPE} {name:?}");
    let mut m = super::config_object(&what, config_json)?;
    for k in stream::WFCTL_INJECTED {
        m.remove(*k);
    }
    super::decode_config(
        OBJECT_STORE_TYPE,
        name,
        "ObjectStoreConfig",
        m,
        |c: ObjectStoreConfig| Ok(KvSpec::validate_object_store(OBJECT_STORE_TYPE, name, &c)?),
    )
}

fn kv_outputs(c: &StreamConfig, f: &stream::Flags) -> Json {
    KV.outputs_from_stream(&stream::to_outputs(c, f))
}

fn obj_outputs(c: &StreamConfig, f: &stream::Flags) -> Json {
    OBJ.outputs_from_stream(&stream::to_outputs(c, f))
}

const KV_SHAPE: Shape = Shape {
    type_name: KV_TYPE,
    outputs: kv_outputs,
};

const OBJ_SHAPE: Shape = Shape {
    type_name: OBJECT_STORE_TYPE,
    outputs: obj_outputs,
};

/// The resource type a kind of bucket is served as.
fn shape(v: &Vocab) -> &'static Shape {
    if *v == OBJ {
        &OBJ_SHAPE
    } else {
        &KV_SHAPE
    }
}

/// Stream-vocabulary changes renamed into the bucket's, their values as bucket outputs show them.
fn renamed(v: &Vocab, changes: Vec<Change>, want: &Json, current: &Json) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    for mut c in changes {
        let path = v.bucket_field(&c.path).to_string();
        if path == "destroys" || path == "prevent_destroy" || path == "bind" || path == "broker" {
            out.push(c);
            continue;
        }
        if out.iter().any(|o| o.path == path) {
            continue; // allow_msg_ttl and subject_delete_marker_ttl are one bucket setting
        }
        c.old = crate::iac::plan::field(current, &path);
        c.new = crate::iac::plan::field(want, &path);
        c.path = path;
        out.push(c);
    }
    out
}

/// Bucket-vocabulary changes back in the stream's (for the stream's live check).
fn to_stream_paths(v: &Vocab, changes: Vec<Change>) -> Vec<Change> {
    changes
        .into_iter()
        .map(|mut c| {
            c.path = v.stream_field(&c.path).to_string();
            c
        })
        .collect()
}

pub fn desired_outputs(spec: &KvSpec, broker: &str) -> Json {
    spec.vocab
        .outputs_from_stream(&stream::desired_outputs(&spec.stream, broker))
}

pub fn diff(spec: &KvSpec, state: &ProviderState, current: &Json) -> Vec<Change> {
    let b = desired_broker(&spec.stream.broker_ref, &spec.stream.servers, state);
    let current_stream = spec.vocab.outputs_to_stream(current);
    let changes = stream::diff(&spec.stream, b.as_deref(), &current_stream);
    renamed(
        spec.vocab,
        changes,
        &desired_outputs(spec, b.as_deref().unwrap_or_default()),
        current,
    )
}

pub async fn plan_report(
    ctx: &Ctx,
    spec: &KvSpec,
    state: &ProviderState,
    changes: Vec<Change>,
) -> Vec<Change> {
    let live = stream::Live {
        broker_ref: &spec.stream.broker_ref,
        servers: &spec.stream.servers,
        target: stream::LiveTarget::Stream(&spec.stream.name),
    };
    let b = desired_broker(&spec.stream.broker_ref, &spec.stream.servers, state);
    let want = desired_outputs(spec, b.as_deref().unwrap_or_default());
    // The current values are already in the changes; keep them.
    let current: serde_json::Map<String, Json> = changes
        .iter()
        .map(|c| (c.path.clone(), c.old.clone()))
        .collect();
    let changes = to_stream_paths(spec.vocab, changes);
    let reported = stream::live_report(ctx, state, Some(live), changes).await;
    renamed(spec.vocab, reported, &want, &Json::Object(current))
}

pub async fn apply(ctx: &Ctx, resource: &str, spec: &KvSpec) -> Result<Output, DriverError> {
    let check = |observed: Option<&StreamConfig>, server: &str| {
        let changed: Vec<&str> = observed
            .map(|o| spec.stream.diff(o).iter().map(|d| d.field).collect())
            .unwrap_or_default();
        spec.check_server(&changed, server)
    };
    stream::apply_as(ctx, resource, &spec.stream, shape(spec.vocab), &check).await
}

pub async fn read(ctx: &Ctx, r: &ResourceRef, v: &Vocab) -> Result<Output, DriverError> {
    stream::read_as(ctx, r, shape(v), &v.stream_name(&r.name)).await
}

pub async fn delete(ctx: &Ctx, r: &ResourceRef, v: &Vocab) -> Result<(), DriverError> {
    stream::delete_as(ctx, r, shape(v)).await
}

pub async fn health(ctx: &Ctx, r: &ResourceRef, v: &Vocab) -> Result<(bool, String), DriverError> {
    stream::health_as(ctx, r, shape(v)).await
}

/// The buckets of kind `v` on `broker`, for import-all.
pub async fn enumerate(
    ctx: &Ctx,
    broker: &str,
    v: &Vocab,
) -> Result<Vec<(String, Output)>, DriverError> {
    let flags = stream::Flags {
        broker: broker.to_string(),
        broker_ref: broker.to_string(),
        ..Default::default()
    };
    Ok(stream::list(ctx, broker)
        .await?
        .into_iter()
        .filter(|(_, cfg)| v.is_bucket_stream(cfg))
        .map(|(provider_id, cfg)| {
            let name = v.bucket_of(&cfg.name).unwrap_or_default().to_string();
            let output = Output {
                provider_id,
                outputs: (shape(v).outputs)(&cfg, &flags),
                sensitive: Vec::new(),
                status: "running".into(),
            };
            (name, output)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(j: Json) -> KvSpec {
        decode("cache", j.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn diff_names_bucket_settings_and_their_class() {
        let s = spec(json!({"bucket": "cache", "history": 5, "ttl": "60s", "broker_ref": "bus"}));
        let st = ProviderState::default();
        let out = desired_outputs(&s, "bus");
        assert!(diff(&s, &st, &out).is_empty(), "{:?}", diff(&s, &st, &out));
        let changed = spec(
            json!({"bucket": "cache", "history": 7, "ttl": "60s", "broker_ref": "bus",
            "storage": "STORAGE_TYPE_MEMORY"}),
        );
        let d = diff(&changed, &st, &out);
        let h = d.iter().find(|c| c.path == "history").unwrap();
        assert!(!h.force_new);
        assert_eq!((h.old.clone(), h.new.clone()), (json!(5), json!(7)));
        assert!(
            d.iter().any(|c| c.path == "storage" && c.force_new),
            "{d:?}"
        );
        let renamed = spec(json!({"bucket": "other", "broker_ref": "bus"}));
        assert!(diff(&renamed, &st, &out)
            .iter()
            .any(|c| c.path == "bucket" && c.force_new));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = decode("c", br#"{"bucket":"c","histroy":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("histroy"), "{e}");
    }
}
