//! The IaC provider with `provider: kafka` brokers, driven the way wfctl drives it
//! (tests/common/iac.rs: a fresh plugin process per command, the host's plan/apply algorithm
//! over its own state) against a real Kafka-protocol broker started per test (tansu 0.6.0,
//! crates/kafka-test-server). Topics and groups are changed and deleted behind the provider's
//! back with a standard client (PyPI confluent-kafka, tests/fixtures/kafka_admin.py).
//!
//! tansu 0.6.0 lacks CreatePartitions and AlterConfigs, so the in-place updates (partitions up,
//! config entries) are planned here and applied in the unit tests against the fake admin layer
//! (`src/iac/drivers/kafka/tests.rs`); its offsets-for-time lookup answers 0 for any time, so a
//! by_start_time group is refused here with the line that says so.

mod common;

use common::iac::{Res, Wfctl};
use eventbus_plugin::kafka::{KafkaProducer, KafkaSettings, Outgoing};
use eventbus_plugin::pb::iac::{
    DriftClass, IaCPlan, ImportRequest, PlanAction, PlanDiagnosticSeverity, ResourceCreateRequest,
    ValidatePlanRequest,
};
use kafka_test_server::{KafkaServer, ONE_RECORD_PER_BATCH};
use serde_json::{json, Value as Json};
use std::process::Command;
use std::time::{Duration, Instant};

const BROKER: &str = "infra.eventbus";
const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";
const PASSWORD: &str = "pw-Kf73-not-in-outputs";
const OP: Duration = Duration::from_secs(10);

fn kafka_broker(name: &str, extra: Json) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "provider": "kafka", "deploy_target": "self_hosted"
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, BROKER, c)
}

fn stream_res(name: &str, topic: &str, broker: &str, extra: Json) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "broker_ref": broker, "depends_on": [broker],
        "name": topic, "subjects": [format!("{topic}.>")]
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, STREAM, c)
}

fn consumer_res(name: &str, topic: &str, stream_res: &str, broker: &str, extra: Json) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "broker_ref": broker, "depends_on": [stream_res],
        "name": name, "stream_name": topic
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, CONSUMER, c)
}

fn actions(plan: &[common::iac::Action]) -> Vec<(String, String)> {
    plan.iter()
        .map(|a| (a.action.clone(), a.name.clone()))
        .collect()
}

fn pair(a: &str, n: &str) -> (String, String) {
    (a.to_string(), n.to_string())
}

/// Runs the confluent-kafka admin script; fails loudly (never skips) when the client is missing.
fn admin(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kafka_admin.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 on PATH");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'confluent_kafka'"),
        "confluent-kafka is missing: `make deps` (pip install confluent-kafka)"
    );
    assert!(out.status.success(), "kafka_admin {args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn topics(server: &KafkaServer) -> Json {
    serde_json::from_str(admin(&["topics", &server.bootstrap()]).trim()).expect("topics json")
}

/// Produces `n` records to `topic` (one record per request: the test broker's batch bug).
async fn produce(server: &KafkaServer, topic: &str, n: usize) {
    let settings = KafkaSettings::plaintext(&server.bootstrap()).with_extra(ONE_RECORD_PER_BATCH);
    let p = KafkaProducer::new(&settings, OP).expect("producer");
    for i in 0..n {
        let m = Outgoing::new(format!("{topic}.created"), format!("{{\"n\":{i}}}"));
        tokio::time::timeout(OP, p.publish(topic, &m))
            .await
            .expect("publish within 10 s")
            .expect("publish");
    }
}

/// Polls the plugin processes' stderr for `needle` (the reader threads run on their own).
fn wait_logs(w: &Wfctl, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = w.logs();
        if logs.contains(needle) || Instant::now() > deadline {
            return logs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn destroys(a: &common::iac::Action) -> String {
    a.changes
        .iter()
        .find(|c| c.path == "destroys")
        .map(|c| String::from_utf8_lossy(&c.old_json).into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn kafka_plan_apply_replan_drift_import_destroy() {
    let server = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        kafka_broker("bus", json!({"kafka": {"brokers": [server.bootstrap()]}})),
        stream_res(
            "orders-stream",
            "orders",
            "bus",
            json!({"partitions": 2, "max_age": "3600s", "max_msg_size": 65536}),
        ),
    ];
    let t = Instant::now();
    let plan = w.plan(&desired).await;
    assert_eq!(
        actions(&plan),
        [pair("create", "bus"), pair("create", "orders-stream")]
    );
    let (_, errors) = w.apply(&desired).await;
    eprintln!("kafka apply (adopt cluster, 1 topic): {:?}", t.elapsed());
    assert!(errors.is_empty(), "{errors:?}");
    let bus = &w.state["bus"].outputs;
    assert_eq!(bus["provider"], "kafka");
    assert_eq!(bus["brokers"], json!([server.bootstrap()]));
    assert_eq!(bus["cluster_brokers"], 1);
    let topic = &w.state["orders-stream"].outputs;
    assert_eq!(w.state["orders-stream"].provider_id, "bus/orders");
    assert_eq!(
        (
            &topic["partitions"],
            &topic["max_age"],
            &topic["max_msg_size"]
        ),
        (&json!(2), &json!("3600s"), &json!(65536)),
        "{topic}"
    );
    assert_eq!(topics(&server)["orders"], 2);

    // Groups are positioned when applied: ALL at the earliest offset (lag = what is there),
    // NEW at the end (lag 0).
    produce(&server, "orders", 3).await;
    desired.push(consumer_res(
        "billing",
        "orders",
        "orders-stream",
        "bus",
        json!({"max_deliver": 5, "ack_wait": "30s", "filter_subject": "orders.created"}),
    ));
    desired.push(consumer_res(
        "audit",
        "orders",
        "orders-stream",
        "bus",
        json!({"deliver_policy": "DELIVER_POLICY_NEW"}),
    ));
    let (plan, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        actions(&plan),
        [pair("create", "billing"), pair("create", "audit")]
    );
    let billing = &w.state["billing"].outputs;
    assert_eq!(w.state["billing"].provider_id, "bus/orders/billing");
    assert_eq!(billing["lag"], 3, "{billing}");
    assert_eq!(
        billing["committed_offsets"],
        json!({"0": 0, "1": 0}),
        "{billing}"
    );
    let audit = &w.state["audit"].outputs;
    assert_eq!(audit["lag"], 0, "{audit}");
    let ends: i64 = audit["committed_offsets"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(ends, 3, "NEW starts at the end of every partition: {audit}");

    // Re-plan after apply: nothing to do; drift: all in sync.
    let t = Instant::now();
    assert!(w.plan(&desired).await.is_empty(), "re-plan is empty");
    eprintln!("kafka re-plan (4 diffs, no changes): {:?}", t.elapsed());
    let drifts = w.drift().await.unwrap();
    assert!(
        drifts.iter().all(|d| d.class == DriftClass::InSync as i32),
        "{drifts:?}"
    );

    // Import by provider_id reads the topic back as config.
    let l = w.load().await;
    let imported = l
        .required
        .clone()
        .import(ImportRequest {
            provider_id: "bus/orders".into(),
            resource_type: STREAM.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(
        (
            &applied["name"],
            &applied["partitions"],
            &applied["max_age"]
        ),
        (&json!("orders"), &json!(2), &json!("3600s")),
        "{applied}"
    );
    let imported = l
        .required
        .clone()
        .import(ImportRequest {
            provider_id: "bus/orders/billing".into(),
            resource_type: CONSUMER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(applied["stream_name"], "orders", "{applied}");
    assert!(applied.get("lag").is_none(), "{applied}");
    l.close().await;

    // In place where Kafka allows it (planned; applied on the fake admin layer: tansu has no
    // CreatePartitions or AlterConfigs).
    let mut up = desired.clone();
    up[1].config["partitions"] = json!(4);
    up[1].config["max_age"] = json!("7200s");
    up[2].config["max_deliver"] = json!(7);
    let plan = w.plan(&up).await;
    assert_eq!(
        actions(&plan),
        [pair("update", "orders-stream"), pair("update", "billing")]
    );
    assert_eq!(plan[0].paths(), ["partitions", "max_age"]);
    assert!(plan[0].forced().is_empty() && plan[1].forced().is_empty());

    // A group's settings live in the plugin: applied in place against the real broker.
    let mut later = desired.clone();
    later[2].config["max_deliver"] = json!(7);
    let (plan, errors) = w.apply(&later).await;
    assert_eq!(actions(&plan), [pair("update", "billing")]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["billing"].outputs["max_deliver"], 7);
    desired = later;

    // Where Kafka forbids the change: a replace, and the plan says what it destroys, read from
    // the live broker.
    let mut down = desired.clone();
    down[1].config["partitions"] = json!(1);
    let plan = w.plan(&down).await;
    assert_eq!(actions(&plan)[0], pair("replace", "orders-stream"));
    assert_eq!(plan[0].forced(), ["partitions"]);
    let lost = destroys(&plan[0]);
    assert!(
        lost.contains("3 record(s) in 2 partition(s)") && lost.contains("\\\"billing\\\""),
        "{lost}"
    );
    let mut rf = desired.clone();
    rf[1].config["num_replicas"] = json!(3);
    let plan = w.plan(&rf).await;
    assert_eq!(plan[0].forced(), ["num_replicas"]);
    assert!(destroys(&plan[0]).contains("record(s)"), "{:?}", plan[0]);
    // A changed start is a new group: a replace too.
    let mut start = desired.clone();
    start[3].config["deliver_policy"] = json!("DELIVER_POLICY_ALL");
    let plan = w.plan(&start).await;
    assert_eq!(actions(&plan), [pair("replace", "audit")]);
    assert_eq!(plan[0].forced(), ["deliver_policy"]);
    assert!(
        destroys(&plan[0]).contains("loses its committed offsets"),
        "{:?}",
        plan[0]
    );

    // Changed behind wfctl's back: CONFIG drift naming the field.
    admin(&[
        "set-config",
        &server.bootstrap(),
        "orders",
        "retention.ms",
        "120000",
    ]);
    let drifts = w.drift().await.unwrap();
    let s = drifts.iter().find(|d| d.name == "orders-stream").unwrap();
    assert_eq!(
        (s.class, s.fields.clone()),
        (DriftClass::Config as i32, vec!["max_age".to_string()]),
        "{s:?}"
    );

    // A group deleted behind wfctl's back: GHOST; refresh + apply positions it again.
    admin(&["delete-group", &server.bootstrap(), "audit"]);
    let drifts = w.drift().await.unwrap();
    let a = drifts.iter().find(|d| d.name == "audit").unwrap();
    assert_eq!(a.class, DriftClass::Ghost as i32, "{drifts:?}");
    assert_eq!(w.refresh().await, ["audit"]);
    let (plan, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(actions(&plan), [pair("create", "audit")]);

    // The topic deleted behind wfctl's back: GHOST (and its groups with it).
    admin(&["delete-topic", &server.bootstrap(), "orders"]);
    let drifts = w.drift().await.unwrap();
    let ghost = |n: &str| {
        drifts
            .iter()
            .any(|d| d.name == n && d.class == DriftClass::Ghost as i32)
    };
    assert!(ghost("orders-stream") && ghost("billing"), "{drifts:?}");
    assert!(!ghost("bus"), "{drifts:?}");
    let mut gone = w.refresh().await;
    gone.sort();
    assert_eq!(gone, ["audit", "billing", "orders-stream"]);
    let (plan, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(plan.len(), 3, "{plan:?}");
    assert_eq!(topics(&server)["orders"], 2);

    // Destroy: groups, topic, then the broker is forgotten (the cluster stays).
    let t = Instant::now();
    let d = w.destroy().await;
    eprintln!(
        "kafka destroy (2 groups, 1 topic, broker): {:?}",
        t.elapsed()
    );
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.destroyed.len(), 4);
    assert!(topics(&server).get("orders").is_none());
    let st: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    assert!(
        st["brokers"].as_object().is_none_or(|m| m.is_empty()),
        "{st}"
    );
    let logs = wait_logs(&w, "kafka topic deleted with its records");
    assert!(logs.contains("kafka cluster adopted"), "{logs}");
    assert!(logs.contains("kafka consumer group deleted"), "{logs}");
}

#[tokio::test]
async fn kafka_refuses_what_it_cannot_do_at_plan_one_line_each() {
    let server = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let desired = vec![
        kafka_broker("bus", json!({"kafka": {"brokers": [server.bootstrap()]}})),
        stream_res("orders-stream", "orders", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");

    // Diff of an existing stream (wfctl's plan): NATS-only settings refused, one line each,
    // naming the resource and the field.
    let mut nats_only = desired.clone();
    nats_only[1].config["storage"] = json!("STORAGE_TYPE_MEMORY");
    nats_only[1].config["max_msgs"] = json!(10);
    nats_only[1].config["deny_delete"] = json!(true);
    let mut l = w.load().await;
    let e = w.plan_with(&mut l, &nats_only).await.unwrap_err();
    for field in ["storage", "max_msgs", "deny_delete"] {
        assert!(
            e.contains(&format!(
                "infra.eventbus.stream \"orders-stream\": config.{field}: "
            )),
            "{field}: {e}"
        );
    }
    assert_eq!(e.matches("config.").count(), 3, "{e}");

    // ValidatePlan for resources not created yet flags the same fields.
    let new_stream = stream_res(
        "audit-stream",
        "audit",
        "bus",
        json!({"retention_policy": "RETENTION_POLICY_WORKQUEUE"}),
    );
    let new_consumer = consumer_res(
        "audit-worker",
        "audit",
        "audit-stream",
        "bus",
        json!({"deliver_policy": "DELIVER_POLICY_LAST"}),
    );
    let msk = kafka_broker(
        "msk",
        json!({"deploy_target": "aws.msk", "kafka": {"brokers": ["b-1.example:9092"]}}),
    );
    let plan = IaCPlan {
        actions: [&new_stream, &new_consumer, &msk]
            .iter()
            .map(|r| PlanAction {
                action: "create".into(),
                resource: Some(r.spec()),
                ..Default::default()
            })
            .collect(),
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
    for (res, field) in [
        ("audit-stream", "retention_policy"),
        ("audit-worker", "deliver_policy"),
    ] {
        assert!(
            diags.iter().any(|d| d.resource == res
                && d.field == field
                && d.severity == PlanDiagnosticSeverity::PlanDiagnosticError as i32),
            "{res}/{field} not flagged: {diags:?}"
        );
    }

    // A deploy target other than self_hosted: refused at plan (ValidatePlan and Create), one
    // line naming what works.
    assert!(
        diags.iter().any(|d| d.resource == "msk"
            && d.message.contains("use deploy_target self_hosted")
            && d.severity == PlanDiagnosticSeverity::PlanDiagnosticError as i32),
        "{diags:?}"
    );
    let e = l
        .driver
        .create(ResourceCreateRequest {
            resource_type: BROKER.into(),
            spec: Some(msk.spec()),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("\"aws.msk\"")
            && e.message().contains("use deploy_target self_hosted")
            && e.message().lines().count() == 1,
        "{}",
        e.message()
    );
    l.close().await;

    // by_start_time on a broker whose time lookup is wrong: a clear error, nothing created.
    produce(&server, "orders", 2).await;
    let mut by_time = desired.clone();
    by_time.push(consumer_res(
        "replay",
        "orders",
        "orders-stream",
        "bus",
        json!({
            "deliver_policy": "DELIVER_POLICY_BY_START_TIME",
            "opt_start_time": "2026-01-02T03:04:05Z"
        }),
    ));
    let (_, errors) = w.apply(&by_time).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("DELIVER_POLICY_BY_START_TIME")
            && errors[0].contains("answers it wrongly")
            && errors[0].contains("DELIVER_POLICY_ALL or _NEW"),
        "{errors:?}"
    );
    assert!(!w.state.contains_key("replay"));

    // The SASL password: never in a plan, an output, an error or a log line. (The test broker
    // speaks no SASL a standard client accepts, so the apply fails; the failure must not echo
    // the password either.)
    let mut sasl = desired.clone();
    sasl[0].config["auth"] = json!({"user": "app", "password": PASSWORD});
    sasl[0].config["kafka"]["sasl_mechanism"] = json!("KAFKA_SASL_MECHANISM_SCRAM_SHA_256");
    sasl[0].config["connect_timeout"] = json!("2s");
    let plan = w.plan(&sasl).await;
    assert_eq!(actions(&plan), [pair("update", "bus")]);
    let shown: String = plan[0]
        .changes
        .iter()
        .map(|c| {
            format!(
                "{} {} {}",
                c.path,
                String::from_utf8_lossy(&c.old_json),
                String::from_utf8_lossy(&c.new_json)
            )
        })
        .collect();
    assert!(
        shown.contains("auth_fingerprint") && shown.contains("sasl_user"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "password in the plan: {shown}");
    let (_, errors) = w.apply(&sasl).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(!errors[0].contains(PASSWORD), "{errors:?}");
    for (name, rec) in &w.state {
        assert!(
            !rec.outputs.to_string().contains(PASSWORD),
            "password in the outputs of {name}"
        );
    }
    let logs = w.logs();
    assert!(!logs.contains(PASSWORD), "password in the logs");

    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
}
