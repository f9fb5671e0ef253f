//! `workflow-plugin-eventbus`: started by the workflow engine or wfctl as a go-plugin subprocess.

use eventbus_plugin::host::{self, handshake};
use std::io::Write;
use tokio_util::sync::CancellationToken;

const HELP: &str = "\
workflow-plugin-eventbus: NATS JetStream event bus plugin for the GoCodeAlone workflow engine

This binary is a plugin: the workflow engine and wfctl start it (with WORKFLOW_PLUGIN set) and
talk to it over gRPC. Install it as <plugins>/eventbus/eventbus beside plugin.json.

Usage:
  workflow-plugin-eventbus --help       this text
  workflow-plugin-eventbus --version    print the version
  workflow-plugin-eventbus render <infra.yaml> <out-dir>
                                        write the Kubernetes objects of every kubernetes or
                                        aws.eks broker in an infra file as YAML (what apply
                                        sends), for review or kubectl diff; no cluster needed

Environment:
  NATS_URL, EVENTBUS_<BROKER>_URI   broker urls when a broker module sets no dsn
  RUST_LOG                          log filter for stderr (default: info)
  EVENTBUS_LOG_FORMAT=json          hclog-style JSON log lines instead of text
  EVENTBUS_METRICS_ADDR=host:port   serve Prometheus metrics on http://host:port/metrics
  EVENTBUS_METRICS_LAG_INTERVAL     how often consumer lag is read (default 15s)
  OTEL_EXPORTER_OTLP_ENDPOINT       export publish/deliver/settle spans over OTLP/gRPC
";

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--help") | Some("-h") | Some("help") => {
            print!("{HELP}");
            return;
        }
        Some("--version") | Some("-V") | Some("version") => {
            println!("workflow-plugin-eventbus {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Some("render") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            std::process::exit(eventbus_plugin::iac::render_cmd::main(&args));
        }
        _ => {}
    }
    if !handshake::cookie_present() {
        let _ = writeln!(
            std::io::stderr(),
            "This binary is a workflow plugin. It is started by the workflow engine or wfctl, not \
             run directly. Try --help."
        );
        std::process::exit(1);
    }
    // Ctrl-C in the host's terminal reaches our process group too; the host owns shutdown.
    // SAFETY: setting a signal disposition to SIG_IGN before any thread exists.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    eventbus_plugin::logging::init();
    // tokio panics on a malformed TOKIO_WORKER_THREADS; say what is wrong and exit instead.
    if let Ok(v) = std::env::var("TOKIO_WORKER_THREADS") {
        if !v.trim().parse::<usize>().is_ok_and(|n| n > 0) {
            tracing::error!(value = %v, "TOKIO_WORKER_THREADS must be a positive whole number");
            exit(1);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            exit(1);
        }
    };
    let code = rt.block_on(async {
        if let Err(e) = eventbus_plugin::telemetry::start_from_env() {
            tracing::error!("{e}");
            return 1;
        }
        if let Err(e) = eventbus_plugin::telemetry::trace::init_from_env() {
            tracing::error!("{e}");
            return 1;
        }
        let stop = CancellationToken::new();
        watch_signals(stop.clone());
        match host::serve(stop).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %eventbus_plugin::runtime::render(&e), "plugin failed");
                1
            }
        }
    });
    // Spans still in the exporter's batch go out before the runtime stops.
    eventbus_plugin::telemetry::trace::shutdown();
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    exit(code);
}

/// Exits once the queued log lines are written (bounded: the host may not be reading).
fn exit(code: i32) -> ! {
    eventbus_plugin::logging::flush(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

/// SIGTERM and the death of the parent process (the host) stop the plugin.
fn watch_signals(stop: CancellationToken) {
    let s = stop.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            tracing::info!("SIGTERM received");
            s.cancel();
        }
    });
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    // SAFETY: as above.
                    if unsafe { libc::getppid() } != parent {
                        tracing::info!("host process exited; stopping");
                        stop.cancel();
                        return;
                    }
                }
            }
        }
    });
}
