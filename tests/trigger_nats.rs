//! The subscribe trigger under failure: redelivery with growing delays, dead-lettering,
//! bounded concurrency, long pipelines past ack_wait, broker restarts, manual acks, filters.

mod common;

use common::*;
use nats_test_server::NatsServer;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn text_of(call: &eventbus_plugin::pb::plugin::TriggerWorkflowRequest, key: &str) -> String {
    match call
        .data
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        Some(prost_types::value::Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
    }
}

async fn setup(p: &Plugin, consumer_extra: &str) {
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "jobs",
        "name: JOBS\nsubjects: ['jobs.>']\n",
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "runner",
        &format!("name: runner\nstream_name: JOBS\n{consumer_extra}"),
    )
    .await;
}

async fn publish(p: &Plugin, subject: &str, payload: &str) {
    let h = p
        .create_step(
            "step.eventbus.publish",
            &format!("pub-{subject}-{payload}"),
            "",
        )
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        &format!("subject: {subject}\npayload: {payload}\n"),
        &json!({}),
    )
    .await
    .unwrap();
}

/// Pitfall: retry storms. A failing pipeline is nak'ed with growing delays, then dead-lettered
/// and terminated after max_deliver, while other messages keep flowing.
#[tokio::test]
async fn failing_pipeline_backs_off_then_dead_letters_without_blocking_others() {
    let server = NatsServer::start();
    let pipeline: PipelineFn = Arc::new(|req| {
        Box::pin(async move {
            let bad = req.data.as_ref().and_then(|d| d.fields.get("text")).is_some_and(|v| {
                matches!(&v.kind, Some(prost_types::value::Kind::StringValue(s)) if s == "poison")
            });
            if bad {
                Err("boom".to_string())
            } else {
                Ok(())
            }
        })
    });
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    setup(&p, "max_deliver: 3\n").await;
    p.module_up(
        "eventbus.stream",
        "dlq",
        "name: DLQ\nsubjects: ['dead.>']\n",
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "dlqc",
        "name: dlqc\nstream_name: DLQ\n",
    )
    .await;
    let t = p
        .create_trigger(
            "pipeline:jobs",
            &json!({"name": "runner", "nak_delay": "0.3s", "dead_letter_subject": "dead.jobs"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    publish(&p, "jobs.a", "poison").await;
    publish(&p, "jobs.b", "fine").await;
    let mut poison_at = Vec::new();
    let mut fine = 0;
    let deadline = Instant::now() + T;
    while poison_at.len() < 3 && Instant::now() < deadline {
        let call = p.next_call(T).await;
        match text_of(&call, "text").as_str() {
            "poison" => poison_at.push((Instant::now(), text_of(&call, "delivery_count"))),
            _ => fine += 1,
        }
    }
    assert_eq!(
        fine, 1,
        "the good message was not blocked behind the poison one"
    );
    assert_eq!(
        poison_at
            .iter()
            .map(|(_, d)| d.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    let gap1 = poison_at[1].0 - poison_at[0].0;
    let gap2 = poison_at[2].0 - poison_at[1].0;
    assert!(gap1 >= Duration::from_millis(250), "{gap1:?}");
    assert!(gap2 > gap1, "delays grow: {gap1:?} then {gap2:?}");
    // Parked in the dead-letter stream with its provenance, and never delivered again.
    let c = p
        .create_step("step.eventbus.consume", "dl", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &c,
            "consumer: dlqc\nmax_wait: 3s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let m = &out["messages"][0];
    assert_eq!(m["text"], "poison", "{out}");
    assert_eq!(m["headers"]["Eventbus-Original-Subject"], "jobs.a");
    assert_eq!(m["headers"]["Eventbus-Delivery-Count"], "3");
    let rx = p.calls.as_mut().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "terminated, not redelivered"
    );
}

/// At most max_in_flight pipelines at once, and every message ends with exactly one ack.
#[tokio::test]
async fn max_in_flight_bounds_concurrency_and_every_message_is_acked_once() {
    let server = NatsServer::start();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, p2) = (now.clone(), peak.clone());
    let pipeline: PipelineFn = Arc::new(move |_| {
        let (now, peak) = (n2.clone(), p2.clone());
        Box::pin(async move {
            let c = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
    });
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    setup(&p, "").await;
    let t = p
        .create_trigger(
            "pipeline:jobs",
            &json!({"name": "runner", "max_in_flight": 4}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for i in 0..40 {
        js.publish("jobs.x", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for _ in 0..40 {
        p.next_call(T).await;
    }
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .get_consumer("runner")
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            assert_eq!(info.delivered.stream_sequence, 40);
            assert_eq!(info.ack_floor.stream_sequence, 40, "all acked");
            break;
        }
        assert!(Instant::now() < deadline, "acks missing: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "peak concurrency {peak}");
    let rx = p.calls.as_mut().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "no message ran twice"
    );
}

/// Pitfall: ack_wait expiry. A pipeline longer than ack_wait runs once (in-progress acks).
#[tokio::test]
async fn pipeline_longer_than_ack_wait_runs_once() {
    let server = NatsServer::start();
    let pipeline: PipelineFn = Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            Ok(())
        })
    });
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    setup(&p, "ack_wait: 1s\n").await;
    let t = p
        .create_trigger("pipeline:slow", &json!({"name": "runner"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    publish(&p, "jobs.slow", "long").await;
    p.next_call(T).await;
    let rx = p.calls.as_mut().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(4), rx.recv())
            .await
            .is_err(),
        "redelivered while still running"
    );
}

/// Pitfall: silent stall after reconnect. The trigger resumes after a restart and a lame duck.
#[tokio::test]
async fn trigger_resumes_after_restart_and_lame_duck() {
    let mut server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    setup(&p, "").await;
    let t = p
        .create_trigger("pipeline:jobs", &json!({"name": "runner"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    publish(&p, "jobs.a", "before").await;
    assert_eq!(text_of(&p.next_call(T).await, "text"), "before");
    server.restart();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("jobs.a", "after-restart".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        text_of(&p.next_call(Duration::from_secs(30)).await, "text"),
        "after-restart"
    );
    server.lame_duck();
    assert!(
        server.wait_exit(Duration::from_secs(60)),
        "lame duck ends the server"
    );
    server.start_again();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("jobs.a", "after-ldm".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        text_of(&p.next_call(Duration::from_secs(30)).await, "text"),
        "after-ldm"
    );
}

/// A declared consumer deleted behind our back is recreated and the trigger resumes.
#[tokio::test]
async fn deleted_consumer_is_recreated() {
    let server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    setup(&p, "").await;
    let t = p
        .create_trigger("pipeline:jobs", &json!({"name": "runner"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_stream("JOBS")
        .await
        .unwrap()
        .delete_consumer("runner")
        .await
        .unwrap();
    js.publish("jobs.a", "after-delete".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        text_of(&p.next_call(Duration::from_secs(30)).await, "text"),
        "after-delete"
    );
}

/// Go B13: manual ack mode leaves the ack to the pipeline; without it the message returns.
/// Go B12: a trigger's filter_subject applies to the consumer it creates.
#[tokio::test]
async fn b12_b13_filter_applies_and_manual_mode_does_not_auto_ack() {
    let server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "jobs",
        "name: JOBS\nsubjects: ['jobs.>']\n",
    )
    .await;
    let t = p
        .create_trigger("pipeline:only-b", &json!({"name": "onlyb", "stream_name": "JOBS", "filter_subject": "jobs.b", "ack_mode": "manual"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .get_consumer("onlyb")
        .await
        .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().config.filter_subject,
        "jobs.b"
    );
    publish(&p, "jobs.a", "not-me").await;
    publish(&p, "jobs.b", "me").await;
    let call = p.next_call(T).await;
    assert_eq!(text_of(&call, "text"), "me");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.num_ack_pending, 1,
        "manual mode: the pipeline owns the ack"
    );
    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    p.execute(
        "step.eventbus.ack",
        &ack,
        "",
        &json!({"ack_token": text_of(&call, "ack_token")}),
    )
    .await
    .unwrap();
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 0);
}

/// With max_in_flight 1 messages keep flowing one after another (a pull batch of 1 used to
/// stall for the pull expiry between messages).
#[tokio::test]
async fn max_in_flight_one_does_not_stall_between_messages() {
    let server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    setup(&p, "").await;
    let t = p
        .create_trigger(
            "pipeline:serial",
            &json!({"name": "runner", "max_in_flight": 1}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for i in 0..20 {
        js.publish("jobs.s", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for i in 0..20 {
        let call = p.next_call(Duration::from_secs(3)).await;
        assert_eq!(
            text_of(&call, "text"),
            format!("m{i}"),
            "in order, no stall"
        );
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Pitfall: a 60 s broker outage. Memory stays bounded, the trigger's error log is rate-limited
/// instead of flooding stderr, and delivery resumes when the broker returns.
#[tokio::test]
async fn sixty_second_outage_keeps_memory_and_logs_bounded() {
    let mut server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    setup(&p, "").await;
    let t = p
        .create_trigger("pipeline:outage", &json!({"name": "runner"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    publish(&p, "jobs.a", "before").await;
    p.next_call(T).await;
    let pid = p.child.id();
    let rss_before = rss_kib(pid);
    let lines_before = p.stderr().lines().count();
    server.kill9();
    let mut rss_max = rss_before;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await; // sampling interval, not synchronisation
        rss_max = rss_max.max(rss_kib(pid));
    }
    server.start_again();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("jobs.a", "after-outage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        text_of(&p.next_call(Duration::from_secs(30)).await, "text"),
        "after-outage"
    );
    let logged = p.stderr().lines().count() - lines_before;
    assert!(
        logged < 40,
        "{logged} stderr lines during a 60 s outage:\n{}",
        p.stderr()
    );
    assert!(
        rss_max < 64 * 1024,
        "RSS grew to {rss_max} KiB (from {rss_before})"
    );
    eprintln!("outage: {logged} log lines, RSS {rss_before} -> max {rss_max} KiB");
}
