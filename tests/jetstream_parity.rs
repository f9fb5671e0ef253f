//! Every JetStream setting beyond the Go plugin's, against a real nats-server through the IaC
//! driver as wfctl calls it: created, read back, changed (in place or planned as a replace,
//! checked against what the server itself accepts), drifted and imported. Settings newer than
//! the server under test are refused at create with one line naming the setting and the
//! release it needs, and the rest of their row is skipped with a message.
//!
//! Runs on nats-server 2.15 (`make test`) and Debian's 2.9 (`make test-nats29`).

mod common;

use async_nats::jetstream::{self, stream};
use common::iac::{Loaded, Res, Wfctl};
use eventbus_plugin::nats::settings::{self, Setting};
use eventbus_plugin::pb::iac::{
    DetectDriftRequest, DriftClass, ResourceCreateRequest, ResourceDiffRequest, ResourceOutput,
    ResourceReadRequest, ResourceRef, ResourceUpdateRequest,
};
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};

const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";

#[derive(Debug, PartialEq, Clone, Copy)]
enum Class {
    InPlace,
    Replace,
}
use Class::*;

/// (setting, extra config of the base resource, the changed value, how the change applies).
type Row = (&'static str, Json, Json, Class);

struct Bench {
    _server: NatsServer,
    js: jetstream::Context,
    version: (u64, u64),
    version_text: String,
    url: String,
    l: Loaded,
    _dir: tempfile::TempDir,
}

async fn bench() -> Bench {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    client.flush().await.unwrap();
    let version_text = client.server_info().version;
    let version = settings::parse_version(&version_text).unwrap();
    let js = jetstream::new(client);
    let dir = tempfile::tempdir().unwrap();
    let w = Wfctl::new(dir.path());
    // The resources name their servers (no broker resource): the broker driver's JetStream
    // probe is a 2.10+ API, and these rows run on 2.9 too.
    let l = w.load().await;
    Bench {
        url: server.url(),
        _server: server,
        js,
        version,
        version_text,
        l,
        _dir: dir,
    }
}

fn since(table: &[Setting], key: &str) -> Option<(u64, u64)> {
    table.iter().find(|s| s.key == key).and_then(|s| s.since)
}

fn with(base: &Json, extra: &Json) -> Json {
    let mut c = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

impl Bench {
    async fn create(&self, type_name: &str, res: &Res) -> Result<ResourceOutput, tonic::Status> {
        self.l
            .driver
            .clone()
            .create(ResourceCreateRequest {
                resource_type: type_name.into(),
                spec: Some(res.spec()),
            })
            .await
            .map(|r| r.into_inner().output.unwrap())
    }

    async fn diff_result(
        &self,
        type_name: &str,
        res: &Res,
        current: &ResourceOutput,
    ) -> eventbus_plugin::pb::iac::DiffResult {
        self.l
            .driver
            .clone()
            .diff(ResourceDiffRequest {
                resource_type: type_name.into(),
                desired: Some(res.spec()),
                current: Some(current.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap_or_default()
    }

    async fn diff(
        &self,
        type_name: &str,
        res: &Res,
        current: &ResourceOutput,
    ) -> (Vec<String>, Vec<String>) {
        let d = self.diff_result(type_name, res, current).await;
        // `destroys` is the plan's note on a replace, not a setting.
        let paths = d
            .changes
            .iter()
            .filter(|c| c.path != "destroys")
            .map(|c| c.path.clone())
            .collect();
        let forced = d
            .changes
            .iter()
            .filter(|c| c.force_new)
            .map(|c| c.path.clone())
            .collect();
        (paths, forced)
    }

    fn rref(type_name: &str, name: &str, out: &ResourceOutput) -> ResourceRef {
        ResourceRef {
            name: name.into(),
            r#type: type_name.into(),
            provider_id: out.provider_id.clone(),
        }
    }

    async fn update(&self, type_name: &str, res: &Res, out: &ResourceOutput) -> ResourceOutput {
        self.l
            .driver
            .clone()
            .update(ResourceUpdateRequest {
                resource_type: type_name.into(),
                r#ref: Some(Self::rref(type_name, &res.name, out)),
                spec: Some(res.spec()),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: update: {e}", res.name))
            .into_inner()
            .output
            .unwrap()
    }

    /// An Update the provider must refuse: its message.
    async fn update_refused(&self, type_name: &str, res: &Res, out: &ResourceOutput) -> String {
        self.l
            .driver
            .clone()
            .update(ResourceUpdateRequest {
                resource_type: type_name.into(),
                r#ref: Some(Self::rref(type_name, &res.name, out)),
                spec: Some(res.spec()),
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .message()
            .to_string()
    }

    /// The provider's in-place Update of `field` to `value`: read back, a clean re-diff, and
    /// an import (a read by provider_id) that shows it.
    async fn change_in_place(
        &self,
        type_name: &str,
        changed: &Res,
        created: &ResourceOutput,
        field: &str,
        value: &Json,
    ) -> ResourceOutput {
        let updated = self.update(type_name, changed, created).await;
        assert_eq!(&outputs(&updated)[field], value, "{field}: read back");
        let (again, _) = self.diff(type_name, changed, &updated).await;
        assert!(again.is_empty(), "{field}: {again:?}");
        let imported = self.read(type_name, &changed.name, &updated).await;
        assert_eq!(&imported[field], value, "{field}: import");
        updated
    }

    async fn read(&self, type_name: &str, name: &str, out: &ResourceOutput) -> Json {
        let o = self
            .l
            .driver
            .clone()
            .read(ResourceReadRequest {
                resource_type: type_name.into(),
                r#ref: Some(Self::rref(type_name, name, out)),
            })
            .await
            .unwrap()
            .into_inner()
            .output
            .unwrap();
        serde_json::from_slice(&o.outputs_json).unwrap()
    }

    async fn drift(&self, type_name: &str, name: &str, out: &ResourceOutput) -> (i32, Vec<String>) {
        let d = self
            .l
            .drift
            .clone()
            .detect_drift(DetectDriftRequest {
                refs: vec![Self::rref(type_name, name, out)],
            })
            .await
            .unwrap()
            .into_inner()
            .drifts;
        (d[0].class, d[0].fields.clone())
    }

    fn too_old(&self, table: &[Setting], key: &str) -> Option<(u64, u64)> {
        since(table, key).filter(|need| self.version < *need)
    }

    /// The release a row needs when this server is older (its create, when the base config
    /// already used the setting, was refused naming it); the row is then skipped, said so.
    fn too_old_for_row(
        &self,
        table: &[Setting],
        field: &str,
        extra: &Json,
        created: &Result<ResourceOutput, tonic::Status>,
        row: usize,
    ) -> Option<(u64, u64)> {
        let need = extra
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .chain([field])
            .filter_map(|k| self.too_old(table, k))
            .max()?;
        if let Err(e) = created {
            let want = format!("needs nats-server {}.{}", need.0, need.1);
            assert!(
                e.message().contains(&want) && e.message().contains(&self.version_text),
                "{field}: {}",
                e.message()
            );
        }
        eprintln!(
            "skipped {field} (row {row}): needs nats-server {}.{}, this one is {}",
            need.0, need.1, self.version_text
        );
        Some(need)
    }
}

fn outputs(o: &ResourceOutput) -> Json {
    serde_json::from_slice(&o.outputs_json).unwrap()
}

#[tokio::test]
async fn every_stream_setting_creates_reads_back_changes_and_drifts() {
    let b = bench().await;
    for origin in ["SRC", "SRC2"] {
        b.js.create_stream(stream::Config {
            name: origin.into(),
            subjects: vec![format!("{}.>", origin.to_lowercase())],
            allow_direct: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mirror = json!({"subjects": [], "mirror": {"name": "SRC"}});
    let rows: Vec<Row> = vec![
        (
            "sources",
            json!({}),
            json!([{"name": "SRC", "filter_subject": "src.a"}]),
            InPlace,
        ),
        (
            "subject_transform",
            json!({}),
            json!({"src": "p#.a.>", "dest": "p#.b.>"}),
            InPlace,
        ),
        (
            "republish",
            json!({}),
            json!({"src": "p#.>", "dest": "rp#.>", "headers_only": true}),
            InPlace,
        ),
        (
            "compression",
            json!({}),
            json!("STREAM_COMPRESSION_S2"),
            InPlace,
        ),
        ("metadata", json!({}), json!({"team": "orders"}), InPlace),
        ("deny_delete", json!({}), json!(true), InPlace),
        (
            "deny_delete",
            json!({"deny_delete": true}),
            json!(false),
            Replace,
        ),
        ("deny_purge", json!({}), json!(true), InPlace),
        (
            "deny_purge",
            json!({"deny_purge": true}),
            json!(false),
            Replace,
        ),
        ("allow_rollup_hdrs", json!({}), json!(true), InPlace),
        ("allow_direct", json!({}), json!(true), InPlace),
        (
            "discard_new_per_subject",
            json!({"discard": "DISCARD_POLICY_NEW", "max_msgs_per_subject": 5}),
            json!(true),
            InPlace,
        ),
        (
            "max_consumers",
            json!({"max_consumers": 10}),
            json!(20),
            InPlace,
        ),
        (
            "consumer_limits",
            json!({}),
            json!({"inactive_threshold": "60s", "max_ack_pending": 100}),
            InPlace,
        ),
        ("allow_msg_ttl", json!({}), json!(true), InPlace),
        (
            "allow_msg_ttl",
            json!({"allow_msg_ttl": true}),
            json!(false),
            Replace,
        ),
        (
            "subject_delete_marker_ttl",
            json!({"allow_msg_ttl": true}),
            json!("60s"),
            InPlace,
        ),
        ("mirror", mirror.clone(), json!({"name": "SRC2"}), Replace),
        (
            "mirror_direct",
            with(&mirror, &json!({"mirror_direct": true})),
            json!(false),
            Replace,
        ),
    ];
    for (i, (field, extra, value, class)) in rows.into_iter().enumerate() {
        let name = format!("P{i}");
        let fill = |j: &Json| -> Json {
            serde_json::from_str(&j.to_string().replace('#', &i.to_string())).unwrap()
        };
        let (extra, value) = (fill(&extra), fill(&value));
        let base = Res::new(
            &format!("s{i}"),
            STREAM,
            with(
                &json!({"servers": [b.url], "name": name, "subjects": [format!("p{i}.>")]}),
                &extra,
            ),
        );
        let created = b.create(STREAM, &base).await;
        if let Some(need) = b.too_old_for_row(settings::STREAM, field, &extra, &created, i) {
            if let Ok(created) = &created {
                let mut changed = base.clone();
                changed.config[field] = value.clone();
                let e = b.update_refused(STREAM, &changed, created).await;
                let want = format!("{field} needs nats-server {}.{}", need.0, need.1);
                assert!(e.contains(&want), "{field}: {e}");
            }
            continue;
        }
        let created = created.unwrap_or_else(|e| panic!("{field}: create: {}", e.message()));
        // Read back: what the config set is what the server holds.
        let out = outputs(&created);
        for (k, v) in extra.as_object().unwrap() {
            if k != "subjects" {
                assert_eq!(&out[k], v, "{field}: {k} read back");
            }
        }
        let mut changed = base.clone();
        changed.config[field] = value.clone();
        let late = settings::STREAM
            .iter()
            .find(|s| s.key == field)
            .and_then(|s| s.in_place_since)
            .filter(|need| b.version < *need);
        let (paths, forced) = b.diff(STREAM, &changed, &created).await;
        assert_eq!(paths, [field], "{field}: only that field differs");
        // A release too old to change it in place plans a replace (the live Diff asks).
        let in_place = class == InPlace && late.is_none();
        assert_eq!(forced.is_empty(), in_place, "{field}: {forced:?}");
        let live =
            b.js.get_stream(&name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone();
        if class == Replace {
            // The server itself refuses the change in place.
            let mut cfg = live.clone();
            let mut set = settings::Settings::new();
            set.insert(field.to_string(), value.clone());
            settings::stream_from_json(&mut cfg, &set).unwrap();
            // Refused, or (mirror_direct) accepted and ignored.
            if b.js.update_stream(cfg).await.is_ok() {
                let now =
                    b.js.get_stream(&name)
                        .await
                        .unwrap()
                        .info()
                        .await
                        .unwrap()
                        .config
                        .clone();
                assert_eq!(
                    settings::stream_to_json(&now)[field],
                    settings::stream_to_json(&live)[field],
                    "{field}: the server took it in place"
                );
            }
            continue;
        }
        if let Some(need) = late {
            // Older releases take it only at creation: the update is refused by name.
            let e = b.update_refused(STREAM, &changed, &created).await;
            let want = format!(
                "{field} changes in place from nats-server {}.{} on",
                need.0, need.1
            );
            assert!(e.contains(&want), "{field}: {e}");
            eprintln!("skipped changing {field} in place (row {i}): needs nats-server {}.{}, this one is {}", need.0, need.1, b.version_text);
            continue;
        }
        // In place: the provider's update (an in-place update on the server) takes it.
        let updated = b
            .change_in_place(STREAM, &changed, &created, field, &value)
            .await;
        // Drift: the server changed behind our back.
        let mut back =
            b.js.get_stream(&name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone();
        let mut set = settings::Settings::new();
        set.insert(
            field.to_string(),
            settings::stream_to_json(&live)[field].clone(),
        );
        settings::stream_from_json(&mut back, &set).unwrap();
        if b.js.update_stream(back).await.is_ok() {
            let (class, fields) = b.drift(STREAM, &changed.name, &updated).await;
            assert_eq!(class, DriftClass::Config as i32, "{field}");
            assert!(fields.contains(&field.to_string()), "{field}: {fields:?}");
        }
    }
    b.l.close().await;
}

#[tokio::test]
async fn every_consumer_setting_creates_reads_back_changes_and_drifts() {
    let b = bench().await;
    b.js.create_stream(stream::Config {
        name: "CT".into(),
        subjects: vec!["ct.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let pinned =
        json!({"priority_policy": "PRIORITY_POLICY_PINNED_CLIENT", "priority_groups": ["g"]});
    let overflow = json!({"priority_policy": "PRIORITY_POLICY_OVERFLOW", "priority_groups": ["g"]});
    let rows: Vec<Row> = vec![
        ("metadata", json!({}), json!({"team": "orders"}), InPlace),
        (
            "replay_policy",
            json!({}),
            json!("REPLAY_POLICY_ORIGINAL"),
            Replace,
        ),
        ("sample_freq", json!({}), json!(50), InPlace),
        ("headers_only", json!({}), json!(true), InPlace),
        ("inactive_threshold", json!({}), json!("3600s"), InPlace),
        ("num_replicas", json!({}), json!(1), InPlace),
        ("mem_storage", json!({}), json!(true), Replace),
        ("max_waiting", json!({}), json!(10), Replace),
        ("max_batch", json!({}), json!(10), InPlace),
        ("max_expires", json!({}), json!("30s"), InPlace),
        ("max_bytes", json!({}), json!(4096), InPlace),
        (
            "pause_until",
            json!({"pause_until": "2098-01-01T00:00:00Z"}),
            json!("2099-01-01T00:00:00Z"),
            InPlace,
        ),
        (
            "priority_groups",
            overflow.clone(),
            json!(["g", "h"]),
            InPlace,
        ),
        (
            "priority_policy",
            overflow.clone(),
            json!("PRIORITY_POLICY_PINNED_CLIENT"),
            InPlace,
        ),
        ("priority_timeout", pinned.clone(), json!("60s"), InPlace),
        (
            "deliver_policy",
            json!({}),
            json!("DELIVER_POLICY_LAST_PER_SUBJECT"),
            Replace,
        ),
    ];
    for (i, (field, extra, value, class)) in rows.into_iter().enumerate() {
        let durable = format!("c{i}");
        let base = Res::new(
            &format!("res-c{i}"),
            CONSUMER,
            with(
                &json!({"servers": [b.url], "name": durable, "stream_name": "CT"}),
                &extra,
            ),
        );
        let created = b.create(CONSUMER, &base).await;
        if b.too_old_for_row(settings::CONSUMER, field, &extra, &created, i)
            .is_some()
        {
            continue;
        }
        let created = created.unwrap_or_else(|e| panic!("{field}: create: {}", e.message()));
        let out = outputs(&created);
        for (k, v) in extra.as_object().unwrap() {
            assert_eq!(&out[k], v, "{field}: {k} read back");
        }
        let mut changed = base.clone();
        changed.config[field] = value.clone();
        let (paths, forced) = b.diff(CONSUMER, &changed, &created).await;
        assert_eq!(paths, [field], "{field}: only that field differs");
        assert_eq!(forced.is_empty(), class == InPlace, "{field}: {forced:?}");
        let stream = b.js.get_stream("CT").await.unwrap();
        let live = stream.consumer_info(&durable).await.unwrap().config;
        if class == Replace {
            let mut cfg = live.clone();
            let mut set = settings::Settings::new();
            if field == "deliver_policy" {
                cfg.deliver_policy = jetstream::consumer::DeliverPolicy::LastPerSubject;
            } else {
                set.insert(field.to_string(), value.clone());
            }
            settings::consumer_from_json(&mut cfg, &set).unwrap();
            let accepted = stream.update_consumer(cfg).await;
            // 2.9 still took a storage change in place; newer releases refuse it, and the plan
            // follows them.
            let old_storage = field == "mem_storage" && b.version < (2, 10);
            assert!(
                accepted.is_err() || old_storage,
                "{field}: the server took it in place"
            );
            continue;
        }
        let updated = b
            .change_in_place(CONSUMER, &changed, &created, field, &value)
            .await;
        let mut back = stream.consumer_info(&durable).await.unwrap().config;
        let mut set = settings::Settings::new();
        set.insert(
            field.to_string(),
            settings::consumer_to_json(&live)[field].clone(),
        );
        settings::consumer_from_json(&mut back, &set).unwrap();
        if field == "pause_until" {
            // Only the pause API moves it (an update carrying it is ignored).
            stream
                .pause_consumer(&durable, live.pause_until.unwrap())
                .await
                .unwrap();
        } else {
            stream.update_consumer(back).await.unwrap();
        }
        let (class, fields) = b.drift(CONSUMER, &changed.name, &updated).await;
        assert_eq!(class, DriftClass::Config as i32, "{field}");
        assert!(fields.contains(&field.to_string()), "{field}: {fields:?}");
    }
    b.l.close().await;
}

impl Bench {
    /// The `destroys` note of a diff, if any.
    async fn destroys(&self, type_name: &str, res: &Res, current: &ResourceOutput) -> String {
        let d = self.diff_result(type_name, res, current).await;
        d.changes
            .iter()
            .find(|c| c.path == "destroys")
            .map(|c| serde_json::from_slice::<Json>(&c.old_json).unwrap())
            .and_then(|j| j.as_str().map(String::from))
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn retention_limits_to_interest_keeps_a_thousand_messages_and_replaces_say_what_they_delete()
{
    let b = bench().await;
    let stream = Res::new(
        "orders",
        STREAM,
        json!({"servers": [b.url], "name": "ORDERS", "subjects": ["orders.>"]}),
    );
    let created = b.create(STREAM, &stream).await.unwrap();
    // A consumer that has read nothing: under interest retention it keeps every message.
    let worker = Res::new(
        "worker",
        CONSUMER,
        json!({"servers": [b.url], "name": "worker", "stream_name": "ORDERS"}),
    );
    let worker_out = b.create(CONSUMER, &worker).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..1000 {
        acks.push(
            b.js.publish(format!("orders.{}", i % 10), "x".into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    let count = |js: jetstream::Context| async move {
        js.get_stream("ORDERS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    assert_eq!(count(b.js.clone()).await, 1000);

    let mut interest = stream.clone();
    interest.config["retention_policy"] = json!("RETENTION_POLICY_INTEREST");
    let (paths, forced) = b.diff(STREAM, &interest, &created).await;
    assert_eq!(paths, ["retention_policy"]);
    if b.version < settings::RETENTION_IN_PLACE_SINCE {
        // 2.9 refuses it in place: the plan is a replace, says why and what it deletes.
        assert_eq!(forced, ["retention_policy"]);
        let note = b.destroys(STREAM, &interest, &created).await;
        assert!(
            note.contains("retention_policy changes in place only from nats-server 2.10")
                && note.contains(&b.version_text)
                && note.contains("deletes 1000 messages"),
            "{note}"
        );
        // Applying it in place anyway is refused by name, before anything is sent.
        let e = b.update_refused(STREAM, &interest, &created).await;
        assert!(
            e.contains("retention_policy changes in place from nats-server 2.10 on"),
            "{e}"
        );
        assert_eq!(count(b.js.clone()).await, 1000);
        eprintln!(
            "skipped limits -> interest in place: needs nats-server 2.10, this one is {}",
            b.version_text
        );
    } else {
        assert!(forced.is_empty(), "{forced:?}");
        // In place, and the plan says what the switch itself removes.
        let note = b.destroys(STREAM, &interest, &created).await;
        assert!(
            note.contains("interest retention deletes the stored messages all 1 consumers have acknowledged (up to stream seq 0)"),
            "{note}"
        );
        let updated = b.update(STREAM, &interest, &created).await;
        assert_eq!(
            outputs(&updated)["retention_policy"],
            "RETENTION_POLICY_INTEREST"
        );
        assert_eq!(count(b.js.clone()).await, 1000, "the messages are kept");
        let (again, _) = b.diff(STREAM, &interest, &updated).await;
        assert!(again.is_empty(), "{again:?}");
    }

    // Without consumers the same switch would delete everything: the plan says so.
    if b.version >= settings::RETENTION_IN_PLACE_SINCE {
        let lone = Res::new(
            "lone",
            STREAM,
            json!({"servers": [b.url], "name": "LONE", "subjects": ["lone.>"]}),
        );
        let lone_out = b.create(STREAM, &lone).await.unwrap();
        for _ in 0..5 {
            b.js.publish("lone.x", "x".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut lone_interest = lone.clone();
        lone_interest.config["retention_policy"] = json!("RETENTION_POLICY_INTEREST");
        let note = b.destroys(STREAM, &lone_interest, &lone_out).await;
        assert!(
            note.contains("interest retention deletes all 5 stored messages at once: the stream has no consumers"),
            "{note}"
        );
    }

    // A replace names what it deletes, read from the live server.
    let mut memory = stream.clone();
    memory.config["storage"] = json!("STORAGE_TYPE_MEMORY");
    let (_, forced) = b.diff(STREAM, &memory, &created).await;
    assert_eq!(forced, ["storage"]);
    let note = b.destroys(STREAM, &memory, &created).await;
    assert!(
        note.contains("deletes 1000 messages (")
            && note.contains("1 consumers with their positions (worker: delivered up to stream seq 0, ack floor 0, 1000 pending"),
        "{note}"
    );
    // And a consumer replace names its position.
    let mut original = worker.clone();
    original.config["replay_policy"] = json!("REPLAY_POLICY_ORIGINAL");
    let note = b.destroys(CONSUMER, &original, &worker_out).await;
    assert!(
        note.contains("deletes the position of consumer worker: delivered up to stream seq 0, ack floor 0, 1000 pending"),
        "{note}"
    );
    b.l.close().await;
}
