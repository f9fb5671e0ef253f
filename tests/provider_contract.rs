//! The provider contract: one list of behaviours every provider must show through the real
//! binary and the test host, run against each provider's real broker (nats-server,
//! PostgreSQL, tansu for Kafka). A new provider adds one entry to `contract!` below (a `Fixture` that starts its
//! server and names its broker config); the behaviours stay as they are.
//!
//! Waits are on events (TriggerWorkflow calls, consume results) bounded by deadlines; the only
//! open-ended waits prove an absence (no redelivery) and are bounded by the consumer's ack_wait.

mod common;

use common::*;
use kafka_test_server::KafkaServer;
use nats_test_server::NatsServer;
use pg_test_server::PgServer;
use prost_types::value::Kind;
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// The consumer's ack_wait in these tests: short, so redelivery is quick to observe.
const ACK_WAIT: &str = "ack_wait: 2s\n";
const ACK_WAIT_D: Duration = Duration::from_secs(2);

type Call = eventbus_plugin::pb::plugin::TriggerWorkflowRequest;

/// A provider under test: its broker, started fresh per test, and how the plugin reaches it.
enum Fixture {
    Nats(NatsServer),
    Pg(PgServer),
    Kafka(KafkaServer),
}

impl Fixture {
    fn nats() -> Fixture {
        Fixture::Nats(NatsServer::start())
    }

    fn pg() -> Fixture {
        Fixture::Pg(PgServer::start())
    }

    fn kafka() -> Fixture {
        Fixture::Kafka(KafkaServer::start())
    }

    /// The broker module `bus` as a user declares it for this provider.
    fn broker_yaml(&self) -> &'static str {
        match self {
            Fixture::Nats(_) => "provider: nats\ndeploy_target: self_hosted\n",
            Fixture::Pg(_) => {
                "provider: pgchannel\nbroker_target: in_process\npoll_interval: 200ms\nmax_conns: 8\n"
            }
            // One record per produce request: tansu 0.6.0 miscounts larger batches.
            Fixture::Kafka(_) => {
                "provider: kafka\ndeploy_target: self_hosted\nkafka:\n  librdkafka_options: {linger.ms: '0', batch.num.messages: '1'}\n"
            }
        }
    }

    /// Where the plugin finds the broker (environment, as the engine's deployment sets it).
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Fixture::Nats(s) => vec![("NATS_URL".into(), s.url())],
            Fixture::Pg(s) => vec![("EVENTBUS_BUS_URI".into(), s.url())],
            Fixture::Kafka(s) => vec![("EVENTBUS_BUS_URI".into(), s.bootstrap())],
        }
    }

    /// Stops the broker and starts it again on the same port and storage (tansu's memory
    /// storage starts empty: topics and group offsets are made again by the plugin).
    fn restart(&mut self) {
        match self {
            Fixture::Nats(s) => s.restart(),
            Fixture::Pg(s) => s.restart(),
            // Frozen for two seconds, not restarted: see `mod outage`.
            Fixture::Kafka(s) => {
                s.pause();
                std::thread::sleep(Duration::from_secs(2));
                s.resume();
            }
        }
    }
}

/// Generates one test per (provider, behaviour).
macro_rules! contract {
    (providers { $($prov:ident: $start:expr,)* } behaviours $bs:tt) => {
        $( mod $prov { contract!(@each $start; $bs); } )*
    };
    (@each $start:expr; { $($b:ident,)* }) => {
        $(
            #[tokio::test]
            async fn $b() {
                super::$b($start).await
            }
        )*
    };
}

contract! {
    providers {
        nats: super::Fixture::nats(),
        pgchannel: super::Fixture::pg(),
        kafka: super::Fixture::kafka(),
    }
    behaviours {
        publish_keeps_list_order,
        consume_then_ack_nak_term_progress,
        unacked_message_comes_back_after_ack_wait,
        max_deliver_then_dead_letter,
        single_trigger_delivers_and_acks,
        batch_trigger_delivers_lists,
        batch_pipeline_marks_one_message_failed,
        two_subscribers_share_one_consumer,
    }
}

/// A broker that goes away and comes back. nats-server and PostgreSQL restart on their storage;
/// tansu 0.6.0 keeps only memory storage (a restart is an empty broker, and its metadata answer
/// for the lost topics carries a null name that crashes librdkafka 2.12), so Kafka's outage is
/// the broker frozen (SIGSTOP) for two seconds and then answering again with its data.
mod outage {
    use super::*;
    contract! {
        providers {
            nats: super::Fixture::nats(),
            pgchannel: super::Fixture::pg(),
            kafka: super::Fixture::kafka(),
        }
        behaviours {
            broker_restart_is_survived,
        }
    }
}

/// De-duplication by message id: NATS's duplicate window and pgchannel's table do it; Kafka
/// has no such window (its idempotent producer drops only its own retries), so it shows the
/// message id travelling instead.
mod message_id {
    use super::*;
    contract! {
        providers {
            nats: super::Fixture::nats(),
            pgchannel: super::Fixture::pg(),
        }
        behaviours {
            message_id_deduplicates,
        }
    }
    contract! {
        providers {
            kafka: super::Fixture::kafka(),
        }
        behaviours {
            message_id_travels_and_is_not_deduplicated,
        }
    }
}

// ------------------------------------------------------------------ helpers

async fn launch(fx: &Fixture, callback: Option<PipelineFn>) -> Plugin {
    Plugin::launch(LaunchOptions {
        env: fx.env(),
        callback,
        ..Default::default()
    })
    .await
}

/// Broker `bus`, stream JOBS (`jobs.>`), stream DEAD (`dead.>`) with the consumer
/// `deadreader`, and the consumer `runner` on JOBS (plus `consumer_extra` YAML).
async fn setup(p: &Plugin, fx: &Fixture, consumer_extra: &str) {
    p.module_up("eventbus.broker", "bus", fx.broker_yaml())
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
    p.module_up(
        "eventbus.consumer",
        "deadreader",
        "name: deadreader\nstream_name: DEAD\n",
    )
    .await;
}

async fn publish(p: &Plugin, config: &str) -> Result<Json, String> {
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute("step.eventbus.publish", &h, config, &json!({}))
        .await
}

/// Consumes until `n` messages arrived (bounded), in delivery order.
async fn consume_n(p: &Plugin, consumer: &str, n: usize) -> Vec<Json> {
    let h = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n}: {got:?}",
            got.len()
        );
        let out = p
            .execute(
                "step.eventbus.consume",
                &h,
                &format!(
                    "consumer: {consumer}\nbatch_size: {}\nmax_wait: 1s\n",
                    n - got.len()
                ),
                &json!({}),
            )
            .await
            .unwrap();
        if let Some(m) = out["messages"].as_array() {
            got.extend(m.iter().cloned());
        }
    }
    got
}

/// Consumes once for `wait` and returns what came (nothing, when the contract holds).
async fn consume_for(p: &Plugin, consumer: &str, wait: Duration) -> Vec<Json> {
    let h = p
        .create_step("step.eventbus.consume", "none", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &h,
            &format!(
                "consumer: {consumer}\nbatch_size: 10\nmax_wait: {}s\n",
                wait.as_secs_f64()
            ),
            &json!({}),
        )
        .await
        .unwrap();
    out["messages"].as_array().cloned().unwrap_or_default()
}

async fn ack(p: &Plugin, action: &str, msg: &Json) -> Json {
    let config = format!("action: {action}\n");
    let h = p
        .create_step("step.eventbus.ack", "ack", &config)
        .await
        .unwrap();
    p.execute("step.eventbus.ack", &h, &config, msg)
        .await
        .unwrap()
}

fn field(v: &prost_types::Value) -> String {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn text_of(call: &Call, key: &str) -> String {
    call.data
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .map(field)
        .unwrap_or_default()
}

/// The `key` of every message of a batch call.
fn batch_fields(call: &Call, key: &str) -> Vec<String> {
    let Some(Kind::ListValue(l)) = call
        .data
        .as_ref()
        .and_then(|d| d.fields.get("messages"))
        .and_then(|v| v.kind.clone())
    else {
        panic!("batch call without messages: {call:?}");
    };
    l.values
        .iter()
        .map(|v| match &v.kind {
            Some(Kind::StructValue(s)) => s.fields.get(key).map(field).unwrap_or_default(),
            _ => String::new(),
        })
        .collect()
}

fn batch_texts(call: &Call) -> Vec<String> {
    batch_fields(call, "text")
}

async fn start_trigger(p: &Plugin, config: Json) -> String {
    let t = p.create_trigger("orders", &config).await.unwrap();
    p.lifecycle("start", &t).await.unwrap();
    t
}

/// Asserts that no TriggerWorkflow arrives within `within`.
async fn no_call(p: &mut Plugin, within: Duration) {
    let rx = p.calls.as_mut().expect("launched with a callback");
    if let Ok(Some(c)) = tokio::time::timeout(within, rx.recv()).await {
        panic!("unexpected delivery: {c:?}");
    }
}

fn recording(seen: Arc<std::sync::Mutex<Vec<String>>>) -> PipelineFn {
    Arc::new(move |call: Call| {
        let seen = seen.clone();
        Box::pin(async move {
            seen.lock().unwrap().push(text_of(&call, "sequence"));
            Ok(())
        })
    })
}

// ------------------------------------------------------------------ behaviours

/// A bulk publish is stored in list order and consumed in that order.
async fn publish_keeps_list_order(fx: Fixture) {
    let p = launch(&fx, None).await;
    setup(&p, &fx, "").await;
    let list: String = (0..20)
        .map(|i| format!("  - {{subject: jobs.o, payload: m{i}}}\n"))
        .collect();
    let out = publish(&p, &format!("messages:\n{list}")).await.unwrap();
    assert_eq!(out["published"], 20, "{out}");
    let seqs: Vec<i64> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sequence"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let got = consume_n(&p, "runner", 20).await;
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
}

/// A second publish with the same message id within the window stores nothing new.
async fn message_id_deduplicates(fx: Fixture) {
    let p = launch(&fx, None).await;
    setup(&p, &fx, "").await;
    let first = publish(&p, "subject: jobs.d\npayload: a\nmessage_id: id-1\n")
        .await
        .unwrap();
    assert!(first.get("duplicate").is_none(), "{first}");
    let second = publish(&p, "subject: jobs.d\npayload: b\nmessage_id: id-1\n")
        .await
        .unwrap();
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["sequence"], first["sequence"], "{second}");
    let got = consume_n(&p, "runner", 1).await;
    assert_eq!(got[0]["text"], "a");
    assert!(consume_for(&p, "runner", Duration::from_millis(500))
        .await
        .is_empty());
}

/// Kafka stores both publishes and says so: no `duplicate`, two offsets; the message id
/// reaches the consumer as a header so a pipeline can de-duplicate.
async fn message_id_travels_and_is_not_deduplicated(fx: Fixture) {
    let p = launch(&fx, None).await;
    setup(&p, &fx, "").await;
    let first = publish(&p, "subject: jobs.d\npayload: a\nmessage_id: id-1\n")
        .await
        .unwrap();
    let second = publish(&p, "subject: jobs.d\npayload: b\nmessage_id: id-1\n")
        .await
        .unwrap();
    assert!(second.get("duplicate").is_none(), "{second}");
    assert_ne!(second["sequence"], first["sequence"], "{second}");
    let got = consume_n(&p, "runner", 2).await;
    for (m, text) in got.iter().zip(["a", "b"]) {
        assert_eq!(m["text"], text, "{m}");
        assert_eq!(m["headers"]["Nats-Msg-Id"], "id-1", "{m}");
    }
}

/// Each settle action does what it says: ack and term end a message, nak brings it back at
/// once with its delivery count up, progress keeps it ours.
async fn consume_then_ack_nak_term_progress(fx: Fixture) {
    let p = launch(&fx, None).await;
    setup(&p, &fx, ACK_WAIT).await;
    for text in ["to-ack", "to-nak", "to-term", "to-progress"] {
        publish(&p, &format!("subject: jobs.s\npayload: {text}\n"))
            .await
            .unwrap();
    }
    let got = consume_n(&p, "runner", 4).await;
    let by_text = |t: &str| got.iter().find(|m| m["text"] == t).unwrap().clone();
    assert_eq!(by_text("to-ack")["delivery_count"], 1);
    assert_eq!(
        ack(&p, "ACK_ACTION_ACK", &by_text("to-ack")).await["action"],
        "ack"
    );
    assert_eq!(
        ack(&p, "ACK_ACTION_NAK", &by_text("to-nak")).await["action"],
        "nak"
    );
    assert_eq!(
        ack(&p, "ACK_ACTION_TERM", &by_text("to-term")).await["action"],
        "term"
    );
    assert_eq!(
        ack(&p, "ACK_ACTION_PROGRESS", &by_text("to-progress")).await["action"],
        "progress"
    );
    let again = consume_n(&p, "runner", 1).await;
    assert_eq!(again[0]["text"], "to-nak", "{again:?}");
    assert_eq!(again[0]["delivery_count"], 2, "{again:?}");
    ack(&p, "ACK_ACTION_ACK", &again[0]).await;
    ack(&p, "ACK_ACTION_ACK", &by_text("to-progress")).await;
    // Past one more ack_wait, nothing comes back: acked and terminated messages are done.
    let rest = consume_for(&p, "runner", ACK_WAIT_D + Duration::from_secs(1)).await;
    assert!(rest.is_empty(), "{rest:?}");
}

/// A message taken and not settled is delivered again once its ack_wait ran out.
async fn unacked_message_comes_back_after_ack_wait(fx: Fixture) {
    let p = launch(&fx, None).await;
    setup(&p, &fx, ACK_WAIT).await;
    publish(&p, "subject: jobs.w\npayload: later\n")
        .await
        .unwrap();
    let first = consume_n(&p, "runner", 1).await;
    let taken = Instant::now();
    let again = consume_n(&p, "runner", 1).await;
    assert!(
        taken.elapsed() >= ACK_WAIT_D - Duration::from_millis(200),
        "redelivered after {:?}",
        taken.elapsed()
    );
    assert_eq!(again[0]["text"], "later");
    assert_eq!(again[0]["sequence"], first[0]["sequence"]);
    assert_eq!(again[0]["delivery_count"], 2);
}

/// A trigger whose pipeline keeps failing naks up to max_deliver, then dead-letters the
/// message with the reason and its coordinates, and does not deliver it again.
async fn max_deliver_then_dead_letter(fx: Fixture) {
    let fail: PipelineFn = Arc::new(|_| Box::pin(async { Err("boom".to_string()) }));
    let mut p = launch(&fx, Some(fail)).await;
    setup(&p, &fx, "max_deliver: 2\n").await;
    start_trigger(
        &p,
        json!({"name": "runner", "dead_letter_subject": "dead.jobs", "nak_delay": "100ms"}),
    )
    .await;
    publish(&p, "subject: jobs.bad\npayload: poison\n")
        .await
        .unwrap();
    for n in 1..=2 {
        let call = p.next_call(T).await;
        assert_eq!(text_of(&call, "delivery_count"), n.to_string());
    }
    let dead = consume_n(&p, "deadreader", 1).await;
    let m = &dead[0];
    assert_eq!(m["subject"], "dead.jobs");
    assert_eq!(m["text"], "poison");
    assert_eq!(m["headers"]["Eventbus-Original-Subject"], "jobs.bad");
    assert_eq!(m["headers"]["Eventbus-Original-Stream"], "JOBS");
    assert_eq!(m["headers"]["Eventbus-Delivery-Count"], "2");
    assert!(
        m["headers"]["Eventbus-Error"]
            .as_str()
            .unwrap()
            .contains("boom"),
        "{m}"
    );
    no_call(&mut p, Duration::from_secs(1)).await;
}

/// One message per pipeline run, in publish order with max_in_flight 1, acked after success.
async fn single_trigger_delivers_and_acks(fx: Fixture) {
    let mut p = launch(&fx, Some(ok_pipeline())).await;
    setup(&p, &fx, ACK_WAIT).await;
    start_trigger(&p, json!({"name": "runner", "max_in_flight": 1})).await;
    for i in 0..3 {
        publish(&p, &format!("subject: jobs.t\npayload: m{i}\n"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let call = p.next_call(T).await;
        assert_eq!(call.action, "message");
        assert_eq!(text_of(&call, "text"), format!("m{i}"));
        assert_eq!(text_of(&call, "subject"), "jobs.t");
        assert_eq!(text_of(&call, "stream"), "JOBS");
        assert_eq!(text_of(&call, "delivery_count"), "1");
    }
    no_call(&mut p, ACK_WAIT_D + Duration::from_secs(1)).await;
}

/// `deliver: batch` hands a pipeline run a list, every message in it acked after success.
async fn batch_trigger_delivers_lists(fx: Fixture) {
    let mut p = launch(&fx, Some(ok_pipeline())).await;
    setup(&p, &fx, ACK_WAIT).await;
    let list: String = (0..5)
        .map(|i| format!("  - {{subject: jobs.b, payload: m{i}}}\n"))
        .collect();
    publish(&p, &format!("messages:\n{list}")).await.unwrap();
    start_trigger(
        &p,
        json!({"name": "runner", "deliver": "batch", "batch_size": 10, "max_batch_wait": "500ms", "max_in_flight": 1}),
    )
    .await;
    let mut texts = Vec::new();
    while texts.len() < 5 {
        let call = p.next_call(T).await;
        assert_eq!(call.action, "batch");
        let got = batch_texts(&call);
        assert_eq!(text_of(&call, "count"), got.len().to_string());
        texts.extend(got);
    }
    let want: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    no_call(&mut p, ACK_WAIT_D + Duration::from_secs(1)).await;
}

/// A batch pipeline that naks one message through `step.eventbus.ack` and succeeds: the
/// others are acked, the marked one alone is redelivered, then dead-lettered on its last
/// delivery instead of dropped.
async fn batch_pipeline_marks_one_message_failed(fx: Fixture) {
    let ack_with: Arc<OnceLock<(StepClient, String)>> = Arc::new(OnceLock::new());
    let cell = ack_with.clone();
    let pipeline: PipelineFn = Arc::new(move |call: Call| {
        let cell = cell.clone();
        Box::pin(async move {
            let (steps, handle) = cell.get().expect("ack step ready").clone();
            let texts = batch_fields(&call, "text");
            let tokens = batch_fields(&call, "ack_token");
            let bad: Vec<Json> = texts
                .iter()
                .zip(tokens)
                .filter(|(t, _)| *t == "bad")
                .map(|(_, tok)| json!(tok))
                .collect();
            if bad.is_empty() {
                return Ok(());
            }
            steps
                .execute(
                    "step.eventbus.ack",
                    &handle,
                    "action: ACK_ACTION_NAK\n",
                    &json!({"ack_tokens": bad}),
                )
                .await
                .map(|_| ())
        })
    });
    let mut p = launch(&fx, Some(pipeline)).await;
    setup(&p, &fx, "max_deliver: 2\n").await;
    let handle = p
        .create_step("step.eventbus.ack", "mark", "action: ACK_ACTION_NAK\n")
        .await
        .unwrap();
    let _ = ack_with.set((p.step_client().await, handle));
    let list: String = ["ok0", "ok1", "bad", "ok2"]
        .iter()
        .map(|t| format!("  - {{subject: jobs.m, payload: {t}}}\n"))
        .collect();
    publish(&p, &format!("messages:\n{list}")).await.unwrap();
    start_trigger(
        &p,
        json!({"name": "runner", "deliver": "batch", "batch_size": 4, "max_batch_wait": "300ms",
               "nak_delay": "100ms", "dead_letter_subject": "dead.jobs", "max_in_flight": 1}),
    )
    .await;
    let mut seen = std::collections::BTreeMap::<String, Vec<String>>::new();
    while seen.get("bad").map_or(0, Vec::len) < 2 {
        let call = p.next_call(T).await;
        for (t, n) in batch_texts(&call)
            .into_iter()
            .zip(batch_fields(&call, "delivery_count"))
        {
            seen.entry(t).or_default().push(n);
        }
    }
    assert_eq!(seen["bad"], ["1", "2"], "{seen:?}");
    for ok in ["ok0", "ok1", "ok2"] {
        assert_eq!(seen[ok], ["1"], "{seen:?}");
    }
    let dead = consume_n(&p, "deadreader", 1).await;
    assert_eq!(dead[0]["text"], "bad");
    assert_eq!(dead[0]["headers"]["Eventbus-Delivery-Count"], "2");
    no_call(&mut p, Duration::from_secs(1)).await;
}

/// Two plugin processes subscribed to one consumer: every message reaches a pipeline, once.
async fn two_subscribers_share_one_consumer(fx: Fixture) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = launch(&fx, Some(recording(seen.clone()))).await;
    let b = launch(&fx, Some(recording(seen.clone()))).await;
    setup(&a, &fx, "").await;
    setup(&b, &fx, "").await;
    start_trigger(&a, json!({"name": "runner", "max_in_flight": 4})).await;
    start_trigger(&b, json!({"name": "runner", "max_in_flight": 4})).await;
    let mut want = BTreeSet::new();
    for i in 0..30 {
        let p = if i % 2 == 0 { &a } else { &b };
        let out = publish(p, &format!("subject: jobs.x\npayload: m{i}\n"))
            .await
            .unwrap();
        want.insert(out["sequence"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + T;
    loop {
        let got: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
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
    let all = seen.lock().unwrap().clone();
    assert_eq!(all.len(), want.len(), "delivered twice: {all:?}");
}

/// The broker restarts under a running trigger: publishes get through again (a bounded number
/// of failures) and the trigger resumes without a new Start.
async fn broker_restart_is_survived(mut fx: Fixture) {
    let mut p = launch(&fx, Some(ok_pipeline())).await;
    setup(&p, &fx, "").await;
    start_trigger(&p, json!({"name": "runner"})).await;
    publish(&p, "subject: jobs.r\npayload: before\n")
        .await
        .unwrap();
    assert_eq!(text_of(&p.next_call(T).await, "text"), "before");
    fx.restart();
    let deadline = Instant::now() + T;
    loop {
        match publish(&p, "subject: jobs.r\npayload: after\n").await {
            Ok(_) => break,
            Err(e) => {
                assert!(e.contains("step.eventbus.publish"), "{e}");
                assert!(Instant::now() < deadline, "publish never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let call = p.next_call(T).await;
    assert_eq!(text_of(&call, "text"), "after", "{}", p.stderr());
}
