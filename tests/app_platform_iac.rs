//! The bug report's file (broker `bmw-eventbus` on `digitalocean.app_platform`, stream
//! `BMW_FULFILLMENT`, six consumers) driven the way wfctl drives it (tests/common/iac.rs) against
//! the Apps API fake behind prism (tests/do_fake), then the workflow app's runtime config
//! against the broker it made. A live variant runs against DigitalOcean itself only with
//! EVENTBUS_ACCEPTANCE=1 and DIGITALOCEAN_TOKEN.

mod common;
mod do_fake;

use common::iac::{Res, Wfctl};
use common::{LaunchOptions, Plugin};
use do_fake::{Fake, TOKEN};
use eventbus_plugin::pb::iac::DriftClass;
use serde_json::{json, Value as Json};
use std::time::Instant;

const BROKER: &str = "infra.eventbus";
const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";
const NATS_TOKEN: &str = "bmwToken.k3y";

const CONSUMERS: [(&str, &str); 6] = [
    ("bmw-order-received", "bmw.order.received"),
    ("bmw-payment-captured", "bmw.payment.captured"),
    ("bmw-vehicle-allocated", "bmw.vehicle.allocated"),
    ("bmw-shipment-scheduled", "bmw.shipment.scheduled"),
    ("bmw-delivery-confirmed", "bmw.delivery.confirmed"),
    ("bmw-order-cancelled", "bmw.order.cancelled"),
];

/// The infra file of the bug report, as wfctl hands it to the plugin.
fn bug_report_file(version: &str) -> Vec<Res> {
    let mut v = vec![
        Res::new(
            "bmw-eventbus",
            BROKER,
            json!({
                "iac_provider": "eventbus-iac",
                "provider": "nats",
                "deploy_target": "digitalocean.app_platform",
                "version": version,
                "region": "nyc",
                "auth": {"token": NATS_TOKEN},
                "app_platform": {"acknowledge_data_loss": true}
            }),
        ),
        Res::new(
            "bmw-fulfillment",
            STREAM,
            json!({
                "iac_provider": "eventbus-iac",
                "broker_ref": "bmw-eventbus",
                "depends_on": ["bmw-eventbus"],
                "name": "BMW_FULFILLMENT",
                "subjects": ["bmw.>"],
                "max_age": "604800s"
            }),
        ),
    ];
    for (name, subject) in CONSUMERS {
        v.push(Res::new(
            name,
            CONSUMER,
            json!({
                "iac_provider": "eventbus-iac",
                "broker_ref": "bmw-eventbus",
                "depends_on": ["bmw-fulfillment"],
                "name": name.replace('-', "_"),
                "stream_name": "BMW_FULFILLMENT",
                "filter_subject": subject,
                "ack_policy": "ACK_POLICY_EXPLICIT",
                "max_deliver": 5
            }),
        ));
    }
    v
}

fn wfctl(state: &std::path::Path) -> Wfctl {
    let fake = Fake::get();
    let mut w = Wfctl::new(state);
    w.provider_config["digitalocean_token"] = json!(TOKEN);
    w.provider_config["digitalocean_api_url"] = json!(fake.url);
    w.env
        .push(("EVENTBUS_DO_POLL_INTERVAL_MS".into(), "50".into()));
    w
}

fn creates(plan: &[common::iac::Action]) -> usize {
    plan.iter().filter(|a| a.action == "create").count()
}

#[tokio::test]
async fn bug_report_file_plan_apply_replan_drift_destroy() {
    let fake = Fake::get();
    let dir = tempfile::tempdir().unwrap();
    let mut w = wfctl(dir.path());
    let file = bug_report_file("2.10.29");

    let t = Instant::now();
    let plan = w.plan(&file).await;
    let plan_time = t.elapsed();
    assert_eq!(creates(&plan), 8, "{plan:?}");

    let t = Instant::now();
    let (_, errors) = w.apply(&file).await;
    let apply_time = t.elapsed();
    assert!(errors.is_empty(), "{errors:?}");
    let broker = &w.state["bmw-eventbus"];
    let app_id = broker.provider_id.clone();
    assert_eq!(
        fake.app_by_name("bmw-eventbus").as_deref(),
        Some(app_id.as_str())
    );
    let o = &broker.outputs;
    assert_eq!(o["durable"], json!(false), "{o}");
    assert_eq!(o["image"], "nats:2.10.29-alpine");
    assert_eq!(o["region"], "nyc");
    assert_eq!(o["instance_size"], "apps-s-1vcpu-1gb");
    assert_eq!(o["internal_url"], "nats://bmw-eventbus:4222");
    let url = o["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("ws://127."), "{o}");
    assert!(!o.to_string().contains(TOKEN), "{o}");
    assert!(
        !o.to_string().contains(NATS_TOKEN),
        "credentials stay out of outputs: {o}"
    );
    // Nor are they in the config the app spec carries (only in its SECRET env vars).
    let spec = fake.spec_of(&app_id).unwrap();
    let conf = spec["services"][0]["envs"][0]["value"].as_str().unwrap();
    assert!(!conf.contains(NATS_TOKEN), "{conf}");

    // The stream and consumers are on that broker, reached over its websocket url.
    let client = async_nats::ConnectOptions::with_token(NATS_TOKEN.into())
        .connect(url.as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("BMW_FULFILLMENT").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.subjects, vec!["bmw.>"]);
    for (name, subject) in CONSUMERS {
        let c: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&name.replace('-', "_")).await.unwrap();
        assert_eq!(c.cached_info().config.filter_subject, subject);
    }
    drop(client);

    let t = Instant::now();
    let replan = w.plan(&file).await;
    let replan_time = t.elapsed();
    assert!(replan.is_empty(), "second plan must be empty: {replan:?}");

    // Someone deletes the app: the broker is missing, and so are the streams it held.
    fake.delete_out_of_band(&app_id).await;
    let drifts = w.drift().await.unwrap();
    let class = |n: &str| drifts.iter().find(|d| d.name == n).map(|d| d.class);
    assert_eq!(
        class("bmw-eventbus"),
        Some(DriftClass::Ghost as i32),
        "{drifts:?}"
    );

    // Destroy still succeeds: the streams' and consumers' data went with the app.
    let t = Instant::now();
    let result = w.destroy().await;
    let destroy_time = t.elapsed();
    assert!(result.errors.is_empty(), "{result:?}");
    assert!(fake.app_by_name("bmw-eventbus").is_none());
    eprintln!(
        "bug report file against the fake: plan {plan_time:?}, apply {apply_time:?}, re-plan {replan_time:?}, destroy {destroy_time:?}"
    );
}

#[tokio::test]
async fn version_change_updates_the_app_in_place_and_destroy_removes_it() {
    let fake = Fake::get();
    let dir = tempfile::tempdir().unwrap();
    let mut w = wfctl(dir.path());
    let mut file = bug_report_file("2.10.29");
    file[0].name = "bmw-eventbus-upd".into();
    file[0].config["version"] = json!("2.10.29");
    for r in file.iter_mut().skip(1) {
        r.config["broker_ref"] = json!("bmw-eventbus-upd");
    }
    file[1].config["depends_on"] = json!(["bmw-eventbus-upd"]);
    let file = &file[..2];
    let (_, errors) = w.apply(file).await;
    assert!(errors.is_empty(), "{errors:?}");
    let id = w.state["bmw-eventbus-upd"].provider_id.clone();

    let mut newer = file.to_vec();
    newer[0].config["version"] = json!("2.11.4");
    let plan = w.plan(&newer).await;
    let b = plan.iter().find(|a| a.name == "bmw-eventbus-upd").unwrap();
    assert_eq!(b.action, "update", "{plan:?}");
    assert_eq!(b.paths(), vec!["version"], "{plan:?}");
    let (_, errors) = w.apply(&newer).await;
    // The store is wiped by the redeploy: the stream comes back with the next apply.
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        w.state["bmw-eventbus-upd"].provider_id, id,
        "updated in place"
    );
    let spec = fake.spec_of(&id).unwrap();
    assert_eq!(spec["services"][0]["image"]["tag"], "2.11.4-alpine");
    assert_eq!(
        w.state["bmw-eventbus-upd"].outputs["image"],
        "nats:2.11.4-alpine"
    );

    // Someone resizes the app in the console: CONFIG drift naming the field (the encrypted
    // SECRET values the API returns are not drift).
    let mut live = fake.spec_of(&id).unwrap();
    live["services"][0]["instance_size_slug"] = json!("apps-s-2vcpu-4gb");
    let (code, _) = do_fake::raw_call(
        &fake.direct_url,
        "PUT",
        &format!("/v2/apps/{id}"),
        TOKEN,
        Some(&json!({"spec": live})),
    )
    .await;
    assert_eq!(code, 200);
    let drifts = w.drift().await.unwrap();
    let d = drifts
        .iter()
        .find(|d| d.name == "bmw-eventbus-upd")
        .unwrap();
    assert_eq!(d.class, DriftClass::Config as i32, "{drifts:?}");
    let actual: Json = serde_json::from_slice(&d.actual_json).unwrap();
    assert_eq!(
        actual,
        json!({"instance_size": "apps-s-2vcpu-4gb"}),
        "{drifts:?}"
    );

    let result = w.destroy().await;
    assert!(result.errors.is_empty(), "{result:?}");
    assert!(fake.spec_of(&id).is_none());
}

#[tokio::test]
async fn plan_refuses_what_app_platform_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let w = wfctl(dir.path());
    let mut l = w.load().await;
    for (patch, expect) in [
        (json!({"replicas": 3}), "kubernetes"),
        (json!({"app_platform": {}}), "acknowledge_data_loss"),
        (json!({"version": "latest"}), "config.version"),
        (json!({"auth": {}}), "config.auth"),
    ] {
        let mut file = bug_report_file("2.10.29");
        for (k, v) in patch.as_object().unwrap() {
            file[0].config[k] = v.clone();
        }
        let e = w.plan_with(&mut l, &file[..1]).await;
        // A create plans without Diff; the refusal then comes from Create (or ValidatePlan).
        let message = match e {
            Err(e) => e,
            Ok(_) => {
                let out = l
                    .driver
                    .create(eventbus_plugin::pb::iac::ResourceCreateRequest {
                        resource_type: BROKER.into(),
                        spec: Some(file[0].spec()),
                    })
                    .await
                    .unwrap_err();
                out.message().to_string()
            }
        };
        assert!(message.contains(expect), "{patch}: {message}");
    }
    l.close().await;
}

/// API errors reach wfctl as one line naming the broker and what to do.
#[tokio::test]
async fn api_errors_name_the_broker_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = wfctl(dir.path());
    w.provider_config["digitalocean_token"] = json!("revoked-token");
    let mut file = bug_report_file("2.10.29");
    file[0].name = "bmw-eventbus-401".into();
    let (_, errors) = w.apply(&file[..1]).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("bmw-eventbus-401")
            && errors[0].contains("401")
            && errors[0].contains("DIGITALOCEAN_TOKEN"),
        "{errors:?}"
    );
    // No token anywhere: said before any call is made.
    let mut w = Wfctl::new(dir.path());
    w.provider_config["digitalocean_api_url"] = json!(Fake::get().url);
    w.env.push(("DIGITALOCEAN_TOKEN".into(), String::new()));
    let (_, errors) = w.apply(&file[..1]).await;
    assert!(
        errors.len() == 1 && errors[0].contains("no DigitalOcean API token"),
        "{errors:?}"
    );
}

/// The workflow app's runtime config: the broker module's `dsn` is the broker's `url` output.
#[tokio::test]
async fn runtime_modules_publish_and_consume_over_the_websocket_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = wfctl(dir.path());
    let mut file = bug_report_file("2.10.29");
    file[0].name = "bmw-eventbus-rt".into();
    file[1].config["broker_ref"] = json!("bmw-eventbus-rt");
    file[1].config["depends_on"] = json!(["bmw-eventbus-rt"]);
    let (_, errors) = w.apply(&file[..2]).await;
    if !errors.is_empty() {
        let id = Fake::get()
            .app_by_name("bmw-eventbus-rt")
            .unwrap_or_default();
        panic!("{errors:?}\napp log:\n{}", Fake::get().log_of(&id));
    }
    let url = w.state["bmw-eventbus-rt"].outputs["url"]
        .as_str()
        .unwrap()
        .to_string();

    let p = Plugin::launch(LaunchOptions::default()).await;
    p.module_up(
        "eventbus.broker",
        "bmw-eventbus",
        &format!(
            "provider: nats\ndeploy_target: digitalocean.app_platform\ndsn: {url}\nauth: {{token: {NATS_TOKEN}}}\n"
        ),
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "fulfilment-worker",
        "name: fulfilment_worker\nstream_name: BMW_FULFILLMENT\nbroker_ref: bmw-eventbus\nfilter_subject: bmw.order.received\n",
    )
    .await;
    let publish = p
        .create_step(
            "step.eventbus.publish",
            "pub",
            "subject: bmw.order.received\n",
        )
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.publish",
            &publish,
            "subject: bmw.order.received\npayload: {order: 42}\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["stream"], "BMW_FULFILLMENT", "{out}");
    let consume = p
        .create_step(
            "step.eventbus.consume",
            "get",
            "consumer: fulfilment_worker\n",
        )
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: fulfilment_worker\nbatch_size: 1\nmax_wait: 5s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["messages"][0]["json"], json!({"order": 42.0}), "{out}");
    drop(p);

    let result = w.destroy().await;
    assert!(result.errors.is_empty(), "{result:?}");
}

/// Against DigitalOcean itself (a billable app for a few minutes, then deleted). Reported as
/// ignored by a plain `cargo test`; `make acceptance` runs it, and it refuses to pass without
/// EVENTBUS_ACCEPTANCE=1 and DIGITALOCEAN_TOKEN.
#[tokio::test]
#[ignore = "live DigitalOcean: make acceptance with EVENTBUS_ACCEPTANCE=1 and DIGITALOCEAN_TOKEN"]
async fn live_digitalocean_apply_and_destroy() {
    let token = std::env::var("DIGITALOCEAN_TOKEN").unwrap_or_default();
    assert!(
        std::env::var("EVENTBUS_ACCEPTANCE").as_deref() == Ok("1") && !token.is_empty(),
        "skipped, not passed: set EVENTBUS_ACCEPTANCE=1 and DIGITALOCEAN_TOKEN to run this against the real Apps API"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    w.provider_config["digitalocean_token"] = json!(token);
    let suffix = std::process::id();
    let mut file = bug_report_file("2.10.29");
    file[0].name = format!("eventbus-accept-{suffix}");
    file[0].config["auth"] = json!({"token": format!("accept{suffix}Token")});
    file[1].config["broker_ref"] = json!(file[0].name);
    file[1].config["depends_on"] = json!([file[0].name]);
    let (_, errors) = w.apply(&file[..2]).await;
    let url = w
        .state
        .get(&file[0].name)
        .map(|r| r.outputs["url"].clone())
        .unwrap_or(Json::Null);
    let result = w.destroy().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        url.as_str().is_some_and(|u| u.starts_with("wss://")),
        "{url}"
    );
    assert!(result.errors.is_empty(), "{result:?}");
}
