//! The IaC face against careless operators and hostile configs: look-alike broker names,
//! concurrent wfctl runs on one state dir, and secrets in configs that fail to decode. Real
//! plugin processes (tests/common/iac.rs) and real nats-server processes.

mod common;

use common::iac::{Loaded, LocalGuard, Res, Wfctl};
use eventbus_plugin::pb::iac::{
    PlanRequest, ResourceCreateRequest, ResourceDiffRequest, ResourceOutput, ResourceSpec,
    StatusRequest,
};
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;

const BROKER: &str = "infra.eventbus";

fn local(name: &str) -> Res {
    Res::new(
        name,
        BROKER,
        json!({"iac_provider": "eventbus-iac", "provider": "nats", "deploy_target": "local",
               "local": {"remove_data_on_delete": true}}),
    )
}

/// Pids of the nats-servers the provider state file records.
fn recorded_pids(state_dir: &std::path::Path) -> Vec<i32> {
    let text = std::fs::read_to_string(state_dir.join("state.json")).unwrap_or_default();
    let v: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
    let mut pids: Vec<i32> = v["brokers"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|b| b["local"]["nodes"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n["pid"].as_i64().map(|p| p as i32))
        .collect();
    pids.sort();
    pids
}

/// Issue 14 finding 10: `orders-bus`, `orders.bus` and `orders/bus` shared one data dir.
#[tokio::test]
async fn local_brokers_with_look_alike_names_get_their_own_data_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let guard = LocalGuard {
        state_dir: dir.path().to_path_buf(),
    };
    let mut w = Wfctl::new(dir.path());
    let names = ["orders-bus", "orders.bus", "orders/bus"];
    let desired: Vec<Res> = names.iter().map(|n| local(n)).collect();
    let (_, errors) = w.apply(&desired).await;
    assert!(errors.is_empty(), "{errors:?}");
    let dirs: BTreeSet<String> = names
        .iter()
        .map(|n| {
            w.state[*n].outputs["data_dir"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(dirs.len(), 3, "one data dir each: {dirs:?}");
    let brokers = dir.path().join("brokers");
    for d in &dirs {
        let p = std::path::Path::new(d);
        assert_eq!(
            p.parent(),
            Some(brokers.as_path()),
            "{d} stays in {brokers:?}"
        );
    }
    assert_eq!(guard.running().len(), 3, "three servers, all recorded");
    assert_eq!(recorded_pids(dir.path()), {
        let mut r = guard.running();
        r.sort();
        r
    });
    // Two brokers may not point local.state_dir at one directory either.
    let shared = dir.path().join("shared");
    let mut a = local("a");
    let mut b = local("b");
    a.config["local"]["state_dir"] = json!(shared);
    b.config["local"]["state_dir"] = json!(shared);
    let (_, errors) = w.apply(&[a, b]).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("already keeps its data in") && errors[0].contains("local.state_dir"),
        "{}",
        errors[0]
    );
    assert!(w.destroy().await.errors.is_empty());
    assert!(guard.running().is_empty());
}

/// Issue 14 finding 13: two plugin processes creating one `local` broker at once both wrote
/// one nats.conf; both failed, or both succeeded with different urls and left a nats-server
/// running that no state recorded. Raced several times: one process creates, the other adopts
/// it (or fails cleanly), and every running server is recorded.
#[tokio::test]
async fn concurrent_creates_of_one_local_broker_are_serialised_and_recorded() {
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let guard = LocalGuard {
            state_dir: dir.path().to_path_buf(),
        };
        let w = Wfctl::new(dir.path());
        let (l1, l2) = tokio::join!(w.load(), w.load());
        let bus = local("bus");
        let create = |l: &Loaded| {
            let mut d = l.driver.clone();
            let spec: ResourceSpec = bus.spec();
            async move {
                d.create(ResourceCreateRequest {
                    resource_type: BROKER.into(),
                    spec: Some(spec),
                })
                .await
                .map(|r| r.into_inner().output.unwrap())
            }
        };
        let (r1, r2) = tokio::join!(create(&l1), create(&l2));
        let urls: BTreeSet<String> = [&r1, &r2]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|o| {
                let v: Json = serde_json::from_slice(&o.outputs_json).unwrap();
                v["url"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            urls.len(),
            1,
            "round {round}: one broker, one url: {r1:?} {r2:?}"
        );
        for r in [&r1, &r2] {
            if let Err(e) = r {
                assert!(
                    !e.message().contains("address already in use"),
                    "round {round}: {}",
                    e.message()
                );
            }
        }
        let mut running = guard.running();
        running.sort();
        assert_eq!(running.len(), 1, "round {round}: one nats-server");
        assert_eq!(
            recorded_pids(dir.path()),
            running,
            "round {round}: the running server is the recorded one"
        );
        l1.close().await;
        l2.close().await;
    }
}

/// Every secret-bearing way to get a broker config wrong, with a secret marker in it.
fn hostile_configs() -> Vec<(&'static str, Json)> {
    let base = |extra: Json| {
        let mut c = json!({"provider": "nats", "deploy_target": "self_hosted", "dsn": "nats://127.0.0.1:4222"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    vec![
        ("auth as a string", base(json!({"auth": "SECRETtok-4417"}))),
        ("auth as a number", base(json!({"auth": 98765432101u64}))),
        (
            "numeric password",
            base(json!({"auth": {"user": "al", "password": 98765432101u64}})),
        ),
        (
            "token as a list",
            base(json!({"auth": {"token": ["SECRETtok-4417"]}})),
        ),
        (
            "dsn password with a comma",
            base(json!({"dsn": "nats://al:SECRET,pw-4417@127.0.0.1:4222"})),
        ),
        (
            "servers with userinfo and a bad port",
            json!({"provider": "nats", "deploy_target": "self_hosted",
                   "servers": ["nats://al:SECRETpw-4417@127.0.0.1:99999999"]}),
        ),
        (
            "dsn with userinfo and an unknown key beside it",
            base(json!({"dsn": "nats://al:SECRETpw-4417@127.0.0.1:4222", "colour": 1})),
        ),
    ]
}

fn assert_clean(case: &str, rpc: &str, msg: &str) {
    for secret in ["SECRET", "98765432101", "pw-4417"] {
        assert!(
            !msg.contains(secret),
            "{case}: {rpc} echoes a secret: {msg}"
        );
    }
    assert!(
        msg.contains("infra.eventbus \"bus\""),
        "{case}: {rpc}: {msg}"
    );
}

/// Issue 14 finding 2 (IaC part): config decode errors in Create/Diff/Plan quoted auth values
/// and dsn userinfo verbatim, long values whole, and Status returned the self_hosted broker's
/// token unmasked.
#[tokio::test]
async fn iac_errors_never_echo_secrets_or_long_values_and_status_masks_them() {
    let dir = tempfile::tempdir().unwrap();
    let w = Wfctl::new(dir.path());
    let l = w.load().await;
    let mut driver = l.driver.clone();
    let mut required = l.required.clone();
    for (case, config) in hostile_configs() {
        let spec = Res::new("bus", BROKER, config).spec();
        let e = driver
            .create(ResourceCreateRequest {
                resource_type: BROKER.into(),
                spec: Some(spec.clone()),
            })
            .await
            .expect_err(case);
        assert_clean(case, "Create", e.message());
        let e = driver
            .diff(ResourceDiffRequest {
                resource_type: BROKER.into(),
                desired: Some(spec.clone()),
                current: Some(ResourceOutput {
                    name: "bus".into(),
                    r#type: BROKER.into(),
                    outputs_json: b"{}".to_vec(),
                    ..Default::default()
                }),
            })
            .await
            .expect_err(case);
        assert_clean(case, "Diff", e.message());
        // Plan echoes the specs it was given (the caller's own input); its errors do not.
        if let Err(e) = required
            .plan(PlanRequest {
                desired: vec![spec],
                current: vec![],
            })
            .await
        {
            assert_clean(case, "Plan", e.message());
        }
    }
    // A 1 MiB value is quoted in part, not whole.
    let long = "v".repeat(1 << 20);
    let spec = Res::new(
        "bus",
        BROKER,
        json!({"provider": "nats", "deploy_target": "self_hosted", "version": long.clone(),
               "dsn": long}),
    )
    .spec();
    let e = driver
        .create(ResourceCreateRequest {
            resource_type: BROKER.into(),
            spec: Some(spec),
        })
        .await
        .expect_err("1 MiB values");
    assert!(e.message().len() < 4096, "{} bytes", e.message().len());
    assert!(!e.message().contains(&"v".repeat(201)), "{}", e.message());
    l.close().await;

    // Status has no sensitive map: the token is masked there, while Create marks it sensitive.
    let server = NatsServer::builder()
        .config("authorization {\n  token: \"SECRETtok-4417\"\n}\n")
        .start();
    let l = w.load().await;
    let bus = Res::new(
        "bus",
        BROKER,
        json!({"provider": "nats", "deploy_target": "self_hosted", "dsn": server.url(),
               "auth": {"token": "SECRETtok-4417"}}),
    );
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
    let statuses = l
        .required
        .clone()
        .status(StatusRequest { refs: vec![] })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert_eq!(statuses.len(), 1);
    let shown = String::from_utf8_lossy(&statuses[0].outputs_json).to_string();
    assert_eq!(statuses[0].status, "running", "{shown}");
    assert!(!shown.contains("SECRET"), "Status shows the token: {shown}");
    let v: Json = serde_json::from_str(&shown).unwrap();
    assert!(v["token"].is_string(), "masked, not dropped: {shown}");
    l.close().await;
}

/// Issue 19 finding 9: provider ids come from wfctl's state unchecked; a 10 KB stream name in
/// one made Read take 5 s and Delete 29 s and dropped the provider's NATS connection. Now the
/// id is checked before any call reaches a broker: one short line naming `provider_id`, at
/// once, and the broker keeps working for the next call.
#[tokio::test]
async fn provider_ids_are_checked_before_any_broker_is_asked() {
    use eventbus_plugin::pb::iac::{ResourceDeleteRequest, ResourceReadRequest, ResourceRef};
    use std::time::{Duration, Instant};
    let server = NatsServer::builder().jetstream(true).start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    let bus = Res::new(
        "bus",
        BROKER,
        json!({"iac_provider": "eventbus-iac", "provider": "nats",
               "deploy_target": "self_hosted", "dsn": server.url()}),
    );
    let stream = Res::new(
        "orders",
        "infra.eventbus.stream",
        json!({"iac_provider": "eventbus-iac", "broker_ref": "bus", "name": "ORDERS",
               "subjects": ["orders.>"]}),
    );
    let (_, errors) = w.apply(&[bus, stream]).await;
    assert!(errors.is_empty(), "{errors:?}");
    let l = w.load().await;
    let long = "S".repeat(10_000);
    let cases = [
        (
            "infra.eventbus.stream",
            format!("bus/{long}"),
            "stream name",
        ),
        (
            "infra.eventbus.stream",
            "bus/OR.DERS".to_string(),
            "stream name",
        ),
        (
            "infra.eventbus.consumer",
            format!("bus/ORDERS/{long}"),
            "durable name",
        ),
        (
            "infra.eventbus.consumer",
            format!("bus/{long}/d"),
            "stream name",
        ),
        (
            "infra.eventbus.stream",
            format!("{long}/ORDERS"),
            "broker part",
        ),
    ];
    for (type_name, pid, says) in cases {
        let r = ResourceRef {
            name: "orders".into(),
            r#type: type_name.into(),
            provider_id: pid.clone(),
        };
        let started = Instant::now();
        let e = l
            .driver
            .clone()
            .read(ResourceReadRequest {
                resource_type: type_name.into(),
                r#ref: Some(r.clone()),
            })
            .await
            .expect_err("read");
        let d = l
            .driver
            .clone()
            .delete(ResourceDeleteRequest {
                resource_type: type_name.into(),
                r#ref: Some(r),
            })
            .await
            .expect_err("delete");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        for m in [e.message(), d.message()] {
            assert!(m.contains("provider_id") && m.contains(says), "{m}");
            assert!(m.len() < 1000 && m.lines().count() == 1, "{m}");
        }
    }
    // The broker still answers through the same provider.
    let r = ResourceRef {
        name: "orders".into(),
        r#type: "infra.eventbus.stream".into(),
        provider_id: "bus/ORDERS".into(),
    };
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        l.driver.clone().read(ResourceReadRequest {
            resource_type: "infra.eventbus.stream".into(),
            r#ref: Some(r),
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.into_inner().output.is_some());
    l.close().await;
}
