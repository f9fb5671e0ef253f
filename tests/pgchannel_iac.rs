//! The IaC provider with `provider: pgchannel` brokers, driven the way wfctl drives it
//! (tests/common/iac.rs: a fresh plugin process per command, the host's plan/apply algorithm
//! over its own state) against a real PostgreSQL server started per test
//! (crates/pg-test-server). Rows are changed and deleted behind the provider's back with psql.

mod common;

use common::iac::{Res, Wfctl};
use eventbus_plugin::pb::iac::{
    DetectDriftWithSpecsRequest, DriftClass, IaCPlan, ImportRequest, PlanAction,
    PlanDiagnosticSeverity, ResourceCreateRequest, ValidatePlanRequest,
};
use pg_test_server::PgServer;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

const BROKER: &str = "infra.eventbus";
const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";
const PASSWORD: &str = "pw-Zq81-not-in-outputs";

fn pg_broker(name: &str, extra: Json) -> Res {
    let mut c = json!({"iac_provider": "eventbus-iac", "provider": "pgchannel"});
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Res::new(name, BROKER, c)
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

fn consumer_res(name: &str, stream: &str, stream_res: &str, broker: &str, extra: Json) -> Res {
    let mut c = json!({
        "iac_provider": "eventbus-iac", "broker_ref": broker, "depends_on": [stream_res],
        "name": name, "stream_name": stream
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

fn state_file(dir: &std::path::Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
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

#[tokio::test]
async fn pgchannel_plan_apply_replan_update_drift_destroy() {
    let pg = PgServer::builder().password(PASSWORD).start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        pg_broker("bus", json!({"dsn": pg.url(), "max_conns": 4})),
        stream_res(
            "orders-stream",
            "ORDERS",
            "bus",
            // Stored in whole seconds: the plan must not see 3600.5s vs 3601s as a change.
            json!({"max_msgs": 100, "max_age": "3600.5s"}),
        ),
        consumer_res(
            "orders-worker",
            "ORDERS",
            "orders-stream",
            "bus",
            json!({"max_deliver": 5, "ack_wait": "30s", "filter_subject": "orders.created"}),
        ),
        // Start time kept in microseconds, backoff in milliseconds: no change on re-plan.
        consumer_res(
            "orders-audit",
            "ORDERS",
            "orders-stream",
            "bus",
            json!({
                "deliver_policy": "DELIVER_POLICY_BY_START_TIME",
                "opt_start_time": "2026-01-02T03:04:05.123456789Z",
                "max_deliver": 4, "backoff": ["1s", "2.5s"]
            }),
        ),
    ];
    let t = Instant::now();
    let plan = w.plan(&desired).await;
    eprintln!("pgchannel plan (4 creates): {:?}", t.elapsed());
    assert_eq!(
        actions(&plan),
        [
            pair("create", "bus"),
            pair("create", "orders-stream"),
            pair("create", "orders-worker"),
            pair("create", "orders-audit")
        ]
    );
    let t = Instant::now();
    let (_, errors) = w.apply(&desired).await;
    eprintln!(
        "pgchannel apply (adopt database + schema, 1 stream, 2 consumers): {:?}",
        t.elapsed()
    );
    assert!(errors.is_empty(), "{errors:?}");

    // The broker's outputs: provider, the dsn without its password, tables, schema version.
    let bus = &w.state["bus"].outputs;
    assert_eq!(bus["provider"], "pgchannel");
    let dsn = bus["dsn"].as_str().unwrap();
    assert!(
        dsn.contains(&format!("127.0.0.1:{}", pg.port())) && !dsn.contains(PASSWORD),
        "{dsn}"
    );
    assert_eq!(bus["tables"].as_array().map(Vec::len), Some(4), "{bus}");
    assert!(!bus["schema_version"].is_null(), "{bus}");
    for (name, rec) in &w.state {
        assert!(
            !rec.outputs.to_string().contains(PASSWORD),
            "password in the outputs of {name}"
        );
    }
    assert_eq!(w.state["orders-stream"].provider_id, "bus/ORDERS");
    assert_eq!(
        w.state["orders-worker"].provider_id,
        "bus/ORDERS/orders-worker"
    );
    assert_eq!(w.state["orders-stream"].outputs["provider"], "pgchannel");
    // The provider's own state records how later processes reach the database, privately.
    let st = state_file(dir.path());
    assert_eq!(st["brokers"]["bus"]["pg"]["dsn"], pg.url());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "state file must be private: {mode:o}");

    // Import by provider_id reads the row back; a broker's import carries no redacted dsn
    // as if it were config.
    let l = w.load().await;
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
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(
        (applied["name"].as_str(), applied["max_msgs"].as_i64()),
        (Some("ORDERS"), Some(100)),
        "{applied}"
    );
    let imported = l
        .required
        .clone()
        .import(ImportRequest {
            provider_id: "bus".into(),
            resource_type: BROKER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(applied["provider"], "pgchannel", "{applied}");
    assert!(applied.get("dsn").is_none(), "{applied}");
    l.close().await;

    // The rows, in the Go provider's columns.
    assert_eq!(
        pg.psql("SELECT subjects FROM eventbus_streams WHERE name = 'ORDERS'")
            .trim(),
        "{orders.>}"
    );
    assert_eq!(
        pg.psql(
            "SELECT max_deliver || '|' || filter_subject FROM eventbus_consumers \
             WHERE stream_name = 'ORDERS' AND name = 'orders-worker'"
        )
        .trim(),
        "5|orders.created"
    );

    // Applying again changes nothing.
    let t = Instant::now();
    assert!(
        w.plan(&desired).await.is_empty(),
        "re-plan after apply is empty"
    );
    eprintln!("pgchannel re-plan (4 diffs, no changes): {:?}", t.elapsed());
    let (plan, errors) = w.apply(&desired).await;
    assert!(plan.is_empty() && errors.is_empty(), "{plan:?} {errors:?}");

    // In-place updates name the field; the rows follow.
    desired[1].config["max_msgs"] = json!(200);
    desired[2].config["max_deliver"] = json!(7);
    let plan = w.plan(&desired).await;
    assert_eq!(
        actions(&plan),
        [
            pair("update", "orders-stream"),
            pair("update", "orders-worker")
        ]
    );
    assert_eq!(plan[0].paths(), ["max_msgs"]);
    assert_eq!(plan[1].paths(), ["max_deliver"]);
    assert!(plan[0].forced().is_empty() && plan[1].forced().is_empty());
    let t = Instant::now();
    let (_, errors) = w.apply(&desired).await;
    eprintln!("pgchannel apply (2 updates): {:?}", t.elapsed());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(w.state["orders-stream"].outputs["max_msgs"], 200);
    assert_eq!(
        pg.psql("SELECT max_deliver FROM eventbus_consumers WHERE name = 'orders-worker'")
            .trim(),
        "7"
    );
    assert!(w.plan(&desired).await.is_empty());

    // Where a consumer starts only counts for a new row: a replace, as for NATS.
    desired[3].config["deliver_policy"] = json!("DELIVER_POLICY_NEW");
    desired[3]
        .config
        .as_object_mut()
        .unwrap()
        .remove("opt_start_time");
    let plan = w.plan(&desired).await;
    assert_eq!(actions(&plan), [pair("replace", "orders-audit")]);
    assert_eq!(plan[0].forced(), ["deliver_policy", "opt_start_time"]);
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        pg.psql("SELECT deliver_policy FROM eventbus_consumers WHERE name = 'orders-audit'")
            .trim(),
        "new"
    );
    assert!(w.plan(&desired).await.is_empty());
    let drifts = w.drift().await.unwrap();
    assert!(
        drifts.iter().all(|d| d.class == DriftClass::InSync as i32),
        "{drifts:?}"
    );

    // Rows changed behind wfctl's back: CONFIG drift naming the field.
    pg.psql(
        "UPDATE eventbus_streams SET subjects = ARRAY['orders.>', 'extra.>'] WHERE name = 'ORDERS'",
    );
    pg.psql("UPDATE eventbus_consumers SET max_deliver = 9 WHERE name = 'orders-worker'");
    let drifts = w.drift().await.unwrap();
    let find = |n: &str| drifts.iter().find(|d| d.name == n).unwrap().clone();
    let (s, c) = (find("orders-stream"), find("orders-worker"));
    assert_eq!(
        (s.class, s.fields.clone()),
        (DriftClass::Config as i32, vec!["subjects".to_string()]),
        "{s:?}"
    );
    assert_eq!(
        (c.class, c.fields.clone()),
        (DriftClass::Config as i32, vec!["max_deliver".to_string()]),
        "{c:?}"
    );
    assert_eq!(find("bus").class, DriftClass::InSync as i32);
    // With the specs (DetectDriftWithSpecs) the same fields, from the config's side.
    let l = w.load().await;
    let with_specs = l
        .drift
        .clone()
        .detect_drift_with_specs(DetectDriftWithSpecsRequest {
            refs: w.all_refs(),
            specs: desired.iter().map(|r| (r.name.clone(), r.spec())).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .drifts;
    l.close().await;
    let s = with_specs
        .iter()
        .find(|d| d.name == "orders-stream")
        .unwrap();
    assert_eq!(s.fields, ["subjects"], "{s:?}");

    // A row deleted behind wfctl's back: GHOST, then refresh + apply makes it again.
    pg.psql("DELETE FROM eventbus_consumers WHERE name = 'orders-worker'");
    let drifts = w.drift().await.unwrap();
    assert!(
        drifts
            .iter()
            .any(|d| d.name == "orders-worker" && d.class == DriftClass::Ghost as i32),
        "{drifts:?}"
    );
    assert_eq!(w.refresh().await, ["orders-worker"]);
    let (plan, errors) = w.apply(&desired).await;
    assert_eq!(actions(&plan), [pair("create", "orders-worker")]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        pg.psql("SELECT max_deliver FROM eventbus_consumers WHERE name = 'orders-worker'")
            .trim(),
        "7"
    );

    // Destroy with events in the stream: the stream goes with its events (as a JetStream
    // stream does); the broker is only forgotten, its tables stay.
    pg.psql(
        "INSERT INTO eventbus_events (stream_name, subject, payload) \
         SELECT 'ORDERS', 'orders.created', 'x'::bytea FROM generate_series(1, 3)",
    );
    let t = Instant::now();
    let d = w.destroy().await;
    eprintln!(
        "pgchannel destroy (2 consumers, stream with 3 events, broker): {:?}",
        t.elapsed()
    );
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.destroyed.len(), 4);
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_streams WHERE name = 'ORDERS'")
            .trim(),
        "0"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_events WHERE stream_name = 'ORDERS'")
            .trim(),
        "0"
    );
    assert_eq!(
        pg.psql("SELECT to_regclass('eventbus_events') IS NOT NULL")
            .trim(),
        "t"
    );
    let st = state_file(dir.path());
    assert!(
        st["brokers"].as_object().is_none_or(|m| m.is_empty()),
        "{st}"
    );

    // The logs say what happened, never with the password.
    let logs = wait_logs(&w, "pgchannel stream deleted with its events");
    assert!(logs.contains("pgchannel database adopted"), "{logs}");
    assert!(
        logs.contains("pgchannel stream deleted with its events"),
        "{logs}"
    );
    assert!(!logs.contains(PASSWORD), "password in the logs");
}

#[tokio::test]
async fn pgchannel_nats_only_settings_are_refused_at_plan_naming_the_field() {
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        pg_broker("bus", json!({"dsn": pg.url()})),
        stream_res("orders-stream", "ORDERS", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");

    // Diff of an existing stream (wfctl's plan): refused, one line naming the field.
    desired[1].config["num_replicas"] = json!(3);
    let mut l = w.load().await;
    let e = w.plan_with(&mut l, &desired).await.unwrap_err();
    assert!(
        e.contains("infra.eventbus.stream \"orders-stream\": config.num_replicas:")
            && e.contains("pgchannel"),
        "{e}"
    );
    assert_eq!(e.matches("config.").count(), 1, "{e}");

    // ValidatePlan for resources not created yet: every NATS-only field, as errors.
    let spec = |r: &Res| r.spec();
    let new_stream = stream_res(
        "audit-stream",
        "AUDIT",
        "bus",
        json!({"storage": "STORAGE_TYPE_MEMORY", "max_msgs_per_subject": 5}),
    );
    let new_consumer = consumer_res(
        "audit-worker",
        "AUDIT",
        "audit-stream",
        "bus",
        json!({"max_ack_pending": 10, "filter_subject": "audit.*"}),
    );
    let plan = IaCPlan {
        actions: [&new_stream, &new_consumer]
            .iter()
            .map(|r| PlanAction {
                action: "create".into(),
                resource: Some(spec(r)),
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
    let has = |res: &str, field: &str| {
        diags.iter().any(|d| {
            d.resource == res
                && d.field == field
                && d.severity == PlanDiagnosticSeverity::PlanDiagnosticError as i32
        })
    };
    for (res, field) in [
        ("audit-stream", "storage"),
        ("audit-stream", "max_msgs_per_subject"),
        ("audit-worker", "max_ack_pending"),
        ("audit-worker", "filter_subjects[0]"),
    ] {
        assert!(has(res, field), "{res}/{field} not flagged: {diags:?}");
    }

    // Create (apply) refuses the same way, and nothing is written.
    let e = l
        .driver
        .create(ResourceCreateRequest {
            resource_type: STREAM.into(),
            spec: Some(new_stream.spec()),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("config.storage")
            && e.message().contains("config.max_msgs_per_subject"),
        "{}",
        e.message()
    );
    l.close().await;
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_streams WHERE name = 'AUDIT'")
            .trim(),
        "0"
    );
    // A NATS broker config key that pgchannel does not have is refused at plan too.
    let bad = stream_res("bad-name", "BMW-Fulfillment", "bus", json!({}));
    let mut l = w.load().await;
    let e = l
        .driver
        .create(ResourceCreateRequest {
            resource_type: STREAM.into(),
            spec: Some(bad.spec()),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("config.name"), "{}", e.message());
    l.close().await;

    // A database that does not answer is an error for drift, never GHOST: its rows may well
    // still be there.
    pg.stop();
    let t = Instant::now();
    let drift = w.drift().await;
    eprintln!("pgchannel drift with the database down: {:?}", t.elapsed());
    let e = drift.expect_err("drift must fail while the database is down");
    assert!(
        e.message().contains("infra.eventbus") && !e.message().contains("iac: resource not found"),
        "{}",
        e.message()
    );
    pg.start_again();
    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
}

#[tokio::test]
async fn pgchannel_env_dsn_prevent_destroy_and_older_state_files() {
    let pg = PgServer::builder().password(PASSWORD).start();
    let dir = tempfile::tempdir().unwrap();
    // A state file of an earlier release (NATS brokers only) is loaded and kept.
    std::fs::write(
        dir.path().join("state.json"),
        include_str!("fixtures/state-v1.json"),
    )
    .unwrap();
    let mut w = Wfctl::new(dir.path());
    // No dsn in the config: apply names the variable it reads.
    let desired = vec![pg_broker("pgbus", json!({}))];
    let (_, errors) = w.apply(&desired).await;
    assert!(
        errors.len() == 1 && errors[0].contains("EVENTBUS_PGBUS_URI"),
        "{errors:?}"
    );
    // A refused password: one line naming the broker, never the password.
    let wrong = pg.url().replace(PASSWORD, "wrong-pw-Xy7");
    let (_, errors) = w.apply(&[pg_broker("pgbus", json!({"dsn": wrong}))]).await;
    assert!(
        errors.len() == 1
            && errors[0].contains("infra.eventbus \"pgbus\"")
            && errors[0].contains("password")
            && !errors[0].contains("wrong-pw-Xy7"),
        "{errors:?}"
    );
    assert!(!w.logs().contains("wrong-pw-Xy7"));
    w.env = vec![("EVENTBUS_PGBUS_URI".into(), pg.url())];
    let mut desired = vec![
        pg_broker("pgbus", json!({"prevent_destroy": true})),
        stream_res(
            "orders-stream",
            "ORDERS",
            "pgbus",
            json!({"prevent_destroy": true}),
        ),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!w.state["pgbus"].outputs.to_string().contains(PASSWORD));
    let st = state_file(dir.path());
    assert_eq!(st["brokers"]["bus"]["target"], "local", "{st}");
    assert_eq!(st["brokers"]["edge"]["target"], "self_hosted", "{st}");
    assert!(st["brokers"]["bus"].get("pg").is_none(), "{st}");
    assert_eq!(st["brokers"]["pgbus"]["pg"]["dsn"], pg.url());

    // prevent_destroy refuses, for the stream and the broker; the row stays.
    let refs = vec![w.r#ref("orders-stream"), w.r#ref("pgbus")];
    let l = w.load().await;
    let d = w.destroy_refs(&l, refs).await;
    l.close().await;
    assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
    assert!(
        d.errors.iter().all(|e| e.error.contains("prevent_destroy")),
        "{:?}",
        d.errors
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_streams WHERE name = 'ORDERS'")
            .trim(),
        "1"
    );
    // Lifted by an in-place update, then destroy goes through.
    desired[0].config["prevent_destroy"] = json!(false);
    desired[1].config["prevent_destroy"] = json!(false);
    let plan = w.plan(&desired).await;
    assert_eq!(
        actions(&plan),
        [pair("update", "pgbus"), pair("update", "orders-stream")]
    );
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let d = w.destroy().await;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_streams WHERE name = 'ORDERS'")
            .trim(),
        "0"
    );
    // The NATS brokers of the older file are untouched.
    let st = state_file(dir.path());
    assert_eq!(
        st["brokers"]["bus"]["local"]["nodes"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert!(st["brokers"].get("pgbus").is_none(), "{st}");
}

/// The engine and wfctl convert a pgchannel stream's config with one function
/// (`crate::pg::spec`), so a NATS-only setting is refused by both with the same line: wfctl's
/// plan at Diff, the runtime when the stream module starts (before, the engine started it and
/// dropped the setting silently).
#[tokio::test]
async fn pgchannel_runtime_and_plan_refuse_num_replicas_with_the_same_line() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![
        pg_broker("bus", json!({"dsn": pg.url()})),
        stream_res("orders-stream", "ORDERS", "bus", json!({})),
    ];
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    desired[1].config["num_replicas"] = json!(3);
    let mut l = w.load().await;
    let planned = w.plan_with(&mut l, &desired).await.unwrap_err();
    l.close().await;

    let p = common::Plugin::launch(common::LaunchOptions::default()).await;
    p.module_up(
        BROKER,
        "bus",
        &format!("provider: pgchannel\ndsn: '{}'\n", pg.url()),
    )
    .await;
    let h = p
        .create_module(
            STREAM,
            "orders-stream",
            "broker_ref: bus\nname: ORDERS\nsubjects: ['orders.>']\nnum_replicas: 3\n",
        )
        .await
        .unwrap();
    p.lifecycle("init", &h).await.unwrap();
    let started = p.lifecycle("start", &h).await.unwrap_err();

    // The line as the provider wrote it (the test host puts `diff <resource>: ` before its
    // errors, as wfctl does).
    let line = |e: &str| {
        let l = e
            .lines()
            .find(|l| l.contains("config.num_replicas"))
            .unwrap_or_else(|| panic!("no num_replicas line in: {e}"));
        l[l.find(STREAM).unwrap_or(0)..].trim().to_string()
    };
    assert_eq!(line(&started), line(&planned));
    assert!(
        line(&started).starts_with("infra.eventbus.stream \"orders-stream\": config.num_replicas: 3 is a NATS JetStream setting; pgchannel"),
        "{started}"
    );
    assert_eq!(started.lines().count(), 1, "{started}");
}
