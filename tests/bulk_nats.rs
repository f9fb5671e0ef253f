//! Issue 13 against a real nats-server through the real binary and the test host: bulk publish
//! (`messages`), bulk ack (`ack_tokens`, or a consume step's output fed straight in) and the
//! trigger's `deliver: batch`, each with partial failures: one bad subject in a list of 100, a
//! duplicate message id, a wrong ack token among good ones, a batch whose pipeline fails and a
//! pipeline that marks one message of its batch failed. Waits are on events (the host's
//! TriggerWorkflow channel, server state), bounded.

mod common;

use async_nats::jetstream::{self, consumer};
use common::*;
use nats_test_server::NatsServer;
use prost_types::value::Kind;
use serde_json::{json, Value as Json};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(20);

type Call = eventbus_plugin::pb::plugin::TriggerWorkflowRequest;

async fn launch(server: &NatsServer, callback: Option<PipelineFn>) -> Plugin {
    Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback,
        ..Default::default()
    })
    .await
}

/// Broker `bus`, stream JOBS (`jobs.>`) and the declared durable `runner`.
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
        "name: JOBS\nsubjects: ['jobs.>']\nduplicate_window: 60s\n",
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "runner",
        &format!(
            "name: runner\nstream_name: JOBS\nack_policy: ACK_POLICY_EXPLICIT\n{consumer_extra}"
        ),
    )
    .await;
}

async fn js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

async fn consumer_info(js: &jetstream::Context, durable: &str) -> consumer::Info {
    js.get_stream("JOBS")
        .await
        .unwrap()
        .consumer_info(durable)
        .await
        .unwrap()
}

/// Polls consumer info (there is no event for server-side ack state) until `ok`, bounded.
async fn wait_consumer(
    js: &jetstream::Context,
    durable: &str,
    ok: impl Fn(&consumer::Info) -> bool,
) -> consumer::Info {
    let deadline = Instant::now() + T;
    loop {
        let info = consumer_info(js, durable).await;
        if ok(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "consumer {durable} never reached the expected state: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settled(info: &consumer::Info) -> bool {
    info.num_ack_pending == 0 && info.num_pending == 0
}

async fn js_publish(js: &jetstream::Context, subject: &str, payload: &str) {
    js.publish(subject.to_string(), payload.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

// ---------------------------------------------------------------- bulk publish

/// One bad subject among 100 messages: 99 are stored, in order, and the result of the bad one
/// names its subject; by default (fail_on: any) the step fails naming that message, with
/// fail_on: none it succeeds and the results say which failed.
#[tokio::test]
async fn bulk_publish_one_bad_subject_in_a_list_of_100() {
    let server = NatsServer::start();
    let p = launch(&server, None).await;
    setup(&p, "").await;
    let step = p
        .create_step(
            "step.eventbus.publish",
            "fanout",
            "subject: jobs.items\nfail_on: none\n",
        )
        .await
        .unwrap();
    let messages: Vec<Json> = (0..100)
        .map(|i| {
            if i == 37 {
                json!({"subject": "jobs.bad subject", "payload": {"i": i}})
            } else {
                json!({"payload": {"i": i}, "headers": {"x-i": i.to_string()}})
            }
        })
        .collect();
    let out = p
        .execute(
            "step.eventbus.publish",
            &step,
            "subject: jobs.items\nfail_on: none\nheaders: {x-step: s}\n",
            &json!({"publish_messages": messages}),
        )
        .await
        .unwrap();
    assert_eq!(out["published"], 99, "{out}");
    assert_eq!(out["failed"], 1, "{out}");
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    let mut last_seq = 0u64;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"].as_i64().unwrap_or(0), i as i64, "{r}");
        if i == 37 {
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("subject") && e.contains("bad subject"), "{e}");
            assert!(r.get("sequence").is_none(), "{r}");
            continue;
        }
        assert_eq!(r["stream"], "JOBS", "{r}");
        let seq: u64 = r["sequence"].as_str().unwrap().parse().unwrap();
        assert!(seq > last_seq, "results follow list order: {results:?}");
        last_seq = seq;
    }
    let js = js(&server).await;
    assert_eq!(stream_messages(&js, "JOBS").await, 99);
    // Step defaults and per-message fields reach the server.
    let m = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(m.subject.as_str(), "jobs.items");
    assert_eq!(&m.payload[..], br#"{"i":0}"#);
    let h = m.headers;
    assert_eq!(h.get("x-step").unwrap().as_str(), "s");
    assert_eq!(h.get("x-i").unwrap().as_str(), "0");

    // Default fail_on (any): the same list fails the step and names the message.
    let strict = p
        .create_step("step.eventbus.publish", "strict", "subject: jobs.items\n")
        .await
        .unwrap();
    let err = p
        .execute(
            "step.eventbus.publish",
            &strict,
            "subject: jobs.items\n",
            &json!({"publish_messages": messages}),
        )
        .await
        .unwrap_err();
    assert!(
        err.starts_with("step.eventbus.publish \"strict\": 1 of 100 messages failed (fail_on: any): #37 subject"),
        "{err}"
    );
    // The 99 good ones were still sent: a partial failure is reported, not rolled back.
    assert_eq!(stream_messages(&js, "JOBS").await, 198);
}

/// A duplicate message id in one list: the server de-duplicates the second, which is reported
/// as `duplicate` (not an error), and the stream holds the message once.
#[tokio::test]
async fn bulk_publish_duplicate_message_id_is_reported_per_message() {
    let server = NatsServer::start();
    let p = launch(&server, None).await;
    setup(&p, "").await;
    let step = p
        .create_step("step.eventbus.publish", "ids", "subject: jobs.ids\n")
        .await
        .unwrap();
    let config = r#"
subject: jobs.ids
messages:
  - {payload: a, message_id: order-1}
  - {payload: b, message_id: order-2}
  - {payload: a-again, message_id: order-1}
  - {payload_bytes: AAEC, subject: jobs.raw, correlation_id: c-9}
"#;
    let out = p
        .execute("step.eventbus.publish", &step, config, &json!({}))
        .await
        .unwrap();
    assert_eq!(out["published"], 4, "{out}");
    assert_eq!(out["duplicates"], 1, "{out}");
    assert!(out.get("failed").is_none(), "{out}");
    let r = out["results"].as_array().unwrap();
    assert_eq!(r[2]["duplicate"], true, "{out}");
    assert_eq!(r[2]["message_id"], "order-1");
    assert_eq!(r[2]["sequence"], r[0]["sequence"], "{out}");
    let js = js(&server).await;
    assert_eq!(stream_messages(&js, "JOBS").await, 3);
    let raw = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .get_raw_message(3)
        .await
        .unwrap();
    assert_eq!(raw.subject.as_str(), "jobs.raw");
    assert_eq!(&raw.payload[..], &[0u8, 1, 2]);
    assert_eq!(
        raw.headers.get("Nats-Correlation-Id").unwrap().as_str(),
        "c-9"
    );
}

/// Bulk config problems are reported at CreateStep, one line each, naming the field.
#[tokio::test]
async fn bulk_config_errors_name_the_field() {
    let server = NatsServer::start();
    let p = launch(&server, None).await;
    let err = p
        .create_step(
            "step.eventbus.publish",
            "bad",
            "fail_on: some\nmax_in_flight: 100000\nmessage_id: x\nmessages: [{subject: ok.a}, {subject: 'no good'}]\n",
        )
        .await
        .unwrap_err();
    for want in [
        "step.eventbus.publish \"bad\": config.fail_on: \"some\" is not valid; use any",
        "config.max_in_flight: 100000 is out of range",
        "config.message_id: does not apply with messages",
        "config.messages[1].subject:",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_eq!(err.lines().count(), 4, "{err}");
    let err = p
        .create_step(
            "step.eventbus.ack",
            "bad",
            "ack_token: $JS.ACK.S.c.1.1.1.0.0\nack_tokens: [$JS.ACK.S.c.1.2.2.0.0, nope]\nfail_on: x\n",
        )
        .await
        .unwrap_err();
    for want in [
        "config.fail_on: \"x\" is not valid",
        "config.ack_tokens: set either ack_token (one message) or ack_tokens (many), not both",
        "config.ack_tokens[1]: \"nope\" is not a JetStream ack token",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let err = p
        .create_trigger(
            "pipeline:x",
            &json!({"name": "runner", "stream_name": "JOBS", "deliver": "bulk", "max_batch_wait": "2s"}),
        )
        .await
        .unwrap_err();
    assert!(
        err.contains("config.deliver: \"bulk\" is not valid; use message"),
        "{err}"
    );
    assert!(
        err.contains("config.max_batch_wait: only applies with deliver: batch"),
        "{err}"
    );
}

// ---------------------------------------------------------------- bulk ack

/// The consume step's output fed straight into the ack step acks the whole batch in one call;
/// a wrong token among good ones fails alone (the good ones are acked and confirmed).
#[tokio::test]
async fn bulk_ack_consume_output_and_a_wrong_token_among_good_ones() {
    let server = NatsServer::start();
    let p = launch(&server, None).await;
    setup(&p, "").await;
    let js = js(&server).await;
    for i in 0..20 {
        js_publish(&js, "jobs.a", &format!("m{i}")).await;
    }
    let consume = p
        .create_step("step.eventbus.consume", "get", "consumer: runner\n")
        .await
        .unwrap();
    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    let batch = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: runner\nbatch_size: 10\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(batch["count"], 10, "{batch}");
    // A single publish later in the same pipeline is not disturbed by the consumed `messages`
    // in its state (they are not a bulk publish list).
    let publish = p
        .create_step(
            "step.eventbus.publish",
            "pub",
            "subject: jobs.out
",
        )
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.publish",
            &publish,
            "subject: jobs.out
payload: one
",
            &batch,
        )
        .await
        .unwrap();
    assert_eq!(out["sequence"], "21", "{out}");
    assert!(out.get("results").is_none(), "{out}");
    // Pipeline state after the consume step is its output: no config needed.
    let out = p
        .execute("step.eventbus.ack", &ack, "", &batch)
        .await
        .unwrap();
    assert_eq!(out["acked"], 10, "{out}");
    assert_eq!(out["action"], "ack");
    wait_consumer(&js, "runner", |i| {
        i.num_ack_pending == 0 && i.ack_floor.stream_sequence == 10
    })
    .await;

    let batch = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: runner\nbatch_size: 10\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let mut tokens: Vec<Json> = batch["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ack_token"].clone())
        .collect();
    assert_eq!(tokens.len(), 10);
    // A well-formed token of a stream that does not exist (nobody answers it) and a string that
    // is no ack token at all.
    tokens.insert(3, json!("$JS.ACK.NOSUCH.runner.1.99.99.0.0"));
    tokens.insert(7, json!("orders.created"));
    let err = p
        .execute(
            "step.eventbus.ack",
            &ack,
            "",
            &json!({"ack_tokens": tokens}),
        )
        .await
        .unwrap_err();
    assert!(
        err.starts_with("step.eventbus.ack \"ack\": 2 of 12 ack tokens failed (fail_on: any): #3 "),
        "{err}"
    );
    assert!(
        err.contains("#7 ack_token \"orders.created\" is not a JetStream ack token"),
        "{err}"
    );
    // The ten good tokens were acked despite the step failing (jobs.out, seq 21, is left).
    wait_consumer(&js, "runner", |i| {
        i.num_ack_pending == 0 && i.ack_floor.stream_sequence == 20
    })
    .await;

    // fail_on: none returns per-token results instead.
    let lenient = p
        .create_step("step.eventbus.ack", "lenient", "fail_on: none\n")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.ack",
            &lenient,
            "fail_on: none\n",
            &json!({"ack_tokens": ["$JS.ACK.NOSUCH.runner.1.1.1.0.0", "x"]}),
        )
        .await
        .unwrap();
    assert_eq!(out["failed"], 2, "{out}");
    assert!(out.get("acked").is_none(), "{out}");
    let r = out["results"].as_array().unwrap();
    assert_eq!(r[1]["ack_token"], "x");
    assert!(r[0]["error"].as_str().unwrap().contains("ack"), "{out}");
}

// ---------------------------------------------------------------- trigger batch delivery

fn list_of(call: &Call) -> Vec<prost_types::Struct> {
    batch_entries(call)
}

fn field(s: &prost_types::Struct, key: &str) -> String {
    match s.fields.get(key).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        Some(Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// `deliver: batch`: runs receive up to batch_size messages with the per-message fields of
/// one-message delivery, and every message is acked once the run succeeds.
#[tokio::test]
async fn trigger_batch_delivery_groups_messages_and_acks_each() {
    let server = NatsServer::start();
    let mut p = launch(&server, Some(ok_pipeline())).await;
    setup(&p, "").await;
    let js = js(&server).await;
    for i in 0..25 {
        js_publish(&js, "jobs.a", &format!("m{i}")).await;
    }
    let t = p
        .create_trigger(
            "pipeline:batch",
            &json!({"name": "runner", "deliver": "batch", "batch_size": 10, "max_batch_wait": "300ms"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let mut seen = Vec::new();
    let num = |t: &str| t.trim_start_matches('m').parse::<u32>().unwrap();
    while seen.len() < 25 {
        let call = p.next_call(T).await;
        assert_eq!(call.trigger_type, "pipeline:batch");
        let msgs = list_of(&call);
        assert!(!msgs.is_empty() && msgs.len() <= 10, "{}", msgs.len());
        let count = call.data.as_ref().unwrap().fields.get("count").cloned();
        assert_eq!(
            count.and_then(|v| v.kind),
            Some(Kind::NumberValue(msgs.len() as f64))
        );
        let texts: Vec<String> = msgs.iter().map(|m| field(m, "text")).collect();
        assert!(
            texts.windows(2).all(|w| num(&w[1]) == num(&w[0]) + 1),
            "a batch holds consecutive messages in stream order: {texts:?}"
        );
        for m in &msgs {
            assert_eq!(field(m, "subject"), "jobs.a");
            assert!(field(m, "ack_token").starts_with("$JS.ACK.JOBS.runner."));
            assert_eq!(field(m, "delivery_count"), "1");
            assert!(
                !m.fields.contains_key("broker_ref"),
                "each entry decodes as a Message"
            );
            seen.push(field(m, "text"));
        }
    }
    // Batches run concurrently (max_in_flight), so they may arrive in any order.
    seen.sort_by_key(|t| num(t));
    let want: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want, "each message once");
    wait_consumer(&js, "runner", |i| {
        settled(i) && i.ack_floor.stream_sequence == 25
    })
    .await;
}

/// A batch whose pipeline fails: every message of it is nak'ed and redelivered, and on its
/// last delivery dead-lettered on its own.
#[tokio::test]
async fn trigger_batch_whose_pipeline_fails_naks_then_dead_letters_each_message() {
    let server = NatsServer::start();
    let pipeline: PipelineFn = Arc::new(|_| Box::pin(async { Err("batch boom".to_string()) }));
    let mut p = launch(&server, Some(pipeline)).await;
    setup(&p, "max_deliver: 2\n").await;
    p.module_up(
        "eventbus.stream",
        "dlq",
        "name: DLQ\nsubjects: ['dead.>']\n",
    )
    .await;
    let js = js(&server).await;
    for i in 0..5 {
        js_publish(&js, "jobs.a", &format!("m{i}")).await;
    }
    let t = p
        .create_trigger(
            "pipeline:batch",
            &json!({"name": "runner", "deliver": "batch", "batch_size": 5,
                    "max_batch_wait": "300ms", "nak_delay": "0.1s",
                    "dead_letter_subject": "dead.jobs"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let mut deliveries = std::collections::BTreeMap::<String, Vec<String>>::new();
    while deliveries.values().map(Vec::len).sum::<usize>() < 10 {
        for m in list_of(&p.next_call(T).await) {
            deliveries
                .entry(field(&m, "text"))
                .or_default()
                .push(field(&m, "delivery_count"));
        }
    }
    for (text, counts) in &deliveries {
        assert_eq!(counts, &["1", "2"], "{text}: {deliveries:?}");
    }
    wait_consumer(&js, "runner", settled).await;
    let deadline = Instant::now() + T;
    while stream_messages(&js, "DLQ").await < 5 {
        assert!(Instant::now() < deadline, "not all dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dl = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert!(dl
        .headers
        .get("Eventbus-Error")
        .unwrap()
        .as_str()
        .contains("batch boom"));
    assert_eq!(stream_messages(&js, "DLQ").await, 5);
}

/// A pipeline that marks one message of its batch failed (a nak through step.eventbus.ack)
/// and succeeds: the others are acked, the marked one alone goes through the trigger's failure
/// rules: redelivered, then dead-lettered on its last delivery instead of dropped.
#[tokio::test]
async fn trigger_batch_pipeline_marks_one_message_failed() {
    let server = NatsServer::start();
    let ack_with: Arc<OnceLock<(StepClient, String)>> = Arc::new(OnceLock::new());
    let (out_tx, mut outs) = mpsc::unbounded_channel::<Result<Json, String>>();
    let cell = ack_with.clone();
    let pipeline: PipelineFn = Arc::new(move |req| {
        let (cell, out_tx) = (cell.clone(), out_tx.clone());
        Box::pin(async move {
            let (steps, handle) = cell.get().expect("ack step ready").clone();
            let bad: Vec<Json> = list_of(&req)
                .iter()
                .filter(|m| field(m, "text") == "bad")
                .map(|m| json!(field(m, "ack_token")))
                .collect();
            if bad.is_empty() {
                return Ok(());
            }
            let out = steps
                .execute(
                    "step.eventbus.ack",
                    &handle,
                    "action: ACK_ACTION_NAK\n",
                    &json!({"ack_tokens": bad}),
                )
                .await;
            let res = out.as_ref().map(|_| ()).map_err(Clone::clone);
            let _ = out_tx.send(out);
            res
        })
    });
    let mut p = launch(&server, Some(pipeline)).await;
    setup(&p, "max_deliver: 2\n").await;
    p.module_up(
        "eventbus.stream",
        "dlq",
        "name: DLQ\nsubjects: ['dead.>']\n",
    )
    .await;
    let handle = p
        .create_step("step.eventbus.ack", "mark", "action: ACK_ACTION_NAK\n")
        .await
        .unwrap();
    let _ = ack_with.set((p.step_client().await, handle));
    let js = js(&server).await;
    for text in ["ok0", "ok1", "bad", "ok2"] {
        js_publish(&js, "jobs.a", text).await;
    }
    let t = p
        .create_trigger(
            "pipeline:batch",
            &json!({"name": "runner", "deliver": "batch", "batch_size": 4,
                    "max_batch_wait": "300ms", "nak_delay": "0.1s",
                    "dead_letter_subject": "dead.jobs"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let mut bad_deliveries = Vec::new();
    let mut ok_deliveries = 0;
    while bad_deliveries.len() < 2 {
        for m in list_of(&p.next_call(T).await) {
            if field(&m, "text") == "bad" {
                bad_deliveries.push(field(&m, "delivery_count"));
            } else {
                ok_deliveries += 1;
            }
        }
    }
    assert_eq!(bad_deliveries, ["1", "2"]);
    let out = tokio::time::timeout(T, outs.recv())
        .await
        .unwrap()
        .unwrap()
        .expect("the nak step succeeds inside the pipeline");
    assert_eq!(out["acked"], 1, "{out}");
    wait_consumer(&js, "runner", settled).await;
    assert_eq!(ok_deliveries, 3, "the good messages ran once");
    let deadline = Instant::now() + T;
    while stream_messages(&js, "DLQ").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the marked message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dl = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(&dl.payload[..], b"bad");
    assert!(dl
        .headers
        .get("Eventbus-Error")
        .unwrap()
        .as_str()
        .contains("marked failed"));
    let info = consumer_info(&js, "runner").await;
    assert_eq!(info.ack_floor.stream_sequence, 4, "{info:?}");
}
