//! The `digitalocean.app_platform` target against a stateful fake of the Apps API that runs each
//! app's spec on this machine, behind prism validating every call against DigitalOcean's OpenAPI
//! (tests/do_fake). The broker the spec boots is a real nats-server, reached over its websocket
//! url with the configured auth.

mod do_fake;

use do_fake::{raw_call, Fake, Injected, READ_ONLY_TOKEN, TOKEN};
use eventbus_plugin::iac::targets::app_platform::{
    self as ap,
    api::{ApiConfig, ApiError, AppsApi},
    spec,
};
use eventbus_plugin::pb::eventbus::{AppPlatformTargetConfig, ClusterConfig, NatsAuth};
use serde_json::json;
use std::time::Duration;

fn cluster(version: &str, token: &str) -> ClusterConfig {
    ClusterConfig {
        provider: "nats".into(),
        deploy_target: ap::TARGET.into(),
        version: version.into(),
        auth: Some(NatsAuth {
            token: token.into(),
            ..Default::default()
        }),
        app_platform: Some(AppPlatformTargetConfig {
            acknowledge_data_loss: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn desired(name: &str, version: &str, token: &str) -> ap::AppDesired {
    ap::validate(name, &cluster(version, token)).unwrap()
}

fn api(token: &str) -> AppsApi {
    std::env::set_var(ap::api::POLL_ENV, "50");
    AppsApi::new(ApiConfig::resolve(Some(token), Some(&Fake::get().url)).unwrap())
}

async fn create_active(api: &AppsApi, d: &ap::AppDesired) -> ap::api::App {
    let s = spec::app_spec(d);
    api.propose(&s, None).await.unwrap();
    let app = api.create(&s).await.unwrap();
    match api.wait_active(&app, Duration::from_secs(60)).await {
        Ok(a) => a,
        Err(e) => panic!("{e}\napp log:\n{}", Fake::get().log_of(&app.id)),
    }
}

async fn ws_client(url: &str, token: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_token(token.into())
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

#[tokio::test]
async fn the_rendered_spec_boots_and_serves_jetstream_over_its_websocket_url() {
    let api = api(TOKEN);
    let token = "Tok3n.with_safe~chars+/-x";
    let d = desired("ws-boot", "2.10.29", token);
    let app = create_active(&api, &d).await;
    let url = spec::websocket_url(&app.live_url).unwrap();
    assert!(url.starts_with("ws://"), "{url}");

    // Wrong token: refused.
    let bad = async_nats::ConnectOptions::with_token("wrong".into())
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(Some(1))
        .connect(&url)
        .await;
    assert!(bad.is_err(), "a wrong token must not connect");

    let client = ws_client(&url, token).await;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "WS_BOOT".into(),
            subjects: vec!["wsboot.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish("wsboot.one", "hello over websocket".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("reader".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    use futures::StreamExt;
    let mut msgs = consumer.fetch().max_messages(1).messages().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"hello over websocket");
    m.ack().await.unwrap();
    // The limits the config asked for are what the server runs with.
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    let monitor = app
        .live_url
        .rsplit_once(':')
        .map(|(h, _)| format!("{h}:{}", spec::MONITOR_PORT))
        .unwrap();
    let (code, jsz) = raw_call(&monitor, "GET", "/jsz", TOKEN, None).await;
    assert_eq!(code, 200);
    assert_eq!(
        jsz["config"]["max_storage"],
        json!(ap::MAX_FILE_STORE),
        "{jsz}"
    );
    drop(client);

    api.delete(&app.id).await.unwrap();
    // Already gone: still fine.
    api.delete(&app.id).await.unwrap();
    assert!(api.get(&app.id).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn secrets_come_back_encrypted_and_an_update_changes_the_version() {
    let api = api(TOKEN);
    let d = desired("upd-version", "2.10.29", "firstToken");
    let app = create_active(&api, &d).await;
    // SECRET values are encrypted on every read; the comparable views still agree.
    let envs = app.spec.pointer("/services/0/envs").unwrap().clone();
    let tok = envs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == spec::ENV_TOKEN)
        .unwrap();
    assert!(tok["value"].as_str().unwrap().starts_with("EV["), "{tok}");
    assert_eq!(
        spec::managed_view(&app.spec),
        spec::managed_view(&spec::app_spec(&d))
    );
    // A spec read back (encrypted secret included) may be sent back as is.
    let same = api.update(&app.id, &app.spec).await.unwrap();
    api.wait_active(&same, Duration::from_secs(60))
        .await
        .unwrap();

    let d2 = desired("upd-version", "2.11.4", "firstToken");
    assert_ne!(
        spec::managed_view(&app.spec),
        spec::managed_view(&spec::app_spec(&d2))
    );
    let s2 = spec::app_spec(&d2);
    api.propose(&s2, Some(&app.id)).await.unwrap();
    let upd = api.update(&app.id, &s2).await.unwrap();
    let live = api
        .wait_active(&upd, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        live.spec.pointer("/services/0/image/tag").unwrap(),
        "2.11.4-alpine"
    );
    // The new deployment runs with the same token.
    let client = ws_client(&spec::websocket_url(&live.live_url).unwrap(), "firstToken").await;
    client.flush().await.unwrap();
    api.delete(&app.id).await.unwrap();
}

#[tokio::test]
async fn each_api_error_class_has_its_own_clear_error() {
    let fake = Fake::get();
    let d = desired("errs", "2.10.29", "someToken");
    let s = spec::app_spec(&d);

    let e = api("not-the-token").create(&s).await.unwrap_err();
    assert!(matches!(e, ApiError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("DIGITALOCEAN_TOKEN"), "{e}");

    let e = api(READ_ONLY_TOKEN).create(&s).await.unwrap_err();
    assert!(matches!(e, ApiError::Forbidden { .. }), "{e}");
    assert!(e.to_string().contains("app:create"), "{e}");

    let e = api(TOKEN)
        .get("6f0c2f44-0000-4000-8000-999999999999")
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // DigitalOcean's own message is shown for a 422.
    let mut bad = s.clone();
    bad["services"][0]["image"]["tag"] = json!("latest");
    let e = api(TOKEN).propose(&bad, None).await.unwrap_err();
    assert!(matches!(e, ApiError::Unprocessable { .. }), "{e}");
    assert!(e.to_string().contains("library/nats"), "{e}");

    // 429 twice, then through: the client waits for the reset.
    for _ in 0..2 {
        fake.inject(Injected {
            method: "GET".into(),
            path_prefix: "/v2/apps".into(),
            status: 429,
            message: "API rate limit exceeded.".into(),
            reset_in: Some(1),
        });
    }
    let started = std::time::Instant::now();
    let listed = api(TOKEN).find_by_name("no-such-app").await.unwrap();
    assert!(listed.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "waited {:?}",
        started.elapsed()
    );

    // A reset too far away: no retry loop, a clear error at once.
    fake.inject(Injected {
        method: "GET".into(),
        path_prefix: "/v2/apps/6f0c2f44-0000-4000-8000-88".into(),
        status: 429,
        message: "API rate limit exceeded.".into(),
        reset_in: Some(3600),
    });
    let e = api(TOKEN)
        .get("6f0c2f44-0000-4000-8000-888888888888")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::RateLimited { .. }), "{e}");
    assert!(e.to_string().contains("429"), "{e}");

    // Prism stands in front and holds every request to DigitalOcean's schema: this one never
    // reaches the fake.
    let mut invalid = s.clone();
    invalid["services"][0]["instance_count"] = json!(0);
    invalid["name"] = json!("never-reaches-fake");
    let (code, _) = raw_call(
        &fake.url,
        "POST",
        "/v2/apps/propose",
        TOKEN,
        Some(&json!({"spec": invalid})),
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        !fake
            .requests()
            .iter()
            .any(|(_, _, name)| name == "never-reaches-fake"),
        "prism let a schema violation through"
    );
}

#[tokio::test]
async fn a_deployment_that_fails_or_never_gets_healthy_is_reported() {
    let api = api(TOKEN);
    let d = desired("dies-at-start", "2.10.29", "someToken");
    let mut s = spec::app_spec(&d);
    s["services"][0]["run_command"] = json!("sh -c 'echo broken config >&2; exit 3'");
    let app = api.create(&s).await.unwrap();
    let e = api
        .wait_active(&app, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::DeployFailed { ref phase, .. } if phase == "ERROR"),
        "{e}"
    );
    api.delete(&app.id).await.unwrap();

    let d = desired("never-healthy", "2.10.29", "someToken");
    let mut s = spec::app_spec(&d);
    s["services"][0]["run_command"] = json!("sleep 60");
    let app = api.create(&s).await.unwrap();
    let e = api
        .wait_active(&app, Duration::from_millis(700))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::DeployTimeout { .. }), "{e}");
    assert!(e.to_string().contains("deploy_timeout"), "{e}");
    api.delete(&app.id).await.unwrap();
}

/// B4: the Go predecessor's command line used `-ms`/`-mm` for store limits (the first is the
/// HTTPS monitor port, the second no flag at all). B5: it always passed `--cluster` without
/// server or cluster names. B6: it named every app `nats` and asked for an object-storage bucket.
#[test]
fn go_predecessor_defects_b4_b5_b6_do_not_come_back() {
    let d = desired("bmw-eventbus", "2.10.29", "someToken");
    let s = spec::app_spec(&d);
    let svc = &s["services"][0];
    let run = svc["run_command"].as_str().unwrap();
    for flag in [" -ms", " -mm", "--cluster", "--routes", "-js"] {
        assert!(!run.contains(flag), "B4/B5: {flag} in {run}");
    }
    assert!(run.contains("nats-server -c "), "{run}");
    let conf = spec::render_config(&d);
    assert!(
        conf.contains(&format!("max_file_store: {}", ap::MAX_FILE_STORE)),
        "{conf}"
    );
    assert!(!conf.contains("cluster {"), "B5: {conf}");
    assert!(!conf.contains("someToken"), "secret inlined: {conf}");
    assert_eq!(svc["instance_count"], 1);
    // B6: no storage component of any kind, and the app is named after the broker.
    for key in ["databases", "static_sites", "jobs", "workers"] {
        assert!(s.get(key).is_none(), "{key}");
    }
    assert_eq!(s["name"], "bmw-eventbus");
    let other = spec::app_spec(&desired("orders-bus", "2.10.29", "someToken"));
    assert_ne!(s["name"], other["name"]);
    assert_eq!(svc["health_check"]["http_path"], spec::HEALTH_PATH);
    assert_eq!(svc["health_check"]["port"], spec::MONITOR_PORT);
    assert_eq!(svc["image"]["tag"], "2.10.29-alpine");
}

/// The config the spec carries passes `nats-server -t`, with the env vars the spec sets.
#[test]
fn the_embedded_config_passes_nats_server_syntax_check() {
    let d = desired("syntax", "2.10.29", "someToken");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, spec::render_config(&d)).unwrap();
    let out = std::process::Command::new(nats_test_server::binary())
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .env(spec::ENV_HOST, "127.0.0.1")
        .env(spec::ENV_TOKEN, "someToken")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
