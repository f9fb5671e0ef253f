//! Issue 3 against a real nats-server: modules, steps and the subscribe trigger through the
//! real binary and the test host. Each test uses its own server and unique names.

mod common;

use base64::Engine;
use common::*;
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

async fn plugin_with(server: &NatsServer, callback: Option<PipelineFn>) -> Plugin {
    Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback,
        ..Default::default()
    })
    .await
}

/// Broker + stream ORDERS(orders.>) + durable `worker`, all started.
async fn orders(p: &Plugin, consumer_extra: &str) {
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "orders",
        "name: ORDERS\nsubjects: ['orders.>']\nbroker_ref: bus\n",
    )
    .await;
    p.module_up(
        "eventbus.consumer",
        "worker",
        &format!("name: worker\nstream_name: ORDERS\nbroker_ref: bus\nack_policy: ACK_POLICY_EXPLICIT\n{consumer_extra}"),
    )
    .await;
}

#[tokio::test]
async fn publish_consume_ack_round_trip() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    orders(&p, "").await;
    let publish = p
        .create_step("step.eventbus.publish", "pub", "subject: orders.created\n")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.publish",
            &publish,
            "subject: orders.created\npayload: hello\nheaders: {x-k: v}\ncorrelation_id: c-1\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["sequence"], "1", "{out}");
    assert_eq!(out["stream"], "ORDERS");
    assert!(
        out.get("duplicate").is_none(),
        "false vanishes as in protojson"
    );
    assert!(out["acked_at"].as_str().unwrap().ends_with('Z'));
    // A JSON object in config is sent as compact JSON.
    let out = p
        .execute(
            "step.eventbus.publish",
            &publish,
            "subject: orders.created\npayload: {id: 7, ok: true}\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(out["sequence"], "2");
    // Payload from pipeline state (bytes = base64), config subject wins over state subject.
    let b64 = base64::engine::general_purpose::STANDARD.encode(b"\x00\x01raw");
    p.execute(
        "step.eventbus.publish",
        &publish,
        "subject: orders.raw\n",
        &json!({"payload": b64, "subject": "ignored.subject"}),
    )
    .await
    .unwrap();

    let consume = p
        .create_step("step.eventbus.consume", "get", "consumer: worker\n")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: worker\nbatch_size: 10\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let msgs = out["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{out}");
    assert_eq!(out["count"], 3);
    assert_eq!(msgs[0]["subject"], "orders.created");
    assert_eq!(msgs[0]["text"], "hello");
    assert_eq!(msgs[0]["headers"]["x-k"], "v");
    assert_eq!(msgs[0]["headers"]["Nats-Correlation-Id"], "c-1");
    assert_eq!(msgs[0]["sequence"], "1");
    assert_eq!(msgs[1]["json"], json!({"id": 7.0, "ok": true}));
    assert_eq!(msgs[2]["subject"], "orders.raw");
    assert_eq!(msgs[2]["payload"], json!(b64));
    assert_eq!(msgs[2]["delivery_count"], 1);

    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    for m in msgs {
        // The ack token comes from pipeline state, no config needed.
        let out = p
            .execute(
                "step.eventbus.ack",
                &ack,
                "",
                &json!({"ack_token": m["ack_token"]}),
            )
            .await
            .unwrap();
        assert_eq!(out["action"], "ack");
    }
    // Nothing left: an empty batch is not an error, and max_wait is honoured.
    let t = Instant::now();
    let out = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: worker\nbatch_size: 5\nmax_wait: 0.5s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert!(out.get("messages").is_none(), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn publish_deduplicates_by_message_id() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    orders(&p, "").await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    let a = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: orders.x\npayload: a\nmessage_id: m-1\n",
            &json!({}),
        )
        .await
        .unwrap();
    let b = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: orders.x\npayload: a\nmessage_id: m-1\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(a["sequence"], b["sequence"]);
    assert_eq!(b["duplicate"], true);
}

/// Go B17: the ack step published to any subject the token contained.
#[tokio::test]
async fn b17_ack_accepts_only_jetstream_ack_subjects() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    orders(&p, "").await;
    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    let e = p
        .execute(
            "step.eventbus.ack",
            &ack,
            "",
            &json!({"ack_token": "orders.created"}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("not a JetStream ack token"), "{e}");
    let e = p
        .execute("step.eventbus.ack", &ack, "", &json!({}))
        .await
        .unwrap_err();
    assert!(e.contains("ack_token is required"), "{e}");
}

/// Go B21: a publish while the broker is down returns an error within the timeout.
#[tokio::test]
async fn b21_publish_never_hangs_while_the_broker_is_down() {
    let mut server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    orders(&p, "").await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        "subject: orders.a\npayload: x\n",
        &json!({}),
    )
    .await
    .unwrap();
    server.kill9();
    let t = Instant::now();
    let e = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: orders.a\npayload: x\ntimeout: 1s\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.contains("step.eventbus.publish \"pub\""), "{e}");
    // Go B8: the connection never gives up; after a restart publishing works again.
    server.start_again();
    let deadline = Instant::now() + T;
    loop {
        match p
            .execute(
                "step.eventbus.publish",
                &h,
                "subject: orders.a\npayload: y\ntimeout: 2s\n",
                &json!({}),
            )
            .await
        {
            Ok(out) => {
                assert_eq!(out["stream"], "ORDERS");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
}

/// Go B9: BY_START_SEQUENCE needs a start sequence, which the Go schema could not carry.
#[tokio::test]
async fn b9_deliver_by_start_sequence_works() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "orders",
        "name: ORDERS\nsubjects: ['orders.>']\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    for i in 0..5 {
        p.execute(
            "step.eventbus.publish",
            &h,
            &format!("subject: orders.n\npayload: m{i}\n"),
            &json!({}),
        )
        .await
        .unwrap();
    }
    p.module_up("eventbus.consumer", "from3", "name: from3\nstream_name: ORDERS\ndeliver_policy: DELIVER_POLICY_BY_START_SEQUENCE\nopt_start_seq: 3\n").await;
    let c = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &c,
            "consumer: from3\nbatch_size: 10\nmax_wait: 0.5s\n",
            &json!({}),
        )
        .await
        .unwrap();
    let seqs: Vec<&str> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence"].as_str().unwrap())
        .collect();
    assert_eq!(seqs, ["3", "4", "5"]);
}

/// Go B14: two consumer modules with one durable name on different streams are ambiguous.
#[tokio::test]
async fn b14_duplicate_durable_names_are_ambiguous_not_random() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\n",
    )
    .await;
    p.module_up("eventbus.stream", "a", "name: A\nsubjects: ['a.>']\n")
        .await;
    p.module_up("eventbus.stream", "b", "name: B\nsubjects: ['b.>']\n")
        .await;
    p.module_up("eventbus.consumer", "ca", "name: w\nstream_name: A\n")
        .await;
    p.module_up("eventbus.consumer", "cb", "name: w\nstream_name: B\n")
        .await;
    let c = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    let e = p
        .execute(
            "step.eventbus.consume",
            &c,
            "consumer: w\nmax_wait: 0.2s\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("declared on several streams"), "{e}");
    p.execute(
        "step.eventbus.consume",
        &c,
        "consumer: w\nstream_name: B\nmax_wait: 0.2s\n",
        &json!({}),
    )
    .await
    .unwrap();
}

/// Go B10: a restart with unchanged config sends no update; server-filled defaults are not drift.
#[tokio::test]
async fn b10_ensure_is_idempotent_against_server_normalised_values() {
    use eventbus_plugin::nats::{ConnSettings, NatsConn};
    use eventbus_plugin::runtime::modules::consumer::ConsumerSpec;
    use eventbus_plugin::runtime::modules::stream::{EnsureOutcome, StreamSpec};
    let server = NatsServer::start();
    let settings = ConnSettings {
        urls: vec![eventbus_plugin::secret::Secret::new(server.url())],
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let conn = NatsConn::open("t", &settings).await.unwrap();
    conn.wait_connected(T).await.unwrap();
    let cfg = eventbus_plugin::pb::eventbus::StreamConfig {
        name: "S".into(),
        subjects: vec!["s.>".into()],
        ..Default::default()
    };
    let spec = StreamSpec::validate("eventbus.stream", "s", &cfg).unwrap();
    assert_eq!(spec.ensure(&conn).await.unwrap(), EnsureOutcome::Created);
    assert_eq!(spec.ensure(&conn).await.unwrap(), EnsureOutcome::Unchanged);
    let cc = eventbus_plugin::pb::eventbus::ConsumerConfig {
        name: "d".into(),
        stream_name: "S".into(),
        ..Default::default()
    };
    let cspec = ConsumerSpec::validate("eventbus.consumer", "c", &cc).unwrap();
    assert_eq!(cspec.ensure(&conn).await.unwrap(), EnsureOutcome::Created);
    assert_eq!(cspec.ensure(&conn).await.unwrap(), EnsureOutcome::Unchanged);
    // A real change updates in place; an impossible one is refused with a reason.
    let mut cfg2 = cfg.clone();
    cfg2.max_msgs = 100;
    let spec2 = StreamSpec::validate("eventbus.stream", "s", &cfg2).unwrap();
    assert_eq!(
        spec2.ensure(&conn).await.unwrap(),
        EnsureOutcome::Updated(vec!["max_msgs"])
    );
    assert_eq!(spec2.ensure(&conn).await.unwrap(), EnsureOutcome::Unchanged);
    let mut cfg3 = cfg2.clone();
    cfg3.storage = eventbus_plugin::pb::eventbus::StorageType::Memory as i32;
    let err = StreamSpec::validate("eventbus.stream", "s", &cfg3)
        .unwrap()
        .ensure(&conn)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("storage cannot change in place"),
        "{err}"
    );
    // The plugin's own refusal does not pose as a server error.
    assert!(
        err.to_string().starts_with("update stream refused: "),
        "{err}"
    );
    assert!(!err.to_string().contains("error code"), "{err}");
}

/// A stream module's update overlays only what its config manages: `sources` and `metadata`
/// an operator set out of band survive a plugin restart whose config changes `max_age`.
#[tokio::test]
async fn stream_update_keeps_settings_the_config_does_not_manage() {
    use eventbus_plugin::nats::{ConnSettings, NatsConn};
    use std::collections::HashMap;
    let server = NatsServer::start();
    let settings = ConnSettings {
        urls: vec![eventbus_plugin::secret::Secret::new(server.url())],
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let conn = NatsConn::open("t", &settings).await.unwrap();
    conn.wait_connected(T).await.unwrap();
    let broker = "provider: nats\ndeploy_target: self_hosted\n";
    let mut p = plugin_with(&server, None).await;
    p.module_up("eventbus.broker", "bus", broker).await;
    p.module_up(
        "eventbus.stream",
        "orders",
        "name: ORDERS\nsubjects: ['orders.>']\nbroker_ref: bus\n",
    )
    .await;
    p.shutdown().await;

    // Out of band: a source stream feeding ORDERS, and metadata.
    conn.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "LEGACY".into(),
            subjects: vec!["legacy.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut cfg = conn
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    cfg.sources = Some(vec![async_nats::jetstream::stream::Source {
        name: "LEGACY".into(),
        ..Default::default()
    }]);
    cfg.metadata = HashMap::from([("owner".to_string(), "payments".to_string())]);
    let set = conn.js.update_stream(cfg).await.unwrap();
    // Stream metadata exists from nats-server 2.10 on; 2.9 (make test-nats29) drops it.
    let server_keeps_metadata = set.config.metadata.contains_key("owner");

    let mut p = plugin_with(&server, None).await;
    p.module_up("eventbus.broker", "bus", broker).await;
    p.module_up(
        "eventbus.stream",
        "orders",
        "name: ORDERS\nsubjects: ['orders.>']\nbroker_ref: bus\nmax_age: 3600s\n",
    )
    .await;
    let got = conn
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(
        got.max_age,
        Duration::from_secs(3600),
        "the config change applied"
    );
    let sources: Vec<_> = got
        .sources
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        sources,
        ["LEGACY"],
        "out-of-band sources survive the update"
    );
    if server_keeps_metadata {
        assert_eq!(
            got.metadata.get("owner").map(String::as_str),
            Some("payments")
        );
    } else {
        eprintln!("this nats-server keeps no stream metadata (before 2.10): sources checked only");
    }
    p.shutdown().await;
}

fn decode_payload(data: &prost_types::Struct) -> Json {
    eventbus_plugin::config::decode::value_to_json(&prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(data.clone())),
    })
}

/// Go B1 + B2: the trigger fires through the real callback with data the host can decode, and
/// keeps running after StartModule returned.
#[tokio::test]
async fn b1_b2_trigger_fires_pipelines_after_start_returns() {
    let server = NatsServer::start();
    let mut p = plugin_with(&server, Some(ok_pipeline())).await;
    orders(&p, "").await;
    let t = p
        .create_trigger(
            "pipeline:on-order",
            &json!({"name": "worker", "workflowType": "pipeline:on-order"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        "subject: orders.created\npayload: '{\"id\":1}'\nheaders: {k: v}\n",
        &json!({}),
    )
    .await
    .unwrap();
    let call = p.next_call(T).await;
    assert_eq!(call.trigger_type, "pipeline:on-order");
    assert_eq!(call.action, "message");
    let data = decode_payload(call.data.as_ref().unwrap());
    assert_eq!(data["subject"], "orders.created");
    assert_eq!(
        data["payload"],
        base64::engine::general_purpose::STANDARD.encode(b"{\"id\":1}")
    );
    assert_eq!(data["text"], "{\"id\":1}");
    assert_eq!(data["json"]["id"], 1);
    assert_eq!(data["headers"]["k"], "v");
    assert_eq!(data["sequence"], "1");
    assert_eq!(data["stream"], "ORDERS");
    assert_eq!(data["consumer"], "worker");
    assert_eq!(data["delivery_count"], 1);
    assert!(data["ack_token"].as_str().unwrap().starts_with("$JS.ACK."));
    // Auto-acked after success: the consumer has nothing pending.
    let c = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    p.lifecycle("stop", &t).await.unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &c,
            "consumer: worker\nmax_wait: 0.3s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert!(
        out.get("messages").is_none(),
        "acked message came back: {out}"
    );
    let (code, took) = p.shutdown().await;
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(2));
}

/// trigger -> publish (forward) and trigger -> ack chains decode in the host's strict decoder.
#[tokio::test]
async fn trigger_data_forwards_to_publish_and_ack_unchanged() {
    let server = NatsServer::start();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<TriggerWorkflowRequestData>();
    let pipeline: PipelineFn = Arc::new(move |req| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.send(TriggerWorkflowRequestData(req.data.unwrap_or_default()));
            Ok(())
        })
    });
    let p = plugin_with(&server, Some(pipeline)).await;
    orders(&p, "").await;
    p.module_up(
        "eventbus.stream",
        "copies",
        "name: COPIES\nsubjects: ['copies.>']\n",
    )
    .await;
    let t = p
        .create_trigger(
            "pipeline:fwd",
            &json!({"name": "worker", "ack_mode": "manual"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let publish = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    let raw: Vec<u8> = vec![0, 159, 146, 150, 255, 10];
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    p.execute(
        "step.eventbus.publish",
        &publish,
        "subject: orders.bin\n",
        &json!({"payload": b64}),
    )
    .await
    .unwrap();
    let data = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap().0;
    let current = decode_payload(&data);
    // Forward: the pipeline's next step publishes the trigger's state as input.
    let fwd = p
        .create_step("step.eventbus.publish", "fwd", "subject: copies.bin\n")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &fwd,
        "subject: copies.bin\n",
        &current,
    )
    .await
    .unwrap();
    // Ack: with no config at all.
    let ack = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    p.execute("step.eventbus.ack", &ack, "", &current)
        .await
        .unwrap();
    p.module_up("eventbus.consumer", "cc", "name: cc\nstream_name: COPIES\n")
        .await;
    let c = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.consume",
            &c,
            "consumer: cc\nmax_wait: 1s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(
        out["messages"][0]["payload"],
        json!(b64),
        "bytes survived the trip unchanged"
    );
}

pub struct TriggerWorkflowRequestData(prost_types::Struct);

/// The ack step's other actions: nak (with delay) redelivers, term never does.
#[tokio::test]
async fn ack_step_nak_redelivers_and_term_drops() {
    let server = NatsServer::start();
    let p = plugin_with(&server, None).await;
    orders(&p, "").await;
    let publish = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &publish,
        "subject: orders.a\npayload: one\n",
        &json!({}),
    )
    .await
    .unwrap();
    let consume = p
        .create_step("step.eventbus.consume", "get", "")
        .await
        .unwrap();
    let empty = json!({});
    let get = || {
        p.execute(
            "step.eventbus.consume",
            &consume,
            "consumer: worker\nmax_wait: 0.5s\n",
            &empty,
        )
    };
    let first = get().await.unwrap();
    let nak = p
        .create_step("step.eventbus.ack", "nak", "action: ACK_ACTION_NAK\n")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.ack",
            &nak,
            "action: ACK_ACTION_NAK\nnak_delay: 0.1s\n",
            &first["messages"][0],
        )
        .await
        .unwrap();
    assert_eq!(out["action"], "nak");
    let again = p
        .execute(
            "step.eventbus.consume",
            &consume,
            "consumer: worker\nmax_wait: 2s\n",
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(again["messages"][0]["delivery_count"], 2, "{again}");
    let term = p
        .create_step("step.eventbus.ack", "term", "action: ACK_ACTION_TERM\n")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.ack",
        &term,
        "action: ACK_ACTION_TERM\n",
        &again["messages"][0],
    )
    .await
    .unwrap();
    let none = get().await.unwrap();
    assert!(none.get("messages").is_none(), "{none}");
}

/// A trigger started while its broker is down does not fail the engine's Start; it binds and
/// fires once the broker is back.
#[tokio::test]
async fn trigger_started_while_the_broker_is_down_binds_later() {
    let mut server = NatsServer::start();
    server.kill9();
    let mut p = plugin_with(&server, Some(ok_pipeline())).await;
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: self_hosted\nrequest_timeout: 1s\n",
    )
    .await;
    let t = p
        .create_trigger(
            "pipeline:late",
            &json!({"name": "late", "stream_name": "LATE", "filter_subject": "late.>"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    server.start_again();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "LATE".into(),
        subjects: vec!["late.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("late.x", "hi".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let call = p.next_call(Duration::from_secs(30)).await;
    assert_eq!(call.trigger_type, "pipeline:late");
}

/// A private CA with a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &std::path::Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, usage: Eku| {
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], Eku::ServerAuth);
        let (client_cert, client_key) = leaf(vec!["eventbus-client".into()], Eku::ClientAuth);
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

/// The broker's authentication options against a server that demands them, not just parsed:
/// mutual TLS (private CA, client certificate required) carrying user/password or an nkey
/// seed file. Each broker publishes and the server stores the message; a broker without the
/// client certificate fails with an error that names it, instead of hanging.
#[tokio::test]
async fn user_password_nkey_and_mutual_tls_work_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let user = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, user.seed().unwrap()).unwrap();
    let server = NatsServer::builder()
        .config(format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n\
             authorization {{ users = [ {{user: bob, password: \"pw-1\"}}, {{nkey: {:?}}} ] }}\n",
            pki.server_cert,
            pki.server_key,
            pki.ca,
            user.public_key()
        ))
        .start();
    let p = Plugin::launch(LaunchOptions::default()).await;
    let dsn = format!("tls://127.0.0.1:{}", server.port());
    let tls = format!(
        "tls: {{ca_file: {:?}, cert_file: {:?}, key_file: {:?}, required: true}}\n",
        pki.ca, pki.client_cert, pki.client_key
    );
    let brokers = [
        ("pw", "auth: {user: bob, password: pw-1}\n".to_string()),
        ("nk", format!("auth: {{nkey_seed_file: {:?}}}\n", seed_file)),
    ];
    for (name, auth) in &brokers {
        p.module_up(
            "eventbus.broker",
            name,
            &format!("provider: nats\ndeploy_target: self_hosted\ndsn: {dsn}\n{auth}{tls}"),
        )
        .await;
    }
    p.module_up(
        "eventbus.stream",
        "secure",
        "name: SECURE\nsubjects: ['secure.>']\nbroker_ref: pw\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    for (i, (name, _)) in brokers.iter().enumerate() {
        let out = p
            .execute(
                "step.eventbus.publish",
                &h,
                &format!("subject: secure.{name}\npayload: hi\nbroker_ref: {name}\n"),
                &json!({}),
            )
            .await
            .unwrap_or_else(|e| panic!("broker {name}: {e}\nstderr:\n{}", p.stderr()));
        assert_eq!(out["sequence"], json!((i + 1).to_string()), "{out}");
        assert_eq!(out["stream"], json!("SECURE"));
    }
    // Same user, no client certificate: the server refuses the TLS handshake.
    p.module_up(
        "eventbus.broker",
        "nocert",
        &format!(
            "provider: nats\ndeploy_target: self_hosted\ndsn: {dsn}\nauth: {{user: bob, password: pw-1}}\n\
             tls: {{ca_file: {:?}, required: true}}\nrequest_timeout: 1s\n",
            pki.ca
        ),
    )
    .await;
    let err = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: secure.x\npayload: hi\nbroker_ref: nocert\ntimeout: 1s\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(err.contains("nocert"), "{err}");
}

/// A NATS JWT (`ed25519-nkey`), claims signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Json) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let header = B64.encode(json!({"typ": "JWT", "alg": "ed25519-nkey"}).to_string());
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": format!("T{iat}{}", &subject[..8]), "iat": iat,
        "iss": issuer.public_key(), "sub": subject, "name": subject, "nats": nats,
    });
    let body = B64.encode(claims.to_string());
    let sig = issuer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", B64.encode(sig))
}

/// Decentralised auth, as NGS / Synadia Cloud use it: the server trusts an operator, the
/// account (with JetStream) is preloaded, and the broker connects with a `.creds` file (user
/// JWT + seed). The publish is stored, and neither the seed nor the JWT reaches stderr.
#[tokio::test]
async fn creds_file_auth_works_against_an_operator_mode_server() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account(); // JetStream needs a system account
    let user = nkeys::KeyPair::new_user();
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1,
        "streams": -1, "consumer": -1});
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        json!({"type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {},
               "subs": -1, "data": -1, "payload": -1}),
    );
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("user.creds");
    let seed = user.seed().unwrap();
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    let server = NatsServer::builder()
        .config(format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {acc}: {account_jwt}, {sys}: {system_jwt} }}\n",
            acc = account.public_key(),
            sys = system.public_key(),
        ))
        .start();
    let p = Plugin::launch(LaunchOptions {
        env: vec![("RUST_LOG".into(), "debug".into())],
        ..Default::default()
    })
    .await;
    p.module_up(
        "eventbus.broker",
        "ngs",
        &format!(
            "provider: nats\ndeploy_target: self_hosted\ndsn: {}\nauth: {{creds_file: {:?}}}\n",
            server.url(),
            creds
        ),
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "s",
        "name: CREDS\nsubjects: ['creds.>']\nbroker_ref: ngs\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    let out = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: creds.a\npayload: hi\nbroker_ref: ngs\n",
            &json!({}),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", p.stderr()));
    assert_eq!(out["stream"], json!("CREDS"), "{out}");
    let stderr = p.stderr();
    for secret in [seed.as_str(), user_jwt.as_str()] {
        assert!(!stderr.contains(secret), "a credential reached stderr");
    }
}
