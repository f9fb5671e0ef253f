//! Real Kafka-protocol brokers on loopback for tests and benchmarks: tansu 0.6.0 (crates.io),
//! single node, `memory://` storage, built with only its `dynostore` engine.
//!
//! Each broker gets a free 127.0.0.1 port (listener and advertised listener both: librdkafka may
//! resolve `localhost` to `::1`, tansu listens on IPv4 only) and an empty temp dir as its working
//! dir (tansu loads a `.env` from there). It is ready when the port accepts a connection; it is
//! killed and its dir deleted on drop. A missing binary fails loudly with the install hint; the
//! harness never skips.
//!
//! Known broker limits (measured, see the project's facts file): a produce batch of N > 1
//! records moves the high watermark by one, so test producers send one record per batch
//! (`linger.ms=0`, `batch.num.messages=1`, see [`ONE_RECORD_PER_BATCH`]); no topic
//! auto-creation; `offsets_for_times` answers offset 0; no CreatePartitions, AlterConfigs or
//! EndTxn. Memory storage does not survive a restart: [`KafkaServer::start_again`] gives an empty
//! broker on the same port.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu release the tests are written against (its bugs are worked around by version).
pub const TANSU_VERSION: &str = "0.6.0";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka producer properties that keep each produce request to one record (the tansu
/// 0.6.0 batch bug); every test producer sets these.
pub const ONE_RECORD_PER_BATCH: &[(&str, &str)] =
    &[("linger.ms", "0"), ("batch.num.messages", "1")];

/// Where `make deps` installs tansu: `$EVENTBUS_TOOLS_DIR/tansu-<version>` (default
/// `$HOME/.cache/eventbus-tools`), so every checkout and CI run on a machine shares one build.
pub fn default_install_root() -> PathBuf {
    let tools = std::env::var_os("EVENTBUS_TOOLS_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/eventbus-tools")
        });
    tools.join(format!("tansu-{TANSU_VERSION}"))
}

/// `TANSU_BIN`, else the `make deps` install ([`default_install_root`]`/bin/tansu`), else
/// `tansu` on PATH.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cached = default_install_root().join("bin/tansu");
    if cached.is_file() {
        return cached;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "tansu (the Kafka-protocol test broker) not found: set TANSU_BIN, run `make deps`, or \
         `cargo install tansu --version {TANSU_VERSION} --locked --no-default-features \
         --features dynostore --root {}` (about 8 minutes of CPU, once per machine)",
        default_install_root().display()
    );
}

/// The nats harness's port allocator: one memory of handed-out ports for every harness in a
/// test process, so a NATS and a Kafka server started side by side never get the same port.
pub use nats_test_server::free_port;

pub struct KafkaServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl KafkaServer {
    /// A broker on a free loopback port with memory storage.
    pub fn start() -> KafkaServer {
        let mut s = KafkaServer {
            bin: binary(),
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        s.spawn();
        s
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// `tcp://127.0.0.1:PORT`, the form tansu's own subcommands take.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(&mut self) {
        let listener = self.url();
        let log = std::fs::File::create(self.log_path()).expect("create tansu log");
        let log2 = log.try_clone().expect("clone log handle");
        let work = self.dir.path().join("work");
        std::fs::create_dir_all(&work).expect("tansu working dir");
        let child = Command::new(&self.bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&listener)
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .current_dir(&work)
            // Its env twins would override nothing we pass, but a stray one in the caller's
            // environment must not point the broker elsewhere.
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tansu exited early ({status}); log:\n{}", self.log_tail());
            }
            let addr = ([127, 0, 0, 1], self.port).into();
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "tansu not listening on {} within {READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// SIGKILL, waiting for the process. Memory storage: everything is gone.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Starts an empty broker again on the same port after [`kill9`](Self::kill9).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker still running");
        self.spawn();
    }

    /// SIGSTOP: the broker keeps its socket but answers nothing (a partition, seen from clients).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `tansu topic create NAME --partitions N` against this broker (no client library needed).
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(&self.bin)
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &self.url(),
                "--partitions",
            ])
            .arg(partitions.to_string())
            .current_dir(self.dir.path().join("work"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {} topic create: {e}", self.bin.display()));
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// ApiVersions v0 request (key 18), correlation id 7, no client id.
    fn api_versions(port: u16) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body: [u8; 10] = [0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).unwrap();
        reply
    }

    #[test]
    fn answers_the_kafka_handshake_and_restarts_empty_on_the_same_port() {
        let mut s = KafkaServer::start();
        let reply = api_versions(s.port());
        // Correlation id echoed, error code 0.
        assert_eq!(&reply[..4], &[0, 0, 0, 7]);
        assert_eq!(&reply[4..6], &[0, 0]);
        let port = s.port();
        s.create_topic("harness-probe", 2);
        s.kill9();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        s.start_again();
        assert_eq!(&api_versions(port)[..4], &[0, 0, 0, 7]);
    }
}
