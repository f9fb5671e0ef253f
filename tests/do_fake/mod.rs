//! A stateful stand-in for the DigitalOcean Apps API that deploys an app by running its spec on
//! this machine, behind prism in proxy mode so every request and every answer is checked against
//! DigitalOcean's own OpenAPI description of the Apps operations.
//!
//! A deployment runs the service's `run_command` under `sh -c` with the spec's GENERAL and SECRET
//! env vars (plus `PORT` = `http_port`, as App Platform sets it), a `nats-server` shim first on
//! PATH that runs this machine's real nats-server in place of the image's, and moves through
//! PENDING_DEPLOY, DEPLOYING to ACTIVE once the spec's health check answers 200, or to ERROR when
//! the process exits or the check does not pass in time.
//!
//! What the real service does differently (and how the fake stands in for it):
//! - It pulls the image; the fake only accepts `DOCKER_HUB library/nats:<x.y[.z]>-alpine` and runs
//!   whatever nats-server this machine has, whatever the tag says.
//! - Each container has its own network namespace and disk. The fake gives each app its own
//!   loopback address (127.0.<n>.<m>) through the `NATS_LISTEN_HOST` variable the spec already
//!   declares, and its own `TMPDIR`, which it empties on every deploy (the platform's disk wipe).
//! - The live url is `http://<that address>:<http_port>` (no TLS edge, no domain); the real one is
//!   `https://<app>-<hash>.ondigitalocean.app` behind DigitalOcean's edge, so clients use wss.
//! - No builds, no regions' capacity, no billing; deployments take well under a second.
//! - SECRET values come back as `EV[1:<digest>]`: stable per value, like the real encryption in
//!   that a client cannot read them, and accepted back unchanged on update.
//! - Tokens: `TOKEN` may do everything, `READ_ONLY_TOKEN` only reads (403 otherwise), any
//!   other is 401. A 429 (or any status) happens only when a test asks for it (`inject`).

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

pub const TOKEN: &str = "do-fake-token";
pub const READ_ONLY_TOKEN: &str = "do-fake-read-only-token";
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);

pub struct Deployment {
    pub id: String,
    pub phase: String,
    pub created_at: String,
    pub updated_at: String,
    pub cause: String,
}

pub struct FakeApp {
    pub id: String,
    /// As submitted, secrets in clear.
    pub spec: Json,
    pub created_at: String,
    pub host: Ipv4Addr,
    pub dir: PathBuf,
    pub deployments: Vec<Deployment>,
    pub child: Option<Child>,
    /// Bumped on every deploy; a deploy task stops when it is no longer current.
    pub generation: u64,
    pub log: PathBuf,
}

impl FakeApp {
    fn secret_of(&self, key: &str) -> Option<String> {
        envs(&self.spec)
            .into_iter()
            .find(|e| e["key"] == key)
            .and_then(|e| e["value"].as_str().map(String::from))
    }
}

/// One injected answer, served instead of the next request that matches.
#[derive(Clone, Debug)]
pub struct Injected {
    pub method: String,
    pub path_prefix: String,
    pub status: u16,
    pub message: String,
    /// Seconds from now for `ratelimit-reset`.
    pub reset_in: Option<u64>,
}

#[derive(Default)]
pub struct State {
    pub apps: BTreeMap<String, FakeApp>,
    pub next: u64,
    pub injected: VecDeque<Injected>,
    /// Every request that reached the fake: (method, path, spec.name of its body).
    pub requests: Vec<(String, String, String)>,
}

pub struct Fake {
    pub state: Arc<Mutex<State>>,
    /// The fake itself (for out-of-band changes a test makes).
    pub direct_url: String,
    /// Prism in front of it: what the plugin is pointed at.
    pub url: String,
    pub shim_dir: PathBuf,
    _root: tempfile::TempDir,
}

fn now() -> String {
    time::OffsetDateTime::from(SystemTime::now())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn envs(spec: &Json) -> Vec<Json> {
    spec.pointer("/services/0/envs")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
}

fn encrypted(app_id: &str, value: &str) -> String {
    let d = Sha256::digest(format!("{app_id}\0{value}").as_bytes());
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("EV[1:{hex}]")
}

/// The app as the API shows it: SECRET values encrypted.
fn app_json(a: &FakeApp) -> Json {
    let mut spec = a.spec.clone();
    if let Some(list) = spec
        .pointer_mut("/services/0/envs")
        .and_then(Json::as_array_mut)
    {
        for e in list {
            if e["type"] == "SECRET" {
                let v = e["value"].as_str().unwrap_or_default().to_string();
                e["value"] = json!(encrypted(&a.id, &v));
            }
        }
    }
    let dep = |d: &Deployment| {
        json!({
            "id": d.id, "phase": d.phase, "cause": d.cause,
            "created_at": d.created_at, "updated_at": d.updated_at,
            "phase_last_updated_at": d.updated_at,
            "progress": {"success_steps": if d.phase == "ACTIVE" {2} else {0}, "total_steps": 2, "error_steps": if d.phase == "ERROR" {1} else {0}},
        })
    };
    let active = a.deployments.iter().rev().find(|d| d.phase == "ACTIVE");
    let pending = a
        .deployments
        .last()
        .filter(|d| !["ACTIVE", "ERROR", "CANCELED", "SUPERSEDED"].contains(&d.phase.as_str()));
    let port = spec
        .pointer("/services/0/http_port")
        .and_then(Json::as_u64)
        .unwrap_or(8080);
    let region = spec["region"].as_str().unwrap_or("nyc").to_string();
    let mut v = json!({
        "id": a.id,
        "owner_uuid": "a4e16f25-cdd1-4483-b246-d77f283c9209",
        "spec": spec,
        "created_at": a.created_at,
        "updated_at": a.deployments.last().map(|d| d.updated_at.clone()).unwrap_or_else(|| a.created_at.clone()),
        "region": {"slug": region, "label": region, "flag": "usa", "continent": "North America", "data_centers": [format!("{region}1")]},
        "tier_slug": "basic",
    });
    if let Some(d) = active {
        let live = format!("http://{}:{port}", a.host);
        v["active_deployment"] = dep(d);
        v["live_url"] = json!(live);
        v["live_url_base"] = json!(live);
        v["live_domain"] = json!(format!("{}:{port}", a.host));
        v["default_ingress"] = json!(live);
    }
    if let Some(d) = pending {
        v["in_progress_deployment"] = dep(d);
    }
    v
}

fn deployment_json(d: &Deployment) -> Json {
    json!({
        "id": d.id, "phase": d.phase, "cause": d.cause,
        "created_at": d.created_at, "updated_at": d.updated_at,
        "phase_last_updated_at": d.updated_at,
        "progress": {"success_steps": if d.phase == "ACTIVE" {2} else {0}, "total_steps": 2, "error_steps": if d.phase == "ERROR" {1} else {0}},
    })
}

fn error(status: StatusCode, id: &str, message: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("ratelimit-limit", "5000")
        .header("ratelimit-remaining", "4999")
        .header("ratelimit-reset", unix_now().to_string())
        .body(Full::new(Bytes::from(
            json!({"id": id, "message": message, "request_id": "fake"}).to_string(),
        )))
        .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ok(v: Json) -> Response<Full<Bytes>> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("ratelimit-limit", "5000")
        .header("ratelimit-remaining", "4999")
        .header("ratelimit-reset", unix_now().to_string())
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

/// What the platform would refuse before deploying (the OpenAPI check happens in prism).
fn check_spec(spec: &Json) -> Result<(), String> {
    let name = spec["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err("spec.name is required".into());
    }
    let services = spec["services"].as_array().cloned().unwrap_or_default();
    if services.len() != 1 {
        return Err("the fake runs exactly one service per app".into());
    }
    let img = &services[0]["image"];
    let tag = img["tag"].as_str().unwrap_or("latest");
    let tag_ok = tag.strip_suffix("-alpine").is_some_and(|v| {
        v.split('.').count() >= 2
            && v.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if img["registry_type"] != "DOCKER_HUB"
        || img["registry"] != "library"
        || img["repository"] != "nats"
        || !tag_ok
    {
        return Err(format!("image {img} is not library/nats:<x.y[.z]>-alpine"));
    }
    Ok(())
}

impl Fake {
    /// The fake and prism, started once per test process.
    pub fn get() -> &'static Fake {
        static FAKE: OnceLock<Fake> = OnceLock::new();
        FAKE.get_or_init(Fake::start)
    }

    fn start() -> Fake {
        let root = tempfile::tempdir().unwrap();
        let shim_dir = root.path().join("bin");
        std::fs::create_dir_all(&shim_dir).unwrap();
        let nats = nats_test_server::binary();
        let shim = shim_dir.join("nats-server");
        std::fs::write(
            &shim,
            format!("#!/bin/sh\nexec {:?} \"$@\"\n", nats.display().to_string()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        let apps_root = root.path().join("apps");
        let shim_dir2 = shim_dir.clone();
        // One thread owns the server's runtime and the child processes, for the whole test
        // process (children get a parent-death signal tied to this thread).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let prism = start_prism(addr);
                tx.send((addr, prism)).unwrap();
                let ctx = Arc::new(Ctx {
                    state: st,
                    apps_root,
                    shim_dir: shim_dir2,
                });
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let ctx = ctx.clone();
                            async move { Ok::<_, std::convert::Infallible>(ctx.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        let (addr, prism_port): (SocketAddr, u16) = rx.recv().unwrap();
        Fake {
            state,
            direct_url: format!("http://{addr}"),
            url: format!("http://127.0.0.1:{prism_port}"),
            shim_dir,
            _root: root,
        }
    }

    pub fn inject(&self, i: Injected) {
        self.state.lock().unwrap().injected.push_back(i);
    }

    pub fn app_ids(&self) -> Vec<String> {
        self.state.lock().unwrap().apps.keys().cloned().collect()
    }

    pub fn app_by_name(&self, name: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.apps
            .values()
            .find(|a| a.spec["name"] == name)
            .map(|a| a.id.clone())
    }

    /// The submitted spec (secrets in clear) of an app.
    pub fn spec_of(&self, id: &str) -> Option<Json> {
        self.state
            .lock()
            .unwrap()
            .apps
            .get(id)
            .map(|a| a.spec.clone())
    }

    pub fn log_of(&self, id: &str) -> String {
        let p = self
            .state
            .lock()
            .unwrap()
            .apps
            .get(id)
            .map(|a| a.log.clone());
        p.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Deletes an app behind the provider's back (someone else's API call).
    pub async fn delete_out_of_band(&self, id: &str) {
        let status = raw_call(
            &self.direct_url,
            "DELETE",
            &format!("/v2/apps/{id}"),
            TOKEN,
            None,
        )
        .await
        .0;
        assert_eq!(status, 200, "out-of-band delete of {id}");
    }
}

/// A plain HTTP/1.1 call (for tests that talk to the fake or prism directly).
pub async fn raw_call(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Json>,
) -> (u16, Json) {
    let addr = base.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&b).unwrap_or(Json::Null))
}

pub fn openapi_file() -> PathBuf {
    if let Ok(p) = std::env::var("EVENTBUS_DO_OPENAPI") {
        return PathBuf::from(p);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rel = "shared/vendor/do-openapi-apps/apps.openapi.yaml";
    for base in [
        manifest.join(".."),
        manifest.join("../.."),
        PathBuf::from("/work"),
    ] {
        let p = base.join(rel);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "DigitalOcean's Apps OpenAPI file not found: set EVENTBUS_DO_OPENAPI, or keep the project's shared/ folder \
         beside the clone (../{rel})"
    );
}

pub fn prism_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PRISM_BIN") {
        return PathBuf::from(p);
    }
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/prism/node_modules/.bin/prism");
    assert!(
        p.exists(),
        "prism not found at {}: run `make deps` (npm install of @stoplight/prism-cli) or set PRISM_BIN",
        p.display()
    );
    p
}

fn parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) only asks the kernel to signal this child when the
    // thread that started it exits; it is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// `prism proxy` on a free port in front of the fake, with `--errors` so a request or answer
/// that breaks DigitalOcean's OpenAPI fails (422 / 500) instead of passing with a header.
fn start_prism(upstream: SocketAddr) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(prism_bin());
    cmd.arg("proxy")
        .arg(openapi_file())
        .arg(format!("http://{upstream}"))
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "--errors"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    parent_death_signal(&mut cmd);
    let mut child = cmd.spawn().expect("start prism");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut sent = false;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if !sent && line.contains("Prism is listening") {
                let _ = tx.send(());
                sent = true;
            }
            if std::env::var("EVENTBUS_PRISM_LOG").is_ok() {
                eprintln!("prism: {line}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("prism did not start listening within 60 s");
    std::mem::forget(child);
    port
}

struct Ctx {
    state: Arc<Mutex<State>>,
    apps_root: PathBuf,
    shim_dir: PathBuf,
}

impl Ctx {
    async fn handle(
        self: &Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
        {
            let mut s = self.state.lock().unwrap();
            let name = body
                .pointer("/spec/name")
                .and_then(Json::as_str)
                .unwrap_or_default();
            s.requests
                .push((method.clone(), path.clone(), name.to_string()));
            let hit = s
                .injected
                .iter()
                .position(|i| i.method == method && path.starts_with(&i.path_prefix));
            if let Some(i) = hit.and_then(|i| s.injected.remove(i)) {
                let mut r = error(
                    StatusCode::from_u16(i.status).unwrap(),
                    match i.status {
                        403 => "forbidden",
                        422 => "unprocessable_entity",
                        429 => "too_many_requests",
                        _ => "error",
                    },
                    &i.message,
                );
                if let Some(secs) = i.reset_in {
                    r.headers_mut().insert(
                        "ratelimit-reset",
                        (unix_now() + secs).to_string().parse().unwrap(),
                    );
                    r.headers_mut()
                        .insert("ratelimit-remaining", "0".parse().unwrap());
                }
                return r;
            }
        }
        let token = auth.strip_prefix("Bearer ").unwrap_or_default();
        if token != TOKEN && token != READ_ONLY_TOKEN {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unable to authenticate you",
            );
        }
        if token == READ_ONLY_TOKEN && method != "GET" && path != "/v2/apps/propose" {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "You are not authorized to perform this operation",
            );
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", ["v2", "apps", "propose"]) => {
                let spec = &body["spec"];
                if let Err(m) = check_spec(spec) {
                    return error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable_entity", &m);
                }
                let taken = {
                    let s = self.state.lock().unwrap();
                    s.apps.values().any(|a| {
                        a.spec["name"] == spec["name"] && body["app_id"].as_str() != Some(&a.id)
                    })
                };
                let mut v = json!({
                    "app_is_static": false,
                    "app_name_available": !taken,
                    "spec": spec,
                    "app_cost": 12,
                });
                if taken {
                    v["app_name_suggestion"] =
                        json!(format!("{}-2", spec["name"].as_str().unwrap_or_default()));
                }
                ok(v)
            }
            ("GET", ["v2", "apps"]) => {
                let s = self.state.lock().unwrap();
                let apps: Vec<Json> = s.apps.values().map(app_json).collect();
                ok(json!({"apps": apps, "links": {}, "meta": {"total": apps.len()}}))
            }
            ("POST", ["v2", "apps"]) => {
                let spec = body["spec"].clone();
                if let Err(m) = check_spec(&spec) {
                    return error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable_entity", &m);
                }
                let (id, generation) = {
                    let mut s = self.state.lock().unwrap();
                    if s.apps.values().any(|a| a.spec["name"] == spec["name"]) {
                        return error(
                            StatusCode::CONFLICT,
                            "conflict",
                            "an app with this name already exists",
                        );
                    }
                    s.next += 1;
                    let n = s.next;
                    let id = format!("6f0c2f44-0000-4000-8000-{n:012}");
                    let dir = self.apps_root.join(&id);
                    std::fs::create_dir_all(&dir).unwrap();
                    let app = FakeApp {
                        id: id.clone(),
                        spec: spec.clone(),
                        created_at: now(),
                        host: free_host(&mut s.next),
                        log: dir.join("app.log"),
                        dir,
                        deployments: Vec::new(),
                        child: None,
                        generation: 0,
                    };
                    s.apps.insert(id.clone(), app);
                    let g = self.new_deployment(&mut s, &id, "initial deployment");
                    (id, g)
                };
                self.deploy(&id, generation);
                let s = self.state.lock().unwrap();
                ok(json!({"app": app_json(&s.apps[&id])}))
            }
            ("GET", ["v2", "apps", id]) => {
                let s = self.state.lock().unwrap();
                match s.apps.get(*id) {
                    Some(a) => ok(json!({"app": app_json(a)})),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "The resource you were accessing could not be found.",
                    ),
                }
            }
            ("PUT", ["v2", "apps", id]) => {
                let mut spec = body["spec"].clone();
                if let Err(m) = check_spec(&spec) {
                    return error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable_entity", &m);
                }
                let generation = {
                    let mut s = self.state.lock().unwrap();
                    let Some(a) = s.apps.get(*id) else {
                        return error(
                            StatusCode::NOT_FOUND,
                            "not_found",
                            "The resource you were accessing could not be found.",
                        );
                    };
                    // An encrypted value sent back unchanged keeps the secret it stands for.
                    if let Some(list) = spec
                        .pointer_mut("/services/0/envs")
                        .and_then(Json::as_array_mut)
                    {
                        for e in list {
                            let key = e["key"].as_str().unwrap_or_default().to_string();
                            let v = e["value"].as_str().unwrap_or_default().to_string();
                            if v.starts_with("EV[") {
                                match a.secret_of(&key) {
                                    Some(old) if encrypted(&a.id, &old) == v => e["value"] = json!(old),
                                    _ => {
                                        return error(
                                            StatusCode::UNPROCESSABLE_ENTITY,
                                            "unprocessable_entity",
                                            &format!("env {key}: encrypted value does not belong to this app"),
                                        )
                                    }
                                }
                            }
                        }
                    }
                    s.apps.get_mut(*id).unwrap().spec = spec;
                    let id = id.to_string();
                    self.new_deployment(&mut s, &id, "app spec updated")
                };
                self.deploy(id, generation);
                let s = self.state.lock().unwrap();
                ok(json!({"app": app_json(&s.apps[*id])}))
            }
            ("DELETE", ["v2", "apps", id]) => {
                let removed = self.state.lock().unwrap().apps.remove(*id);
                match removed {
                    Some(mut a) => {
                        stop(&mut a.child);
                        let _ = std::fs::remove_dir_all(&a.dir);
                        ok(json!({"id": id}))
                    }
                    None => error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "The resource you were accessing could not be found.",
                    ),
                }
            }
            ("GET", ["v2", "apps", id, "deployments"]) => {
                let s = self.state.lock().unwrap();
                match s.apps.get(*id) {
                    Some(a) => {
                        let list: Vec<Json> =
                            a.deployments.iter().rev().map(deployment_json).collect();
                        ok(json!({"deployments": list, "links": {}, "meta": {"total": list.len()}}))
                    }
                    None => error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "The resource you were accessing could not be found.",
                    ),
                }
            }
            ("GET", ["v2", "apps", id, "deployments", dep]) => {
                let s = self.state.lock().unwrap();
                match s
                    .apps
                    .get(*id)
                    .and_then(|a| a.deployments.iter().find(|d| d.id == *dep))
                {
                    Some(d) => ok(json!({"deployment": deployment_json(d)})),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "The resource you were accessing could not be found.",
                    ),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such operation in the fake",
            ),
        }
    }

    /// Supersedes what is in flight and queues a new deployment; returns its generation.
    fn new_deployment(&self, s: &mut State, id: &str, cause: &str) -> u64 {
        s.next += 1;
        let n = s.next;
        let a = s.apps.get_mut(id).unwrap();
        for d in a.deployments.iter_mut() {
            if !["ACTIVE", "ERROR", "CANCELED", "SUPERSEDED"].contains(&d.phase.as_str()) {
                d.phase = "SUPERSEDED".into();
            }
        }
        a.deployments.push(Deployment {
            id: format!("d0c2f44a-0000-4000-8000-{n:012}"),
            phase: "PENDING_DEPLOY".into(),
            created_at: now(),
            updated_at: now(),
            cause: cause.into(),
        });
        a.generation += 1;
        a.generation
    }

    fn set_phase(&self, id: &str, generation: u64, phase: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        let Some(a) = s.apps.get_mut(id) else {
            return false;
        };
        if a.generation != generation {
            return false;
        }
        if phase == "ACTIVE" {
            for d in a.deployments.iter_mut() {
                if d.phase == "ACTIVE" {
                    d.phase = "SUPERSEDED".into();
                }
            }
        }
        if let Some(d) = a.deployments.last_mut() {
            d.phase = phase.into();
            d.updated_at = now();
        }
        true
    }

    /// Runs the spec: stop the old container, wipe its disk, start the new one, health-check it.
    fn deploy(self: &Arc<Self>, id: &str, generation: u64) {
        let ctx = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            if !ctx.set_phase(&id, generation, "DEPLOYING") {
                return;
            }
            let started = {
                let mut s = ctx.state.lock().unwrap();
                let Some(a) = s.apps.get_mut(&id) else { return };
                stop(&mut a.child);
                let tmp = a.dir.join("tmp");
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).unwrap();
                let svc = a.spec["services"][0].clone();
                let run = svc["run_command"].as_str().unwrap_or_default().to_string();
                let mut cmd = Command::new("sh");
                // The image's entrypoint execs the command it is given: one process from here
                // to nats-server, so the parent-death signal set below reaches it.
                cmd.arg("-c").arg(format!("exec {run}")).env_clear();
                cmd.env(
                    "PATH",
                    format!("{}:/usr/local/bin:/usr/bin:/bin", ctx.shim_dir.display()),
                );
                for e in envs(&a.spec) {
                    if let (Some(k), Some(v)) = (e["key"].as_str(), e["value"].as_str()) {
                        cmd.env(k, v);
                    }
                }
                cmd.env(
                    "PORT",
                    svc["http_port"].as_u64().unwrap_or(8080).to_string(),
                );
                // The container's own network namespace and disk, on one machine.
                cmd.env("NATS_LISTEN_HOST", a.host.to_string());
                cmd.env("TMPDIR", &tmp);
                cmd.current_dir(&tmp);
                let log = std::fs::File::create(&a.log).unwrap();
                cmd.stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
                parent_death_signal(&mut cmd);
                match cmd.spawn() {
                    Ok(c) => {
                        a.child = Some(c);
                        let hc = &svc["health_check"];
                        Some((
                            a.host,
                            hc["port"].as_u64().unwrap_or(8080) as u16,
                            hc["http_path"].as_str().unwrap_or("/").to_string(),
                        ))
                    }
                    Err(_) => None,
                }
            };
            let Some((host, port, path)) = started else {
                ctx.set_phase(&id, generation, "ERROR");
                return;
            };
            let deadline = Instant::now() + HEALTH_DEADLINE;
            loop {
                let exited = {
                    let mut s = ctx.state.lock().unwrap();
                    match s.apps.get_mut(&id) {
                        Some(a) if a.generation == generation => a
                            .child
                            .as_mut()
                            .map(|c| !matches!(c.try_wait(), Ok(None)))
                            .unwrap_or(true),
                        _ => return,
                    }
                };
                if exited {
                    ctx.set_phase(&id, generation, "ERROR");
                    return;
                }
                if health(host, port, &path).await {
                    ctx.set_phase(&id, generation, "ACTIVE");
                    return;
                }
                if Instant::now() > deadline {
                    let mut s = ctx.state.lock().unwrap();
                    if let Some(a) = s.apps.get_mut(&id) {
                        stop(&mut a.child);
                    }
                    drop(s);
                    ctx.set_phase(&id, generation, "ERROR");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

/// A loopback address of its own for an app: 127.<from the pid>.x.y, skipping any where one of
/// the ports an app uses is taken (another test process, a leftover).
fn free_host(next: &mut u64) -> Ipv4Addr {
    let a = 100 + (std::process::id() % 100) as u8;
    loop {
        *next += 1;
        let n = *next;
        let ip = Ipv4Addr::new(127, a, (n / 250 % 250) as u8, 1 + (n % 250) as u8);
        let free = [4222u16, 8222, 8080]
            .iter()
            .all(|p| std::net::TcpListener::bind((ip, *p)).is_ok());
        if free {
            return ip;
        }
    }
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

async fn health(host: Ipv4Addr, port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
        || String::from_utf8_lossy(&buf).starts_with("HTTP/1.0 200")
}
