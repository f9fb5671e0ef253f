//! The IaC provider driven the way wfctl drives it (tests/common/iac.rs): a fresh plugin process
//! per command, the host's probe sequence, its plan/apply algorithm over its own state, against
//! real nats-server processes.

mod common;

use async_nats::jetstream::{self, consumer, stream};
use common::iac::{Loaded, LocalGuard, Res, Wfctl, NOT_FOUND};
use eventbus_plugin::pb::iac::{
    DetectDriftWithSpecsRequest, DriftClass, EnumerateAllRequest, IaCPlan, ImportRequest,
    NameRequest, PlanAction, PlanDiagnosticSeverity, PlanRequest, ResourceCreateRequest,
    ResourceDeleteRequest, ResourceDiffRequest, ResourceHealthCheckRequest, ResourceOutput,
    ResourceReadRequest, ResourceRef, ResourceState, ResourceUpdateRequest, SensitiveKeysRequest,
    StatusRequest, ValidatePlanRequest, VersionRequest,
};
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

const BROKER: &str = "infra.eventbus";
const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";

fn self_hosted(name: &str, url: &str) -> Res {
    Res::new(
        name,
        BROKER,
        json!({"iac_provider": "eventbus-iac", "provider": "nats", "deploy_target": "self_hosted", "dsn": url}),
    )
}

fn stream_res(name: &str, js_name: &str, broker: &str, extra: Json) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "broker_ref": broker, "depends_on": [broker],
        "name": js_name, "subjects": [format!("{}.>", js_name.to_lowercase())]
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, STREAM, c)
}

fn consumer_res(
    name: &str,
    durable: &str,
    stream: &str,
    stream_res: &str,
    broker: &str,
    extra: Json,
) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "broker_ref": broker, "depends_on": [stream_res],
        "name": durable, "stream_name": stream
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, CONSUMER, c)
}

async fn js(url: &str) -> jetstream::Context {
    let addrs: Vec<async_nats::ServerAddr> = url.split(',').map(|u| u.parse().unwrap()).collect();
    jetstream::new(async_nats::connect(addrs).await.unwrap())
}

fn actions(plan: &[common::iac::Action]) -> Vec<(String, String)> {
    plan.iter()
        .map(|a| (a.action.clone(), a.name.clone()))
        .collect()
}

fn pair(a: &str, n: &str) -> (String, String) {
    (a.to_string(), n.to_string())
}

#[tokio::test]
async fn loads_like_wfctl_with_any_config_and_passes_the_capabilities_gate() {
    // Orphan destroy path: no config at all, and no provider state anywhere.
    let l = Loaded::load(&Json::Null, &[]).await.unwrap();
    assert_eq!(
        l.probes,
        [
            "GetManifest",
            "GetTriggerTypes",
            "GetContractRegistry",
            "GetConfigFragment",
            "Initialize",
            "Capabilities"
        ]
    );
    let mut served = l.services.clone();
    served.sort();
    assert_eq!(served, eventbus_plugin::iac::SERVICES);
    let caps = l
        .required
        .clone()
        .capabilities(eventbus_plugin::pb::iac::CapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut types: Vec<_> = caps
        .capabilities
        .iter()
        .map(|c| c.resource_type.as_str())
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            BROKER,
            CONSUMER,
            "infra.eventbus.kv",
            "infra.eventbus.kv_entry",
            "infra.eventbus.object_store",
            STREAM
        ]
    );
    assert_eq!(
        l.required
            .clone()
            .name(NameRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        "eventbus"
    );
    assert!(!l
        .required
        .clone()
        .version(VersionRequest {})
        .await
        .unwrap()
        .into_inner()
        .version
        .is_empty());
    let keys = l
        .driver
        .clone()
        .sensitive_keys(SensitiveKeysRequest {
            resource_type: BROKER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.contains(&"token".to_string()) && keys.contains(&"password".to_string()));
    // Destroy and Status with nothing recorded are clean.
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let d = w
        .destroy_refs(
            &l,
            vec![ResourceRef {
                name: "gone".into(),
                r#type: STREAM.into(),
                provider_id: "bus/GONE".into(),
            }],
        )
        .await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    l.close().await;
    for cfg in [
        json!({}),
        json!({"provider": "eventbus"}),
        json!({"provider": "eventbus", "state_dir": dir.path()}),
    ] {
        Loaded::load(&cfg, &[]).await.unwrap().close().await;
    }
    let err = Loaded::load(&json!({"provider": "eventbus", "statedir": "/x"}), &[])
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("initialize provider") && err.contains("statedir"),
        "{err}"
    );
    assert!(
        !dir.path().join("state.json").exists(),
        "Initialize writes nothing"
    );
}

#[tokio::test]
async fn self_hosted_plan_apply_replan_update_replace_drift_destroy() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        self_hosted("bus", &server.url()),
        stream_res(
            "orders-stream",
            "ORDERS",
            "bus",
            json!({"max_msgs": 100, "max_age": "3600s"}),
        ),
        consumer_res(
            "orders-worker",
            "orders-worker",
            "ORDERS",
            "orders-stream",
            "bus",
            json!({"max_deliver": 5, "ack_wait": "30s"}),
        ),
    ];
    let plan = w.plan(&desired).await;
    assert_eq!(
        actions(&plan),
        [
            pair("create", "bus"),
            pair("create", "orders-stream"),
            pair("create", "orders-worker")
        ]
    );
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["bus"].outputs["url"], server.url());
    assert_eq!(w.state["orders-stream"].provider_id, "bus/ORDERS");
    assert!(
        w.plan(&desired).await.is_empty(),
        "re-plan after apply is empty"
    );

    // In-place changes plan as updates naming the field.
    desired[1].config["max_msgs"] = json!(200);
    desired[2].config["max_deliver"] = json!(7);
    let plan = w.plan(&desired).await;
    // The Plan RPC (for engine steps) agrees with the host's algorithm.
    let l = w.load().await;
    let current: Vec<ResourceState> = w
        .state
        .iter()
        .map(|(n, r)| ResourceState {
            name: n.clone(),
            r#type: r.type_name.clone(),
            provider_id: r.provider_id.clone(),
            outputs_json: serde_json::to_vec(&r.outputs).unwrap(),
            dependencies: r.dependencies.clone(),
            ..Default::default()
        })
        .collect();
    let rpc_plan = l
        .required
        .clone()
        .plan(PlanRequest {
            desired: desired.iter().map(Res::spec).collect(),
            current,
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    let rpc_actions: Vec<(String, String)> = rpc_plan
        .actions
        .iter()
        .map(|a| (a.action.clone(), a.resource.as_ref().unwrap().name.clone()))
        .collect();
    assert_eq!(rpc_actions, actions(&plan));
    // Import by provider_id adopts what the id names.
    let imported = l
        .required
        .clone()
        .import(ImportRequest {
            provider_id: "bus/ORDERS".into(),
            resource_type: STREAM.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(imported.provider_id, "bus/ORDERS");
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(applied["name"], "ORDERS");
    l.close().await;
    assert_eq!(
        actions(&plan),
        [
            pair("update", "orders-stream"),
            pair("update", "orders-worker")
        ]
    );
    assert_eq!(plan[0].paths(), ["max_msgs"]);
    assert!(plan[0].forced().is_empty());
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let js = js(&server.url()).await;
    let info = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.max_messages, 200);
    assert!(w.plan(&desired).await.is_empty());

    // Storage cannot change in place: a replace that names the field.
    desired[1].config["storage"] = json!("STORAGE_TYPE_MEMORY");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [pair("replace", "orders-stream")]);
    assert_eq!(plan[0].forced(), ["storage"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let info = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.storage, stream::StorageType::Memory);
    // The stream's replace took its consumer with it: drift says so, refresh + apply restores it.
    let drifts = w.drift().await.unwrap();
    let ghost = |d: &[eventbus_plugin::pb::iac::DriftResult], n: &str| {
        d.iter()
            .any(|x| x.name == n && x.class == DriftClass::Ghost as i32)
    };
    assert!(ghost(&drifts, "orders-worker"), "{drifts:?}");
    assert_eq!(w.refresh().await, ["orders-worker"]);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [pair("create", "orders-worker")]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(w.plan(&desired).await.is_empty());

    // Out-of-band deletion: GHOST (never an error), then refresh plans a recreate.
    js.delete_stream("ORDERS").await.unwrap();
    let drifts = w.drift().await.unwrap();
    assert!(
        ghost(&drifts, "orders-stream") && ghost(&drifts, "orders-worker"),
        "{drifts:?}"
    );
    assert!(drifts
        .iter()
        .any(|d| d.name == "bus" && d.class == DriftClass::InSync as i32));
    let mut pruned = w.refresh().await;
    pruned.sort();
    assert_eq!(pruned, ["orders-stream", "orders-worker"]);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(
        actions(&plan),
        [
            pair("create", "orders-stream"),
            pair("create", "orders-worker")
        ]
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(js.get_stream("ORDERS").await.is_ok());

    // A change made behind our back is CONFIG drift with the field named.
    let mut cfg = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    cfg.max_messages = 999;
    js.update_stream(cfg).await.unwrap();
    let drifts = w.drift().await.unwrap();
    let d = drifts.iter().find(|d| d.name == "orders-stream").unwrap();
    assert_eq!(d.class, DriftClass::Config as i32);
    assert_eq!(d.fields, ["max_msgs"]);
    let l = w.load().await;
    let specs = desired.iter().map(|r| (r.name.clone(), r.spec())).collect();
    let with_specs = l
        .drift
        .clone()
        .detect_drift_with_specs(DetectDriftWithSpecsRequest {
            refs: w.all_refs(),
            specs,
        })
        .await
        .unwrap()
        .into_inner()
        .drifts;
    let d = with_specs
        .iter()
        .find(|d| d.name == "orders-stream")
        .unwrap();
    assert_eq!(
        (d.class, d.fields.clone()),
        (DriftClass::Config as i32, vec!["max_msgs".to_string()])
    );
    l.close().await;
    let plan_after = w.plan(&desired).await;
    assert!(
        plan_after.is_empty(),
        "Diff compares state outputs only (wfctl's contract)"
    );

    // Destroy: consumers, streams, broker; then again with the same refs is clean.
    let refs = w.all_refs();
    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.destroyed.len(), 3);
    assert!(w.state.is_empty());
    assert!(js.get_stream("ORDERS").await.is_err());
    let l = w.load().await;
    let again = w.destroy_refs(&l, refs).await;
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    l.close().await;
}

#[tokio::test]
async fn local_three_node_cluster_runs_an_r3_stream_across_plugin_processes() {
    let dir = tempfile::tempdir().unwrap();
    let guard = LocalGuard {
        state_dir: dir.path().to_path_buf(),
    };
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        Res::new(
            "cluster",
            BROKER,
            json!({"iac_provider": "eventbus-iac", "provider": "nats", "deploy_target": "local", "replicas": 3,
                   "local": {"remove_data_on_delete": true}}),
        ),
        stream_res("events", "EVENTS", "cluster", json!({"num_replicas": 3})),
        consumer_res(
            "events-worker",
            "events-worker",
            "EVENTS",
            "events",
            "cluster",
            json!({}),
        ),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    // Each command ran in its own plugin process, which has exited: the servers outlive it.
    assert_eq!(guard.running().len(), 3, "three nats-server processes");
    let url = w.state["cluster"].outputs["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(url.split(',').count(), 3);
    let js = js(&url).await;
    let info = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.as_ref().unwrap().replicas.len(),
        2,
        "a leader and two replicas"
    );
    // On a busy machine the first ack from a new R3 stream can take longer than one timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let once = jetstream::message::PublishMessage::build()
            .payload("hello".into())
            .message_id("hello-1"); // a retried publish is de-duplicated
        match js.send_publish("events.x", once).await.unwrap().await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => panic!("publish: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(w.plan(&desired).await.is_empty());

    let l = w.load().await;
    let st = l
        .required
        .clone()
        .status(StatusRequest { refs: w.all_refs() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.statuses.iter().all(|s| s.status == "running"),
        "{:?}",
        st.statuses
    );
    let h = l
        .driver
        .clone()
        .health_check(ResourceHealthCheckRequest {
            resource_type: CONSUMER.into(),
            r#ref: Some(w.r#ref("events-worker")),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert!(h.healthy && h.message.contains("lag 1"), "{}", h.message);
    l.close().await;

    // Replicas scale in place.
    desired[1].config["num_replicas"] = json!(1);
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [pair("update", "events")]);
    desired[1].config["num_replicas"] = json!(3);

    // The machine "reboots": the broker is GHOST, its streams are UNKNOWN (not gone), and
    // refresh + apply restarts the servers on the same data.
    for pid in guard.running() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !guard.running().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drifts = w.drift().await.unwrap();
    let class = |n: &str| drifts.iter().find(|d| d.name == n).unwrap().class;
    assert_eq!(class("cluster"), DriftClass::Ghost as i32);
    assert_eq!(class("events"), DriftClass::Unknown as i32);
    assert_eq!(w.refresh().await, ["cluster"]);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [pair("create", "cluster")]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(guard.running().len(), 3);
    assert_eq!(w.state["cluster"].outputs["url"], url, "same ports");
    let js = self::js(&url).await;
    // The stream's own raft group elects a leader shortly after the servers answer.
    let deadline = Instant::now() + Duration::from_secs(15);
    let messages = loop {
        match js.get_stream("EVENTS").await {
            Ok(mut s) => match s.info().await {
                Ok(i) => break i.state.messages,
                Err(e) if Instant::now() > deadline => panic!("stream info: {e}"),
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => panic!("get stream: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(messages, 1, "data survived");

    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert!(guard.running().is_empty(), "destroy stops every process");
    assert!(
        !dir.path()
            .join("brokers")
            .join("cluster")
            .join("cluster-0")
            .exists(),
        "data removed"
    );
}

/// Every managed field, classified as the diff classifies it, checked against what the
/// server really does with an in-place update.
#[tokio::test]
async fn field_classification_table_matches_the_server() {
    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Class {
        InPlace,
        Replace,
        Identity,
    }
    use Class::*;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let w = Wfctl::new(dir.path());
    let l = w.load().await;
    let mut driver = l.driver.clone();
    let bus = self_hosted("bus", &server.url());
    driver
        .create(ResourceCreateRequest {
            resource_type: BROKER.into(),
            spec: Some(bus.spec()),
        })
        .await
        .unwrap();
    let js = js(&server.url()).await;

    type Row<C> = (&'static str, Json, Class, fn(&mut C));
    let stream_table: Vec<Row<stream::Config>> = vec![
        ("subjects", json!(["t.>", "u.>"]), InPlace, |c| {
            c.subjects.push("u.>".into())
        }),
        ("max_bytes", json!(1_000_000), InPlace, |c| {
            c.max_bytes = 1_000_000
        }),
        ("max_msgs", json!(50), InPlace, |c| c.max_messages = 50),
        ("max_msgs_per_subject", json!(5), InPlace, |c| {
            c.max_messages_per_subject = 5
        }),
        ("max_msg_size", json!(2048), InPlace, |c| {
            c.max_message_size = 2048
        }),
        ("max_age", json!("7200s"), InPlace, |c| {
            c.max_age = Duration::from_secs(7200)
        }),
        ("discard", json!("DISCARD_POLICY_NEW"), InPlace, |c| {
            c.discard = stream::DiscardPolicy::New
        }),
        ("duplicate_window", json!("30s"), InPlace, |c| {
            c.duplicate_window = Duration::from_secs(30)
        }),
        ("description", json!("changed"), InPlace, |c| {
            c.description = Some("changed".into())
        }),
        ("storage", json!("STORAGE_TYPE_MEMORY"), Replace, |c| {
            c.storage = stream::StorageType::Memory
        }),
        (
            "retention_policy",
            json!("RETENTION_POLICY_WORKQUEUE"),
            Replace,
            |c| c.retention = stream::RetentionPolicy::WorkQueue,
        ),
        ("name", json!("OTHER"), Identity, |_| {}),
    ];
    for (i, (field, value, class, mutate)) in stream_table.into_iter().enumerate() {
        let name = format!("T{i}");
        let base = Res::new(
            &format!("s{i}"),
            STREAM,
            json!({"broker_ref": "bus", "name": name, "subjects": [format!("t{i}.>")],
                   "max_age": "3600s", "description": "base"}),
        );
        let created = driver
            .create(ResourceCreateRequest {
                resource_type: STREAM.into(),
                spec: Some(base.spec()),
            })
            .await
            .unwrap()
            .into_inner()
            .output
            .unwrap();
        let mut changed = base.clone();
        let value = if field == "subjects" {
            json!([format!("t{i}.>"), format!("u{i}.>")])
        } else {
            value
        };
        changed.config[field] = value;
        let diff = driver
            .diff(ResourceDiffRequest {
                resource_type: STREAM.into(),
                desired: Some(changed.spec()),
                current: Some(created.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        let change = diff
            .changes
            .iter()
            .find(|c| c.path == field)
            .unwrap_or_else(|| panic!("{field}: no change in {diff:?}"));
        assert_eq!(
            diff.changes.len(),
            1,
            "{field}: only that field differs: {diff:?}"
        );
        assert_eq!(change.force_new, class != InPlace, "{field}");
        if class == Identity {
            continue;
        }
        // What the server does with the same change made in place.
        let mut cfg = js
            .get_stream(&name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        if field == "subjects" {
            cfg.subjects = vec![format!("t{i}.>"), format!("u{i}.>")];
        } else {
            mutate(&mut cfg);
        }
        let server_accepts = js.update_stream(cfg).await.is_ok();
        assert_eq!(
            server_accepts,
            class == InPlace,
            "{field}: server in-place update accepted = {server_accepts}"
        );
        if class == InPlace {
            // The provider's own Update applies it, and the re-diff is empty.
            let out = driver
                .update(ResourceUpdateRequest {
                    resource_type: STREAM.into(),
                    r#ref: Some(ResourceRef {
                        name: format!("s{i}"),
                        r#type: STREAM.into(),
                        provider_id: created.provider_id.clone(),
                    }),
                    spec: Some(changed.spec()),
                })
                .await
                .unwrap()
                .into_inner()
                .output
                .unwrap();
            let again = driver
                .diff(ResourceDiffRequest {
                    resource_type: STREAM.into(),
                    desired: Some(changed.spec()),
                    current: Some(out),
                })
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            assert!(again.changes.is_empty(), "{field}: {again:?}");
        }
    }

    js.create_stream(stream::Config {
        name: "CT".into(),
        subjects: vec!["ct.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let consumer_table: Vec<Row<consumer::Config>> = vec![
        ("filter_subjects", json!("ct.b"), InPlace, |c| {
            c.filter_subject = "ct.b".into()
        }),
        ("max_deliver", json!(9), InPlace, |c| c.max_deliver = 9),
        ("ack_wait", json!("45s"), InPlace, |c| {
            c.ack_wait = Duration::from_secs(45)
        }),
        ("max_ack_pending", json!(10), InPlace, |c| {
            c.max_ack_pending = 10
        }),
        ("description", json!("changed"), InPlace, |c| {
            c.description = Some("changed".into())
        }),
        (
            "deliver_policy",
            json!("DELIVER_POLICY_NEW"),
            Replace,
            |c| c.deliver_policy = consumer::DeliverPolicy::New,
        ),
        ("ack_policy", json!("ACK_POLICY_ALL"), Replace, |c| {
            c.ack_policy = consumer::AckPolicy::All
        }),
        ("stream_name", json!("T0"), Identity, |_| {}),
        ("name", json!("other"), Identity, |_| {}),
    ];
    let stream = js.get_stream("CT").await.unwrap();
    for (i, (field, value, class, mutate)) in consumer_table.into_iter().enumerate() {
        let durable = format!("c{i}");
        let base = Res::new(
            &format!("res-c{i}"),
            CONSUMER,
            json!({"broker_ref": "bus", "name": durable, "stream_name": "CT", "filter_subject": "ct.a",
                   "max_deliver": 3, "ack_wait": "30s", "max_ack_pending": 100, "description": "base"}),
        );
        let created = driver
            .create(ResourceCreateRequest {
                resource_type: CONSUMER.into(),
                spec: Some(base.spec()),
            })
            .await
            .unwrap()
            .into_inner()
            .output
            .unwrap();
        let mut changed = base.clone();
        if field == "filter_subjects" {
            changed.config["filter_subject"] = value;
        } else {
            changed.config[field] = value;
        }
        let diff = driver
            .diff(ResourceDiffRequest {
                resource_type: CONSUMER.into(),
                desired: Some(changed.spec()),
                current: Some(created.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        let change = diff
            .changes
            .iter()
            .find(|c| c.path == field)
            .unwrap_or_else(|| panic!("{field}: {diff:?}"));
        assert_eq!(change.force_new, class != InPlace, "{field}");
        if class == Identity {
            continue;
        }
        let mut cfg = stream.consumer_info(&durable).await.unwrap().config;
        mutate(&mut cfg);
        let server_accepts = stream.update_consumer(cfg).await.is_ok();
        assert_eq!(
            server_accepts,
            class == InPlace,
            "{field}: server in-place update accepted = {server_accepts}"
        );
    }
    l.close().await;
}

#[tokio::test]
async fn apply_twice_is_a_no_op_and_lost_state_adopts_without_changes() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    // Server-filled defaults (duplicate window, limits, ack wait, max_ack_pending) are not set here.
    let desired = vec![
        self_hosted("bus", &server.url()),
        stream_res("s", "TWICE", "bus", json!({})),
        consumer_res(
            "c",
            "twice-worker",
            "TWICE",
            "s",
            "bus",
            json!({"filter_subject": "twice.a"}),
        ),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let js = js(&server.url()).await;
    js.publish("twice.a", "m".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let before = js
        .get_stream("TWICE")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let (plan, errors) = w.apply(&desired).await;
    assert!(plan.is_empty() && errors.is_empty(), "{plan:?} {errors:?}");
    // wfctl loses its state (no iac.state module): every resource is "created" again, and
    // Create adopts what exists without touching it.
    w.state.clear();
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(plan.len(), 3);
    assert!(errors.is_empty(), "{errors:?}");
    let after = js
        .get_stream("TWICE")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(before.created, after.created, "not recreated");
    assert_eq!(after.state.messages, 1);
    assert_eq!(before.config, after.config);
    assert!(w.plan(&desired).await.is_empty());
    // Read by name with no provider_id (adopt_existing) finds both.
    let l = w.load().await;
    for (name, ty, pid) in [
        ("TWICE", STREAM, "bus/TWICE"),
        ("twice-worker", CONSUMER, "bus/TWICE/twice-worker"),
    ] {
        let o = l
            .driver
            .clone()
            .read(ResourceReadRequest {
                resource_type: ty.into(),
                r#ref: Some(ResourceRef {
                    name: name.into(),
                    r#type: ty.into(),
                    provider_id: String::new(),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .output
            .unwrap();
        assert_eq!(o.provider_id, pid);
    }
    let missing = l
        .driver
        .clone()
        .read(ResourceReadRequest {
            resource_type: STREAM.into(),
            r#ref: Some(ResourceRef {
                name: "NOPE".into(),
                r#type: STREAM.into(),
                provider_id: String::new(),
            }),
        })
        .await
        .unwrap_err();
    assert!(
        missing.message().contains(NOT_FOUND),
        "{}",
        missing.message()
    );
    l.close().await;
    assert!(w.destroy().await.errors.is_empty());
}

#[tokio::test]
async fn unknown_and_unmanaged_server_fields_cause_no_drift_and_survive_updates() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let js = js(&server.url()).await;
    js.create_stream(stream::Config {
        name: "ODD".into(),
        subjects: vec!["odd.>".into()],
        deny_delete: true,
        allow_direct: true,
        max_consumers: 7,
        metadata: [("team".to_string(), "payments".to_string())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut desired = vec![
        self_hosted("bus", &server.url()),
        stream_res("odd", "ODD", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(w.plan(&desired).await.is_empty());
    let drifts = w.drift().await.unwrap();
    assert!(
        drifts.iter().all(|d| d.class == DriftClass::InSync as i32),
        "{drifts:?}"
    );
    desired[1].config["max_msgs"] = json!(10);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [pair("update", "odd")]);
    assert!(errors.is_empty(), "{errors:?}");
    let cfg = js
        .get_stream("ODD")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(cfg.max_messages, 10);
    assert!(cfg.deny_delete && cfg.allow_direct && cfg.max_consumers == 7);
    assert_eq!(
        cfg.metadata.get("team").map(String::as_str),
        Some("payments")
    );
}

#[tokio::test]
async fn prevent_destroy_and_bind() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let js = js(&server.url()).await;
    let mut desired = vec![
        self_hosted("bus", &server.url()),
        stream_res("bound", "BOUND", "bus", json!({"bind": true})),
        stream_res("kept", "KEPT", "bus", json!({"prevent_destroy": true})),
    ];
    // bind never creates.
    let (_, errors) = w.apply(&desired).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("create/bound") && errors[0].contains("bind"),
        "{errors:?}"
    );
    assert!(js.get_stream("BOUND").await.is_err());
    js.create_stream(stream::Config {
        name: "BOUND".into(),
        subjects: vec!["bound.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    // prevent_destroy refuses, and destroy keeps the whole group's state.
    let d = w.destroy().await;
    assert_eq!(
        d.errors.len(),
        2,
        "kept and (then) its broker: {:?}",
        d.errors
    );
    assert!(d
        .errors
        .iter()
        .any(|e| e.resource == "kept" && e.error.contains("prevent_destroy")));
    assert!(!w.state.is_empty());
    assert!(js.get_stream("KEPT").await.is_ok());
    // Lifting it is an in-place update of the flag; then everything goes, except the bound
    // stream, which is released but stays on the server.
    desired[2].config["prevent_destroy"] = json!(false);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [pair("update", "kept")]);
    assert_eq!(plan[0].paths(), ["prevent_destroy"]);
    assert!(errors.is_empty(), "{errors:?}");
    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert!(js.get_stream("KEPT").await.is_err());
    assert!(js.get_stream("BOUND").await.is_ok(), "bound stream stays");
}

#[tokio::test]
async fn errors_name_the_problem_and_transient_failures_are_never_ghosts() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let l = w.load().await;
    let mut driver = l.driver.clone();
    // A stream whose broker this provider never saw.
    let orphan = stream_res("s", "S", "nowhere", json!({}));
    let e = driver
        .create(ResourceCreateRequest {
            resource_type: STREAM.into(),
            spec: Some(orphan.spec()),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("\"nowhere\"")
            && e.message().contains("state.json")
            && !e.message().contains(NOT_FOUND),
        "{}",
        e.message()
    );
    // aws.ecs without its `aws:` section fails at Diff and at Create naming the fields it needs.
    for target in ["aws.ecs"] {
        let b = Res::new(
            "k",
            BROKER,
            json!({"provider": "nats", "deploy_target": target}),
        );
        let e = driver
            .create(ResourceCreateRequest {
                resource_type: BROKER.into(),
                spec: Some(b.spec()),
            })
            .await
            .unwrap_err();
        assert!(
            e.message().contains("aws.vpc_id: is required")
                && e.message().contains("aws.execution_role_arn: is required")
                && !e.message().contains("not available yet"),
            "{}",
            e.message()
        );
        let e = driver
            .diff(ResourceDiffRequest {
                resource_type: BROKER.into(),
                desired: Some(b.spec()),
                current: Some(ResourceOutput {
                    outputs_json: b"{}".to_vec(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("aws.subnets"), "{}", e.message());
    }
    // Config errors name the field.
    let bad = stream_res("bad", "bad.name", "bus", json!({"max_agee": "1s"}));
    let e = driver
        .create(ResourceCreateRequest {
            resource_type: STREAM.into(),
            spec: Some(bad.spec()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("max_agee"), "{}", e.message());
    let e = driver
        .delete(ResourceDeleteRequest {
            resource_type: "infra.database".into(),
            r#ref: Some(ResourceRef::default()),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("infra.database") && !e.message().contains(NOT_FOUND));
    l.close().await;

    let desired = vec![
        self_hosted("bus", &server.url()),
        stream_res("s", "S", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    server.stop();
    // The broker is down: drift is an error (never GHOST), status is unknown per ref.
    let e = w.drift().await.unwrap_err();
    assert!(!e.message().contains(NOT_FOUND), "{}", e.message());
    let l = w.load().await;
    let st = l
        .required
        .clone()
        .status(StatusRequest { refs: w.all_refs() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.statuses.len(), 2);
    assert!(
        st.statuses.iter().all(|s| s.status == "unknown"),
        "{:?}",
        st.statuses
    );
    l.close().await;
    server.start_again();
    let drifts = w.drift().await.unwrap();
    assert!(
        drifts.iter().all(|d| d.class == DriftClass::InSync as i32),
        "{drifts:?}"
    );
    assert!(w.destroy().await.errors.is_empty());
}

#[tokio::test]
async fn validator_checks_the_plan_and_enumerator_lists_what_is_on_the_broker() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let desired = vec![
        self_hosted("bus", &server.url()),
        stream_res("a", "ENUM_A", "bus", json!({})),
        consumer_res("a-worker", "a-worker", "ENUM_A", "a", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let js = js(&server.url()).await;
    js.create_stream(stream::Config {
        name: "FOREIGN".into(),
        subjects: vec!["foreign.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let l = w.load().await;
    let mut e = l.enumerator.clone();
    let streams = e
        .enumerate_all(EnumerateAllRequest {
            resource_type: STREAM.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .outputs;
    let mut ids: Vec<_> = streams.iter().map(|o| o.provider_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["bus/ENUM_A", "bus/FOREIGN"]);
    let consumers = e
        .enumerate_all(EnumerateAllRequest {
            resource_type: CONSUMER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .outputs;
    assert_eq!(
        consumers
            .iter()
            .map(|o| o.provider_id.as_str())
            .collect::<Vec<_>>(),
        ["bus/ENUM_A/a-worker"]
    );

    let action = |name: &str, ty: &str, cfg: Json| PlanAction {
        action: "create".into(),
        resource: Some(Res::new(name, ty, cfg).spec()),
        ..Default::default()
    };
    let plan = IaCPlan {
        actions: vec![
            action(
                "b",
                STREAM,
                json!({"name": "B", "subjects": ["b.>"], "broker_ref": "bus", "num_replicas": 3}),
            ),
            action(
                "c",
                STREAM,
                json!({"name": "C", "subjects": ["c.>"], "broker_ref": "elsewhere"}),
            ),
            action(
                "d",
                STREAM,
                json!({"name": "D", "subjects": ["d.>"], "broker_ref": "bus"}),
            ),
        ],
        ..Default::default()
    };
    let diags = l
        .validator
        .clone()
        .validate_plan(ValidatePlanRequest { plan: Some(plan) })
        .await
        .unwrap()
        .into_inner()
        .diagnostics;
    let errs: Vec<_> = diags
        .iter()
        .filter(|d| d.severity == PlanDiagnosticSeverity::PlanDiagnosticError as i32)
        .map(|d| (d.resource.as_str(), d.field.as_str()))
        .collect();
    assert!(errs.contains(&("c", "broker_ref")), "{diags:?}");
    assert!(!errs.iter().any(|(r, _)| *r == "d"), "{diags:?}");
    // The self_hosted broker declared no replicas, so the R3 stream is not judged.
    assert!(!errs.iter().any(|(r, _)| *r == "b"), "{diags:?}");
    l.close().await;
    assert!(w.destroy().await.errors.is_empty());
    assert!(
        js.get_stream("FOREIGN").await.is_ok(),
        "destroy touches only what it manages"
    );
}

/// Closing-note figure: plan and apply of 1 local broker + 50 streams + 50 consumers.
#[tokio::test]
async fn plan_and_apply_time_for_one_broker_fifty_streams_fifty_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = LocalGuard {
        state_dir: dir.path().to_path_buf(),
    };
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![Res::new(
        "bus",
        BROKER,
        json!({"iac_provider": "eventbus-iac", "provider": "nats", "deploy_target": "local", "local": {"remove_data_on_delete": true}}),
    )];
    for i in 0..50 {
        desired.push(stream_res(
            &format!("s{i}"),
            &format!("S{i}"),
            "bus",
            json!({"max_age": "3600s"}),
        ));
        desired.push(consumer_res(
            &format!("c{i}"),
            &format!("w{i}"),
            &format!("S{i}"),
            &format!("s{i}"),
            "bus",
            json!({"max_deliver": 5}),
        ));
    }
    let t = Instant::now();
    let plan = w.plan(&desired).await;
    let plan_empty_state = t.elapsed();
    assert_eq!(plan.len(), 101);
    let t = Instant::now();
    let (_, errors) = w.apply(&desired).await;
    let apply = t.elapsed();
    assert!(errors.is_empty(), "{errors:?}");
    let t = Instant::now();
    let replan = w.plan(&desired).await;
    let replan_t = t.elapsed();
    assert!(replan.is_empty());
    let t = Instant::now();
    let (_, errors) = w.apply(&desired).await;
    let noop_apply = t.elapsed();
    assert!(errors.is_empty());
    let t = Instant::now();
    let d = w.destroy().await;
    let destroy = t.elapsed();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    eprintln!(
        "iac timing (1 local broker + 50 streams + 50 consumers, each command a fresh plugin process):\n  \
         plan (empty state): {plan_empty_state:?}\n  apply (101 creates): {apply:?}\n  \
         re-plan (101 Diffs): {replan_t:?}\n  apply again (no-op): {noop_apply:?}\n  destroy: {destroy:?}"
    );
}

#[tokio::test]
async fn self_hosted_credentials_are_sensitive_strings_and_streams_reach_them_through_the_record() {
    let server = NatsServer::builder()
        .config("authorization {\n  token: \"s3cr3t-tok\"\n}\n")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut bus = self_hosted("bus", &server.url());
    bus.config["auth"] = json!({"token": "s3cr3t-tok"});
    let desired = vec![bus.clone(), stream_res("s", "SECURE", "bus", json!({}))];
    let l = w.load().await;
    let out = l
        .driver
        .clone()
        .create(ResourceCreateRequest {
            resource_type: BROKER.into(),
            spec: Some(bus.spec()),
        })
        .await
        .unwrap()
        .into_inner()
        .output
        .unwrap();
    assert_eq!(out.sensitive.get("token"), Some(&true));
    let outputs: Json = serde_json::from_slice(&out.outputs_json).unwrap();
    assert!(outputs["token"].is_string());
    assert!(!outputs["url"].as_str().unwrap().contains("s3cr3t"));
    l.close().await;
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    // wfctl stores a secret_ref placeholder instead of the value: still no diff.
    w.state.get_mut("bus").unwrap().outputs["token"] = json!("secret_ref://bus.token");
    assert!(w.plan(&desired).await.is_empty());
    // A changed credential is an in-place update that names a fingerprint, not the secret.
    let mut changed = desired.clone();
    changed[0].config["auth"] = json!({"token": "other"});
    let plan = w.plan(&changed).await;
    assert_eq!(plan[0].paths(), ["auth_fingerprint"]);
    for c in &plan[0].changes {
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&c.old_json),
            String::from_utf8_lossy(&c.new_json)
        );
        assert!(
            !shown.contains("other") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the provider state holds credentials: private"
    );
    assert!(w.destroy().await.errors.is_empty());
}
