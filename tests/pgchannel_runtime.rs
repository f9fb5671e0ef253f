//! Provider pgchannel through the real binary and the test host, against a real PostgreSQL
//! started per test (crates/pg-test-server): publish / consume / ack through the steps, the
//! subscribe trigger (id order with max_in_flight 1, dead-letter after max_deliver), two plugin
//! processes on one consumer, a plugin killed mid-delivery, a Postgres restart, and the config
//! errors a user meets first. Waits are on events (TriggerWorkflow calls, rows in the database)
//! bounded by deadlines; sleeps only create the condition under test.

mod common;

use common::*;
use pg_test_server::PgServer;
use prost_types::value::Kind;
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

type Call = eventbus_plugin::pb::plugin::TriggerWorkflowRequest;

fn text_of(call: &Call, key: &str) -> String {
    match call
        .data
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::StringValue(s)) => s,
        Some(Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
    }
}

async fn launch(pg: &PgServer, callback: Option<PipelineFn>) -> Plugin {
    Plugin::launch(LaunchOptions {
        // Through the env var (the Go provider read none for pgchannel: B20).
        env: vec![("EVENTBUS_PGBUS_URI".into(), pg.url())],
        callback,
        ..Default::default()
    })
    .await
}

/// Broker `pgbus`, stream JOBS (`jobs.>`), stream DEAD (`dead.>`) and the declared consumer
/// `runner` (plus `consumer_extra` YAML).
async fn setup(p: &Plugin, consumer_extra: &str) {
    p.module_up(
        "eventbus.broker",
        "pgbus",
        "provider: pgchannel\nbroker_target: in_process\npoll_interval: 200ms\nmax_conns: 8\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "jobs",
        "name: JOBS\nsubjects: ['jobs.>']\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "dead",
        "name: DEAD\nsubjects: ['dead.>']\n",
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "runner",
        &format!("name: runner\nstream_name: JOBS\n{consumer_extra}"),
    )
    .await;
}

async fn publish(p: &Plugin, subject: &str, payload: &str) -> Result<Json, String> {
    let h = p
        .create_step("step.eventbus.publish", &format!("pub-{subject}"), "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        &format!("subject: {subject}\npayload: '{payload}'\n"),
        &json!({}),
    )
    .await
}

async fn start_trigger(p: &Plugin, workflow_type: &str, config: Json) -> String {
    let t = p.create_trigger(workflow_type, &config).await.unwrap();
    p.lifecycle("start", &t).await.unwrap();
    t
}

/// Polls a SQL scalar (there is no event for "the row reached this state"), bounded.
fn wait_sql(pg: &PgServer, sql: &str, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let got = pg.psql(sql).trim().to_string();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} gave {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn publish_consume_ack_through_steps() {
    // Password auth over TCP, so "never logged" has something to hide.
    let pg = PgServer::builder().password("s3cret-pw").start();
    let p = launch(&pg, None).await;
    setup(&p, "").await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: jobs.a\npayload: '{\"id\": 7}'\ncorrelation_id: c-1\nheaders: {x-k: v}\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["stream"], "JOBS", "{out}");
    let seq = out["sequence"].as_str().unwrap().to_string();
    assert!(seq.parse::<i64>().unwrap() > 0, "{out}");
    assert!(out["acked_at"].as_str().unwrap().ends_with('Z'), "{out}");
    // The row is where the Go plugin keeps it: correlation id in its own column.
    assert_eq!(
        pg.psql(&format!(
            "select stream_name || '|' || subject || '|' || correlation_id from eventbus_events where id = {seq}"
        ))
        .trim(),
        "JOBS|jobs.a|c-1"
    );
    publish(&p, "jobs.b", "two").await.unwrap();

    let consume = p
        .create_step("step.eventbus.consume", "get", "consumer: runner\n")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: runner\nbatch_size: 10\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let msgs = out["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2, "{out}");
    assert_eq!(msgs[0]["subject"], "jobs.a");
    assert_eq!(msgs[0]["json"], json!({"id": 7.0}));
    assert_eq!(msgs[0]["headers"]["x-k"], "v");
    // Both providers' header names, so pipelines written for either keep working.
    assert_eq!(msgs[0]["headers"]["Nats-Correlation-Id"], "c-1");
    assert_eq!(msgs[0]["headers"]["X-Correlation-Id"], "c-1");
    assert_eq!(msgs[0]["sequence"], json!(seq));
    assert_eq!(msgs[0]["ack_token"], json!(format!("JOBS:runner:{seq}")));
    assert_eq!(msgs[1]["text"], "two");

    // A second consumer call while both are leased gets nothing (no double delivery).
    let t = Instant::now();
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: runner\nbatch_size: 10\nmax_wait: 0.3s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert!(out.get("messages").is_none(), "{out}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    for m in &msgs {
        let out = p.execute("step.eventbus.ack", &ack, "", m).await.unwrap();
        assert_eq!(out["action"], "ack", "{out}");
    }
    // A malformed token is one clear line with the Go provider's wording.
    let e = p
        .execute(
            "step.eventbus.ack",
            &ack,
            "ack_token: 'JOBS:runner'\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("step.eventbus.ack \"ack\""), "{e}");
    assert!(e.contains("malformed ackToken"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // Issue 19 finding 11: a 100 KB token was echoed whole; what is quoted is capped.
    let huge = format!("JOBS:runner:{}x", "9".repeat(100_000));
    let e = p
        .execute("step.eventbus.ack", &ack, "", &json!({ "ack_token": huge }))
        .await
        .unwrap_err();
    assert!(e.contains("malformed ackToken \"JOBS:runner:999"), "{e}");
    assert!(e.len() < 1000, "{} bytes of error", e.len());
    assert_eq!(e.lines().count(), 1);
    // Bulk publish: one result per message, in order.
    let out = p
        .execute(
            "step.eventbus.publish",
            &h,
            "messages:\n  - {subject: jobs.c, payload: x}\n  - {subject: jobs.d, payload: y}\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["published"], 2, "{out}");
    let r = out["results"].as_array().unwrap();
    assert!(
        r[0]["sequence"].as_str().unwrap().parse::<i64>().unwrap()
            < r[1]["sequence"].as_str().unwrap().parse::<i64>().unwrap(),
        "{out}"
    );
    // The consumer resumes after the acked rows.
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: runner\nbatch_size: 10\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let subjects: Vec<&str> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["jobs.c", "jobs.d"], "{out}");
    // Nak with a delay: the first message comes back once the delay has passed, with its
    // delivery count raised; the other is acked.
    let msgs = out["messages"].as_array().unwrap().clone();
    let nak = p
        .create_step(
            "step.eventbus.ack",
            "nak",
            "action: ACK_ACTION_NAK\nnak_delay: 0.3s\n",
        )
        .await
        .unwrap();
    let o = p
        .execute(
            "step.eventbus.ack",
            &nak,
            "action: ACK_ACTION_NAK\nnak_delay: 0.3s\n",
            &msgs[0],
        )
        .await
        .unwrap();
    assert_eq!(o["action"], "nak", "{o}");
    p.execute("step.eventbus.ack", &ack, "", &msgs[1])
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    let again = loop {
        let out = p
            .execute(
                "step.eventbus.consume",
                &consume,
                "consumer: runner\nbatch_size: 10\nmax_wait: 1s\n",
                &json!({}),
            )
            .await
            .unwrap();
        if out["messages"].as_array().is_some_and(|a| !a.is_empty()) {
            break out.clone();
        }
        assert!(Instant::now() < deadline, "naked message never came back");
    };
    let m = &again["messages"][0];
    assert_eq!(m["subject"], "jobs.c", "{again}");
    assert_eq!(m["delivery_count"], 2, "{again}");
    assert_eq!(again["count"], 1, "{again}");
    // Bulk ack of the consume output.
    let out = p
        .execute("step.eventbus.ack", &ack, "", &again)
        .await
        .unwrap();
    assert_eq!(out["acked"], 1, "{out}");
    let log = p.stderr();
    assert!(log.contains("connecting to PostgreSQL"), "{log}");
    assert!(!log.contains("s3cret-pw"), "password logged: {log}");
}

#[tokio::test]
async fn bad_poll_interval_is_one_clear_line() {
    let pg = PgServer::start();
    let p = launch(&pg, None).await;
    let e = p
        .create_module(
            "eventbus.broker",
            "pgbus",
            "provider: pgchannel\npoll_interval: fast\n",
        )
        .await
        .unwrap_err();
    assert_eq!(
        e,
        "eventbus.broker \"pgbus\": config.poll_interval: \"fast\" is not a positive duration such as \"500ms\", \"1s\" or \"1m30s\" (at most 1h)"
    );
    let e = p
        .create_module(
            "eventbus.broker",
            "pgbus2",
            "provider: pgchannel\ndsn: 'postgres://u:hunter2@127.0.0.1:1/x'\nbroker_target: remote\n",
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("pgchannel requires broker_target=in_process (got \"remote\")"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    // Batch delivery runs on pgchannel through the shared loop (tests/provider_contract.rs
    // delivers batches on a real PostgreSQL): Start accepts it.
    setup(&p, "").await;
    let t = p
        .create_trigger("orders", &json!({"name": "runner", "deliver": "batch"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
}

/// Host pipeline that records each call's sequence and succeeds.
fn recording(seen: Arc<std::sync::Mutex<Vec<i64>>>) -> PipelineFn {
    Arc::new(move |call: Call| {
        let seen = seen.clone();
        Box::pin(async move {
            let seq = text_of(&call, "sequence").parse::<i64>().unwrap_or(-1);
            seen.lock().unwrap().push(seq);
            Ok(())
        })
    })
}

#[tokio::test]
async fn trigger_with_max_in_flight_1_delivers_in_id_order() {
    let pg = PgServer::start();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut p = launch(&pg, Some(recording(seen.clone()))).await;
    setup(&p, "").await;
    for i in 0..30 {
        publish(&p, "jobs.o", &format!("m{i}")).await.unwrap();
    }
    start_trigger(&p, "orders", json!({"name": "runner", "max_in_flight": 1})).await;
    for _ in 0..30 {
        p.next_call(T).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 30);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    wait_sql(
        &pg,
        "select count(*) from eventbus_events e where stream_name = 'JOBS' and e.id > (select position from eventbus_consumers where name = 'runner')",
        "0",
    );
}

#[tokio::test]
async fn failing_pipeline_dead_letters_after_max_deliver() {
    let pg = PgServer::start();
    let fail: PipelineFn = Arc::new(|call: Call| {
        Box::pin(async move {
            if text_of(&call, "subject") == "jobs.bad" {
                Err("boom".to_string())
            } else {
                Ok(())
            }
        })
    });
    let mut p = launch(&pg, Some(fail)).await;
    setup(&p, "max_deliver: 3\n").await;
    p.module_up(
        "eventbus.consumer",
        "deadreader",
        "name: deadreader\nstream_name: DEAD\n",
    )
    .await;
    publish(&p, "jobs.bad", "poison").await.unwrap();
    publish(&p, "jobs.good", "fine").await.unwrap();
    start_trigger(
        &p,
        "orders",
        json!({"name": "runner", "nak_delay": "0.1s", "dead_letter_subject": "dead.jobs"}),
    )
    .await;
    let mut bad = 0;
    let mut good = 0;
    let deadline = Instant::now() + T;
    while bad < 3 || good < 1 {
        assert!(Instant::now() < deadline, "bad {bad} good {good}");
        let c = p.next_call(T).await;
        match text_of(&c, "subject").as_str() {
            "jobs.bad" => bad += 1,
            "jobs.good" => good += 1,
            s => panic!("unexpected {s}"),
        }
    }
    // The dead letter lands with the reason and the original coordinates.
    let consume = p
        .create_step("step.eventbus.consume", "dlq", "consumer: deadreader\n")
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    let msg = loop {
        let out = p
            .execute(
                "step.eventbus.consume",
                &consume,
                "consumer: deadreader\nmax_wait: 1s\n",
                &json!({}),
            )
            .await
            .unwrap();
        if let Some(m) = out["messages"].as_array().and_then(|a| a.first()) {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "no dead letter");
    };
    assert_eq!(msg["subject"], "dead.jobs");
    assert_eq!(msg["text"], "poison");
    assert_eq!(msg["headers"]["Eventbus-Original-Subject"], "jobs.bad");
    assert_eq!(msg["headers"]["Eventbus-Delivery-Count"], "3");
    assert!(
        msg["headers"]["Eventbus-Error"]
            .as_str()
            .unwrap()
            .contains("boom"),
        "{msg}"
    );
    // No fourth attempt.
    let extra = tokio::time::timeout(Duration::from_secs(1), p.next_call(T)).await;
    assert!(extra.is_err(), "delivered again after dead-letter");
}

#[tokio::test]
async fn two_processes_on_one_consumer_deliver_each_message_once() {
    let pg = PgServer::start();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = launch(&pg, Some(recording(seen.clone()))).await;
    let b = launch(&pg, Some(recording(seen.clone()))).await;
    setup(&a, "").await;
    setup(&b, "").await;
    start_trigger(&a, "orders", json!({"name": "runner", "max_in_flight": 4})).await;
    start_trigger(&b, "orders", json!({"name": "runner", "max_in_flight": 4})).await;
    let mut want = BTreeSet::new();
    for i in 0..60 {
        let p = if i % 2 == 0 { &a } else { &b };
        let out = publish(p, "jobs.x", &format!("m{i}")).await.unwrap();
        want.insert(out["sequence"].as_str().unwrap().parse::<i64>().unwrap());
    }
    let deadline = Instant::now() + T;
    loop {
        let got: BTreeSet<i64> = seen.lock().unwrap().iter().copied().collect();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {:?}",
            want.difference(&got).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_sql(
        &pg,
        "select count(*) from eventbus_events e where stream_name = 'JOBS' and e.id > (select position from eventbus_consumers where name = 'runner')",
        "0",
    );
    let all = seen.lock().unwrap().clone();
    assert_eq!(
        all.len(),
        want.len(),
        "a message was delivered twice: {all:?}"
    );
}

#[tokio::test]
async fn kill9_of_a_plugin_mid_delivery_loses_nothing() {
    let pg = PgServer::start();
    // Process A's pipeline never finishes: the message is leased to A when A dies.
    let entered = Arc::new(AtomicBool::new(false));
    let e2 = entered.clone();
    let hang: PipelineFn = Arc::new(move |_call: Call| {
        e2.store(true, Ordering::SeqCst);
        Box::pin(std::future::pending())
    });
    let mut a = launch(&pg, Some(hang)).await;
    setup(&a, "ack_wait: 2s\n").await;
    start_trigger(&a, "orders", json!({"name": "runner", "max_in_flight": 1})).await;
    let mut want = BTreeSet::new();
    for i in 0..5 {
        let out = publish(&a, "jobs.k", &format!("m{i}")).await.unwrap();
        want.insert(out["sequence"].as_str().unwrap().parse::<i64>().unwrap());
    }
    a.next_call(T).await;
    assert!(entered.load(Ordering::SeqCst));
    a.child.kill().unwrap(); // SIGKILL
    let _ = a.child.wait();

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = launch(&pg, Some(recording(seen.clone()))).await;
    setup(&b, "ack_wait: 2s\n").await;
    start_trigger(&b, "orders", json!({"name": "runner", "max_in_flight": 1})).await;
    let deadline = Instant::now() + T;
    loop {
        let got: BTreeSet<i64> = seen.lock().unwrap().iter().copied().collect();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost {:?}; stderr: {}",
            want.difference(&got).collect::<Vec<_>>(),
            b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn postgres_restart_is_survived_by_publishers_and_the_trigger() {
    let mut pg = PgServer::start();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut p = launch(&pg, Some(recording(seen.clone()))).await;
    setup(&p, "").await;
    start_trigger(&p, "orders", json!({"name": "runner"})).await;
    publish(&p, "jobs.r", "before").await.unwrap();
    p.next_call(T).await;

    pg.restart();

    // The first publish may meet a pooled connection the restart cut; a bounded number of
    // retries must get through, and nothing acknowledged is lost.
    let deadline = Instant::now() + T;
    let failures = AtomicUsize::new(0);
    let seq = loop {
        match publish(&p, "jobs.r", "after").await {
            Ok(out) => break out["sequence"].as_str().unwrap().parse::<i64>().unwrap(),
            Err(e) => {
                failures.fetch_add(1, Ordering::SeqCst);
                assert!(e.contains("step.eventbus.publish"), "{e}");
                assert!(Instant::now() < deadline, "publish never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let deadline = Instant::now() + T;
    while !seen.lock().unwrap().contains(&seq) {
        assert!(
            Instant::now() < deadline,
            "trigger did not resume after the restart; stderr: {}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures.load(Ordering::SeqCst) < 50);
}

#[tokio::test]
async fn jetstream_only_stream_and_consumer_settings_are_refused_at_start() {
    let pg = PgServer::start();
    let p = launch(&pg, None).await;
    p.module_up(
        "eventbus.broker",
        "pgbus",
        "provider: pgchannel\nbroker_target: in_process\n",
    )
    .await;
    let s = p
        .create_module(
            "eventbus.stream",
            "orders",
            "name: ORDERS\nsubjects: ['orders.>']\nallow_direct: true\nmetadata: {team: a}\n",
        )
        .await
        .unwrap();
    p.lifecycle("init", &s).await.unwrap();
    let e = p.lifecycle("start", &s).await.unwrap_err();
    for key in ["allow_direct", "metadata"] {
        // The plan's words (crate::pg::spec is the one conversion for wfctl and the engine).
        let line = format!("eventbus.stream \"orders\": config.{key}: is a NATS JetStream setting; pgchannel has no equivalent (remove it)");
        assert!(e.contains(&line), "{line} missing in: {e}");
    }
}

#[tokio::test]
async fn buckets_and_object_stores_are_refused_in_one_line() {
    let pg = PgServer::start();
    let p = launch(&pg, None).await;
    p.module_up(
        "eventbus.broker",
        "pgbus",
        "provider: pgchannel\nbroker_target: in_process\n",
    )
    .await;
    for (module, what) in [
        ("eventbus.kv", "key-value buckets"),
        ("eventbus.object_store", "object stores"),
    ] {
        let m = p
            .create_module(module, "files", "bucket: files\n")
            .await
            .unwrap();
        p.lifecycle("init", &m).await.unwrap();
        let e = p.lifecycle("start", &m).await.unwrap_err();
        let line = format!("which has no {what}; {module} needs a NATS broker");
        assert!(
            e.contains(&line) && e.contains("pgchannel") && !e.contains('\n'),
            "{e}"
        );
        p.lifecycle("destroy", &m).await.unwrap();
    }
    for (step, cfg, what) in [
        (
            "step.eventbus.kv",
            "bucket: files\naction: get\nkey: k\n",
            "key-value buckets",
        ),
        (
            "step.eventbus.object",
            "bucket: files\naction: get\nname: k\n",
            "object stores",
        ),
    ] {
        let h = p.create_step(step, "s", "").await.unwrap();
        let e = p.execute(step, &h, cfg, &json!({})).await.unwrap_err();
        let line = format!("which has no {what}; {step} needs a NATS broker");
        assert!(e.contains(&line) && !e.contains('\n'), "{e}");
    }
}
