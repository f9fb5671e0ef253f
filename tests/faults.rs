//! Fault injection: malformed input, secrets in logs, a plugin killed mid-delivery, a paused
//! broker. Each test breaks something on purpose and asserts what users rely on.

mod common;

use common::*;
use nats_test_server::NatsServer;
use serde_json::{json, Map, Value as Json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

fn junk(rng: &mut Rng, depth: u32) -> Json {
    match rng.next() % if depth > 1 { 6 } else { 8 } {
        0 => Json::Null,
        1 => Json::Bool(rng.next().is_multiple_of(2)),
        2 => json!((rng.next() % 2000) as i64 - 1000),
        3 => json!(rng.next() as f64 / 7.0),
        4 => Json::String(
            rng.pick(&[
                "",
                "x",
                "a.b",
                "orders.>",
                "1s",
                "-5s",
                "latest",
                "$JS.ACK.x",
                "nats://h:1",
                "{{ .x }}",
                "ACK_POLICY_ALL",
                "💥",
                "a b",
            ])
            .to_string(),
        ),
        5 => Json::String("z".repeat((rng.next() % 300) as usize)),
        6 => Json::Array((0..rng.next() % 3).map(|_| junk(rng, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.next() % 3 {
                m.insert(
                    rng.pick(&["token", "user", "a", "enabled", "binary"])
                        .to_string(),
                    junk(rng, depth + 1),
                );
            }
            Json::Object(m)
        }
    }
}

const MODULE_FIELDS: &[&str] = &[
    "provider",
    "deploy_target",
    "version",
    "replicas",
    "dsn",
    "servers",
    "auth",
    "tls",
    "local",
    "name",
    "subjects",
    "retention_policy",
    "num_replicas",
    "max_bytes",
    "max_age",
    "storage",
    "discard",
    "duplicate_window",
    "stream_name",
    "filter_subject",
    "filter_subjects",
    "deliver_policy",
    "ack_policy",
    "max_deliver",
    "ack_wait",
    "backoff",
    "opt_start_seq",
    "opt_start_time",
    "broker_ref",
    "bogus",
    "subject",
    "payload",
    "consumer",
    "batch_size",
    "max_wait",
    "ack_token",
    "action",
    "nak_delay",
    "timeout",
    "max_in_flight",
    "ack_mode",
    "dead_letter_subject",
    "bus",
];

#[tokio::test]
async fn a_thousand_malformed_configs_never_panic_and_every_error_names_module_and_field() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let module_types = [
        "eventbus.broker",
        "eventbus.stream",
        "eventbus.consumer",
        "infra.eventbus",
        "infra.eventbus.stream",
        "infra.eventbus.consumer",
    ];
    let step_types = [
        "step.eventbus.publish",
        "step.eventbus.consume",
        "step.eventbus.ack",
    ];
    let mut c = p.client.clone();
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..1000 {
        let mut cfg = Map::new();
        for _ in 0..1 + rng.next() % 4 {
            cfg.insert(rng.pick(MODULE_FIELDS).to_string(), junk(&mut rng, 0));
        }
        let config = Some(common::typed::json_to_struct(&Json::Object(cfg.clone())));
        let name = format!("n{i}");
        let (kind, type_name, error) = match i % 3 {
            0 => {
                let t = *rng.pick(&module_types);
                let r = c
                    .create_module(eventbus_plugin::pb::plugin::CreateModuleRequest {
                        r#type: t.into(),
                        name: name.clone(),
                        config,
                        typed_config: None,
                    })
                    .await
                    .expect("no transport error")
                    .into_inner();
                ("module", t, r.error)
            }
            1 => {
                let t = *rng.pick(&step_types);
                let r = c
                    .create_step(eventbus_plugin::pb::plugin::CreateStepRequest {
                        r#type: t.into(),
                        name: name.clone(),
                        config,
                        typed_config: None,
                    })
                    .await
                    .expect("no transport error")
                    .into_inner();
                ("step", t, r.error)
            }
            _ => {
                let t = "trigger.eventbus.subscribe";
                let r = c
                    .create_trigger(eventbus_plugin::pb::plugin::CreateTriggerRequest {
                        r#type: t.into(),
                        name: name.clone(),
                        config,
                    })
                    .await
                    .expect("no transport error")
                    .into_inner();
                ("trigger", t, r.error)
            }
        };
        if error.is_empty() {
            accepted += 1;
            continue;
        }
        rejected += 1;
        for line in error.lines() {
            let prefix = format!("{type_name} \"{name}\": config.");
            assert!(
                line.starts_with(&prefix),
                "{kind} {cfg:?}\n-> {line:?} does not name the {kind} and a field"
            );
        }
    }
    assert!(
        rejected > 500,
        "the generator should mostly produce bad configs ({accepted} accepted)"
    );
    assert!(c.get_manifest(()).await.is_ok(), "still serving");
    assert!(!p.stderr().contains("panicked"), "{}", p.stderr());
}

#[tokio::test]
async fn secrets_never_reach_stderr_or_error_texts() {
    let server = NatsServer::builder()
        .config("authorization { token: \"tok-S3CRET-1\" }\n")
        .start();
    let p = Plugin::launch(LaunchOptions {
        env: vec![("RUST_LOG".into(), "trace".into())],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(
        &seed,
        "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    // Working token auth (a real connection, publishes succeed).
    p.module_up(
        "eventbus.broker",
        "good",
        &format!(
            "provider: nats\ndeploy_target: self_hosted\ndsn: {}\nauth: {{token: tok-S3CRET-1}}\n",
            server.url()
        ),
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "s",
        "name: S\nsubjects: ['s.>']\nbroker_ref: good\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        "subject: s.x\npayload: hi\nbroker_ref: good\n",
        &json!({}),
    )
    .await
    .unwrap();
    // Wrong credentials of every kind, with userinfo in the url too.
    for (name, yaml) in [
        (
            "pw",
            format!(
                "dsn: nats://alice:pw-S3CRET-2@127.0.0.1:{}\n",
                server.port()
            ),
        ),
        (
            "up",
            format!(
                "dsn: {}\nauth: {{user: bob, password: pw-S3CRET-3}}\n",
                server.url()
            ),
        ),
        (
            "nk",
            format!(
                "dsn: {}\nauth: {{nkey_seed_file: {}}}\n",
                server.url(),
                seed.display()
            ),
        ),
        ("bad", "dsn: 'nats://carol:pw-S3CRET-4@[::1'\n".to_string()),
    ] {
        let yaml =
            format!("provider: nats\ndeploy_target: self_hosted\n{yaml}request_timeout: 1s\n");
        match p.create_module("eventbus.broker", name, &yaml).await {
            Err(e) => errors.push(e),
            Ok(hd) => {
                p.lifecycle("init", &hd).await.unwrap();
                if let Err(e) = p.lifecycle("start", &hd).await {
                    errors.push(e);
                }
                let e = p
                    .execute(
                        "step.eventbus.publish",
                        &h,
                        &format!("subject: s.x\npayload: x\nbroker_ref: {name}\ntimeout: 1s\n"),
                        &json!({}),
                    )
                    .await
                    .unwrap_err();
                errors.push(e);
            }
        }
    }
    let stderr = p.stderr();
    for secret in [
        "S3CRET",
        "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY",
    ] {
        assert!(
            !stderr.contains(secret),
            "secret {secret} in stderr:\n{stderr}"
        );
        for e in &errors {
            assert!(!e.contains(secret), "secret {secret} in error: {e}");
        }
    }
    assert!(errors.len() >= 4, "{errors:?}");
}

/// A plugin killed with SIGKILL mid-delivery: its unacked messages go to the next process.
#[tokio::test]
async fn kill9_of_the_plugin_mid_delivery_loses_nothing() {
    let server = NatsServer::start();
    let env = vec![("NATS_URL".to_string(), server.url())];
    let stuck: PipelineFn =
        Arc::new(|_| Box::pin(async { futures::future::pending::<Result<(), String>>().await }));
    let mut first = Plugin::launch(LaunchOptions {
        env: env.clone(),
        callback: Some(stuck),
        ..Default::default()
    })
    .await;
    let up = |p: &'_ Plugin| {
        let p = p as *const Plugin;
        async move {
            let p = unsafe { &*p };
            p.module_up(
                "eventbus.broker",
                "bus",
                "provider: nats\ndeploy_target: self_hosted\n",
            )
            .await;
            p.module_up("eventbus.stream", "s", "name: JOBS\nsubjects: ['jobs.>']\n")
                .await;
            p.module_up(
                "eventbus.consumer",
                "c",
                "name: runner\nstream_name: JOBS\nack_wait: 1s\n",
            )
            .await;
            let t = p
                .create_trigger(
                    "pipeline:run",
                    &json!({"name": "runner", "max_in_flight": 8}),
                )
                .await
                .unwrap();
            p.lifecycle("start", &t).await.unwrap();
        }
    };
    up(&first).await;
    let h = first
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    for i in 0..5 {
        first
            .execute(
                "step.eventbus.publish",
                &h,
                &format!("subject: jobs.j\npayload: job-{i}\n"),
                &json!({}),
            )
            .await
            .unwrap();
    }
    for _ in 0..5 {
        first.next_call(Duration::from_secs(10)).await;
    }
    unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) };
    let _ = first.child.wait();

    let mut second = Plugin::launch(LaunchOptions {
        env,
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    up(&second).await;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 5 && Instant::now() < deadline {
        let call = second.next_call(Duration::from_secs(20)).await;
        let text = call
            .data
            .unwrap()
            .fields
            .get("text")
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        seen.insert(text.unwrap_or_default());
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}

/// A partition (SIGSTOP on the server): steps fail within their timeout, then recover.
#[tokio::test]
async fn paused_broker_fails_fast_then_recovers() {
    let server = NatsServer::start();
    let p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        ..Default::default()
    })
    .await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up("eventbus.stream", "s", "name: P\nsubjects: ['p.>']\n")
        .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        "subject: p.x\npayload: a\n",
        &json!({}),
    )
    .await
    .unwrap();
    server.pause();
    let t = Instant::now();
    let e = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: p.x\npayload: b\ntimeout: 1s\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(e.contains("step.eventbus.publish \"pub\""), "{e}");
    server.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match p
            .execute(
                "step.eventbus.publish",
                &h,
                "subject: p.x\npayload: c\ntimeout: 2s\n",
                &json!({}),
            )
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// SIGKILL of nats-server during 10k publishes, then a restart: every publish that returned a
/// sequence is in the stream, and no publish took longer than its timeout (plus slack).
#[tokio::test]
async fn kill9_of_the_broker_during_10k_publishes_loses_no_acknowledged_message() {
    let mut server = NatsServer::start();
    let p = Arc::new(
        Plugin::launch(LaunchOptions {
            env: vec![("NATS_URL".into(), server.url())],
            ..Default::default()
        })
        .await,
    );
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up("eventbus.stream", "s", "name: KILL\nsubjects: ['kill.>']\n")
        .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    const N: usize = 10_000;
    const WORKERS: usize = 32;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(usize, u64)>::new()));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (p, h, next, acked, slowest) = (
            p.clone(),
            h.clone(),
            next.clone(),
            acked.clone(),
            slowest.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= N {
                    break;
                }
                let t = Instant::now();
                let r = p
                    .execute(
                        "step.eventbus.publish",
                        &h,
                        &format!("subject: kill.m\npayload: m{i}\nmessage_id: m{i}\ntimeout: 2s\n"),
                        &json!({}),
                    )
                    .await;
                let took = t.elapsed();
                let mut s = slowest.lock().unwrap();
                *s = (*s).max(took);
                if let Ok(out) = r {
                    acked
                        .lock()
                        .unwrap()
                        .push((i, out["sequence"].as_str().unwrap().parse().unwrap()));
                }
            }
        }));
    }
    // Kill once a third of the publishes are acknowledged, restart shortly after.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < N / 3 {
        assert!(
            Instant::now() < deadline,
            "publishing stalled before the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start_again();
    for t in tasks {
        t.await.unwrap();
    }
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(4),
        "a publish took {slowest:?} (timeout 2s)"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > N / 3,
        "publishing resumed after the restart ({} acked)",
        acked.len()
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("KILL").await.unwrap();
    for (i, seq) in &acked {
        let m = stream
            .get_raw_message(*seq)
            .await
            .unwrap_or_else(|e| panic!("acknowledged seq {seq} (m{i}) lost: {e}"));
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes(), "seq {seq}");
    }
    eprintln!(
        "acknowledged {} of {N}, slowest publish {slowest:?}",
        acked.len()
    );
}
