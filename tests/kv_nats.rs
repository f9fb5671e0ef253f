//! Key-value buckets against a real nats-server: `infra.eventbus.kv` through the IaC services as
//! wfctl drives them (plan, apply, re-plan no-op, in-place update, replace, drift, destroy), and
//! the runtime face through the plugin binary (`eventbus.kv` module, `step.eventbus.kv`, and a
//! subscribe trigger watching the bucket's keys).
//!
//! Runs on nats-server 2.15 (`make test`) and Debian's 2.9 (`make test-nats29`): what needs a
//! newer release is asserted as the one-line refusal there and exercised from 2.11 on.

mod common;

use async_nats::jetstream;
use common::iac::{Res, Wfctl};
use eventbus_plugin::nats::settings;
use eventbus_plugin::pb::iac::DriftClass;
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};
use std::time::Duration;

const KV: &str = "infra.eventbus.kv";
const T: Duration = Duration::from_secs(20);

async fn js(url: &str) -> (jetstream::Context, (u64, u64), String) {
    let client = async_nats::connect(url).await.unwrap();
    client.flush().await.unwrap();
    let v = client.server_info().version;
    (
        jetstream::new(client),
        settings::parse_version(&v).unwrap(),
        v,
    )
}

/// A bucket as the server keeps one, made without async-nats' `create_key_value` (its account
/// query does not parse nats-server 2.9's answer).
async fn bucket_stream(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
) -> jetstream::kv::Store {
    js.create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    js.get_key_value(bucket).await.unwrap()
}

fn bucket(url: &str, extra: Json) -> Res {
    let mut c = json!({"bucket": "cache", "servers": [url], "history": 3, "ttl": "3600s",
        "max_value_size": 1024});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    Res::new("cache", KV, c)
}

fn actions(plan: &[common::iac::Action]) -> Vec<(String, String)> {
    plan.iter()
        .map(|a| (a.action.clone(), a.name.clone()))
        .collect()
}

async fn stream_cfg(js: &jetstream::Context) -> jetstream::stream::Config {
    js.get_stream("KV_cache")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone()
}

#[tokio::test]
async fn bucket_plan_apply_replan_update_replace_drift_destroy() {
    let server = NatsServer::start();
    let url = server.url();
    let (js, version, version_text) = js(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![bucket(&url, json!({}))];

    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("create".into(), "cache".into())]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["cache"].provider_id, "servers/KV_cache");
    assert_eq!(w.state["cache"].outputs["bucket"], "cache");
    assert_eq!(w.state["cache"].outputs["history"], 3);
    // The client library sees a bucket, as the server keeps one.
    let store = js.get_key_value("cache").await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.history(), 3);
    assert_eq!(status.max_age(), Duration::from_secs(3600));
    store.put("a", "1".into()).await.unwrap();
    assert!(w.plan(&desired).await.is_empty(), "re-plan is a no-op");

    // history, ttl and max_value_size change in place; the keys stay.
    desired[0].config["history"] = json!(5);
    desired[0].config["ttl"] = json!("7200s");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("update".into(), "cache".into())]);
    let mut paths = plan[0].paths();
    paths.sort();
    assert_eq!(paths, ["history", "ttl"]);
    assert!(plan[0].forced().is_empty());
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let cfg = stream_cfg(&js).await;
    assert_eq!(cfg.max_messages_per_subject, 5);
    assert_eq!(cfg.max_age, Duration::from_secs(7200));
    assert_eq!(
        store.get("a").await.unwrap().as_deref(),
        Some(&b"1"[..]),
        "an in-place update keeps the keys"
    );
    assert!(w.plan(&desired).await.is_empty());

    // A change behind our back is CONFIG drift named in the bucket's words.
    let mut changed = stream_cfg(&js).await;
    changed.max_message_size = 4096;
    js.update_stream(changed).await.unwrap();
    let drifts = w.drift().await.unwrap();
    let d = drifts.iter().find(|d| d.name == "cache").unwrap();
    assert_eq!(d.class, DriftClass::Config as i32, "{drifts:?}");
    assert_eq!(d.fields, ["max_value_size"]);
    let mut back = stream_cfg(&js).await;
    back.max_message_size = 1024;
    js.update_stream(back).await.unwrap();

    // Per-key TTLs need 2.11: refused in one line naming the setting there, in place from it.
    let mut marker = desired.clone();
    marker[0].config["limit_marker_ttl"] = json!("60s");
    if version < (2, 11) {
        let (_, errors) = w.apply(&marker).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("limit_marker_ttl needs nats-server 2.11")
                && errors[0].contains(&version_text),
            "{errors:?}"
        );
        eprintln!(
            "skipped limit_marker_ttl in place: needs nats-server 2.11, this one is {version_text}"
        );
    } else {
        let (plan, errors) = w.apply(&marker).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(plan[0].paths(), ["limit_marker_ttl"]);
        let cfg = stream_cfg(&js).await;
        assert!(cfg.allow_message_ttl);
        assert_eq!(cfg.subject_delete_marker_ttl, Some(Duration::from_secs(60)));
        assert!(w.plan(&marker).await.is_empty());
        desired = marker;
    }

    // Storage changes only by replace: the plan says so, and what the replace deletes.
    desired[0].config["storage"] = json!("STORAGE_TYPE_MEMORY");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("replace".into(), "cache".into())]);
    assert_eq!(plan[0].forced(), ["storage"]);
    let destroys = plan[0]
        .changes
        .iter()
        .find(|c| c.path == "destroys")
        .map(|c| String::from_utf8_lossy(&c.old_json).to_string())
        .unwrap_or_default();
    assert!(destroys.contains("1 message"), "{destroys}");
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        stream_cfg(&js).await.storage,
        jetstream::stream::StorageType::Memory
    );
    assert!(w.plan(&desired).await.is_empty());

    // Deleted behind our back: GHOST, and a refresh plans the create.
    js.delete_key_value("cache").await.unwrap();
    let drifts = w.drift().await.unwrap();
    assert!(drifts
        .iter()
        .any(|d| d.name == "cache" && d.class == DriftClass::Ghost as i32));
    assert_eq!(w.refresh().await, ["cache"]);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [("create".into(), "cache".into())]);
    assert!(errors.is_empty(), "{errors:?}");

    let r = w.destroy().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(js.get_key_value("cache").await.is_err());
}

/// Broker `bus` on `server` through the plugin binary, with the host's pipeline `callback`.
async fn plugin(server: &NatsServer, callback: Option<common::PipelineFn>) -> common::Plugin {
    let p = common::Plugin::launch(common::LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback,
        ..Default::default()
    })
    .await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p
}

async fn kv_step(p: &common::Plugin, config: &str) -> Result<Json, String> {
    let h = p.create_step("step.eventbus.kv", "kv", "").await?;
    tokio::time::timeout(
        Duration::from_secs(20),
        p.execute("step.eventbus.kv", &h, config, &json!({})),
    )
    .await
    .expect("step.eventbus.kv within 20s")
}

#[tokio::test]
async fn kv_step_put_get_conflict_delete_and_keys_through_the_binary() {
    let server = NatsServer::start();
    let (js, _, _) = js(&server.url()).await;
    let mut p = plugin(&server, None).await;
    // The bucket module creates it at Start, as the server keeps buckets.
    p.module_up("eventbus.kv", "sessions", "bucket: sessions\nhistory: 3\n")
        .await;
    let e = p
        .create_module("eventbus.kv", "bad", "bucket: a.b\nhistory: 65\n")
        .await
        .unwrap_err();
    assert!(e.contains("bucket") && e.contains("history"), "{e}");

    let put = kv_step(
        &p,
        "bucket: sessions\naction: put\nkey: user.1\nvalue: {\"n\": 1}\n",
    )
    .await
    .unwrap();
    let rev: u64 = put["revision"].as_str().unwrap().parse().unwrap();
    let got = kv_step(&p, "bucket: sessions\naction: get\nkey: user.1\n")
        .await
        .unwrap();
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(got["text"], "{\"n\":1}");
    assert_eq!(got["json"]["n"], 1.0);
    assert_eq!(got["operation"], "PUT");
    // What the client library reads is what the step wrote.
    let store = js.get_key_value("sessions").await.unwrap();
    assert_eq!(
        store.get("user.1").await.unwrap().as_deref(),
        Some(&b"{\"n\":1}"[..])
    );

    // Expected revision: the current one wins, a stale one is a conflict, said in one line.
    let h = p
        .create_step("step.eventbus.kv", "kv-rev", "")
        .await
        .unwrap();
    let ok = p
        .execute(
            "step.eventbus.kv",
            &h,
            "bucket: sessions\naction: put\nkey: user.1\nvalue: two\n",
            &json!({"expected_revision": rev}),
        )
        .await
        .unwrap();
    let rev2: u64 = ok["revision"].as_str().unwrap().parse().unwrap();
    assert!(rev2 > rev);
    let stale = p
        .execute(
            "step.eventbus.kv",
            &h,
            "bucket: sessions\naction: put\nkey: user.1\nvalue: three\n",
            &json!({"expected_revision": rev}),
        )
        .await
        .unwrap_err();
    assert!(
        stale.contains("no longer at revision") && !stale.contains('\n'),
        "{stale}"
    );
    let dup = kv_step(
        &p,
        "bucket: sessions\naction: create\nkey: user.1\nvalue: x\n",
    )
    .await
    .unwrap_err();
    assert!(dup.contains("already exists"), "{dup}");

    kv_step(&p, "bucket: sessions\naction: put\nkey: user.2\nvalue: b\n")
        .await
        .unwrap();
    kv_step(
        &p,
        "bucket: sessions\naction: put\nkey: admin.1\nvalue: c\n",
    )
    .await
    .unwrap();
    let keys = kv_step(&p, "bucket: sessions\naction: keys\nkeys: user.*\n")
        .await
        .unwrap();
    assert_eq!(keys["keys"], json!(["user.1", "user.2"]), "{keys}");
    kv_step(&p, "bucket: sessions\naction: delete\nkey: user.1\n")
        .await
        .unwrap();
    let gone = kv_step(&p, "bucket: sessions\naction: get\nkey: user.1\n")
        .await
        .unwrap();
    assert_eq!(gone["operation"], "DEL", "{gone}");
    assert!(gone.get("found").is_none(), "{gone}");
    assert!(store.get("user.1").await.unwrap().is_none());

    // Hostile keys never reach the server: wildcards, dot tricks, whitespace, CRLF, the API.
    for key in [
        "user.*",
        ">",
        "a..b",
        ".a",
        "a b",
        "a\\r\\nPUB $JS.API.STREAM.DELETE.KV_sessions 0",
        "$JS.API.STREAM.DELETE.KV_sessions",
    ] {
        let e = kv_step(
            &p,
            &format!("bucket: sessions\naction: put\nkey: \"{key}\"\nvalue: x\n"),
        )
        .await
        .unwrap_err();
        assert!(e.contains("key") && !e.contains('\n'), "{key}: {e}");
    }
    for bucket in ["a.b", "sessions.>", "*"] {
        let e = kv_step(&p, &format!("bucket: \"{bucket}\"\naction: get\nkey: k\n"))
            .await
            .unwrap_err();
        assert!(e.contains("bucket"), "{bucket}: {e}");
    }
    assert!(js.get_stream("KV_sessions").await.is_ok());
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

/// A trigger config refused at Create, in one line naming `field_name`.
async fn refused_trigger(p: &common::Plugin, cfg: Json, field_name: &str) {
    let e = p.create_trigger("pipeline:bad", &cfg).await.unwrap_err();
    assert!(e.contains(field_name) && !e.contains('\n'), "{cfg}: {e}");
}

/// The watch consumer once the worker has acked everything it was sent (polled: the server
/// has no event for it), bounded.
async fn settled(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> jetstream::consumer::Info {
    tokio::time::timeout(T, async {
        loop {
            let i = js
                .get_stream(stream)
                .await
                .unwrap()
                .consumer_info(durable)
                .await
                .unwrap()
                .clone();
            if i.num_ack_pending == 0 && i.num_pending == 0 {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the watch consumer settles")
}

fn field(call: &eventbus_plugin::pb::plugin::TriggerWorkflowRequest, key: &str) -> String {
    match call
        .data
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        _ => String::new(),
    }
}

#[tokio::test]
async fn kv_trigger_fires_on_key_changes_through_the_trigger_worker() {
    let server = NatsServer::start();
    let (js, _, _) = js(&server.url()).await;
    let store = bucket_stream(&js, "sessions", 2).await;
    store.put("user.1", "a".into()).await.unwrap();
    store.put("admin.1", "x".into()).await.unwrap();
    let mut p = plugin(&server, Some(common::ok_pipeline())).await;

    // Configs that would reach past the bucket are refused, one line per field.
    for (cfg, field_name) in [
        (json!({"name": "w", "kv_bucket": "sessions.>"}), "kv_bucket"),
        (
            json!({"name": "w", "kv_bucket": "sessions", "keys": "a..b"}),
            "keys",
        ),
        (
            json!({"name": "w", "kv_bucket": "sessions", "keys": "$JS.API.>"}),
            "keys",
        ),
        (
            json!({"name": "w", "kv_bucket": "sessions", "keys": "a b"}),
            "keys",
        ),
        (
            json!({"name": "w", "kv_bucket": "sessions", "stream_name": "OTHER"}),
            "stream_name",
        ),
        (
            json!({"name": "w", "stream_name": "S", "keys": "user.*"}),
            "keys",
        ),
    ] {
        refused_trigger(&p, cfg, field_name).await;
    }

    let t = p
        .create_trigger(
            "pipeline:users",
            &json!({"name": "users-watch", "kv_bucket": "sessions", "keys": "user.*"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    // The current value of each watched key first, then every change, in order.
    let call = p.next_call(T).await;
    assert_eq!(
        (
            field(&call, "key"),
            field(&call, "operation"),
            field(&call, "text")
        ),
        ("user.1".into(), "PUT".into(), "a".into())
    );
    assert_eq!(field(&call, "bucket"), "sessions");
    let h = p.create_step("step.eventbus.kv", "kv", "").await.unwrap();
    for cfg in [
        "bucket: sessions\naction: put\nkey: admin.2\nvalue: y\n",
        "bucket: sessions\naction: put\nkey: user.2\nvalue: b\n",
        "bucket: sessions\naction: delete\nkey: user.1\n",
    ] {
        p.execute("step.eventbus.kv", &h, cfg, &json!({}))
            .await
            .unwrap();
    }
    let call = p.next_call(T).await;
    assert_eq!(
        (
            field(&call, "key"),
            field(&call, "operation"),
            field(&call, "text")
        ),
        ("user.2".into(), "PUT".into(), "b".into()),
        "admin.* is not watched"
    );
    let revision = field(&call, "revision");
    assert!(!revision.is_empty());
    let call = p.next_call(T).await;
    assert_eq!(
        (field(&call, "key"), field(&call, "operation")),
        ("user.1".into(), "DEL".into())
    );
    // Every change was acked by the worker: nothing pending on its consumer.
    let info = settled(&js, "KV_sessions", "users-watch").await;
    assert_eq!(info.delivered.consumer_sequence, 3);
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn kv_entry_plan_apply_update_replace_drift_import_destroy() {
    let server = NatsServer::start();
    let url = server.url();
    let (js, _, _) = js(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let entry = |key: &str, value: &str| {
        Res::new(
            "greeting",
            "infra.eventbus.kv_entry",
            json!({"bucket": "cache", "key": key, "value": value, "servers": [url],
                "depends_on": ["cache"]}),
        )
    };
    // Without its bucket: one line saying to apply the bucket first.
    let (_, errors) = w.apply(&[entry("hello", "world")]).await;
    assert!(
        errors.len() == 1 && errors[0].contains("apply its infra.eventbus.kv first"),
        "{errors:?}"
    );
    let mut desired = vec![bucket(&url, json!({})), entry("hello", "world")];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["greeting"].provider_id, "servers/cache/hello");
    let store = js.get_key_value("cache").await.unwrap();
    assert_eq!(
        store.get("hello").await.unwrap().as_deref(),
        Some(&b"world"[..])
    );
    assert!(w.plan(&desired).await.is_empty());
    let rev = w.state["greeting"].outputs["revision"].clone();

    // The value changes in place (a new revision); the key only by replace.
    desired[1] = entry("hello", "there");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("update".into(), "greeting".into())]);
    assert_eq!(plan[0].paths(), ["value"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_ne!(w.state["greeting"].outputs["revision"], rev);
    desired[1] = entry("hi/all", "there");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("replace".into(), "greeting".into())]);
    assert_eq!(plan[0].forced(), ["key"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        store.get("hello").await.unwrap().is_none(),
        "the old key went"
    );
    assert_eq!(
        store.get("hi/all").await.unwrap().as_deref(),
        Some(&b"there"[..])
    );

    // A write behind our back is CONFIG drift on the value; a delete is GHOST.
    store.put("hi/all", "other".into()).await.unwrap();
    let drifts = w.drift().await.unwrap();
    let d = drifts.iter().find(|d| d.name == "greeting").unwrap();
    assert_eq!(d.class, DriftClass::Config as i32, "{drifts:?}");
    assert_eq!(d.fields, ["value"]);
    store.delete("hi/all").await.unwrap();
    let drifts = w.drift().await.unwrap();
    assert!(drifts
        .iter()
        .any(|d| d.name == "greeting" && d.class == DriftClass::Ghost as i32));
    store.put("hi/all", "there".into()).await.unwrap();

    // Import by provider_id: the key part may hold '/'.
    let l = w.load().await;
    let imported = l
        .required
        .clone()
        .import(eventbus_plugin::pb::iac::ImportRequest {
            provider_id: "servers/cache/hi/all".into(),
            resource_type: "infra.eventbus.kv_entry".into(),
        })
        .await;
    l.close().await;
    // A `servers/...` id names no recorded broker to dial: one line saying how to fix it.
    let e = imported.unwrap_err().message().to_string();
    assert!(e.contains("no broker") && !e.contains('\n'), "{e}");

    let r = w.destroy().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(js.get_key_value("cache").await.is_err());
}

#[tokio::test]
async fn object_store_plan_apply_replan_update_replace_drift_destroy() {
    let server = NatsServer::start();
    let url = server.url();
    let (js, _, _) = js(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![Res::new(
        "files",
        "infra.eventbus.object_store",
        json!({"bucket": "files", "servers": [url], "ttl": "3600s", "max_bucket_size": 1048576,
            "description": "uploads"}),
    )];
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [("create".into(), "files".into())]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["files"].provider_id, "servers/OBJ_files");
    assert_eq!(w.state["files"].outputs["max_bucket_size"], 1048576);
    // The client library sees an object store and stores into it.
    let store = js.get_object_store("files").await.unwrap();
    let mut data: &[u8] = b"hello";
    store.put("a.txt", &mut data).await.unwrap();
    let cfg = |js: jetstream::Context| async move {
        js.get_stream("OBJ_files")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone()
    };
    let c = cfg(js.clone()).await;
    assert_eq!(c.subjects, ["$O.files.C.>", "$O.files.M.>"]);
    assert!(c.allow_rollup && c.allow_direct);
    assert!(w.plan(&desired).await.is_empty(), "re-plan is a no-op");

    desired[0].config["max_bucket_size"] = json!(2097152);
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("update".into(), "files".into())]);
    assert_eq!(plan[0].paths(), ["max_bucket_size"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(cfg(js.clone()).await.max_bytes, 2097152);
    assert!(
        store.get("a.txt").await.is_ok(),
        "an update keeps the objects"
    );

    let mut changed = cfg(js.clone()).await;
    changed.max_age = Duration::from_secs(7200);
    js.update_stream(changed).await.unwrap();
    let drifts = w.drift().await.unwrap();
    let d = drifts.iter().find(|d| d.name == "files").unwrap();
    assert_eq!(d.class, DriftClass::Config as i32, "{drifts:?}");
    assert_eq!(d.fields, ["ttl"]);

    desired[0].config["storage"] = json!("STORAGE_TYPE_MEMORY");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [("replace".into(), "files".into())]);
    assert_eq!(plan[0].forced(), ["storage"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        cfg(js.clone()).await.storage,
        jetstream::stream::StorageType::Memory
    );

    let r = w.destroy().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(js.get_stream("OBJ_files").await.is_err());
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test]
async fn kv_put_over_max_value_size_or_max_payload_is_refused_before_it_is_sent() {
    let server = NatsServer::builder().config("max_payload: 4096\n").start();
    let (js, _, _) = js(&server.url()).await;
    let mut p = plugin(&server, None).await;
    p.module_up(
        "eventbus.kv",
        "limited",
        "bucket: limited\nmax_value_size: 1024\n",
    )
    .await;
    p.module_up("eventbus.kv", "open", "bucket: open\n").await;
    let put = |bucket: &str, action: &str, n: usize| {
        format!(
            "bucket: {bucket}\naction: {action}\nkey: k{n}\nvalue: \"{}\"\n",
            "v".repeat(n)
        )
    };
    // At the bucket's limit a plain put (no header) is stored.
    kv_step(&p, &put("limited", "put", 1024)).await.unwrap();
    assert_eq!(stream_messages(&js, "KV_limited").await, 1);
    for (cfg, sent) in [
        (put("limited", "put", 1025), "1025 bytes"),
        // Create sends the expected revision as a header: counted, as the server counts it.
        (put("limited", "create", 1000), "1052 bytes"),
    ] {
        let e = kv_step(&p, &cfg).await.unwrap_err();
        assert!(
            e.contains("step.eventbus.kv")
                && e.contains("value")
                && e.contains(sent)
                && e.contains("max_value_size of 1024 bytes")
                && !e.contains('\n'),
            "{e}"
        );
    }
    assert_eq!(
        stream_messages(&js, "KV_limited").await,
        1,
        "nothing refused reached the bucket"
    );
    // The server agrees: the same create, sent past the plugin, is refused by the stream.
    let store = js.get_key_value("limited").await.unwrap();
    assert!(store
        .create("k1000", "v".repeat(1000).into())
        .await
        .is_err());
    assert!(store.create("k971", "v".repeat(971).into()).await.is_ok());

    // The server's max_payload bounds a bucket without a value limit.
    let e = kv_step(&p, &put("open", "put", 4097)).await.unwrap_err();
    assert!(
        e.contains("value") && e.contains("max_payload of 4096 bytes") && !e.contains('\n'),
        "{e}"
    );
    assert_eq!(stream_messages(&js, "KV_open").await, 0);
    kv_step(&p, &put("open", "put", 4096)).await.unwrap();
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

async fn object_step(p: &common::Plugin, config: &str, input: &Json) -> Result<Json, String> {
    let h = p.create_step("step.eventbus.object", "obj", "").await?;
    tokio::time::timeout(
        Duration::from_secs(20),
        p.execute("step.eventbus.object", &h, config, input),
    )
    .await
    .expect("step.eventbus.object within 20s")
}

#[tokio::test]
async fn object_store_put_get_info_list_delete_through_the_binary() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let server = NatsServer::start();
    let (js, _, _) = js(&server.url()).await;
    let mut p = plugin(&server, None).await;
    // The module creates the store at Start, as the server keeps object stores.
    p.module_up(
        "eventbus.object_store",
        "files",
        "bucket: files\nmax_bucket_size: 1048576\ndescription: uploads\n",
    )
    .await;
    let e = p
        .create_module(
            "eventbus.object_store",
            "bad",
            "bucket: a.b\nttl: \"-1s\"\n",
        )
        .await
        .unwrap_err();
    assert!(e.contains("bucket") && e.contains("ttl"), "{e}");
    let e = p
        .create_step(
            "step.eventbus.object",
            "bad",
            "action: move\nmax_object_size: -1\n",
        )
        .await
        .unwrap_err();
    assert!(e.contains("action") && e.contains("max_object_size"), "{e}");

    // Text from the step config, binary from pipeline state (base64 in the host's JSON).
    let put = object_step(
        &p,
        "bucket: files\naction: put\nname: docs/a.json\ndata: {\"n\": 1}\ndescription: first\n",
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(put["info"]["size"], "7", "{put}");
    assert_eq!(put["info"]["description"], "first");
    assert!(put["info"]["digest"]
        .as_str()
        .unwrap()
        .starts_with("SHA-256="));
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let put = object_step(
        &p,
        "bucket: files\naction: put\nname: blob.bin\n",
        &json!({"data": b64.encode(&binary)}),
    )
    .await
    .unwrap();
    assert_eq!(put["info"]["size"], "300000", "{put}");
    assert_eq!(put["info"]["chunks"], "3", "128 KiB chunks: {put}");

    // What the client library reads is what the step wrote, and the other way round.
    let store = js.get_object_store("files").await.unwrap();
    let mut read = Vec::new();
    use tokio::io::AsyncReadExt;
    store
        .get("blob.bin")
        .await
        .unwrap()
        .read_to_end(&mut read)
        .await
        .unwrap();
    assert!(read == binary);
    let mut other: &[u8] = b"from the client";
    store.put("c.txt", &mut other).await.unwrap();

    let got = object_step(
        &p,
        "bucket: files\naction: get\nname: docs/a.json\n",
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(got["text"], "{\"n\":1}");
    assert_eq!(got["json"]["n"], 1.0);
    assert_eq!(got["info"]["name"], "docs/a.json");
    let got = object_step(
        &p,
        "bucket: files\naction: get\nname: blob.bin\n",
        &json!({}),
    )
    .await
    .unwrap();
    assert!(b64.decode(got["data"].as_str().unwrap()).unwrap() == binary);
    assert!(got.get("text").is_none(), "binary data has no text form");
    let got = object_step(&p, "bucket: files\naction: get\nname: c.txt\n", &json!({}))
        .await
        .unwrap();
    assert_eq!(got["text"], "from the client");
    let info = object_step(
        &p,
        "bucket: files\naction: info\nname: blob.bin\n",
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(info["found"], true);
    assert!(info.get("data").is_none(), "{info}");
    let list = object_step(&p, "bucket: files\naction: list\n", &json!({}))
        .await
        .unwrap();
    let names: Vec<&str> = list["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["blob.bin", "c.txt", "docs/a.json"]);
    assert_eq!(list["count"], 3);

    // Delete: found, then gone for get, info and a second delete; the chunks are purged.
    let del = object_step(
        &p,
        "bucket: files\naction: delete\nname: blob.bin\n",
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(del["found"], true, "{del}");
    for action in ["get", "info", "delete"] {
        let r = object_step(
            &p,
            &format!("bucket: files\naction: {action}\nname: blob.bin\n"),
            &json!({}),
        )
        .await
        .unwrap();
        assert!(r.get("found").is_none(), "{action}: {r}");
    }
    assert!(store.get("blob.bin").await.is_err());
    let missing = object_step(&p, "bucket: nosuch\naction: get\nname: a\n", &json!({}))
        .await
        .unwrap_err();
    assert!(
        missing.contains("object store \"nosuch\" not found"),
        "{missing}"
    );
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn object_store_oversize_and_hostile_names_are_refused_before_anything_is_sent() {
    let server = NatsServer::start();
    let (js, _, _) = js(&server.url()).await;
    let mut p = plugin(&server, None).await;
    p.module_up(
        "eventbus.object_store",
        "files",
        "bucket: files\nmax_bucket_size: 262144\n",
    )
    .await;
    let put = |name: &str, n: usize, max: usize| {
        format!(
            "bucket: files\naction: put\nname: \"{name}\"\nmax_object_size: {max}\ndata: \"{}\"\n",
            "x".repeat(n)
        )
    };
    object_step(&p, &put("kept", 2000, 2000), &json!({}))
        .await
        .unwrap();
    let before = stream_messages(&js, "OBJ_files").await;
    // Over the step's max_object_size, and over the room the bucket's max_bucket_size leaves
    // (the data alone would fit the bucket; with what it holds already it would not).
    for (cfg, limit) in [
        (
            put("big", 2001, 2000),
            "the step's max_object_size of 2000 bytes",
        ),
        (put("huge", 261_000, 1 << 20), "under its max_bucket_size"),
    ] {
        let e = object_step(&p, &cfg, &json!({})).await.unwrap_err();
        assert!(
            e.contains("step.eventbus.object")
                && e.contains("data")
                && e.contains(limit)
                && !e.contains('\n'),
            "{e}"
        );
    }
    // A get over the step's limit is refused before it is read.
    let e = object_step(
        &p,
        "bucket: files\naction: get\nname: kept\nmax_object_size: 1000\n",
        &json!({}),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("object \"kept\" is 2000 bytes") && e.contains("max_object_size of 1000 bytes"),
        "{e}"
    );

    // Hostile names never reach the server: wildcards, CR/LF, control characters, emptiness.
    for name in [
        "a*",
        "a.>",
        ">",
        "a\\r\\nPUB $JS.API.STREAM.DELETE.OBJ_files 0",
        "a\\u0000",
        " a",
        "",
    ] {
        let e = object_step(
            &p,
            &format!("bucket: files\naction: put\nname: \"{name}\"\ndata: x\n"),
            &json!({}),
        )
        .await
        .unwrap_err();
        assert!(e.contains("name") && !e.contains('\n'), "{name}: {e}");
    }
    for bucket in ["a.b", "files.>", "*", "OBJ_files.C"] {
        let e = object_step(
            &p,
            &format!("bucket: \"{bucket}\"\naction: get\nname: k\n"),
            &json!({}),
        )
        .await
        .unwrap_err();
        assert!(e.contains("bucket") && !e.contains('\n'), "{bucket}: {e}");
    }
    assert_eq!(
        stream_messages(&js, "OBJ_files").await,
        before,
        "nothing refused reached the bucket"
    );
    // A name that reads like an API subject is only a name: base64url on the wire, kept in
    // this store, and the stream it names is untouched.
    object_step(
        &p,
        &put("$JS.API.STREAM.DELETE.OBJ_files", 10, 100),
        &json!({}),
    )
    .await
    .unwrap();
    let list = object_step(&p, "bucket: files\naction: list\n", &json!({}))
        .await
        .unwrap();
    assert_eq!(list["count"], 2, "{list}");
    assert!(js.get_stream("OBJ_files").await.is_ok());
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn object_trigger_fires_on_object_changes_through_the_trigger_worker() {
    let server = NatsServer::start();
    let (js, _, _) = js(&server.url()).await;
    let mut p = plugin(&server, Some(common::ok_pipeline())).await;
    p.module_up("eventbus.object_store", "files", "bucket: files\n")
        .await;
    let store = js.get_object_store("files").await.unwrap();
    let mut first: &[u8] = b"one";
    store.put("a.txt", &mut first).await.unwrap();

    // Configs that would reach past the store are refused, one line per field.
    for (cfg, field_name) in [
        (
            json!({"name": "w", "object_bucket": "files.>"}),
            "object_bucket",
        ),
        (
            json!({"name": "w", "object_bucket": "files", "stream_name": "OTHER"}),
            "stream_name",
        ),
        (
            json!({"name": "w", "object_bucket": "files", "filter_subject": "$JS.API.>"}),
            "filter_subject",
        ),
        (
            json!({"name": "w", "object_bucket": "files", "kv_bucket": "files"}),
            "object_bucket",
        ),
        (
            json!({"name": "w", "object_bucket": "files", "keys": "a"}),
            "keys",
        ),
    ] {
        refused_trigger(&p, cfg, field_name).await;
    }

    let t = p
        .create_trigger(
            "pipeline:files",
            &json!({"name": "files-watch", "object_bucket": "files"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    // The current record of each object first, then every change, in order.
    let call = p.next_call(T).await;
    assert_eq!(
        (
            field(&call, "bucket"),
            field(&call, "object"),
            field(&call, "operation"),
            field(&call, "size")
        ),
        ("files".into(), "a.txt".into(), "PUT".into(), "3".into())
    );
    let h = p
        .create_step("step.eventbus.object", "obj", "")
        .await
        .unwrap();
    for cfg in [
        "bucket: files\naction: put\nname: docs/b.txt\ndata: hello\n",
        "bucket: files\naction: delete\nname: a.txt\n",
    ] {
        p.execute("step.eventbus.object", &h, cfg, &json!({}))
            .await
            .unwrap();
    }
    let call = p.next_call(T).await;
    assert_eq!(
        (
            field(&call, "object"),
            field(&call, "operation"),
            field(&call, "size")
        ),
        ("docs/b.txt".into(), "PUT".into(), "5".into())
    );
    let call = p.next_call(T).await;
    assert_eq!(
        (field(&call, "object"), field(&call, "operation")),
        ("a.txt".into(), "DEL".into())
    );
    // Every change was acked by the worker: nothing pending on its consumer.
    let info = settled(&js, "OBJ_files", "files-watch").await;
    assert_eq!(info.delivered.consumer_sequence, 3);
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}
