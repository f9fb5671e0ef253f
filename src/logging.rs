//! Logs go to stderr (stdout belongs to the handshake), and a closed stderr never panics.
//!
//! A host that stops reading stderr must not stall the plugin: with the pipe full, a direct
//! write blocks, and at `RUST_LOG=trace` every RPC logs, so every RPC blocked. Lines go through
//! a bounded queue to one writer thread instead; when the queue is full a line is dropped and
//! counted, and the count is reported once the writer catches up.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Lines waiting for the writer thread at most (about a few MB of trace output).
const QUEUE_LINES: usize = 16 * 1024;

/// Writes to stderr and swallows every error (EPIPE after the host stops reading included).
#[derive(Clone, Copy)]
pub struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The sending side of the log queue: never blocks.
#[derive(Clone)]
pub struct Queued {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it was written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// One log event being formatted; queued whole when the formatter is done with it.
pub struct Line {
    buf: Vec<u8>,
    queue: Queued,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self
            .queue
            .tx
            .try_send(Msg::Line(std::mem::take(&mut self.buf)))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for Queued {
    type Writer = Line;
    fn make_writer(&'a self) -> Self::Writer {
        Line {
            buf: Vec::new(),
            queue: self.clone(),
        }
    }
}

impl Queued {
    /// A queue of `lines` and its writer thread, writing to `out`.
    pub fn start(lines: usize, json: bool, out: impl Write + Send + 'static) -> Queued {
        let (tx, rx) = sync_channel(lines);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(rx, d, json, out));
        if spawned.is_err() {
            // No thread: every line is counted as dropped rather than blocking anyone.
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        Queued { tx, dropped }
    }

    /// Waits at most `within` until the lines queued so far are written.
    pub fn flush(&self, within: Duration) -> bool {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let tx = self.tx.clone();
        // The send waits for room in the queue, so it runs off this thread.
        let sent = std::thread::Builder::new().spawn(move || {
            let _ = tx.send(Msg::Flush(done_tx));
        });
        sent.is_ok() && done_rx.recv_timeout(within).is_ok()
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write_lines(rx: Receiver<Msg>, dropped: Arc<AtomicU64>, json: bool, mut out: impl Write) {
    while let Ok(msg) = rx.recv() {
        let line = match msg {
            Msg::Line(line) => line,
            Msg::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
                continue;
            }
        };
        let _ = out.write_all(&line);
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let msg = format!("{lost} log lines dropped: stderr was not being read");
            let text = if json {
                let mut obj = serde_json::Map::new();
                obj.insert("@level".into(), "warn".into());
                obj.insert("@message".into(), msg.into());
                obj.insert("@timestamp".into(), timestamp().into());
                obj.insert("@module".into(), "workflow-plugin-eventbus".into());
                format!("{}\n", serde_json::Value::Object(obj))
            } else {
                format!("WARN {msg}\n")
            };
            let _ = out.write_all(text.as_bytes());
        }
        let _ = out.flush();
    }
}

static QUEUE: OnceLock<Mutex<Option<Queued>>> = OnceLock::new();

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("EVENTBUS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let queue = Queued::start(QUEUE_LINES, json, QuietStderr);
    let _ = QUEUE.set(Mutex::new(Some(queue.clone())));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(queue)
        .with_ansi(false);
    let _ = if json {
        builder.event_format(HclogJson).try_init()
    } else {
        builder.with_target(false).try_init()
    };
}

/// Before exit: lets the writer thread write what is queued, for at most `within` (a host that
/// does not read stderr must not hold the exit).
pub fn flush(within: Duration) {
    let Some(q) = QUEUE.get() else { return };
    let Some(queue) = q.lock().ok().and_then(|mut q| q.take()) else {
        return;
    };
    queue.flush(within);
}

fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

/// hclog-compatible JSON: `@message`, `@level`, `@timestamp` are strings, as the host requires.
struct HclogJson;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for HclogJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut v = Visitor::default();
        event.record(&mut v);
        let level = match *event.metadata().level() {
            tracing::Level::TRACE => "trace",
            tracing::Level::DEBUG => "debug",
            tracing::Level::INFO => "info",
            tracing::Level::WARN => "warn",
            tracing::Level::ERROR => "error",
        };
        let ts = timestamp();
        let mut obj = serde_json::Map::new();
        obj.insert("@level".into(), level.into());
        obj.insert("@message".into(), v.message.into());
        obj.insert("@timestamp".into(), ts.into());
        obj.insert("@module".into(), "workflow-plugin-eventbus".into());
        for (k, val) in v.fields {
            obj.insert(k, val.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(obj))
    }
}

#[derive(Default)]
struct Visitor {
    message: String,
    fields: Vec<(String, String)>,
}

impl tracing::field::Visit for Visitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields
                .push((field.name().to_string(), value.to_string()));
        }
    }
}
