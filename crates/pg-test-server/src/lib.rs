//! Real PostgreSQL servers for tests and benchmarks.
//!
//! `PgServer::start()` copies a cluster made once by `initdb` (see `copy_template`) into a
//! fresh temp dir, starts `postgres` listening on a
//! unix socket in that dir and on `127.0.0.1:<free port>` (nothing else), and creates the
//! database `eventbus`. Durability is traded for speed (`fsync=off`, `synchronous_commit=off`,
//! `full_page_writes=off`): a crash of the *machine* may lose data, a crash of the server
//! process does not, so kill-9 restart tests stay meaningful.
//!
//! Binaries: `PG_BIN_DIR`, else `pg_config --bindir`, else `/usr/lib/postgresql/<newest>/bin`.
//!
//! Running as root: `initdb` and `postgres` refuse to run as root, so when this process is
//! root the temp dir is chowned to the `postgres` account (Debian's package creates it; set
//! `PG_TEST_USER` to use another unprivileged account) and both programs are started with
//! that uid/gid (set in the child before exec, so the pid we hold is the postmaster itself and
//! signals reach it directly). As a normal user everything runs as that user.
//!
//! The server runs in its own process group so `kill9()` takes the backends down with the
//! postmaster, like a machine losing the process tree. Drop stops the server (fast shutdown,
//! then SIGKILL) and deletes the directory.

use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bumped whenever the template's content changes, so an old one is never reused.
const TEMPLATE_LAYOUT: &str = "v2";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The database the harness creates; tests may create more with [`PgServer::create_database`].
pub const DATABASE: &str = "eventbus";
/// The superuser initdb creates.
pub const USER: &str = "postgres";

/// Directory holding `initdb`, `postgres`, `psql`.
pub fn bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (set PG_BIN_DIR, put pg_config on PATH, or \
             `apt-get install postgresql`)"
        ),
    }
}

/// A port that was free a moment ago (see nats-test-server for the same caveat).
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
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

/// Where servers live: `PG_TEST_TMPDIR`, else `/dev/shm` (memory: a copy of the cluster
/// costs milliseconds instead of seconds on a busy disk), else the temp dir.
fn scratch_base() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_TEST_TMPDIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let shm = Path::new("/dev/shm");
    let writable = tempfile::Builder::new()
        .prefix("pgtest-probe")
        .tempdir_in(shm)
        .is_ok();
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// uid/gid to run the server as when we are root; None when we are not root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let user = std::env::var("PG_TEST_USER").unwrap_or_else(|_| "postgres".to_string());
    let c = CString::new(user.clone()).expect("user name");
    // SAFETY: getpwnam returns a pointer into static storage or null; read it at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        panic!(
            "running as root, and initdb refuses root: user {user:?} not found (create an \
             unprivileged account or set PG_TEST_USER)"
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some((uid, gid))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown test dir");
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read dir").flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

fn initdb(bin: &Path, owner: Option<(u32, u32)>, data: &Path, extra: &[String]) {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args([
            "-U",
            USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--wal-segsize=1",
        ])
        .arg("--auth-local=trust")
        .args(extra);
    if !extra.iter().any(|a| a.starts_with("--auth-host")) {
        cmd.arg("--auth-host=trust");
    }
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.join("initdb").display()));
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A trust-auth cluster made once per machine, user and server version under the temp dir
/// (`pg-test-template-<uid>-<version>`), copied for each server. Built in a scratch dir and
/// renamed into place, so concurrent test processes never see a half-made template.
fn copy_template(bin: &Path, owner: Option<(u32, u32)>, data: &Path) {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg".into());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let template =
        scratch_base().join(format!("pg-test-template-{me}-{version}-{TEMPLATE_LAYOUT}"));
    if !template.join("PG_VERSION").is_file() {
        let scratch = tempfile::Builder::new()
            .prefix("pg-test-template-build")
            .tempdir_in(scratch_base())
            .expect("temp dir");
        if let Some((uid, gid)) = owner {
            chown_tree(scratch.path(), uid, gid);
        }
        let d = scratch.path().join("data");
        initdb(bin, owner, &d, &[]);
        // The database the tests use replaces `postgres`, so a copy holds three databases.
        let mut single = Command::new(bin.join("postgres"));
        single.arg("--single").arg("-D").arg(&d).arg("template1");
        if let Some((uid, gid)) = owner {
            single.uid(uid).gid(gid);
        }
        let mut child = single
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run postgres --single");
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = writeln!(stdin, "ALTER DATABASE postgres RENAME TO {DATABASE}");
        }
        let out = child.wait_with_output().expect("postgres --single");
        assert!(
            out.status.success(),
            "postgres --single: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Losing the race to another process is fine: its template is as good as ours.
        let _ = std::fs::rename(&d, &template);
    }
    let out = Command::new("cp")
        .arg("-a")
        .arg(&template)
        .arg(data)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "copy the initdb template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // cp -a keeps the template's owner, which is the account the server runs as.
}

#[derive(Clone, Debug, Default)]
pub struct Builder {
    password: Option<String>,
    port: Option<u16>,
    settings: Vec<(String, String)>,
    tls: Option<(String, String)>,
    client_ca: Option<String>,
}

impl Builder {
    /// Require this password for TCP connections (scram-sha-256); the unix socket stays
    /// `trust` so the harness itself needs no password.
    pub fn password(mut self, p: impl Into<String>) -> Self {
        self.password = Some(p.into());
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// Serve TLS (`ssl=on`) with this PEM certificate chain and key; plain connections stay
    /// allowed, so `sslmode` decides.
    pub fn tls(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.tls = Some((cert_pem.into(), key_pem.into()));
        self
    }
    /// Ask clients for a certificate issued by this CA (PEM); `pg_stat_ssl.client_dn` then
    /// shows who presented one.
    pub fn tls_client_ca(mut self, ca_pem: impl Into<String>) -> Self {
        self.client_ca = Some(ca_pem.into());
        self
    }
    /// An extra `-c name=value` server setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    pub fn start(self) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("pgtest")
            .tempdir_in(scratch_base())
            .expect("temp dir");
        let owner = run_as();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).expect("socket dir");
        if let Some((uid, gid)) = owner {
            chown_tree(dir.path(), uid, gid);
        }
        let bin = bin_dir();
        match &self.password {
            // The common case copies a cluster initdb'd once per machine: initdb takes
            // seconds on a busy machine, a copy a fraction of that.
            None => copy_template(&bin, owner, &data),
            Some(pw) => {
                let pwfile = dir.path().join("pw");
                std::fs::write(&pwfile, pw).expect("password file");
                if let Some((uid, gid)) = owner {
                    chown_tree(&pwfile, uid, gid);
                }
                initdb(
                    &bin,
                    owner,
                    &data,
                    &[
                        "--auth-host=scram-sha-256".to_string(),
                        format!("--pwfile={}", pwfile.display()),
                    ],
                );
            }
        }
        if let Some((cert, key)) = &self.tls {
            use std::os::unix::fs::PermissionsExt;
            let ca = self.client_ca.as_ref();
            let files = [
                ("server.crt", Some(cert)),
                ("server.key", Some(key)),
                ("root.crt", ca),
            ];
            for (name, pem) in files.into_iter().filter_map(|(n, p)| p.map(|p| (n, p))) {
                let p = data.join(name);
                std::fs::write(&p, pem).expect("write TLS file");
                // The server refuses a key readable by others.
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod TLS file");
                if let Some((uid, gid)) = owner {
                    chown_tree(&p, uid, gid);
                }
            }
        }
        let mut s = PgServer {
            port: self.port.unwrap_or_else(free_port),
            bin,
            data,
            sock,
            owner,
            builder: self,
            child: None,
            dir,
        };
        s.spawn();
        if s.builder.password.is_some() {
            s.psql_as_super("template1", &format!("CREATE DATABASE {DATABASE}"));
        }
        s
    }
}

/// A running PostgreSQL server; stopped and deleted on drop.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    owner: Option<(u32, u32)>,
    builder: Builder,
    child: Option<Child>,
    // Last: the directory must outlive the process that uses it.
    dir: tempfile::TempDir,
}

impl PgServer {
    pub fn start() -> PgServer {
        Builder::default().start()
    }
    pub fn builder() -> Builder {
        Builder::default()
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    /// libpq URL over loopback TCP for [`DATABASE`] (password included when one was set).
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }
    pub fn url_for(&self, db: &str) -> String {
        match &self.builder.password {
            Some(pw) => format!("postgres://{USER}:{pw}@127.0.0.1:{}/{db}", self.port),
            None => format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port),
        }
    }
    /// key=value DSN over the unix socket for [`DATABASE`] (no password needed).
    pub fn socket_dsn(&self) -> String {
        format!(
            "host={} port={} user={USER} dbname={DATABASE}",
            self.sock.display(),
            self.port
        )
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        if let Some((uid, gid)) = self.owner {
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.sock)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=32MB"]);
        if self.builder.tls.is_some() {
            cmd.args(["-c", "ssl=on"])
                .args(["-c", "ssl_cert_file=server.crt"])
                .args(["-c", "ssl_key_file=server.key"]);
            if self.builder.client_ca.is_some() {
                cmd.args(["-c", "ssl_ca_file=root.crt"]);
            }
        }
        for (k, v) in &self.builder.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let err = log.try_clone().expect("log handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .process_group(0);
        self.child = Some(cmd.spawn().expect("spawn postgres"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("postgres exited early ({status}):\n{}", self.log_tail());
                }
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .arg("-q")
                .args(["-U", USER])
                .arg("-h")
                .arg(&self.sock)
                .arg("-p")
                .arg(self.port.to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_string()
    }

    /// Run SQL through `psql` on the unix socket against [`DATABASE`]; panics with psql's
    /// output when it fails (`ON_ERROR_STOP`). Returns stdout (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as_super(DATABASE, sql)
    }

    /// Run a SQL file (e.g. a fixture) against [`DATABASE`].
    pub fn psql_file(&self, path: &Path) -> String {
        let sql = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        self.psql(&sql)
    }

    pub fn create_database(&self, name: &str) {
        self.psql_as_super("template1", &format!("CREATE DATABASE {name}"));
    }

    fn psql_as_super(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-X")
            .arg("-q")
            .arg("-A")
            .arg("-t")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", db, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed for {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn signal_group(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on the process group we created.
            unsafe {
                libc::kill(-(pid as i32), sig);
            }
        }
    }

    fn reap(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fast shutdown (SIGINT: abort transactions, disconnect clients), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: signal to our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGINT);
            }
        }
        if !self.reap(Duration::from_secs(10)) {
            self.kill9();
        }
    }

    /// SIGKILL the postmaster and its backends (the whole process group).
    pub fn kill9(&mut self) {
        self.signal_group(libc::SIGKILL);
        self.reap(Duration::from_secs(10));
        // The backends were in the same group and died too; the stale postmaster.pid is
        // recognised as stale by the next start.
    }

    /// Start again on the same port and data directory.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        self.spawn();
    }

    /// Stop (fast) and start again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: signals to our own child / its group.
            unsafe {
                libc::kill(pid as i32, libc::SIGINT);
            }
            if !self.reap(Duration::from_secs(5)) {
                self.signal_group(libc::SIGKILL);
                self.reap(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_sql_and_restarts_on_the_same_port() {
        let mut pg = PgServer::start();
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (41)");
        assert_eq!(pg.psql("SELECT x + 1 FROM t"), "42");
        let port = pg.port();
        pg.restart();
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql("SELECT x FROM t"), "41");
        pg.kill9();
        pg.start_again();
        assert_eq!(pg.psql("SELECT count(*) FROM t"), "1");
    }
}
