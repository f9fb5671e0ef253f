//! `make demo`: a local nats-server, the release plugin binary launched exactly as the workflow
//! engine launches it (via the test host in tests/common), and a small workflow declared in
//! YAML: a broker, a stream, a consumer, a publishing pipeline and a subscribed one.
//!
//! The demo plays the engine's part: it creates the modules, steps and trigger over gRPC,
//! resolves the `{{ }}` templates the engine would resolve, runs `step.log` itself (an engine
//! built-in) and the `step.eventbus.*` steps through ExecuteStep, and serves the callback the
//! plugin fires pipelines through.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use common::{LaunchOptions, PipelineFn, Plugin};
use eventbus_plugin::pb::plugin::TriggerWorkflowRequest;
use nats_test_server::NatsServer;
use serde_json::{json, Value as Json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const WORKFLOW: &str = r#"modules:
  - name: orders-bus
    type: eventbus.broker
    config:
      provider: nats
      deploy_target: local          # no dsn: the url comes from NATS_URL
  - name: orders-stream
    type: eventbus.stream
    config:
      name: ORDERS
      subjects: ["orders.>"]
      duplicate_window: 120s
  - name: orders-worker
    type: eventbus.consumer
    config:
      name: orders-worker
      stream_name: ORDERS
      filter_subject: orders.created
      ack_policy: ACK_POLICY_EXPLICIT
      max_deliver: 5
      ack_wait: 30s

pipelines:
  create-order:
    steps:
      - name: announce
        type: step.eventbus.publish
        config:
          subject: orders.created
          payload: '{{ toJson .order }}'
          message_id: 'order-{{ .order.id }}'
          correlation_id: demo
  handle-order:
    trigger:
      type: trigger.eventbus.subscribe
      config:
        name: orders-worker        # stream and broker come from the consumer module
        ack_mode: manual           # the pipeline acks with step.eventbus.ack
        max_in_flight: 4
        nak_delay: 0.3s
    steps:
      - name: log
        type: step.log
        config:
          message: 'order {{ .json.id }}: {{ .json.qty }} x {{ .json.item }}'
      - name: ack
        type: step.eventbus.ack
"#;

const ORDERS: &[(u32, &str, u32)] = &[(1, "coffee", 2), (2, "tea", 1), (3, "cake", 3)];

/// The order whose first pipeline run fails on purpose, to show a nak and a redelivery.
const FLAKY_ORDER: f64 = 3.0;

struct Clock(Instant);

impl Clock {
    fn say(&self, what: &str, text: impl AsRef<str>) {
        let ms = self.0.elapsed().as_secs_f64() * 1000.0;
        println!("{ms:>9.1} ms  {what:<9} {}", text.as_ref());
    }
}

/// A pipeline run requested by the plugin (TriggerWorkflow) and the answer the host gives.
type Run = (TriggerWorkflowRequest, oneshot::Sender<Result<(), String>>);

#[tokio::main]
async fn main() {
    support::ensure_plugin_binary();
    let clock = Clock(Instant::now());
    if let Err(e) = run(&clock).await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run(clock: &Clock) -> Result<(), String> {
    let nats_bin = nats_test_server::binary();
    let server = NatsServer::start();
    clock.say(
        "nats",
        format!(
            "{} ({}) listening on {}",
            nats_bin.display(),
            nats_test_server::version(&nats_bin),
            server.url()
        ),
    );

    println!("\nworkflow:\n");
    for line in WORKFLOW.lines() {
        println!("    {line}");
    }
    println!();
    let wf = common::typed::yaml_to_json(WORKFLOW);

    // The callback hands each TriggerWorkflow to the pipeline runner below and answers with
    // its result, as the engine does.
    let (runs_tx, mut runs) = mpsc::unbounded_channel::<Run>();
    let callback: PipelineFn = Arc::new(move |req| {
        let tx = runs_tx.clone();
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            tx.send((req, done))
                .map_err(|_| "host is gone".to_string())?;
            result.await.unwrap_or_else(|_| Err("host is gone".into()))
        })
    });
    let mut plugin = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(callback),
        ..Default::default()
    })
    .await;
    clock.say(
        "handshake",
        format!(
            "{}  (pid {}, {:.1} ms after spawn)",
            plugin.handshake,
            plugin.child.id(),
            plugin.spawn_to_handshake.as_secs_f64() * 1000.0
        ),
    );
    clock.say("callback", "host callback served; ConfigureCallback ok");
    let p = &plugin;

    for m in arr(&wf["modules"]) {
        let (ty, name) = (str_of(&m["type"]), str_of(&m["name"]));
        let handle = p.module_up(ty, name, &to_yaml(&m["config"])).await;
        clock.say("module", format!("{ty:<16} {name:<14} handle {handle}"));
    }

    // Steps of every pipeline, created once as the engine does at load.
    let mut steps: Vec<(String, Step)> = Vec::new();
    for (pipeline, def) in obj(&wf["pipelines"]) {
        for s in arr(&def["steps"]) {
            let (ty, name) = (str_of(&s["type"]), str_of(&s["name"]));
            let handle = if ty.starts_with("step.eventbus.") {
                let h = p
                    .create_step(ty, name, &to_yaml(&s["config"]))
                    .await
                    .map_err(|e| format!("create step {pipeline}/{name}: {e}"))?;
                clock.say("step", format!("{pipeline}/{name} ({ty}) handle {h}"));
                Some(h)
            } else {
                None
            };
            steps.push((
                pipeline.clone(),
                Step {
                    name: name.into(),
                    ty: ty.into(),
                    config: s["config"].clone(),
                    handle,
                },
            ));
        }
    }
    let pipeline_steps = |name: &str| -> Vec<&Step> {
        steps
            .iter()
            .filter(|(p, _)| p == name)
            .map(|(_, s)| s)
            .collect()
    };

    let trigger_def = &wf["pipelines"]["handle-order"]["trigger"];
    let trigger = p
        .create_trigger("pipeline:handle-order", &trigger_def["config"])
        .await
        .map_err(|e| format!("create trigger: {e}"))?;
    p.lifecycle("start", &trigger)
        .await
        .map_err(|e| format!("start trigger: {e}"))?;
    clock.say(
        "trigger",
        format!(
            "{} for pipeline handle-order started, handle {trigger}",
            str_of(&trigger_def["type"])
        ),
    );
    println!();

    // Publish the orders (and order 2 again: same message id, so the stream drops it) while
    // the subscribed pipeline handles what arrives.
    let create_order = pipeline_steps("create-order");
    let publisher = async {
        let mut sends: Vec<Json> = ORDERS
            .iter()
            .map(|(id, item, qty)| json!({"id": id, "item": item, "qty": qty}))
            .collect();
        sends.push(sends[1].clone());
        for order in sends {
            let state = json!({ "order": order });
            for s in &create_order {
                let out = s.execute(p, &state).await?;
                let dup = if out["duplicate"] == true {
                    "  duplicate: dropped by the stream, nothing delivered"
                } else {
                    ""
                };
                clock.say(
                    "publish",
                    format!(
                        "create-order/{}  order {} -> stream {} sequence {}{dup}",
                        s.name,
                        order["id"],
                        str_of(&out["stream"]),
                        str_of(&out["sequence"])
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        Ok::<(), String>(())
    };

    let handle_order = pipeline_steps("handle-order");
    let expected = ORDERS.len() + 1; // the flaky order comes twice
    let handler = async {
        let mut seen = 0;
        while seen < expected {
            let (req, done) = tokio::time::timeout(Duration::from_secs(15), runs.recv())
                .await
                .map_err(|_| format!("only {seen} of {expected} deliveries within 15 s"))?
                .ok_or("callback closed")?;
            seen += 1;
            let state = eventbus_plugin::config::decode::value_to_json(&prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(
                    req.data.clone().unwrap_or_default(),
                )),
            });
            clock.say(
                "delivered",
                format!(
                    "{} ({})  subject {}  sequence {}  delivery_count {}  text {}",
                    req.trigger_type,
                    req.action,
                    str_of(&state["subject"]),
                    str_of(&state["sequence"]),
                    state["delivery_count"],
                    str_of(&state["text"])
                ),
            );
            if state["json"]["id"].as_f64() == Some(FLAKY_ORDER) && state["delivery_count"] == 1 {
                let err = "inventory service unavailable (the demo fails this run on purpose)";
                clock.say("failed", format!("handle-order: {err}; the plugin naks it"));
                let _ = done.send(Err(err.into()));
                continue;
            }
            let mut result = Ok(());
            for s in &handle_order {
                match s.execute(p, &state).await {
                    Ok(out) if s.ty == "step.log" => {
                        clock.say("log", format!("handle-order/{}: {}", s.name, str_of(&out)))
                    }
                    Ok(out) => clock.say(
                        "step",
                        format!("handle-order/{} ({}) -> {}", s.name, s.ty, out),
                    ),
                    Err(e) => {
                        clock.say("failed", format!("handle-order/{}: {e}", s.name));
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = done.send(result);
        }
        Ok::<(), String>(())
    };
    let (published, handled) = tokio::join!(publisher, handler);
    published?;
    handled?;

    // A moment for anything unexpected (the duplicate must not arrive), then check the
    // consumer has nothing left.
    if let Ok(Some((req, done))) =
        tokio::time::timeout(Duration::from_millis(500), runs.recv()).await
    {
        let _ = done.send(Ok(()));
        return Err(format!("unexpected extra delivery: {:?}", req.data));
    }
    p.lifecycle("stop", &trigger)
        .await
        .map_err(|e| format!("stop trigger: {e}"))?;
    clock.say("trigger", "stopped");
    let (pending, unacked) = consumer_state(&server.url(), "ORDERS", "orders-worker").await?;
    clock.say(
        "consumer",
        format!("orders-worker: {pending} pending, {unacked} awaiting ack"),
    );

    let (code, took) = plugin.shutdown().await;
    clock.say(
        "shutdown",
        format!(
            "plugin exited with code {} in {:.1} ms",
            code.map_or("none (killed)".into(), |c| c.to_string()),
            took.as_secs_f64() * 1000.0
        ),
    );
    let socket_gone = !plugin.socket.exists();
    drop(plugin);
    drop(server);
    clock.say(
        "cleanup",
        format!("nats-server stopped, temp dirs removed, plugin socket removed: {socket_gone}"),
    );
    if code != Some(0) || pending != 0 || unacked != 0 || !socket_gone {
        return Err("unexpected final state (see above)".into());
    }
    Ok(())
}

struct Step {
    name: String,
    ty: String,
    config: Json,
    handle: Option<String>,
}

impl Step {
    /// One step as the engine runs it: templates resolved against the pipeline state, plugin
    /// steps through ExecuteStep, `step.log` (an engine built-in) here.
    async fn execute(&self, p: &Plugin, state: &Json) -> Result<Json, String> {
        let config = resolve(&self.config, state);
        match &self.handle {
            Some(h) => p
                .execute(&self.ty, h, &to_yaml(&config), state)
                .await
                .map_err(|e| format!("{}: {e}", self.name)),
            None if self.ty == "step.log" => Ok(config["message"].clone()),
            None => Err(format!("the demo host does not run {}", self.ty)),
        }
    }
}

/// The engine's templates, as far as this workflow needs them: `{{ .a.b }}` and
/// `{{ toJson .a }}` inside strings.
fn resolve(v: &Json, state: &Json) -> Json {
    match v {
        Json::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let Some(end) = rest[start..].find("}}") else {
                    break;
                };
                out.push_str(&rest[..start]);
                let expr = rest[start + 2..start + end].trim();
                let (to_json, path) = match expr.strip_prefix("toJson ") {
                    Some(p) => (true, p.trim()),
                    None => (false, expr),
                };
                let value = path
                    .trim_start_matches('.')
                    .split('.')
                    .filter(|k| !k.is_empty())
                    .fold(state, |v, k| &v[k]);
                match value {
                    Json::String(s) if !to_json => out.push_str(s),
                    Json::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                        out.push_str(&format!("{}", n.as_f64().unwrap_or_default() as i64))
                    }
                    other => out.push_str(&other.to_string()),
                }
                rest = &rest[start + end + 2..];
            }
            out.push_str(rest);
            Json::String(out)
        }
        Json::Object(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), resolve(v, state)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.iter().map(|v| resolve(v, state)).collect()),
        other => other.clone(),
    }
}

fn to_yaml(v: &Json) -> String {
    if v.is_null() {
        return String::new();
    }
    serde_yaml::to_string(v).unwrap_or_default()
}

fn arr(v: &Json) -> Vec<Json> {
    v.as_array().cloned().unwrap_or_default()
}

fn obj(v: &Json) -> Vec<(String, Json)> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn str_of(v: &Json) -> &str {
    v.as_str().unwrap_or_default()
}

/// Pending and unacknowledged counts of a durable, read straight from the server.
async fn consumer_state(url: &str, stream: &str, durable: &str) -> Result<(u64, usize), String> {
    let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .map_err(|e| e.to_string())?
        .get_consumer(durable)
        .await
        .map_err(|e| e.to_string())?;
    let info = consumer.info().await.map_err(|e| e.to_string())?;
    Ok((info.num_pending, info.num_ack_pending))
}
