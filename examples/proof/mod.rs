//! The bench's proof phases (issue 21), each against fresh plugin processes on the bench's
//! nats-server, in interleaved pairs so that drift on a shared machine falls on both sides:
//!
//! - `metrics`: publish c64 and trigger mif64 with the metrics endpoint off vs on
//!   (`EVENTBUS_METRICS_ADDR` on a free loopback port, for the plugin process only), at least
//!   5 pairs, the first of each pair alternating; then the trigger paced at 10 000 msg/s while
//!   another task scrapes `/metrics` back to back: the trigger's rate and the scrape latencies.
//! - `baseline`: when `BENCH_BASELINE_BIN` names another plugin binary (an older release
//!   build), publish c1, publish c64 and trigger mif64 on that binary vs this one (metrics off),
//!   3 pairs. Only requests both binaries understand: the publish step with `subject` and
//!   `payload`, a trigger with `name` and `max_in_flight`, the modules as the bench declares them.
//!
//! Each run prints a `#` line; the figures are the medians and their ratios (on/off, this/baseline).

use super::*;
use std::net::SocketAddr;
use std::path::PathBuf;

const METRICS_PAIRS: usize = 5;
const BASELINE_PAIRS: usize = 3;
/// Publishes at one in flight per baseline run (fewer than at 64: each waits a round trip).
const C1_N: usize = 3_000;
const PUB_SUBJECT: &str = "bench.proof.pub";
const TRIG_SUBJECT: &str = "bench.proof.trig";
const TRIG_DURABLE: &str = "proof_mif64";
/// One scrape's bound: a scrape that takes longer is reported as failed.
const SCRAPE_BOUND: Duration = Duration::from_secs(5);

/// Which figures a run takes.
#[derive(Clone, Copy)]
struct Take {
    c1: bool,
}

/// One run's figures, msg/s.
#[derive(Default)]
struct Run {
    publish_c1: f64,
    publish_c64: f64,
    trigger_mif64: f64,
}

/// A fresh plugin process with the bench's stream, the proof consumer and a publish step.
struct Rig {
    plugin: Plugin,
    calls: mpsc::UnboundedReceiver<(u64, u64)>,
    publish: ExecuteStepRequest,
}

impl Rig {
    async fn launch(
        server: &NatsServer,
        bin: Option<PathBuf>,
        metrics: Option<SocketAddr>,
    ) -> Res<Rig> {
        let (pipeline, calls) = latency_pipeline();
        let mut env = vec![("NATS_URL".to_string(), server.url())];
        if let Some(a) = metrics {
            env.push(("EVENTBUS_METRICS_ADDR".into(), a.to_string()));
        }
        let mut plugin = Plugin::launch(LaunchOptions {
            env,
            callback: Some(pipeline),
            bin,
            ..Default::default()
        })
        .await;
        plugin.calls = None;
        if let Some(a) = metrics {
            scrape(a).await?; // the endpoint is on
        }
        let p = &plugin;
        bench_modules(p).await;
        p.module_up(
            "eventbus.consumer",
            TRIG_DURABLE,
            &format!("name: {TRIG_DURABLE}\nstream_name: BENCH\nfilter_subject: {TRIG_SUBJECT}\nack_policy: ACK_POLICY_EXPLICIT\n"),
        )
        .await;
        let handle = p
            .create_step(
                "step.eventbus.publish",
                "pub",
                &format!("subject: {PUB_SUBJECT}\nbroker_ref: bus\n"),
            )
            .await?;
        let publish = request(
            p,
            "step.eventbus.publish",
            &handle,
            json!({"subject": PUB_SUBJECT, "payload": payload(0)}),
            json!({}),
        )?;
        Ok(Rig {
            plugin,
            calls,
            publish,
        })
    }

    async fn publish(&self, n: usize, inflight: usize) -> Res<Stats> {
        let (client, req) = (&self.plugin.client, &self.publish);
        closed_loop(n, inflight, |_| {
            let req = req.clone();
            async move { execute(client, req).await.map(|_| ()) }
        })
        .await
    }

    /// The proof trigger, started.
    async fn trigger(&self) -> Res<String> {
        let p = &self.plugin;
        let handle = p
            .create_trigger(
                "pipeline:proof",
                &json!({"name": TRIG_DURABLE, "max_in_flight": 64}),
            )
            .await?;
        p.lifecycle("start", &handle).await?;
        Ok(handle)
    }

    /// The figures of one run: warm-up, then the publishes, then a trigger burst.
    async fn run(mut self, js: &async_nats::jetstream::Context, take: Take) -> Res<Run> {
        let mut r = Run::default();
        self.publish(1000, 16).await?;
        if take.c1 {
            r.publish_c1 = self.publish(C1_N, 1).await?.rate;
        }
        r.publish_c64 = self.publish(PUBLISH_N, 64).await?.rate;
        self.trigger().await?;
        let publisher = spawn_publisher(js, TRIG_SUBJECT, TRIGGER_BURST_N, None);
        let burst = receive(&mut self.calls, TRIGGER_BURST_N, TRIGGER_CAP).await?;
        publisher.await.map_err(|e| e.to_string())??;
        if burst.received < TRIGGER_BURST_N {
            println!(
                "# trigger burst received {} of {TRIGGER_BURST_N}",
                burst.received
            );
        }
        r.trigger_mif64 = burst.rate;
        self.close().await?;
        purge(js).await?;
        Ok(r)
    }

    async fn close(mut self) -> Res<()> {
        let (code, _) = self.plugin.shutdown().await;
        if code != Some(0) {
            return Err(format!(
                "proof plugin exited with {code:?}; stderr:\n{}",
                self.plugin.stderr()
            ));
        }
        Ok(())
    }
}

/// Drops what the proof runs left in the stream, so every run starts from the same state.
async fn purge(js: &async_nats::jetstream::Context) -> Res<()> {
    let stream = js.get_stream("BENCH").await.map_err(|e| e.to_string())?;
    for subject in [PUB_SUBJECT, TRIG_SUBJECT] {
        stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A loopback address no one listens on now (bound, read, released).
fn free_loopback() -> Res<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure of a run: its name, how to read it, whether the runs took it.
type Figure = (&'static str, fn(&Run) -> f64, bool);

/// Prints the medians of both sides and their ratio (`b` over `a`) for each figure taken.
fn compare(prefix: &str, (a_name, a): (&str, &[Run]), (b_name, b): (&str, &[Run]), take: Take) {
    let figures: [Figure; 3] = [
        ("publish_c1", |r| r.publish_c1, take.c1),
        ("publish_c64", |r| r.publish_c64, true),
        ("trigger_mif64", |r| r.trigger_mif64, true),
    ];
    for (name, get, taken) in figures {
        if !taken {
            continue;
        }
        let ma = median(a.iter().map(get).collect());
        let mb = median(b.iter().map(get).collect());
        fig(&format!("{prefix}_{a_name}_{name}_median"), ma, "msg/s");
        fig(&format!("{prefix}_{b_name}_{name}_median"), mb, "msg/s");
        fig(
            &format!("{prefix}_{name}_ratio_{b_name}_over_{a_name}"),
            mb / ma,
            "x",
        );
    }
}

fn print_run(prefix: &str, pair: usize, side: &str, r: &Run, take: Take) {
    let c1 = if take.c1 {
        format!(" publish_c1 {:.0}", r.publish_c1)
    } else {
        String::new()
    };
    println!(
        "# {prefix} pair {pair} {side}:{c1} publish_c64 {:.0} trigger_mif64 {:.0} msg/s",
        r.publish_c64, r.trigger_mif64
    );
}

/// `pairs` interleaved pairs of runs, side A (`a`) and side B (`b`), the first of each pair
/// alternating; each run on a fresh plugin launched by `launch(side_is_b)`.
async fn pairs<F, Fut>(
    prefix: &str,
    names: (&str, &str),
    pairs: usize,
    js: &async_nats::jetstream::Context,
    take: Take,
    launch: F,
) -> Res<(Vec<Run>, Vec<Run>)>
where
    F: Fn(bool) -> Fut,
    Fut: Future<Output = Res<Rig>>,
{
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for side_b in order {
            let r = launch(side_b).await?.run(js, take).await?;
            let name = if side_b { names.1 } else { names.0 };
            print_run(prefix, pair + 1, name, &r, take);
            if side_b {
                b.push(r)
            } else {
                a.push(r)
            }
        }
    }
    Ok((a, b))
}

/// `metrics`: off vs on, then scrapes under a paced 10k msg/s trigger.
pub async fn metrics_bench(server: &NatsServer, js: &async_nats::jetstream::Context) -> Res<()> {
    let take = Take { c1: false };
    let launch = |on: bool| async move {
        let addr = if on { Some(free_loopback()?) } else { None };
        Rig::launch(server, None, addr).await
    };
    let (off, on) = pairs("metrics", ("off", "on"), METRICS_PAIRS, js, take, launch).await?;
    compare("metrics", ("off", &off), ("on", &on), take);
    scrape_under_load(server, js).await
}

/// The trigger paced at 10 000 msg/s (the (c) phase's helper) while another task scrapes
/// `/metrics` back to back: the rate the trigger keeps and what a scrape takes meanwhile.
async fn scrape_under_load(server: &NatsServer, js: &async_nats::jetstream::Context) -> Res<()> {
    let addr = free_loopback()?;
    let mut rig = Rig::launch(server, None, Some(addr)).await?;
    let handle = rig.trigger().await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                scrape(addr).await?;
                lat.push(t.elapsed());
            }
            Res::Ok(lat)
        })
    };
    let n = TRIGGER_SUSTAINED_N;
    let paced = paced_phase(
        &rig.plugin,
        js,
        &handle,
        TRIG_SUBJECT,
        &mut rig.calls,
        n,
        10,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lat = scraper.await.map_err(|e| e.to_string())??;
    let paced = paced?;
    rig.close().await?;
    purge(js).await?;
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |q: usize| lat.get((lat.len() * q / 100).min(lat.len().saturating_sub(1)));
    fig("metrics_scrape_trigger_paced10k_rate", paced.rate, "msg/s");
    if paced.received < n {
        fig(
            "metrics_scrape_trigger_paced10k_received",
            paced.received as f64,
            "msg",
        );
    }
    fig("metrics_scrape_count", lat.len() as f64, "count");
    fig("metrics_scrape_p50", pct(50).map_or(0.0, |d| ms(*d)), "ms");
    fig("metrics_scrape_p99", pct(99).map_or(0.0, |d| ms(*d)), "ms");
    fig(
        "metrics_scrape_max",
        lat.last().map_or(0.0, |d| ms(*d)),
        "ms",
    );
    Ok(())
}

/// One `GET /metrics` on a new connection, read to its end; an answer other than 200 fails.
async fn scrape(addr: SocketAddr) -> Res<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.map_err(|e| e.to_string())?;
        if !body.starts_with(b"HTTP/1.1 200") {
            let head = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            return Err(format!("scrape of {addr} answered {head:?}"));
        }
        Ok(())
    };
    tokio::time::timeout(SCRAPE_BOUND, get)
        .await
        .map_err(|_| format!("scrape of {addr} took over {SCRAPE_BOUND:?}"))?
}

/// `baseline`: this binary against `BENCH_BASELINE_BIN` (metrics off on both).
pub async fn baseline_bench(server: &NatsServer, js: &async_nats::jetstream::Context) -> Res<()> {
    let Some(old) = std::env::var_os("BENCH_BASELINE_BIN").filter(|v| !v.is_empty()) else {
        println!("# baseline skipped: BENCH_BASELINE_BIN is not set");
        return Ok(());
    };
    let old = PathBuf::from(old);
    if !old.is_file() {
        return Err(format!(
            "BENCH_BASELINE_BIN {} is not a file",
            old.display()
        ));
    }
    println!(
        "# baseline: {} vs {}",
        old.display(),
        common::plugin_bin().display()
    );
    let take = Take { c1: true };
    let launch = |this: bool| {
        let bin = (!this).then(|| old.clone());
        async move { Rig::launch(server, bin, None).await }
    };
    let (base, this) = pairs(
        "baseline",
        ("old", "this"),
        BASELINE_PAIRS,
        js,
        take,
        launch,
    )
    .await?;
    compare("baseline", ("old", &base), ("this", &this), take);
    Ok(())
}
