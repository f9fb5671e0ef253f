//! `make bench`: the plugin binary under the test host against raw async-nats, one nats-server,
//! one run. Prints one line per figure, `name value unit` (lines starting with `#` are context).
//!
//! (a) publish: ExecuteStep(step.eventbus.publish) vs JetStream publish + ack, 10k messages at
//!     1, 16 and 64 in flight: msg/s, p50/p99 latency, plugin/raw ratios; at 64 also the CPU
//!     each process spends per message. Two floors first: a NATS round trip and an ExecuteStep
//!     the plugin answers at once (the host <-> plugin gRPC hop alone), the latter also at 64
//!     in flight: the throughput ceiling of any work behind ExecuteStep.
//! (b) consume + ack: step.eventbus.consume (batch 100) then step.eventbus.ack per message vs a
//!     raw pull consumer fetching 100 and double-acking each: msg/s.
//! (c) trigger: raw publishes, TriggerWorkflow received by the host callback (no-op pipeline,
//!     auto ack) at max_in_flight 1 and 64 (default batch_size, = max_in_flight), plus
//!     max_in_flight 1 with batch_size 2: msg/s and end-to-end latency (publish time in the
//!     payload), for a 10k burst, a paced 1000 msg/s stream and (max_in_flight 64) 20k messages
//!     paced at 10 000 msg/s. Each phase is capped at
//!     15 s; a phase that did not get everything also prints what it received and its stalls.
//! (e) bulk: step.eventbus.publish with 100-message `messages` lists (one call at a time, the
//!     100 in flight) vs raw async-nats publishing the same messages in the same order with the
//!     same window of 100 unacknowledged; consume 100 + one bulk ack (the consume output fed
//!     straight in) vs raw fetch 100 + double-ack each (one at a time, and pipelined); the
//!     trigger with `deliver: batch` (batch 100) against the one-message trigger in (c).
//! (d) spawn-to-handshake (median of 10 launches) and the plugin's RSS idle, loaded and peak
//!     (VmRSS / VmHWM).
//! (f) pg: provider pgchannel against a real PostgreSQL started here (pg-test-server: loopback
//!     TCP, fsync off): the same publish step at 1, 16 and 64 in flight, consume 100 + ack each,
//!     and the trigger at max_in_flight 1 and 64 (burst published through the publish step at
//!     64 in flight while receiving), same payloads as the NATS figures.
//!
//! (h) kafka: provider kafka against tansu started here: the publish step at 1 and 64 in flight
//!     and in lists of 100, and the trigger at max_in_flight 1 and 64, against raw rdkafka on the
//!     same broker (the limit), ratios printed. See `kafka_bench` for what the test broker forces.
//!
//! (g) metrics and baseline: the proof phases of `proof/mod.rs` (metrics off vs on in
//!     interleaved pairs, scrapes under a 10k msg/s trigger; with `BENCH_BASELINE_BIN`, this
//!     binary against an older one).
//!
//! `BENCH_ONLY=publish,consume,trigger,bulk,pg,kafka,metrics,baseline,launch` picks phases and `BENCH_INFLIGHT=1,16,64` the
//! publish concurrencies (used by `make profile`, which runs one phase under callgrind).
//!
//! The plugin side sends requests the way the host does (typed_config / typed_input Any) but
//! builds them once: the host's own per-call YAML/protojson work is not in the figures.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "proof/mod.rs"]
mod proof;
#[path = "support/mod.rs"]
mod support;

use common::{LaunchOptions, PipelineFn, Plugin};
use eventbus_plugin::pb::eventbus::{AckRequest, ConsumeResponse};
use eventbus_plugin::pb::plugin::{plugin_service_client::PluginServiceClient, ExecuteStepRequest};
use futures::{FutureExt, StreamExt, TryStreamExt};
use nats_test_server::NatsServer;
use prost::Message as _;
use serde_json::json;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

const PUBLISH_N: usize = 10_000;
const FLOOR_N: usize = 2_000;
const CONSUME_N: usize = 10_000;
const TRIGGER_BURST_N: usize = 10_000;
const TRIGGER_PACED_N: usize = 1_000;
const TRIGGER_SUSTAINED_N: usize = 20_000;
const LAUNCHES: usize = 10;
const PAYLOAD_LEN: usize = 128;
const WAIT: Duration = Duration::from_secs(60);
/// Bound on each trigger phase, so a stalling configuration cannot stretch the run.
const TRIGGER_CAP: Duration = Duration::from_secs(15);
/// pgchannel phase sizes: one transaction per message is slower than NATS, so fewer messages
/// keep the phase within a minute.
const PG_PUBLISH_N: usize = 5_000;
const PG_CONSUME_N: usize = 5_000;
const PG_TRIGGER_N: usize = 5_000;

type Res<T> = Result<T, String>;

/// Whether `BENCH_ONLY` (a comma list; unset = all) selects the phase.
fn phase(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
}

/// Publish concurrencies: `BENCH_INFLIGHT` (a comma list), else 1, 16 and 64.
fn inflights() -> Vec<usize> {
    std::env::var("BENCH_INFLIGHT")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![1, 16, 64])
}

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `{"t":<ns since BASE>,"pad":"xxx…"}`, PAYLOAD_LEN bytes.
fn payload(t: u64) -> String {
    let head = format!("{{\"t\":{t},\"pad\":\"");
    let pad = PAYLOAD_LEN.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

fn stamp_of(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("{\"t\":")?;
    rest[..rest.find(',')?].parse().ok()
}

fn fig(name: &str, value: f64, unit: &str) {
    if value >= 100.0 || value.fract() == 0.0 {
        println!("{name} {value:.0} {unit}");
    } else {
        println!("{name} {value:.2} {unit}");
    }
}

struct Stats {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Stats {
    fn new(mut lat_ns: Vec<u64>, n: usize, wall: Duration) -> Stats {
        lat_ns.sort_unstable();
        let pct = |q: usize| -> f64 {
            if lat_ns.is_empty() {
                return 0.0;
            }
            let i = (lat_ns.len() * q / 100).min(lat_ns.len() - 1);
            lat_ns[i] as f64 / 1000.0
        };
        Stats {
            rate: n as f64 / wall.as_secs_f64(),
            p50_us: pct(50),
            p99_us: pct(99),
        }
    }

    fn print(&self, name: &str) {
        fig(&format!("{name}_rate"), self.rate, "msg/s");
        fig(&format!("{name}_p50"), self.p50_us, "us");
        fig(&format!("{name}_p99"), self.p99_us, "us");
    }
}

/// Runs `n` operations with at most `inflight` outstanding; per-operation latency and the
/// throughput over the wall time of the whole run.
async fn closed_loop<F, Fut>(n: usize, inflight: usize, op: F) -> Res<Stats>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let start = Instant::now();
    let mut lat = Vec::with_capacity(n);
    let mut runs = futures::stream::iter(0..n)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                fut.await.map(|_| t.elapsed().as_nanos() as u64)
            }
        })
        .buffer_unordered(inflight);
    while let Some(r) = runs.next().await {
        lat.push(r?);
    }
    Ok(Stats::new(lat, n, start.elapsed()))
}

/// CPU used by the plugin, this host process and nats-server over one run.
#[derive(Clone, Copy)]
struct Pids {
    plugin: u32,
    server: u32,
}

struct CpuMeter {
    pids: Pids,
    start: [Duration; 3],
}

impl CpuMeter {
    fn sample(pids: Pids) -> [Duration; 3] {
        [pids.plugin, std::process::id(), pids.server]
            .map(|pid| support::cpu_time(pid).unwrap_or_default())
    }
    fn start(pids: Pids) -> CpuMeter {
        CpuMeter {
            pids,
            start: Self::sample(pids),
        }
    }
    /// `<name>_cpu_{plugin,host,nats}` in µs of CPU per message.
    fn print(&self, name: &str, n: usize, with_plugin: bool) {
        let end = Self::sample(self.pids);
        for (i, who) in ["plugin", "host", "nats"].iter().enumerate() {
            if i == 0 && !with_plugin {
                continue;
            }
            let us = end[i].saturating_sub(self.start[i]).as_secs_f64() * 1e6 / n as f64;
            fig(&format!("{name}_cpu_{who}"), us, "us/msg");
        }
    }
}

/// Under `make profile` the plugin runs in callgrind (`BENCH_CALLGRIND=1`): zero its counters
/// before a measured loop and dump them after, so the profile holds that loop alone.
fn callgrind(pid: u32, arg: &str) {
    if std::env::var_os("BENCH_CALLGRIND").is_none() {
        return;
    }
    let out = std::process::Command::new("callgrind_control")
        .args([arg, &pid.to_string()])
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("callgrind_control {arg} {pid} failed: {out:?}");
    }
}

async fn execute(client: &PluginServiceClient<Channel>, req: ExecuteStepRequest) -> Res<Vec<u8>> {
    let r = client
        .clone()
        .execute_step(req)
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    if !r.error.is_empty() {
        return Err(r.error);
    }
    r.typed_output
        .map(|a| a.value)
        .ok_or_else(|| "STRICT step returned no typed_output".into())
}

/// An ExecuteStepRequest as the host sends it in STRICT mode, built once.
fn request(
    p: &Plugin,
    step_type: &str,
    handle: &str,
    config: serde_json::Value,
    input: serde_json::Value,
) -> Res<ExecuteStepRequest> {
    let (cfg, inp, _) = p.codec.step_messages(step_type);
    Ok(ExecuteStepRequest {
        handle_id: handle.into(),
        typed_config: Some(p.codec.typed_from_json(&cfg, &config)?),
        typed_input: Some(p.codec.typed_input(&inp, &input)?),
        current: Some(common::typed::json_to_struct(&input)),
        ..Default::default()
    })
}

async fn raw_publish(js: &async_nats::jetstream::Context, subject: &str, body: String) -> Res<()> {
    js.publish(subject.to_string(), body.into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
        .map(|_| ())
}

#[tokio::main]
async fn main() {
    support::ensure_plugin_binary();
    BASE.get_or_init(Instant::now);
    let started = Instant::now();
    if let Err(e) = run().await {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
    println!("# total {:.1} s", started.elapsed().as_secs_f64());
}

async fn run() -> Res<()> {
    let nats_bin = nats_test_server::binary();
    let server = NatsServer::start();
    println!(
        "# nats-server {} | plugin {} | {} cpus | payload {PAYLOAD_LEN} B, file storage",
        nats_test_server::version(&nats_bin),
        common::plugin_bin().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    let (pipeline, mut lat_rx) = latency_pipeline();
    let pg_pipeline = pipeline.clone();
    let mut plugin = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    plugin.calls = None; // the host's copy of each call is not needed here
    let pid = plugin.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = support::proc_status_kb(pid, "VmRSS").unwrap_or(0);

    let p = &plugin;
    bench_modules(p).await;
    for (name, filter) in [
        ("cons_steps", "bench.cons"),
        ("cons_raw", "bench.cons"),
        ("trig_mif1", "bench.trig.mif1"),
        ("trig_mif1_batch2", "bench.trig.mif1_batch2"),
        ("trig_mif64", "bench.trig.mif64"),
        ("trig_batch100", "bench.trig.batch100"),
        ("cons_bulk", "bench.cons"),
        ("cons_raw_pipelined", "bench.cons"),
    ] {
        p.module_up(
            "eventbus.consumer",
            name,
            &format!("name: {name}\nstream_name: BENCH\nfilter_subject: {filter}\nack_policy: ACK_POLICY_EXPLICIT\n"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let modules_rss = support::proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let client = async_nats::connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);

    let pids = Pids {
        plugin: pid,
        server: server.pid().unwrap_or(0),
    };
    if phase("publish") {
        publish_bench(p, &js, pids).await?;
    }
    if phase("consume") {
        consume_bench(p, &js).await?;
    }
    if phase("trigger") {
        trigger_bench(p, &js, &mut lat_rx, pids).await?;
    }
    if phase("bulk") {
        bulk_bench(p, &js, &mut lat_rx).await?;
    }

    if phase("pg") {
        pg_bench(pg_pipeline.clone(), &mut lat_rx).await?;
    }
    if phase("kafka") {
        kafka_bench(pg_pipeline, &mut lat_rx).await?;
    }

    let loaded_rss = support::proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let peak_rss = support::proc_status_kb(pid, "VmHWM").unwrap_or(0);
    let (code, _) = plugin.shutdown().await;
    if code != Some(0) {
        return Err(format!(
            "plugin exited with {code:?}; stderr:\n{}",
            plugin.stderr()
        ));
    }
    drop(plugin);
    if phase("metrics") {
        proof::metrics_bench(&server, &js).await?;
    }
    if phase("baseline") {
        proof::baseline_bench(&server, &js).await?;
    }
    if !phase("launch") {
        return Ok(());
    }

    // (d) Fresh launches, no NATS: spawn to handshake line.
    let mut spawn = Vec::with_capacity(LAUNCHES);
    for _ in 0..LAUNCHES {
        let mut p = Plugin::launch(LaunchOptions::default()).await;
        spawn.push(p.spawn_to_handshake);
        p.shutdown().await;
    }
    spawn.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    fig(
        "spawn_to_handshake_median",
        ms((spawn[LAUNCHES / 2 - 1] + spawn[LAUNCHES / 2]) / 2),
        "ms",
    );
    fig("spawn_to_handshake_max", ms(spawn[LAUNCHES - 1]), "ms");
    let mib = |kb: u64| kb as f64 / 1024.0;
    fig("rss_idle", mib(idle_rss), "MiB");
    fig("rss_modules_up", mib(modules_rss), "MiB");
    fig("rss_loaded", mib(loaded_rss), "MiB");
    fig("rss_peak", mib(peak_rss), "MiB");
    drop(server);
    Ok(())
}

/// The broker `bus` and the stream BENCH (`bench.>`) every bench plugin declares.
async fn bench_modules(p: &Plugin) {
    p.module_up(
        "eventbus.broker",
        "bus",
        "provider: nats\ndeploy_target: local\n",
    )
    .await;
    p.module_up(
        "eventbus.stream",
        "bench",
        "name: BENCH\nsubjects: ['bench.>']\n",
    )
    .await;
}

/// The no-op pipeline: records each delivery's end-to-end latency (from the publish stamp in
/// the payload) and arrival time on the returned channel.
fn latency_pipeline() -> (PipelineFn, mpsc::UnboundedReceiver<(u64, u64)>) {
    let (lat_tx, lat_rx) = mpsc::unbounded_channel::<(u64, u64)>();
    // A batch run (`messages: [...]`) records each of its messages.
    let pipeline: PipelineFn = Arc::new(move |req| {
        use prost_types::value::Kind;
        let now = now_ns();
        let stamp = |s: &prost_types::Struct| {
            s.fields.get("text").and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => stamp_of(s),
                _ => None,
            })
        };
        let send = |t: Option<u64>| {
            let _ = lat_tx.send((t.map_or(u64::MAX, |t| now.saturating_sub(t)), now));
        };
        match req
            .data
            .as_ref()
            .and_then(|d| d.fields.get("messages"))
            .map(|v| &v.kind)
        {
            Some(Some(Kind::ListValue(l))) => {
                for v in &l.values {
                    match &v.kind {
                        Some(Kind::StructValue(m)) => send(stamp(m)),
                        _ => send(None),
                    }
                }
            }
            _ => send(req.data.as_ref().and_then(stamp)),
        }
        Box::pin(async { Ok(()) })
    });
    (pipeline, lat_rx)
}

/// (a) ExecuteStep(publish) through the plugin vs raw JetStream publish, same stream.
async fn publish_bench(p: &Plugin, js: &async_nats::jetstream::Context, pids: Pids) -> Res<()> {
    let handle = p
        .create_step(
            "step.eventbus.publish",
            "pub",
            "subject: bench.pub\nbroker_ref: bus\n",
        )
        .await?;
    let req = request(
        p,
        "step.eventbus.publish",
        &handle,
        json!({"subject": "bench.pub", "payload": payload(0)}),
        json!({}),
    )?;
    let plugin_op = |_| {
        let req = req.clone();
        async move { execute(&p.client, req).await.map(|_| ()) }
    };
    let raw_op = |_| raw_publish(js, "bench.pub", payload(0));
    // Warm both paths (connections, the plugin's caches, the stream's first blocks).
    closed_loop(1000, 16, plugin_op).await?;
    closed_loop(1000, 16, raw_op).await?;
    // Floors, for reading the figures below: a NATS round trip (PING/PONG) from this process,
    // and an ExecuteStep the plugin answers at once (unknown handle): the gRPC hop alone.
    let client = js.client();
    let rtt = closed_loop(FLOOR_N, 1, |_| {
        let c = client.clone();
        async move { c.flush().await.map_err(|e| e.to_string()) }
    })
    .await?;
    let unknown = ExecuteStepRequest {
        handle_id: "bench-unknown-handle".into(),
        ..Default::default()
    };
    let noop = |_| {
        let req = unknown.clone();
        async move {
            let r = p.client.clone().execute_step(req).await;
            r.map(|_| ()).map_err(|s| s.to_string())
        }
    };
    let hop = closed_loop(FLOOR_N, 1, noop).await?;
    fig("nats_rtt_c1_p50", rtt.p50_us, "us");
    fig("execute_step_floor_c1_p50", hop.p50_us, "us");
    // The same no-op at 64 in flight: what the gRPC hop alone allows, the ceiling for any
    // plugin-side publish work (compare with publish_raw_c64_rate below).
    let cpu = CpuMeter::start(pids);
    let hop64 = closed_loop(PUBLISH_N, 64, noop).await?;
    fig("execute_step_floor_c64_rate", hop64.rate, "msg/s");
    cpu.print("execute_step_floor_c64", PUBLISH_N, true);
    for inflight in inflights() {
        let cpu = CpuMeter::start(pids);
        callgrind(pids.plugin, "--zero");
        let plugin = closed_loop(PUBLISH_N, inflight, plugin_op).await?;
        callgrind(pids.plugin, &format!("--dump=publish_c{inflight}"));
        plugin.print(&format!("publish_plugin_c{inflight}"));
        if inflight == 64 {
            cpu.print("publish_plugin_c64", PUBLISH_N, true);
        }
        let cpu = CpuMeter::start(pids);
        let raw = closed_loop(PUBLISH_N, inflight, raw_op).await?;
        raw.print(&format!("publish_raw_c{inflight}"));
        if inflight == 64 {
            cpu.print("publish_raw_c64", PUBLISH_N, false);
        }
        fig(
            &format!("publish_ratio_c{inflight}_rate"),
            plugin.rate / raw.rate,
            "x",
        );
        fig(
            &format!("publish_ratio_c{inflight}_p50"),
            plugin.p50_us / raw.p50_us,
            "x",
        );
    }
    Ok(())
}

/// (b) consume 100 + ack each, via steps vs a raw pull consumer, over the same 10k messages.
async fn consume_bench(p: &Plugin, js: &async_nats::jetstream::Context) -> Res<()> {
    closed_loop(CONSUME_N, 256, |i| {
        raw_publish(js, "bench.cons", payload(i as u64))
    })
    .await?;

    let consume = p
        .create_step("step.eventbus.consume", "get", "consumer: cons_steps\n")
        .await?;
    let ack = p.create_step("step.eventbus.ack", "ack", "").await?;
    let consume_req = request(
        p,
        "step.eventbus.consume",
        &consume,
        json!({"consumer": "cons_steps", "batch_size": 100, "max_wait": "1s"}),
        json!({}),
    )?;
    let ack_template = request(p, "step.eventbus.ack", &ack, json!({}), json!({}))?;
    let ack_input_type = ack_template
        .typed_input
        .as_ref()
        .map(|a| a.type_url.clone())
        .unwrap_or_default();
    let start = Instant::now();
    let mut done = 0;
    while done < CONSUME_N {
        if start.elapsed() > WAIT {
            return Err(format!("steps consumed only {done} of {CONSUME_N}"));
        }
        let out = execute(&p.client, consume_req.clone()).await?;
        let batch = ConsumeResponse::decode(out.as_slice()).map_err(|e| e.to_string())?;
        for m in batch.messages {
            let mut req = ack_template.clone();
            req.typed_input = Some(prost_types::Any {
                type_url: ack_input_type.clone(),
                value: AckRequest {
                    ack_token: m.ack_token,
                    ..Default::default()
                }
                .encode_to_vec(),
            });
            req.current = None;
            execute(&p.client, req).await?;
            done += 1;
        }
    }
    let steps_rate = done as f64 / start.elapsed().as_secs_f64();

    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("BENCH")
        .await
        .map_err(|e| e.to_string())?
        .get_consumer("cons_raw")
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut done = 0;
    while done < CONSUME_N {
        if start.elapsed() > WAIT {
            return Err(format!("raw consumed only {done} of {CONSUME_N}"));
        }
        let batch: Vec<_> = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        for m in batch {
            m.double_ack().await.map_err(|e| e.to_string())?;
            done += 1;
        }
    }
    let raw_rate = done as f64 / start.elapsed().as_secs_f64();
    fig("consume_ack_steps_b100_rate", steps_rate, "msg/s");
    fig("consume_ack_raw_b100_rate", raw_rate, "msg/s");
    fig("consume_ack_ratio_rate", steps_rate / raw_rate, "x");
    Ok(())
}

/// (c) raw publish -> trigger -> TriggerWorkflow at the host: max_in_flight 1 and 64 with the
/// default batch size (= max_in_flight), and max_in_flight 1 with batch_size 2 for contrast.
async fn trigger_bench(
    p: &Plugin,
    js: &async_nats::jetstream::Context,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
    pids: Pids,
) -> Res<()> {
    for (mif, batch, label) in [
        (1usize, 0usize, "mif1"),
        (1, 2, "mif1_batch2"),
        (64, 0, "mif64"),
    ] {
        let durable = format!("trig_{label}");
        let subject = format!("bench.trig.{label}");
        let handle = p
            .create_trigger(
                &format!("pipeline:bench-{label}"),
                &json!({"name": durable, "max_in_flight": mif, "batch_size": batch}),
            )
            .await?;
        p.lifecycle("start", &handle).await?;

        // Burst: publish as fast as acks come back (256 outstanding) while receiving.
        let cpu = CpuMeter::start(pids);
        callgrind(pids.plugin, "--zero");
        let publisher = spawn_publisher(js, &subject, TRIGGER_BURST_N, None);
        let burst = receive(calls, TRIGGER_BURST_N, TRIGGER_CAP).await?;
        publisher.await.map_err(|e| e.to_string())??;
        callgrind(pids.plugin, &format!("--dump=trigger_{label}_burst"));
        if mif == 64 {
            cpu.print("trigger_mif64_burst", burst.received.max(1), true);
        }
        settle(p, js, &handle, &subject, calls).await?;

        // Paced: one message per millisecond, below capacity: latency without a queue.
        let paced = paced_phase(p, js, &handle, &subject, calls, TRIGGER_PACED_N, 1).await?;
        // Sustained 10k msg/s (10 per millisecond) for 2 s: throughput and latency together.
        let sustained = if mif == 64 {
            let n = TRIGGER_SUSTAINED_N;
            Some(paced_phase(p, js, &handle, &subject, calls, n, 10).await?)
        } else {
            None
        };
        p.lifecycle("stop", &handle).await?;

        let name = format!("trigger_{label}");
        fig(&format!("{name}_burst_rate"), burst.rate, "msg/s");
        fig(&format!("{name}_burst_p99_e2e"), burst.p99_us, "us");
        fig(&format!("{name}_paced1k_p50_e2e"), paced.p50_us, "us");
        fig(&format!("{name}_paced1k_p99_e2e"), paced.p99_us, "us");
        if let Some(r) = &sustained {
            fig(&format!("{name}_paced10k_rate"), r.rate, "msg/s");
            fig(&format!("{name}_paced10k_p50_e2e"), r.p50_us, "us");
            fig(&format!("{name}_paced10k_p99_e2e"), r.p99_us, "us");
        }
        let mut phases = vec![
            ("burst", &burst, TRIGGER_BURST_N),
            ("paced1k", &paced, TRIGGER_PACED_N),
        ];
        if let Some(r) = &sustained {
            phases.push(("paced10k", r, TRIGGER_SUSTAINED_N));
        }
        for (phase, r, n) in phases {
            if r.received < n || r.stalls > 0 {
                fig(
                    &format!("{name}_{phase}_received"),
                    r.received as f64,
                    "msg",
                );
                fig(
                    &format!("{name}_{phase}_stalls_over_1s"),
                    r.stalls as f64,
                    "count",
                );
            }
        }
    }
    Ok(())
}

/// Publishes `n` messages at `per_ms` per millisecond while receiving them, then settles.
async fn paced_phase(
    p: &Plugin,
    js: &async_nats::jetstream::Context,
    handle: &str,
    subject: &str,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
    n: usize,
    per_ms: usize,
) -> Res<Received> {
    let pace = Some((Duration::from_millis(1), per_ms));
    let publisher = spawn_publisher(js, subject, n, pace);
    let r = receive(calls, n, TRIGGER_CAP).await?;
    publisher.await.map_err(|e| e.to_string())??;
    settle(p, js, handle, subject, calls).await?;
    Ok(r)
}

/// Publishes `n` stamped messages from its own task: as fast as acks allow, or `per_tick`
/// messages every `every` when paced.
fn spawn_publisher(
    js: &async_nats::jetstream::Context,
    subject: &str,
    n: usize,
    pace: Option<(Duration, usize)>,
) -> tokio::task::JoinHandle<Res<()>> {
    let (js, subject) = (js.clone(), subject.to_string());
    tokio::spawn(async move {
        match pace {
            None => {
                futures::stream::iter(0..n)
                    .map(|_| raw_publish(&js, &subject, payload(now_ns())))
                    .buffer_unordered(256)
                    .try_collect::<Vec<()>>()
                    .await?;
            }
            Some((every, per_tick)) => {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Acks are collected as they come (the context bounds unacknowledged publishes).
                let mut acks = futures::stream::FuturesUnordered::<
                    <async_nats::jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture,
                >::new();
                for i in 0..n {
                    if i % per_tick.max(1) == 0 {
                        tick.tick().await;
                        while let Some(Some(r)) = acks.next().now_or_never() {
                            r.map_err(|e| e.to_string())?;
                        }
                    }
                    let ack = js
                        .publish(subject.clone(), payload(now_ns()).into())
                        .await
                        .map_err(|e| e.to_string())?;
                    acks.push(std::future::IntoFuture::into_future(ack));
                }
                while let Some(r) = acks.next().await {
                    r.map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    })
}

/// After a capped phase: stop the trigger (in-flight calls finish), drop what was not delivered
/// and what the host still holds, then start again for the next phase.
async fn settle(
    p: &Plugin,
    js: &async_nats::jetstream::Context,
    handle: &str,
    subject: &str,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
) -> Res<()> {
    p.lifecycle("stop", handle).await?;
    js.get_stream("BENCH")
        .await
        .map_err(|e| e.to_string())?
        .purge()
        .filter(subject)
        .await
        .map_err(|e| e.to_string())?;
    while calls.try_recv().is_ok() {}
    p.lifecycle("start", handle).await
}

struct Received {
    received: usize,
    /// Gaps of a second or more between consecutive deliveries.
    stalls: usize,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Collects up to `n` deliveries (end-to-end latency, arrival time) within `cap`. The rate is
/// deliveries per second from the first publish stamp to the last arrival.
async fn receive(
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
    n: usize,
    cap: Duration,
) -> Res<Received> {
    let started = now_ns();
    let deadline = tokio::time::Instant::now() + cap;
    let mut lat = Vec::with_capacity(n);
    let (mut last, mut stalls) = (started, 0);
    while lat.len() < n {
        match tokio::time::timeout_at(deadline, calls.recv()).await {
            Ok(Some((u64::MAX, _))) => return Err("a delivery without a publish stamp".into()),
            Ok(Some((l, at))) => {
                if at.saturating_sub(last) >= 1_000_000_000 {
                    stalls += 1;
                }
                last = at;
                lat.push(l);
            }
            Ok(None) => return Err("callback closed".into()),
            Err(_) => break,
        }
    }
    let received = lat.len();
    let stats = Stats::new(
        lat,
        received,
        Duration::from_nanos(last.saturating_sub(started).max(1)),
    );
    Ok(Received {
        received,
        stalls,
        rate: stats.rate,
        p50_us: stats.p50_us,
        p99_us: stats.p99_us,
    })
}

const BULK_LIST: usize = 100;

/// Raw async-nats publishing `n` messages in order from one task with at most `window`
/// unacknowledged: what bulk publish does, without the plugin.
async fn raw_windowed(
    js: &async_nats::jetstream::Context,
    subject: &str,
    n: usize,
    window: usize,
) -> Res<()> {
    let mut pending = futures::stream::FuturesOrdered::<
        <async_nats::jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture,
    >::new();
    for i in 0..n {
        while pending.len() >= window {
            if let Some(r) = pending.next().await {
                r.map_err(|e| e.to_string())?;
            }
        }
        let ack = js
            .publish(subject.to_string(), payload(i as u64).into())
            .await
            .map_err(|e| e.to_string())?;
        pending.push_back(std::future::IntoFuture::into_future(ack));
    }
    while let Some(r) = pending.next().await {
        r.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A bulk publish of one `BULK_LIST`-message list to `subject` (`max_in_flight` when given).
fn bulk_publish_req(
    p: &Plugin,
    handle: &str,
    subject: &str,
    max_in_flight: Option<usize>,
) -> Res<ExecuteStepRequest> {
    let list: Vec<serde_json::Value> = (0..BULK_LIST)
        .map(|i| json!({"payload": payload(i as u64)}))
        .collect();
    let mut config = json!({"subject": subject, "messages": list});
    if let Some(n) = max_in_flight {
        config["max_in_flight"] = json!(n);
    }
    request(p, "step.eventbus.publish", handle, config, json!({}))
}

/// Sends one bulk publish and checks that every message of the list was stored.
async fn bulk_publish(p: &Plugin, req: ExecuteStepRequest) -> Res<()> {
    let out = execute(&p.client, req).await?;
    let r = eventbus_plugin::pb::eventbus::PublishResponse::decode(out.as_slice())
        .map_err(|e| e.to_string())?;
    if r.published as usize != BULK_LIST {
        return Err(format!(
            "bulk publish stored {} of {BULK_LIST}",
            r.published
        ));
    }
    Ok(())
}

/// One consume step call, its output fed straight into one bulk ack (as pipeline state would
/// carry it); the messages settled.
async fn consume_bulk_ack(
    p: &Plugin,
    consume_req: &ExecuteStepRequest,
    ack_template: &ExecuteStepRequest,
    ack_input_type: &str,
) -> Res<usize> {
    let out = execute(&p.client, consume_req.clone()).await?;
    let batch = ConsumeResponse::decode(out.as_slice()).map_err(|e| e.to_string())?;
    let n = batch.messages.len();
    if n == 0 {
        return Ok(0);
    }
    let mut req = ack_template.clone();
    req.typed_input = Some(prost_types::Any {
        type_url: ack_input_type.to_string(),
        value: AckRequest {
            messages: batch.messages,
            ..Default::default()
        }
        .encode_to_vec(),
    });
    req.current = None;
    let out = execute(&p.client, req).await?;
    let acked = eventbus_plugin::pb::eventbus::AckResponse::decode(out.as_slice())
        .map_err(|e| e.to_string())?;
    if acked.acked as usize != n {
        return Err(format!("bulk ack confirmed {} of {n}", acked.acked));
    }
    Ok(n)
}

/// (e) Bulk publish, consume + bulk ack, and trigger batch delivery against their baselines.
async fn bulk_bench(
    p: &Plugin,
    js: &async_nats::jetstream::Context,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
) -> Res<()> {
    // Bulk publish: PUBLISH_N messages as 100-message lists, one call at a time.
    let handle = p
        .create_step(
            "step.eventbus.publish",
            "bulk",
            "subject: bench.bulk\nbroker_ref: bus\n",
        )
        .await?;
    let req = bulk_publish_req(p, &handle, "bench.bulk", Some(BULK_LIST))?;
    let bulk_op = |_| bulk_publish(p, req.clone());
    let lists = PUBLISH_N / BULK_LIST;
    closed_loop(10, 1, bulk_op).await?; // warm
    raw_windowed(js, "bench.bulk", 1000, BULK_LIST).await?;
    let plugin = closed_loop(lists, 1, bulk_op).await?;
    let start = Instant::now();
    raw_windowed(js, "bench.bulk", PUBLISH_N, BULK_LIST).await?;
    let raw_rate = PUBLISH_N as f64 / start.elapsed().as_secs_f64();
    // The same lists raw, each awaited before the next (the bulk step's per-call barrier).
    let start = Instant::now();
    for _ in 0..lists {
        raw_windowed(js, "bench.bulk", BULK_LIST, BULK_LIST).await?;
    }
    let raw_lists_rate = PUBLISH_N as f64 / start.elapsed().as_secs_f64();
    let bulk_rate = plugin.rate * BULK_LIST as f64;
    fig("bulk_publish_plugin_l100_rate", bulk_rate, "msg/s");
    fig("bulk_publish_plugin_l100_call_p50", plugin.p50_us, "us");
    fig("bulk_publish_raw_w100_rate", raw_rate, "msg/s");
    fig("bulk_publish_raw_lists100_rate", raw_lists_rate, "msg/s");
    fig("bulk_publish_ratio_rate", bulk_rate / raw_rate, "x");

    // Consume 100 + one bulk ack vs raw fetch 100 + double-ack each. Every consumer of
    // bench.cons needs CONSUME_N messages; cons_raw used its set in the consume phase if it ran.
    let stream = js.get_stream("BENCH").await.map_err(|e| e.to_string())?;
    let pending = |durable: &'static str| {
        let stream = stream.clone();
        async move {
            let mut c: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer(durable)
                .await
                .map_err(|e| e.to_string())?;
            c.info()
                .await
                .map(|i| i.num_pending as usize)
                .map_err(|e| e.to_string())
        }
    };
    if pending("cons_raw").await? < CONSUME_N {
        closed_loop(CONSUME_N, 256, |i| {
            raw_publish(js, "bench.cons", payload(i as u64))
        })
        .await?;
    }
    let consume = p
        .create_step("step.eventbus.consume", "get_bulk", "consumer: cons_bulk\n")
        .await?;
    let ack = p.create_step("step.eventbus.ack", "ack_bulk", "").await?;
    let consume_req = request(
        p,
        "step.eventbus.consume",
        &consume,
        json!({"consumer": "cons_bulk", "batch_size": 100, "max_wait": "1s"}),
        json!({}),
    )?;
    let ack_template = request(p, "step.eventbus.ack", &ack, json!({}), json!({}))?;
    let ack_input_type = ack_template
        .typed_input
        .as_ref()
        .map(|a| a.type_url.clone())
        .unwrap_or_default();
    let start = Instant::now();
    let mut done = 0;
    while done < CONSUME_N {
        if start.elapsed() > WAIT {
            return Err(format!("bulk steps consumed only {done} of {CONSUME_N}"));
        }
        done += consume_bulk_ack(p, &consume_req, &ack_template, &ack_input_type).await?;
    }
    let steps_rate = done as f64 / start.elapsed().as_secs_f64();
    let mut raw_rates = Vec::new();
    for (durable, pipelined) in [("cons_raw", false), ("cons_raw_pipelined", true)] {
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(durable)
            .await
            .map_err(|e| e.to_string())?;
        let pending = CONSUME_N;
        let start = Instant::now();
        let mut done = 0;
        while done < pending {
            if start.elapsed() > WAIT {
                return Err(format!("raw consumed only {done} of {pending}"));
            }
            let batch: Vec<_> = consumer
                .fetch()
                .max_messages(100)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| e.to_string())?
                .try_collect()
                .await
                .map_err(|e| e.to_string())?;
            done += batch.len();
            if pipelined {
                futures::future::try_join_all(batch.iter().map(|m| m.double_ack()))
                    .await
                    .map_err(|e| e.to_string())?;
            } else {
                for m in batch {
                    m.double_ack().await.map_err(|e| e.to_string())?;
                }
            }
        }
        raw_rates.push(done as f64 / start.elapsed().as_secs_f64());
    }
    fig("consume_bulk_ack_steps_b100_rate", steps_rate, "msg/s");
    fig("consume_bulk_ack_raw_b100_rate", raw_rates[0], "msg/s");
    fig(
        "consume_bulk_ack_ratio_rate",
        steps_rate / raw_rates[0],
        "x",
    );
    fig(
        "consume_bulk_ack_raw_pipelined_b100_rate",
        raw_rates[1],
        "msg/s",
    );
    fig(
        "consume_bulk_ack_ratio_pipelined_rate",
        steps_rate / raw_rates[1],
        "x",
    );

    // Trigger batch delivery (batch 100) vs one-message delivery (max_in_flight 64), bursts.
    let mut rates = Vec::new();
    for (label, config) in [
        ("mif64", json!({"name": "trig_mif64", "max_in_flight": 64})),
        (
            "batch100",
            json!({"name": "trig_batch100", "deliver": "batch", "batch_size": 100, "max_batch_wait": "100ms"}),
        ),
    ] {
        let subject = format!("bench.trig.{label}");
        let handle = p
            .create_trigger(&format!("pipeline:bulk-{label}"), &config)
            .await?;
        p.lifecycle("start", &handle).await?;
        let publisher = spawn_publisher(js, &subject, TRIGGER_BURST_N, None);
        let burst = receive(calls, TRIGGER_BURST_N, TRIGGER_CAP).await?;
        publisher.await.map_err(|e| e.to_string())??;
        settle(p, js, &handle, &subject, calls).await?;
        p.lifecycle("stop", &handle).await?;
        fig(
            &format!("trigger_{label}_vs_batch_burst_rate"),
            burst.rate,
            "msg/s",
        );
        fig(
            &format!("trigger_{label}_vs_batch_burst_p99_e2e"),
            burst.p99_us,
            "us",
        );
        if burst.received < TRIGGER_BURST_N {
            fig(
                &format!("trigger_{label}_vs_batch_burst_received"),
                burst.received as f64,
                "msg",
            );
        }
        rates.push(burst.rate);
    }
    fig("trigger_batch_ratio_rate", rates[1] / rates[0], "x");
    Ok(())
}

/// Statements the server has run so far (pg_stat_statements, every statement counted).
fn pg_statements(pg: &pg_test_server::PgServer) -> i64 {
    pg.psql(
        "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE query NOT LIKE '%pg_stat_statements%'",
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

/// Raw SQL against the plugin's own tables, one connection, prepared statements: bulk insert
/// of 100-row lists, and a consumer that claims 100 delivery rows per statement, then settles
/// them one statement each or all in one. What PostgreSQL gives on this machine, without the
/// plugin and the host hop.
async fn pg_raw_bench(pg: &pg_test_server::PgServer) -> Res<()> {
    let err = |e: tokio_postgres::Error| e.to_string();
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .map_err(err)?;
    let driver = tokio::spawn(conn);
    let insert = c
        .prepare(
            "WITH ins AS (INSERT INTO eventbus_events (stream_name, subject, headers, payload) \
               SELECT 'PGBENCH', $1, '{}'::jsonb, p FROM unnest($2::bytea[]) AS p RETURNING id) \
             SELECT pg_notify('eventbus_pgbench', max(id)::text) FROM ins",
        )
        .await
        .map_err(err)?;
    let list: Vec<Vec<u8>> = (0..BULK_LIST)
        .map(|i| payload(i as u64).into_bytes())
        .collect();
    let start = Instant::now();
    for _ in 0..PG_PUBLISH_N / BULK_LIST {
        c.execute(&insert, &[&"pgb.rawbulk", &list])
            .await
            .map_err(err)?;
    }
    fig(
        "pg_bulk_publish_raw_sql_l100_rate",
        PG_PUBLISH_N as f64 / start.elapsed().as_secs_f64(),
        "msg/s",
    );
    for name in ["praw_each", "praw_all"] {
        c.execute(
            "INSERT INTO eventbus_consumers (stream_name, name, position, filter_subject) \
             VALUES ('PGBENCH', $1, 0, 'pgb.rawbulk')",
            &[&name],
        )
        .await
        .map_err(err)?;
    }
    // The plugin's plan shapes (see `src/pg/sql.rs`), so the baseline stays the limit on a
    // fresh schema: the range bound as an InitPlan keeps the events' index scan outermost and
    // ordered, the filter written as the plugin writes it (not an index condition on
    // `subject`), the rows to skip read once into a hashed NOT IN (their range row comparisons
    // only the primary key can serve, not the event_id index across every consumer); the settle finds its rows
    // through the event_id index. A join against the consumer's delivery rows instead (the
    // first version) read all of them per statement: 415 ms per claim by the end.
    let claim = c
        .prepare(
            "WITH k AS MATERIALIZED (SELECT e.id FROM eventbus_events e \
               WHERE e.stream_name = 'PGBENCH' AND e.id > (SELECT $2::int8) \
               AND ($3::bool OR e.subject = ANY($4::text[]) OR e.subject LIKE ANY($5::text[])) \
               AND e.id NOT IN (SELECT d.event_id FROM eventbus_event_deliveries d \
                 WHERE (d.stream_name, d.consumer_name, d.event_id) > ('PGBENCH', $1, (SELECT $2::int8)) \
                 AND (d.stream_name, d.consumer_name, d.event_id) <= ('PGBENCH', $1, 9223372036854775807::int8)) \
               ORDER BY e.id LIMIT 100), \
             ins AS (INSERT INTO eventbus_event_deliveries AS d (stream_name, consumer_name, \
               event_id, due_at) SELECT 'PGBENCH', $1, k.id, now() + interval '30 seconds' FROM k \
               ON CONFLICT DO NOTHING RETURNING d.event_id) \
             SELECT e.id, e.payload FROM ins JOIN eventbus_events e ON e.id = ins.event_id \
             ORDER BY e.id",
        )
        .await
        .map_err(err)?;
    let ack_one = c
        .prepare(
            "UPDATE eventbus_event_deliveries SET state = 'acked', due_at = NULL \
             WHERE stream_name = 'PGBENCH' AND consumer_name = $1 AND event_id = $2 AND state IS NULL",
        )
        .await
        .map_err(err)?;
    let ack_all = c
        .prepare(
            "UPDATE eventbus_event_deliveries SET state = 'acked', due_at = NULL \
             WHERE event_id = ANY($2) AND stream_name || '' = 'PGBENCH' \
             AND consumer_name || '' = $1 AND state IS NULL",
        )
        .await
        .map_err(err)?;
    let advance = c
        .prepare(
            "UPDATE eventbus_consumers SET position = $2 WHERE stream_name = 'PGBENCH' AND name = $1",
        )
        .await
        .map_err(err)?;
    let (filter, no_like) = (vec!["pgb.rawbulk"], Vec::<&str>::new());
    for (name, each) in [("praw_each", true), ("praw_all", false)] {
        let start = Instant::now();
        let mut done = 0;
        let mut position = 0i64;
        while done < PG_PUBLISH_N {
            let rows = c
                .query(&claim, &[&name, &position, &false, &filter, &no_like])
                .await
                .map_err(err)?;
            if rows.is_empty() {
                return Err(format!("raw SQL consumer {name} ran dry at {done}"));
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            if each {
                for id in &ids {
                    c.execute(&ack_one, &[&name, id]).await.map_err(err)?;
                }
            } else {
                c.execute(&ack_all, &[&name, &ids]).await.map_err(err)?;
            }
            position = ids.iter().copied().max().unwrap_or(position);
            c.execute(&advance, &[&name, &position])
                .await
                .map_err(err)?;
            done += ids.len();
        }
        fig(
            &format!(
                "pg_consume_{}_raw_sql_b100_rate",
                if each { "ack" } else { "bulk_ack" }
            ),
            done as f64 / start.elapsed().as_secs_f64(),
            "msg/s",
        );
    }
    drop(c);
    let _ = driver.await;
    Ok(())
}

/// (f) Provider pgchannel: publish, consume + ack and the trigger through a second plugin
/// process whose broker is a real PostgreSQL.
async fn pg_bench(
    pipeline: PipelineFn,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
) -> Res<()> {
    let pg = pg_test_server::PgServer::builder()
        .setting("shared_preload_libraries", "pg_stat_statements")
        .setting("pg_stat_statements.track", "all")
        .start();
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    println!(
        "# pgchannel: {} over loopback TCP, fsync off | payload {PAYLOAD_LEN} B",
        pg.psql("select version()")
            .trim()
            .split(" on ")
            .next()
            .unwrap_or("PostgreSQL")
    );
    let mut plugin = Plugin::launch(LaunchOptions {
        env: vec![("EVENTBUS_PGBUS_URI".into(), pg.url())],
        callback: Some(pipeline.clone()),
        ..Default::default()
    })
    .await;
    plugin.calls = None;
    let p = &plugin;
    p.module_up("eventbus.broker", "pgbus", "provider: pgchannel\n")
        .await;
    p.module_up(
        "eventbus.stream",
        "pgbench",
        "name: PGBENCH\nsubjects: ['pgb.>']\n",
    )
    .await;
    for (name, filter) in [
        ("pcons", "pgb.cons"),
        ("pcons_bulk", "pgb.cons"),
        ("pcons_c4", "pgb.cons"),
        ("ptrig_mif1", "pgb.trig.mif1"),
        ("ptrig_mif64", "pgb.trig.mif64"),
        ("ptrig_2proc_mif64", "pgb.trig.2proc_mif64"),
    ] {
        p.module_up(
            "eventbus.consumer",
            name,
            &format!("name: {name}\nstream_name: PGBENCH\nfilter_subject: {filter}\n"),
        )
        .await;
    }
    let handle = p
        .create_step("step.eventbus.publish", "pgpub", "broker_ref: pgbus\n")
        .await?;
    let publish_req = |subject: &str, t: u64| {
        request(
            p,
            "step.eventbus.publish",
            &handle,
            json!({"subject": subject, "payload": payload(t)}),
            json!({}),
        )
    };
    let req = publish_req("pgb.pub", 0)?;
    let op = |_| {
        let req = req.clone();
        async move { execute(&p.client, req).await.map(|_| ()) }
    };
    closed_loop(500, 16, op).await?;
    for inflight in [1usize, 16, 64] {
        let s = closed_loop(PG_PUBLISH_N, inflight, op).await?;
        s.print(&format!("pg_publish_plugin_c{inflight}"));
    }

    // consume 100 + ack each.
    let req = publish_req("pgb.cons", 0)?;
    closed_loop(PG_CONSUME_N, 64, |_| {
        let req = req.clone();
        async move { execute(&p.client, req).await.map(|_| ()) }
    })
    .await?;
    let consume = p
        .create_step("step.eventbus.consume", "pgget", "consumer: pcons\n")
        .await?;
    let ack = p.create_step("step.eventbus.ack", "pgack", "").await?;
    let consume_req = request(
        p,
        "step.eventbus.consume",
        &consume,
        json!({"consumer": "pcons", "batch_size": 100, "max_wait": "1s"}),
        json!({}),
    )?;
    let ack_template = request(p, "step.eventbus.ack", &ack, json!({}), json!({}))?;
    let ack_input_type = ack_template
        .typed_input
        .as_ref()
        .map(|a| a.type_url.clone())
        .unwrap_or_default();
    let statements = pg_statements(&pg);
    let start = Instant::now();
    let mut done = 0;
    while done < PG_CONSUME_N {
        if start.elapsed() > WAIT {
            // Reported, not fatal: the trigger figures below still get measured.
            fig("pg_consume_ack_steps_b100_consumed", done as f64, "msg");
            break;
        }
        let out = execute(&p.client, consume_req.clone()).await?;
        let batch = ConsumeResponse::decode(out.as_slice()).map_err(|e| e.to_string())?;
        for m in batch.messages {
            let mut req = ack_template.clone();
            req.typed_input = Some(prost_types::Any {
                type_url: ack_input_type.clone(),
                value: AckRequest {
                    ack_token: m.ack_token,
                    ..Default::default()
                }
                .encode_to_vec(),
            });
            req.current = None;
            execute(&p.client, req).await?;
            done += 1;
        }
    }
    fig(
        "pg_consume_ack_steps_b100_rate",
        done as f64 / start.elapsed().as_secs_f64(),
        "msg/s",
    );
    fig(
        "pg_consume_ack_statements_per_msg",
        (pg_statements(&pg) - statements) as f64 / done.max(1) as f64,
        "stmt",
    );

    // consume 100 + one bulk ack of the consume output, one caller, then 4 callers sharing
    // one consumer.
    let consume = p
        .create_step(
            "step.eventbus.consume",
            "pgget_bulk",
            "consumer: pcons_bulk\n",
        )
        .await?;
    let ack = p.create_step("step.eventbus.ack", "pgack_bulk", "").await?;
    let consume_req = |durable: &str| {
        request(
            p,
            "step.eventbus.consume",
            &consume,
            json!({"consumer": durable, "batch_size": 100, "max_wait": "1s"}),
            json!({}),
        )
    };
    let ack_template = request(p, "step.eventbus.ack", &ack, json!({}), json!({}))?;
    let done_c = std::sync::atomic::AtomicUsize::new(0);
    let bulk_loop = |req: ExecuteStepRequest| {
        let ack_template = ack_template.clone();
        let ack_input_type = ack_input_type.clone();
        let done_c = &done_c;
        async move {
            let start = Instant::now();
            while done_c.load(std::sync::atomic::Ordering::Relaxed) < PG_CONSUME_N {
                if start.elapsed() > WAIT {
                    return Err("pg bulk consume stalled".to_string());
                }
                let n = consume_bulk_ack(p, &req, &ack_template, &ack_input_type).await?;
                done_c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<Instant, String>(Instant::now())
        }
    };
    let statements = pg_statements(&pg);
    let start = Instant::now();
    let end = bulk_loop(consume_req("pcons_bulk")?).await?;
    let done = done_c.swap(0, std::sync::atomic::Ordering::Relaxed);
    fig(
        "pg_consume_bulk_ack_steps_b100_rate",
        done as f64 / (end - start).as_secs_f64(),
        "msg/s",
    );
    fig(
        "pg_consume_bulk_ack_statements_per_msg",
        (pg_statements(&pg) - statements) as f64 / done.max(1) as f64,
        "stmt",
    );
    let start = Instant::now();
    let req = consume_req("pcons_c4")?;
    let ends = futures::future::try_join_all((0..4).map(|_| bulk_loop(req.clone()))).await?;
    let done = done_c.load(std::sync::atomic::Ordering::Relaxed);
    let end = ends.into_iter().min().unwrap_or_else(Instant::now);
    fig(
        "pg_consume_bulk_ack_steps_b100_c4_rate",
        done as f64 / (end - start).as_secs_f64(),
        "msg/s",
    );

    // Bulk publish: lists of 100 through the step, one call at a time.
    let bulk = p
        .create_step(
            "step.eventbus.publish",
            "pgbulk",
            "subject: pgb.bulk\nbroker_ref: pgbus\n",
        )
        .await?;
    let bulk_req = bulk_publish_req(p, &bulk, "pgb.bulk", None)?;
    let bulk_op = |_| bulk_publish(p, bulk_req.clone());
    closed_loop(5, 1, bulk_op).await?;
    let s = closed_loop(PG_PUBLISH_N / BULK_LIST, 1, bulk_op).await?;
    fig(
        "pg_bulk_publish_plugin_l100_rate",
        s.rate * BULK_LIST as f64,
        "msg/s",
    );

    // The limit: raw SQL on the same server and schema, no plugin.
    pg_raw_bench(&pg).await?;

    // Trigger: burst published through the step (64 in flight) while receiving; last, two
    // plugin processes triggering on one consumer (64 in flight each: competing subscribers).
    let mut second = Plugin::launch(LaunchOptions {
        env: vec![("EVENTBUS_PGBUS_URI".into(), pg.url())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    second.calls = None;
    second
        .module_up("eventbus.broker", "pgbus", "provider: pgchannel\n")
        .await;
    second
        .module_up(
            "eventbus.consumer",
            "ptrig_2proc_mif64",
            "name: ptrig_2proc_mif64\nstream_name: PGBENCH\nfilter_subject: pgb.trig.2proc_mif64\n",
        )
        .await;
    for (mif, label, procs) in [
        (1usize, "mif1", vec![p]),
        (64, "mif64", vec![p]),
        (64, "2proc_mif64", vec![p, &second]),
    ] {
        let subject = format!("pgb.trig.{label}");
        let mut triggers = Vec::new();
        for q in &procs {
            let t = q
                .create_trigger(
                    &format!("pipeline:pgbench-{label}"),
                    &json!({"name": format!("ptrig_{label}"), "max_in_flight": mif}),
                )
                .await?;
            q.lifecycle("start", &t).await?;
            triggers.push(t);
        }
        let publisher = futures::stream::iter(0..PG_TRIGGER_N)
            .map(|_| {
                let req = publish_req(&subject, now_ns());
                async move { execute(&p.client, req?).await.map(|_| ()) }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>();
        let (published, r) = tokio::join!(publisher, receive(calls, PG_TRIGGER_N, TRIGGER_CAP));
        published?;
        let r = r?;
        for (q, t) in procs.iter().zip(&triggers) {
            q.lifecycle("stop", t).await?;
        }
        while calls.try_recv().is_ok() {}
        fig(&format!("pg_trigger_{label}_burst_rate"), r.rate, "msg/s");
        fig(&format!("pg_trigger_{label}_burst_p99_e2e"), r.p99_us, "us");
        if r.received < PG_TRIGGER_N {
            fig(
                &format!("pg_trigger_{label}_burst_received"),
                r.received as f64,
                "msg",
            );
        }
    }
    for (what, mut q) in [("pg plugin", plugin), ("second pg plugin", second)] {
        let (code, _) = q.shutdown().await;
        if code != Some(0) {
            return Err(format!(
                "{what} exited with {code:?}; stderr:\n{}",
                q.stderr()
            ));
        }
    }
    Ok(())
}

/// Kafka phase sizes: tansu answers one record per produce request (see below), so fewer
/// messages keep the phase within a minute.
const KAFKA_N: usize = 2_000;

/// A raw rdkafka producer with the plugin's settings (idempotent, one record per request).
fn kafka_raw_producer(bootstrap: &str) -> Res<rdkafka::producer::FutureProducer> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "any")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "5000")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())
}

/// One record as the plugin writes it: the subject as key and header.
async fn kafka_raw_send(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    subject: &str,
    body: &str,
) -> Res<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    let headers = OwnedHeaders::new().insert(Header {
        key: "eventbus.subject",
        value: Some(subject.as_bytes()),
    });
    let rec = rdkafka::producer::FutureRecord::to(topic)
        .key(subject)
        .payload(body)
        .headers(headers);
    p.send(rec, Duration::from_secs(5))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

/// (h) kafka: provider kafka against tansu (a Kafka-protocol broker, memory storage) started
/// here: the publish step at 1 and 64 in flight and in lists of 100, against raw rdkafka with the
/// same settings on the same broker (the limit), and the trigger at max_in_flight 1 and 64
/// against a raw rdkafka group consumer committing each message. tansu 0.6.0 miscounts produce
/// requests of more than one record, so plugin and raw producers both send one record per
/// request (`linger.ms=0`, `batch.num.messages=1`): Kafka's batching is off in these figures.
async fn kafka_bench(
    pipeline: PipelineFn,
    calls: &mut mpsc::UnboundedReceiver<(u64, u64)>,
) -> Res<()> {
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    let server = kafka_test_server::KafkaServer::start();
    println!(
        "# kafka: tansu {} (memory storage) over loopback | payload {PAYLOAD_LEN} B | one record per produce request",
        kafka_test_server::TANSU_VERSION
    );
    for t in ["KRAW", "KRAWT"] {
        server.create_topic(t, 1);
    }
    let mut plugin = Plugin::launch(LaunchOptions {
        env: vec![("EVENTBUS_KBUS_URI".into(), server.bootstrap())],
        callback: Some(pipeline),
        ..Default::default()
    })
    .await;
    plugin.calls = None;
    let p = &plugin;
    p.module_up(
        "eventbus.broker",
        "kbus",
        "provider: kafka\ndeploy_target: self_hosted\nkafka:\n  librdkafka_options: {linger.ms: '0', batch.num.messages: '1'}\n",
    )
    .await;
    for (module, name, subjects) in [
        ("kbench", "KBENCH", "kb.>"),
        ("kt1", "KT1", "kt1.>"),
        ("kt64", "KT64", "kt64.>"),
    ] {
        p.module_up(
            "eventbus.stream",
            module,
            &format!("name: {name}\nsubjects: ['{subjects}']\n"),
        )
        .await;
    }
    for (name, stream) in [("ktrig_mif1", "KT1"), ("ktrig_mif64", "KT64")] {
        p.module_up(
            "eventbus.consumer",
            name,
            &format!("name: {name}\nstream_name: {stream}\n"),
        )
        .await;
    }
    let handle = p.create_step("step.eventbus.publish", "kpub", "").await?;
    let req = request(
        p,
        "step.eventbus.publish",
        &handle,
        json!({"subject": "kb.pub", "payload": payload(0)}),
        json!({}),
    )?;
    let op = |_| {
        let req = req.clone();
        async move { execute(&p.client, req).await.map(|_| ()) }
    };
    closed_loop(200, 16, op).await?;
    let raw = kafka_raw_producer(&server.bootstrap())?;
    let body = payload(0);
    let raw_op = |_| kafka_raw_send(&raw, "KRAW", "kb.raw", &body);
    closed_loop(200, 16, raw_op).await?;
    for inflight in [1usize, 64] {
        let s = closed_loop(KAFKA_N, inflight, op).await?;
        s.print(&format!("kafka_publish_plugin_c{inflight}"));
        let r = closed_loop(KAFKA_N, inflight, raw_op).await?;
        r.print(&format!("kafka_publish_raw_c{inflight}"));
        fig(
            &format!("kafka_publish_c{inflight}_plugin_over_raw"),
            s.rate / r.rate,
            "x",
        );
    }

    // Lists of 100 through the step, one call at a time, against raw rdkafka sending the same
    // 100 in order with 100 unacknowledged.
    let bulk = p
        .create_step("step.eventbus.publish", "kbulk", "subject: kb.bulk\n")
        .await?;
    let bulk_req = bulk_publish_req(p, &bulk, "kb.bulk", None)?;
    let bulk_op = |_| bulk_publish(p, bulk_req.clone());
    let s = closed_loop(KAFKA_N / BULK_LIST, 1, bulk_op).await?;
    let raw_list = |_| async {
        futures::stream::iter(0..BULK_LIST)
            .map(|_| kafka_raw_send(&raw, "KRAW", "kb.raw", &body))
            .buffered(BULK_LIST)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    };
    let r = closed_loop(KAFKA_N / BULK_LIST, 1, raw_list).await?;
    fig(
        "kafka_bulk_publish_plugin_l100_rate",
        s.rate * BULK_LIST as f64,
        "msg/s",
    );
    fig(
        "kafka_bulk_publish_raw_w100_rate",
        r.rate * BULK_LIST as f64,
        "msg/s",
    );
    fig("kafka_bulk_publish_plugin_over_raw", s.rate / r.rate, "x");

    // Trigger: a burst published raw (64 in flight) while the trigger receives.
    for (mif, stream, topic) in [(1usize, "ktrig_mif1", "KT1"), (64, "ktrig_mif64", "KT64")] {
        let t = p
            .create_trigger(
                &format!("pipeline:kbench-{mif}"),
                &json!({"name": stream, "max_in_flight": mif}),
            )
            .await?;
        p.lifecycle("start", &t).await?;
        let subject = format!("{}.x", topic.to_ascii_lowercase());
        let publisher = futures::stream::iter(0..KAFKA_N)
            .map(|_| {
                let body = payload(now_ns());
                let (raw, subject) = (&raw, &subject);
                async move { kafka_raw_send(raw, topic, subject, &body).await }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>();
        let (published, r) = tokio::join!(publisher, receive(calls, KAFKA_N, TRIGGER_CAP));
        published?;
        let r = r?;
        p.lifecycle("stop", &t).await?;
        while calls.try_recv().is_ok() {}
        fig(
            &format!("kafka_trigger_mif{mif}_burst_rate"),
            r.rate,
            "msg/s",
        );
        fig(
            &format!("kafka_trigger_mif{mif}_burst_p99_e2e"),
            r.p99_us,
            "us",
        );
        if r.received < KAFKA_N {
            fig(
                &format!("kafka_trigger_mif{mif}_burst_received"),
                r.received as f64,
                "msg",
            );
        }
    }

    // The limit for the trigger: a raw group consumer reading the same number of records and
    // committing each (asynchronously), as the plugin's member does.
    futures::stream::iter(0..KAFKA_N)
        .map(|_| kafka_raw_send(&raw, "KRAWT", "kb.rawt", &body))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", server.bootstrap())
        .set("broker.address.family", "any")
        .set("group.id", "kraw")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    // From the subscribe (the group join included, as for the trigger): librdkafka prefetches,
    // so the time from the first record would measure its local queue.
    let start = Instant::now();
    consumer.subscribe(&["KRAWT"]).map_err(|e| e.to_string())?;
    let mut got = 0;
    while got < KAFKA_N {
        let m = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .map_err(|_| format!("raw consumer stalled at {got}"))?
            .map_err(|e| e.to_string())?;
        consumer
            .commit_message(&m, CommitMode::Async)
            .map_err(|e| e.to_string())?;
        got += 1;
    }
    fig(
        "kafka_consume_raw_commit_each_rate",
        got as f64 / start.elapsed().as_secs_f64(),
        "msg/s",
    );

    let (code, _) = plugin.shutdown().await;
    if code != Some(0) {
        return Err(format!(
            "kafka plugin exited with {code:?}; stderr:\n{}",
            plugin.stderr()
        ));
    }
    Ok(())
}
