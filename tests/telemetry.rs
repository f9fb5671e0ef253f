//! Observability through the real binary: a real Prometheus server (Debian's `prometheus`,
//! started per test on loopback) scrapes the plugin's endpoint after a scripted run on NATS
//! and on pgchannel and reads lag, deliveries and dead letters back through its query API;
//! `promtool check metrics` lints the exposition; an in-process OTLP receiver sees the publish
//! and deliver spans of one trace across a publish step and the trigger; 10,000 distinct
//! subjects leave the series count alone; the endpoint answers while the trigger runs hot.
//! Every wait is bounded; Prometheus' first sample lands ~5 s after it starts, so those
//! queries poll with a deadline.

mod common;

use common::*;
use nats_test_server::NatsServer;
use pg_test_server::PgServer;
use prost_types::value::Kind;
use serde_json::{json, Value as Json};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        _ => String::new(),
    }
}

/// A string field of a map field of the call's data (`trace_headers.traceparent`).
fn nested(call: &Call, map: &str, key: &str) -> String {
    match call
        .data
        .as_ref()
        .and_then(|d| d.fields.get(map))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::StructValue(s)) => match s.fields.get(key).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(v)) => v,
            _ => String::new(),
        },
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- HTTP on loopback

/// GET over a fresh connection; (status, body).
async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .map_err(|_| format!("GET {path}: no full answer in {T:?}"))?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    // hyper answers small bodies with Content-Length; a chunked one is decoded here.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The metrics address the plugin logged (`EVENTBUS_METRICS_ADDR=127.0.0.1:0` picks a port).
async fn metrics_addr(p: &Plugin) -> String {
    let deadline = Instant::now() + T;
    loop {
        let err = p.stderr();
        if let Some(i) = err.find("address=") {
            let rest = &err[i + "address=".len()..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            return rest[..end].trim_matches('"').to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged: {err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The sum of a family's samples whose label text contains every `want` (e.g. `trigger="orders"`).
fn sample_sum(exposition: &str, name: &str, want: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn series_count(exposition: &str) -> usize {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Polls the plugin's own endpoint until `check` holds (bounded).
async fn wait_metric(addr: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let body = scrape(addr).await;
        if check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- Prometheus

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).is_file() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's prometheus package (`make deps` does: apt-get install prometheus)");
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// A one-shot server scraping `target` every second.
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: plugin\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// An instant query's first value, if any.
    async fn query(&self, q: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let (status, body) = http_get(&self.addr, &path).await.ok()?;
        if status != 200 {
            return None;
        }
        let v: Json = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls a query until `ok(value)` (first samples land ~5 s after start).
    async fn wait(&self, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.query(q).await;
            if let Some(v) = got.filter(|v| ok(*v)) {
                return v;
            }
            if Instant::now() > deadline {
                let targets = http_get(&self.addr, "/api/v1/targets").await;
                panic!("prometheus: {q} gave {got:?}; targets: {targets:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `promtool check metrics` on an exposition: exit 0 means no findings.
fn promtool_check(exposition: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {:?}\n{}{}\n--- exposition\n{exposition}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- scripted run

const NATS_BROKER: &str = "provider: nats\ndeploy_target: self_hosted\n";

/// NATS broker `bus` and one stream module.
async fn nats_bus_with_stream(p: &Plugin, stream_yaml: &str) {
    p.module_up("eventbus.broker", "bus", NATS_BROKER).await;
    p.module_up("eventbus.stream", "stream", stream_yaml).await;
}

async fn launch(env: Vec<(String, String)>, callback: Option<PipelineFn>) -> Plugin {
    let mut env = env;
    env.push(("EVENTBUS_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    env.push(("EVENTBUS_METRICS_LAG_INTERVAL".into(), "300ms".into()));
    Plugin::launch(LaunchOptions {
        env,
        callback,
        ..Default::default()
    })
    .await
}

async fn publish(p: &Plugin, subject: &str, payload: &str) {
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
    .unwrap();
}

fn failing_bad() -> PipelineFn {
    Arc::new(|call: Call| {
        Box::pin(async move {
            if text_of(&call, "subject") == "jobs.bad" {
                Err("boom".to_string())
            } else {
                Ok(())
            }
        })
    })
}

/// Broker `bus`, streams JOBS and DEAD, consumers `runner` (max_deliver 2, read by trigger
/// `orders`) and `backlog` (read by nobody); 3 good messages and 1 that fails twice and is
/// dead-lettered. Then a real Prometheus reads the outcome back.
async fn scripted_run(p: &Plugin, broker_yaml: &str) {
    let addr = metrics_addr(p).await;
    p.module_up("eventbus.broker", "bus", broker_yaml).await;
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
    for (module, extra) in [("runner", "max_deliver: 2\n"), ("backlog", "")] {
        p.module_up(
            "eventbus.consumer",
            module,
            &format!("name: {module}\nstream_name: JOBS\n{extra}"),
        )
        .await;
    }
    for s in ["jobs.a", "jobs.b", "jobs.c", "jobs.bad"] {
        publish(p, s, "x").await;
    }
    let t = p
        .create_trigger(
            "orders",
            &json!({"name": "runner", "nak_delay": "0.1s", "dead_letter_subject": "dead.jobs"}),
        )
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    let body = wait_metric(&addr, "one dead letter and four acks", |b| {
        sample_sum(b, "eventbus_dead_letters_total", &[r#"trigger="orders""#]) == 1.0
            && sample_sum(
                b,
                "eventbus_settlements_total",
                &[r#"trigger="orders""#, r#"outcome="ack""#],
            ) == 3.0
            && sample_sum(b, "eventbus_consumer_pending", &[r#"consumer="backlog""#]) == 4.0
    })
    .await;
    assert_eq!(
        sample_sum(&body, "eventbus_published_total", &[r#"outcome="ok""#]),
        4.0,
        "{body}"
    );
    assert!(body.contains("# HELP eventbus_deliveries_total"), "{body}");
    assert!(body.contains("# TYPE eventbus_pipeline_duration_seconds histogram"));
    assert!(
        !body.contains("jobs.bad"),
        "a subject became a label: {body}"
    );
    promtool_check(&body);

    let prom = Prometheus::start(&addr);
    prom.wait(
        r#"eventbus_consumer_pending{consumer="backlog",stream="JOBS",broker="bus"}"#,
        |v| v == 4.0,
    )
    .await;
    prom.wait(r#"sum(eventbus_deliveries_total{trigger="orders"})"#, |v| {
        v == 5.0
    })
    .await;
    prom.wait(
        r#"sum(eventbus_redeliveries_total{trigger="orders"})"#,
        |v| v == 1.0,
    )
    .await;
    prom.wait(
        r#"sum(eventbus_dead_letters_total{trigger="orders"})"#,
        |v| v == 1.0,
    )
    .await;
    prom.wait(
        r#"sum(eventbus_pipeline_duration_seconds_count{trigger="orders",outcome="error"})"#,
        |v| v == 2.0,
    )
    .await;
    prom.wait(r#"eventbus_broker_connected{broker="bus"}"#, |v| v == 1.0)
        .await;
}

#[tokio::test]
async fn prometheus_reads_lag_deliveries_and_dead_letters_on_nats() {
    let server = NatsServer::start();
    let p = launch(vec![("NATS_URL".into(), server.url())], Some(failing_bad())).await;
    scripted_run(&p, NATS_BROKER).await;
}

#[tokio::test]
async fn prometheus_reads_lag_deliveries_and_dead_letters_on_pgchannel() {
    let pg = PgServer::start();
    let p = launch(
        vec![("EVENTBUS_BUS_URI".into(), pg.url())],
        Some(failing_bad()),
    )
    .await;
    scripted_run(
        &p,
        "provider: pgchannel\nbroker_target: in_process\npoll_interval: 200ms\nmax_conns: 8\n",
    )
    .await;
}

#[tokio::test]
async fn metrics_are_off_by_default_and_a_taken_address_is_refused_in_one_line() {
    let server = NatsServer::start();
    let p = Plugin::launch(LaunchOptions {
        env: vec![("NATS_URL".into(), server.url())],
        ..Default::default()
    })
    .await;
    p.module_up("eventbus.broker", "bus", NATS_BROKER).await;
    assert!(!p.stderr().contains("serving Prometheus metrics"));
    // A broker module asking for a busy address fails its Start with the reason.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let h = p
        .create_module(
            "eventbus.broker",
            "other",
            &format!("provider: nats\ndeploy_target: self_hosted\nmetrics_address: '{busy}'\n"),
        )
        .await
        .unwrap();
    let e = p.lifecycle("start", &h).await.unwrap_err();
    assert!(
        e.contains("metrics_address") && e.contains("cannot listen") && !e.contains('\n'),
        "{e}"
    );
    // A malformed one is a config error naming the key.
    let e = p
        .create_module(
            "eventbus.broker",
            "third",
            "provider: nats\ndeploy_target: self_hosted\nmetrics_address: nope\n",
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("metrics_address") && e.contains("host:port"),
        "{e}"
    );
    // The environment variable on a busy address stops the plugin with one line.
    let mut child = spawn_raw(
        plugin_bin(),
        &[("EVENTBUS_METRICS_ADDR".into(), busy.to_string())],
        true,
    );
    let code = wait_exit(&mut child, T);
    assert_eq!(code, Some(1));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("EVENTBUS_METRICS_ADDR") && err.contains("cannot listen"),
        "{err}"
    );
    drop(taken);
}

// ---------------------------------------------------------------- adversarial

#[tokio::test]
async fn ten_thousand_distinct_subjects_do_not_grow_the_series_count() {
    let server = NatsServer::start();
    let p = launch(vec![("NATS_URL".into(), server.url())], None).await;
    let addr = metrics_addr(&p).await;
    nats_bus_with_stream(
        &p,
        "name: MANY\nsubjects: ['many.>']\nstorage: STORAGE_TYPE_MEMORY\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    let one = |i: usize| json!({"subject": format!("many.s{i}"), "payload": "eA=="});
    let bulk = |from: usize| {
        let list: Vec<Json> = (from..from + 10_000)
            .map(|i| json!({"subject": format!("many.b{i}"), "payload": "x"}))
            .collect();
        json!({"publish_messages": list})
    };
    let publish = |state: Json| {
        let (p, h) = (&p, &h);
        async move {
            p.execute("step.eventbus.publish", h, "", &state)
                .await
                .unwrap()
        }
    };
    publish(one(0)).await;
    publish(bulk(0)).await;
    let before = series_count(&scrape(&addr).await);
    publish(bulk(10_000)).await;
    for i in 1..200 {
        publish(one(i)).await;
    }
    let after = scrape(&addr).await;
    assert_eq!(series_count(&after), before, "{after}");
    assert!(!after.contains("many."), "a subject became a label");
    assert_eq!(
        sample_sum(
            &after,
            "eventbus_bulk_published_total",
            &[r#"outcome="ok""#]
        ),
        20_000.0
    );
    assert_eq!(
        sample_sum(&after, "eventbus_published_total", &[r#"outcome="ok""#]),
        200.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_while_the_trigger_runs_hot_and_never_blocks_it() {
    const N: usize = 10_000;
    let server = NatsServer::start();
    let p = launch(vec![("NATS_URL".into(), server.url())], Some(ok_pipeline())).await;
    let addr = metrics_addr(&p).await;
    nats_bus_with_stream(
        &p,
        "name: HOT\nsubjects: ['hot.>']\nstorage: STORAGE_TYPE_MEMORY\n",
    )
    .await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    for part in 0..N / 10_000 {
        let list: Vec<Json> = (0..10_000)
            .map(|i| json!({"subject": format!("hot.{part}.{i}"), "payload": "x"}))
            .collect();
        p.execute(
            "step.eventbus.publish",
            &h,
            "",
            &json!({"publish_messages": list}),
        )
        .await
        .unwrap();
    }
    let t = p
        .create_trigger(
            "hot",
            &json!({"name": "hotrunner", "stream_name": "HOT", "max_in_flight": 64}),
        )
        .await
        .unwrap();
    let started = Instant::now();
    p.lifecycle("start", &t).await.unwrap();
    // Four scrapers hammer the endpoint while the trigger drains the stream.
    let stop = Arc::new(AtomicBool::new(false));
    let worst_ms = Arc::new(AtomicU64::new(0));
    let scrapes = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut scrapers = Vec::new();
    for _ in 0..4 {
        let (stop, worst_ms, scrapes, seen, addr) = (
            stop.clone(),
            worst_ms.clone(),
            scrapes.clone(),
            seen.clone(),
            addr.clone(),
        );
        scrapers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let body = scrape(&addr).await;
                worst_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                scrapes.fetch_add(1, Ordering::Relaxed);
                let d = sample_sum(&body, "eventbus_deliveries_total", &[r#"trigger="hot""#]);
                seen.lock().unwrap().push(d);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let body = scrape(&addr).await;
        let acked = sample_sum(
            &body,
            "eventbus_settlements_total",
            &[r#"trigger="hot""#, r#"outcome="ack""#],
        );
        if acked >= N as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {acked} of {N} acked while scraped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        tokio::time::timeout(T, s).await.unwrap().unwrap();
    }
    let worst = worst_ms.load(Ordering::Relaxed);
    let n = scrapes.load(Ordering::Relaxed);
    let distinct = {
        let mut v = seen.lock().unwrap().clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.dedup();
        v.len()
    };
    eprintln!(
        "trigger: {N} messages in {took:?} ({:.0} msg/s) under {n} scrapes; worst scrape {worst} ms",
        N as f64 / took.as_secs_f64()
    );
    assert!(n >= 8, "only {n} scrapes completed");
    assert!(distinct >= 3, "scrapes did not see deliveries progress");
    assert!(worst < 5_000, "a scrape took {worst} ms");
}

// ---------------------------------------------------------------- OTLP

mod otlp {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.0.lock().unwrap();
            for rs in req.into_inner().resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// An OTLP/gRPC trace receiver on loopback; its address and what it received.
    pub async fn start() -> (String, Receiver) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rx = Receiver::default();
        let svc = TraceServiceServer::new(rx.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), rx)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sees_publish_and_deliver_spans_of_one_trace_across_a_publish_step_and_the_trigger() {
    let (endpoint, rx) = otlp::start().await;
    let server = NatsServer::start();
    let mut p = Plugin::launch(LaunchOptions {
        env: vec![
            ("NATS_URL".into(), server.url()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ("OTEL_SERVICE_NAME".into(), "eventbus-test".into()),
        ],
        callback: Some(ok_pipeline()),
        ..Default::default()
    })
    .await;
    nats_bus_with_stream(&p, "name: JOBS\nsubjects: ['jobs.>']\n").await;
    let t = p
        .create_trigger("orders", &json!({"name": "runner", "stream_name": "JOBS"}))
        .await
        .unwrap();
    p.lifecycle("start", &t).await.unwrap();
    publish(&p, "jobs.first", "x").await;
    let call = p.next_call(T).await;
    // The message carries the publish span's context; the pipeline gets the deliver span's.
    let sent = nested(&call, "headers", "traceparent");
    let handed = nested(&call, "trace_headers", "traceparent");
    let part = |tp: &str, i: usize| tp.split('-').nth(i).unwrap_or("").to_string();
    assert_eq!(part(&sent, 1).len(), 32, "{sent}");
    assert_eq!(part(&sent, 1), part(&handed, 1), "{sent} vs {handed}");
    assert_ne!(part(&sent, 2), part(&handed, 2));
    // A publish in that pipeline continues the trace from the carrier in its state.
    let carrier = json!({"traceparent": handed});
    let h = p
        .create_step("step.eventbus.publish", "next", "")
        .await
        .unwrap();
    p.execute(
        "step.eventbus.publish",
        &h,
        "subject: jobs.second\npayload: y\n",
        &json!({"trace_headers": carrier}),
    )
    .await
    .unwrap();
    let trace = part(&sent, 1);
    let deadline = Instant::now() + T;
    let spans = loop {
        let spans: Vec<_> =
            rx.0.lock()
                .unwrap()
                .iter()
                .filter(|s| hex(&s.trace_id) == trace)
                .cloned()
                .collect();
        let publishes = spans
            .iter()
            .filter(|s| s.name.starts_with("publish"))
            .count();
        let delivers = spans
            .iter()
            .filter(|s| s.name.starts_with("deliver"))
            .count();
        if publishes >= 2 && delivers >= 2 {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace}: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_id = |id: &str| spans.iter().find(|s| hex(&s.span_id) == id).unwrap();
    let first_publish = by_id(&part(&sent, 2));
    let deliver = by_id(&part(&handed, 2));
    assert!(first_publish.name.starts_with("publish"));
    assert_eq!(first_publish.kind, 4, "PRODUCER");
    assert!(deliver.name.starts_with("deliver"));
    assert_eq!(deliver.kind, 5, "CONSUMER");
    assert_eq!(hex(&deliver.parent_span_id), hex(&first_publish.span_id));
    let second = spans
        .iter()
        .find(|s| s.name.starts_with("publish") && hex(&s.parent_span_id) == hex(&deliver.span_id))
        .expect("the pipeline's publish is a child of the deliver span");
    assert_ne!(second.span_id, first_publish.span_id);
    // The settle of the first message is a child of its deliver span.
    let settle_deadline = Instant::now() + T;
    loop {
        let settled = rx.0.lock().unwrap().iter().any(|s| {
            s.name.starts_with("settle") && hex(&s.parent_span_id) == hex(&deliver.span_id)
        });
        if settled {
            break;
        }
        assert!(Instant::now() < settle_deadline, "no settle span");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
