//! A stateful stand-in for a Kubernetes API server, enough of it for the `kubernetes` and
//! `aws.eks` targets: namespaces, Secrets, ConfigMaps, Services, StatefulSets,
//! PodDisruptionBudgets, NetworkPolicies (stored, not enforced: loopback has no pod network),
//! ServiceAccounts, and the custom resources PodMonitor and Certificate (stored: no Prometheus
//! scrapes, no cert-manager issues; the kinds are served as if their CRDs were installed),
//! PersistentVolumeClaims and Pods, with server-side apply, and the pods'
//! `portforward` websocket. The pods are REAL nats-server processes on loopback, started from the
//! StatefulSet's pod template and the ConfigMap's nats.conf (and the files it includes, projected
//! from the Secret), so the JetStream cluster the provider
//! waits for, and the streams and consumers it then creates through the port-forward, are real.
//!
//! What a real API server (and cluster) does differently:
//! - Server-side apply merges each field manager's fields and reports conflicts (409) between
//!   managers; the fake keeps the last applied body whole (the provider is the only manager), only
//!   requires `fieldManager` (422 without it) and the apply-patch content type (415 otherwise).
//!   It does no defaulting and validates only what the tests rely on: a StatefulSet's immutable
//!   fields (selector, serviceName, volumeClaimTemplates, podManagementPolicy) answer 422 on
//!   change, as the real one does. `stringData` of a Secret is folded into `data` (base64).
//! - Watches, discovery, RBAC, admission, quotas, events and finalizers do not exist; a bearer
//!   token is checked (401), nothing else. HTTP/1.1 only, on 127.0.0.1: plain (`start`) or TLS
//!   with a private CA the kubeconfig carries as `certificate-authority-data` (`start_tls`), as
//!   a real one always has (and HTTP/2).
//! - Controllers: the StatefulSet "controller" runs in-process every 100 ms: Parallel pod
//!   management only (all missing ordinals start at once), RollingUpdate one pod at a time from the
//!   highest ordinal, each replaced pod Ready before the next (OnDelete is honoured by not
//!   rolling). Deleting a StatefulSet deletes its pods at once (the real garbage collector takes
//!   seconds); volume claims stay, as with the real `Retain` policy.
//! - Pods are processes, not containers: nats-server of this machine (`NATS_SERVER_BIN`) whatever
//!   the image says; each pod gets its own loopback ports for 4222/6222/8222, so the config's
//!   ports, the route hosts (`<pod>.<headless>...`) and the mount paths are rewritten to those
//!   ports and to per-pod directories. Env vars (values, `fieldRef metadata.name`,
//!   `secretKeyRef`, `$(VAR)`) are resolved like the kubelet does. Readiness is the template's
//!   readiness probe path asked on the pod's monitor port. preStop hooks do not run (pods get
//!   SIGTERM).
//! - Port-forward speaks `v4.channel.k8s.io` only (a real server may also offer v5 and SPDY);
//!   per port a data and an error channel, each opened by a frame carrying the port (2 bytes,
//!   little endian), bridged to the pod process's port.
//! - A LoadBalancer Service gets an address of its own on loopback (127.0.<n>.<m>) with a TCP
//!   proxy on the Service's port to a Ready pod; a real cloud provisions an external LB.
//! - PVCs are directories, Bound at once; storage classes are not checked.

#![allow(dead_code)]

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub const TOKEN: &str = "k8s-fake-token";

/// (plural, namespace, name)
type Key = (String, String, String);

pub struct Pod {
    pub ns: String,
    pub name: String,
    pub set: String,
    pub ordinal: u32,
    pub revision: String,
    pub labels: Json,
    pub ports: BTreeMap<u16, u16>,
    pub child: Option<Child>,
    pub ready: bool,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub started: u64,
}

impl Pod {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn json(&self) -> Json {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.ns, "labels": self.labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": self.set, "uid": format!("uid-{}", self.set), "controller": true}],
                "uid": format!("uid-{}-{}", self.name, self.started)},
            "spec": {"containers": [{"name": "nats", "image": "nats"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": if self.ready {"True"} else {"False"}}]}
        })
    }
}

struct Lb {
    ip: Ipv4Addr,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct State {
    pub namespaces: BTreeSet<String>,
    pub objects: BTreeMap<Key, Json>,
    pub pods: BTreeMap<(String, String), Pod>,
    /// Claim name -> directory (kept until the claim is deleted).
    pub claims: BTreeMap<(String, String), PathBuf>,
    lbs: BTreeMap<(String, String), Lb>,
    rv: u64,
    /// Every request: (method, path and query, content type).
    pub requests: Vec<(String, String, String)>,
    pub starts: u64,
    /// Each pod's cluster (route) port, stable across its restarts so every peer's routes agree.
    cluster_ports: BTreeMap<(String, String), u16>,
}

pub struct Fake {
    pub url: String,
    pub kubeconfig: PathBuf,
    pub state: Arc<Mutex<State>>,
    root: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for p in st.pods.values_mut() {
            p.stop();
        }
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fake {
    pub fn start() -> Fake {
        Fake::launch(false)
    }

    /// Served over TLS with a certificate of a private CA (the kubeconfig trusts that CA).
    pub fn start_tls() -> Fake {
        Fake::launch(true)
    }

    fn launch(tls: bool) -> Fake {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let acceptor = tls.then(|| {
            use tokio_rustls::rustls;
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let root = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        lock(&state).namespaces.insert("default".into());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let dir = root.path().to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let ctl = tokio::spawn(controller(st.clone(), dir.clone()));
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let st = st.clone();
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let st = st.clone();
                                async move { Ok::<_, std::convert::Infallible>(handle(st, req).await) }
                            });
                            let http = hyper::server::conn::http1::Builder::new();
                            match acceptor {
                                Some(a) => {
                                    if let Ok(tls) = a.accept(tcp).await {
                                        let _ = http
                                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                            .with_upgrades()
                                            .await;
                                    }
                                }
                                None => {
                                    let _ = http
                                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                                        .with_upgrades()
                                        .await;
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
                ctl.abort();
                let lbs: Vec<Lb> = std::mem::take(&mut lock(&st).lbs).into_values().collect();
                for lb in lbs {
                    lb.task.abort();
                }
            });
        });
        let addr: SocketAddr = rx.recv().unwrap();
        let url = format!("{}://{addr}", if tls { "https" } else { "http" });
        let ca_data = if tls {
            format!(
                "\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(ca.pem())
            )
        } else {
            String::new()
        };
        let kubeconfig = root.path().join("kubeconfig");
        // Two contexts: `fake` (current) and `elsewhere`, a cluster that does not answer, so a
        // test can show which context the provider picked.
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: {url}{ca_data}\n- name: elsewhere\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n- name: elsewhere\n  context:\n    cluster: elsewhere\n    user: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n"
            ),
        )
        .unwrap();
        Fake {
            url,
            kubeconfig,
            state,
            root,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// A kubeconfig whose current context is the dead one (so only `kube_context: fake` works).
    pub fn kubeconfig_elsewhere(&self) -> PathBuf {
        let p = self.root.path().join("kubeconfig-elsewhere");
        let text = std::fs::read_to_string(&self.kubeconfig)
            .unwrap()
            .replace("current-context: fake", "current-context: elsewhere");
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Json> {
        lock(&self.state)
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn names(&self, plural: &str, ns: &str) -> Vec<String> {
        lock(&self.state)
            .objects
            .keys()
            .filter(|(p, n, _)| p == plural && n == ns)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    pub fn claims(&self, ns: &str) -> Vec<String> {
        self.names("persistentvolumeclaims", ns)
    }

    /// Pods: name -> (revision, ready, times started so far in this fake).
    pub fn pods(&self, ns: &str) -> BTreeMap<String, (String, bool, u64)> {
        lock(&self.state)
            .pods
            .values()
            .filter(|p| p.ns == ns)
            .map(|p| (p.name.clone(), (p.revision.clone(), p.ready, p.started)))
            .collect()
    }

    /// The client port of a pod's nats-server (to check a stream from outside the provider).
    pub fn client_url(&self, ns: &str, pod: &str) -> Option<String> {
        let st = lock(&self.state);
        let p = st.pods.get(&(ns.to_string(), pod.to_string()))?;
        p.ports
            .get(&4222)
            .map(|port| format!("nats://127.0.0.1:{port}"))
    }

    pub fn pod_log(&self, ns: &str, pod: &str) -> String {
        let st = lock(&self.state);
        st.pods
            .get(&(ns.to_string(), pod.to_string()))
            .and_then(|p| std::fs::read_to_string(&p.log).ok())
            .unwrap_or_default()
    }

    /// Changes a stored object as `kubectl edit` would (out of band).
    pub fn edit(&self, plural: &str, ns: &str, name: &str, f: impl FnOnce(&mut Json)) {
        let mut st = lock(&self.state);
        let o = st
            .objects
            .get_mut(&(plural.into(), ns.into(), name.into()))
            .expect("object exists");
        f(o);
    }

    /// Creates an object as `kubectl create` would (out of band): a Secret the user manages.
    pub fn put(&self, plural: &str, ns: &str, name: &str, obj: Json) {
        let mut st = lock(&self.state);
        st.namespaces.insert(ns.to_string());
        st.objects
            .insert((plural.into(), ns.into(), name.into()), obj);
    }

    /// Deletes an object as `kubectl delete` would (out of band).
    pub fn delete_out_of_band(&self, plural: &str, ns: &str, name: &str) -> bool {
        let mut st = lock(&self.state);
        delete_object(&mut st, plural, ns, name)
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        lock(&self.state).requests.clone()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn ok(v: &Json) -> Response<Full<Bytes>> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        "secrets" => ("v1", "Secret"),
        "configmaps" => ("v1", "ConfigMap"),
        "services" => ("v1", "Service"),
        "pods" => ("v1", "Pod"),
        "persistentvolumeclaims" => ("v1", "PersistentVolumeClaim"),
        "statefulsets" => ("apps/v1", "StatefulSet"),
        "poddisruptionbudgets" => ("policy/v1", "PodDisruptionBudget"),
        "networkpolicies" => ("networking.k8s.io/v1", "NetworkPolicy"),
        "serviceaccounts" => ("v1", "ServiceAccount"),
        "podmonitors" => ("monitoring.coreos.com/v1", "PodMonitor"),
        "certificates" => ("cert-manager.io/v1", "Certificate"),
        _ => ("", ""),
    }
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            let v = v.replace('+', " ");
            percent_decode(&v)
        })
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches_selector(labels: &Json, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => labels.get(k).and_then(Json::as_str) == Some(v),
            None => false,
        })
}

async fn handle(
    st: Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let q = req.uri().query().unwrap_or("").to_string();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    lock(&st)
        .requests
        .push((method.clone(), format!("{path}?{q}"), ctype.clone()));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {TOKEN}") {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}[/{plural}[/{name}[/{sub}]]] or
    // /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]
    let rest: &[&str] = match parts.as_slice() {
        ["api", "v1", "namespaces", rest @ ..] => rest,
        ["apis", "apps" | "policy" | "networking.k8s.io" | "monitoring.coreos.com" | "cert-manager.io", "v1", "namespaces", rest @ ..] => {
            rest
        }
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    };
    match rest {
        [ns] => namespace(&st, &method, ns, &ctype, &q, req).await,
        [ns, plural] if method == "GET" => list(&st, ns, plural, &q),
        [ns, "pods", name, "portforward"] => portforward(&st, ns, name, &q, req),
        [ns, plural, name] => {
            if kind_of(plural).0.is_empty() {
                return status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                );
            }
            match method.as_str() {
                "GET" => get(&st, ns, plural, name),
                "PATCH" => {
                    let body = match req.into_body().collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => return status(400, "BadRequest", &e.to_string()),
                    };
                    apply(&st, ns, plural, name, &ctype, &q, &body)
                }
                "DELETE" => {
                    let mut s = lock(&st);
                    let key = (plural.to_string(), ns.to_string(), name.to_string());
                    let Some(obj) = s.objects.get(&key).cloned() else {
                        return not_found(plural, name);
                    };
                    delete_object(&mut s, plural, ns, name);
                    ok(&obj)
                }
                _ => status(405, "MethodNotAllowed", "method not allowed"),
            }
        }
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn not_found(plural: &str, name: &str) -> Response<Full<Bytes>> {
    let group = match kind_of(plural).0 {
        "apps/v1" => ".apps",
        "policy/v1" => ".policy",
        "networking.k8s.io/v1" => ".networking.k8s.io",
        "monitoring.coreos.com/v1" => ".monitoring.coreos.com",
        "cert-manager.io/v1" => ".cert-manager.io",
        _ => "",
    };
    status(
        404,
        "NotFound",
        &format!("{plural}{group} \"{name}\" not found"),
    )
}

async fn namespace(
    st: &Arc<Mutex<State>>,
    method: &str,
    ns: &str,
    ctype: &str,
    q: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let ns_json = |n: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}, "status": {"phase": "Active"}});
    match method {
        "GET" => {
            if lock(st).namespaces.contains(ns) {
                ok(&ns_json(ns))
            } else {
                status(404, "NotFound", &format!("namespaces \"{ns}\" not found"))
            }
        }
        "PATCH" => {
            if ctype != "application/apply-patch+yaml" {
                return status(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format",
                );
            }
            if query(q, "fieldManager").unwrap_or_default().is_empty() {
                return status(
                    422,
                    "Invalid",
                    "fieldManager: Required value: is required for apply patch",
                );
            }
            let _ = req.into_body().collect().await;
            lock(st).namespaces.insert(ns.to_string());
            ok(&ns_json(ns))
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn list(st: &Arc<Mutex<State>>, ns: &str, plural: &str, q: &str) -> Response<Full<Bytes>> {
    let (api_version, kind) = kind_of(plural);
    if kind.is_empty() {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let selector = query(q, "labelSelector").unwrap_or_default();
    let s = lock(st);
    let items: Vec<Json> = if plural == "pods" {
        s.pods
            .values()
            .filter(|p| p.ns == ns)
            .map(Pod::json)
            .collect()
    } else {
        s.objects
            .iter()
            .filter(|((p, n, _), _)| p == plural && n == ns)
            .map(|(_, o)| o.clone())
            .collect()
    };
    let items: Vec<Json> = items
        .into_iter()
        .filter(|o| matches_selector(&o["metadata"]["labels"], &selector))
        .collect();
    ok(
        &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

fn get(st: &Arc<Mutex<State>>, ns: &str, plural: &str, name: &str) -> Response<Full<Bytes>> {
    let s = lock(st);
    if plural == "pods" {
        return match s.pods.get(&(ns.to_string(), name.to_string())) {
            Some(p) => ok(&p.json()),
            None => not_found(plural, name),
        };
    }
    match s
        .objects
        .get(&(plural.to_string(), ns.to_string(), name.to_string()))
    {
        Some(o) => ok(o),
        None => not_found(plural, name),
    }
}

const IMMUTABLE_SET_FIELDS: [&str; 4] = [
    "selector",
    "serviceName",
    "volumeClaimTemplates",
    "podManagementPolicy",
];

fn apply(
    st: &Arc<Mutex<State>>,
    ns: &str,
    plural: &str,
    name: &str,
    ctype: &str,
    q: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    if ctype != "application/apply-patch+yaml" {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("the fake supports only server-side apply, not {ctype}"),
        );
    }
    let Some(manager) = query(q, "fieldManager").filter(|m| !m.is_empty()) else {
        return status(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch");
    };
    // The body is YAML; JSON is YAML.
    let mut obj: Json = match serde_yaml::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", &format!("error decoding YAML: {e}")),
    };
    let (api_version, kind) = kind_of(plural);
    if obj["apiVersion"] != api_version || obj["kind"] != kind || obj["metadata"]["name"] != name {
        return status(
            400,
            "BadRequest",
            &format!("the object's apiVersion/kind/name do not match {api_version} {kind} {name}"),
        );
    }
    if obj["metadata"]["namespace"]
        .as_str()
        .is_some_and(|n| n != ns)
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    let mut s = lock(st);
    if !s.namespaces.contains(ns) {
        return status(404, "NotFound", &format!("namespaces \"{ns}\" not found"));
    }
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let old = s.objects.get(&key).cloned();
    if let (Some(old), "statefulsets") = (&old, plural) {
        for f in IMMUTABLE_SET_FIELDS {
            if old["spec"][f] != obj["spec"][f] {
                return status(422, "Invalid", &format!(
                    "StatefulSet.apps \"{name}\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"));
            }
        }
    }
    if plural == "secrets" {
        if let Some(sd) = obj.get("stringData").and_then(Json::as_object).cloned() {
            let data = obj["data"].as_object().cloned().unwrap_or_default();
            let mut data = data;
            for (k, v) in sd {
                let text = v.as_str().unwrap_or_default();
                data.insert(
                    k,
                    json!(base64::engine::general_purpose::STANDARD.encode(text)),
                );
            }
            obj["data"] = Json::Object(data);
            obj.as_object_mut().unwrap().remove("stringData");
        }
    }
    s.rv += 1;
    let rv = s.rv;
    let generation = match &old {
        Some(o) if o["spec"] == obj["spec"] => o["metadata"]["generation"].as_i64().unwrap_or(1),
        Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
        None => 1,
    };
    let m = obj["metadata"].as_object_mut().unwrap();
    m.insert("namespace".into(), json!(ns));
    m.insert("resourceVersion".into(), json!(rv.to_string()));
    m.insert("generation".into(), json!(generation));
    m.insert(
        "uid".into(),
        json!(old
            .as_ref()
            .map(|o| o["metadata"]["uid"].clone())
            .unwrap_or(json!(format!("uid-{plural}-{name}-{rv}")))),
    );
    m.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
    m.insert(
        "managedFields".into(),
        json!([{"manager": manager, "operation": "Apply", "apiVersion": api_version}]),
    );
    if let Some(o) = &old {
        if let Some(status) = o.get("status") {
            obj["status"] = status.clone();
        }
    }
    if plural == "services" {
        let ip = old
            .as_ref()
            .and_then(|o| o["spec"]["clusterIP"].as_str().map(String::from))
            .unwrap_or_else(|| {
                if obj["spec"]["clusterIP"] == "None" {
                    "None".into()
                } else {
                    format!("10.96.{}.{}", (rv >> 8) & 255, rv & 255)
                }
            });
        obj["spec"]["clusterIP"] = json!(ip);
        let lb_key = (ns.to_string(), name.to_string());
        if obj["spec"]["type"] == "LoadBalancer" {
            if !s.lbs.contains_key(&lb_key) {
                let ip = next_lb_ip();
                let port = obj["spec"]["ports"][0]["port"].as_u64().unwrap_or(4222) as u16;
                let target = obj["spec"]["ports"][0]["targetPort"].clone();
                let selector = obj["spec"]["selector"].clone();
                let task = tokio::spawn(lb_proxy(
                    st.clone(),
                    ns.to_string(),
                    ip,
                    port,
                    target,
                    selector,
                ));
                s.lbs.insert(lb_key.clone(), Lb { ip, task });
            }
            let ip = s.lbs[&lb_key].ip;
            obj["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}});
        } else {
            if let Some(lb) = s.lbs.remove(&lb_key) {
                lb.task.abort();
            }
            obj["status"] = json!({"loadBalancer": {}});
        }
    }
    s.objects.insert(key, obj.clone());
    ok(&obj)
}

fn next_lb_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() % 200 * 256;
    Ipv4Addr::new(127, 1 + ((n >> 8) % 250) as u8, (n & 255) as u8, 77)
}

fn delete_object(st: &mut State, plural: &str, ns: &str, name: &str) -> bool {
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let existed = st.objects.remove(&key).is_some();
    match plural {
        "statefulsets" => {
            let keys: Vec<(String, String)> = st
                .pods
                .iter()
                .filter(|(_, p)| p.ns == ns && p.set == name)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                if let Some(mut p) = st.pods.remove(&k) {
                    p.stop();
                }
            }
        }
        "persistentvolumeclaims" => {
            if let Some(dir) = st.claims.remove(&(ns.to_string(), name.to_string())) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        "services" => {
            if let Some(lb) = st.lbs.remove(&(ns.to_string(), name.to_string())) {
                lb.task.abort();
            }
        }
        _ => {}
    }
    existed
}

/// The Service's LoadBalancer: each connection to `ip:port` goes to a Ready pod's target port.
async fn lb_proxy(
    st: Arc<Mutex<State>>,
    ns: String,
    ip: Ipv4Addr,
    port: u16,
    _target: Json,
    selector: Json,
) {
    let Ok(listener) = tokio::net::TcpListener::bind((ip, port)).await else {
        return;
    };
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let to = {
            let s = lock(&st);
            s.pods
                .values()
                .filter(|p| p.ns == ns && p.ready)
                .filter(|p| {
                    selector
                        .as_object()
                        .is_some_and(|m| m.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                })
                .find_map(|p| p.ports.get(&4222).copied())
        };
        let Some(to) = to else { continue };
        tokio::spawn(async move {
            if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            }
        });
    }
}

fn portforward(
    st: &Arc<Mutex<State>>,
    ns: &str,
    pod: &str,
    q: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let ports: Vec<u16> = query(q, "ports")
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    if ports.len() != 1 {
        return status(
            400,
            "BadRequest",
            "the fake forwards exactly one port per request",
        );
    }
    let port = ports[0];
    let local = {
        let s = lock(st);
        match s.pods.get(&(ns.to_string(), pod.to_string())) {
            None => return status(404, "NotFound", &format!("pods \"{pod}\" not found")),
            Some(p) => p.ports.get(&port).copied(),
        }
    };
    let protocols = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !protocols
        .split(',')
        .any(|p| p.trim() == "v4.channel.k8s.io")
    {
        return status(400, "BadRequest", "the fake speaks v4.channel.k8s.io only");
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return status(400, "BadRequest", "not a websocket upgrade");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        bridge(ws, port, local).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", "v4.channel.k8s.io")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// One forwarded port: channel 0 data, channel 1 errors, each opened with the port number.
async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, port: u16, local: Option<u16>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let p = port.to_le_bytes();
    if tx.send(Message::binary(vec![0, p[0], p[1]])).await.is_err()
        || tx.send(Message::binary(vec![1, p[0], p[1]])).await.is_err()
    {
        return;
    }
    let tcp = match local {
        Some(l) => tokio::net::TcpStream::connect(("127.0.0.1", l)).await.ok(),
        None => None,
    };
    let Some(tcp) = tcp else {
        let mut msg = vec![1];
        msg.extend_from_slice(
            format!("an error occurred forwarding {port} -> {port}: connection refused").as_bytes(),
        );
        let _ = tx.send(Message::binary(msg)).await;
        let _ = tx.send(Message::Close(None)).await;
        return;
    };
    let (mut r, mut w) = tcp.into_split();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            m = rx.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    _ => continue,
                };
                // Channel 0 carries the port's bytes; the client writes nothing else.
                if data.first() == Some(&0) && w.write_all(&data[1..]).await.is_err() {
                    break;
                }
            },
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut msg = Vec::with_capacity(n + 1);
                    msg.push(0);
                    msg.extend_from_slice(&buf[..n]);
                    if tx.send(Message::binary(msg)).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = w.shutdown().await;
    let _ = tx.send(Message::Close(None)).await;
}

// ---- the StatefulSet controller ----

fn revision(set: &str, template: &Json) -> String {
    let d = Sha256::digest(template.to_string().as_bytes());
    let hex: String = d[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("{set}-{hex}")
}

async fn controller(st: Arc<Mutex<State>>, root: PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Readiness: ask each running pod's probe path.
        let probes: Vec<((String, String), u16, String)> = {
            let s = lock(&st);
            s.pods
                .iter()
                .filter_map(|(k, p)| Some((k.clone(), *p.ports.get(&8222)?, probe_path(&s, p))))
                .collect()
        };
        for (k, port, path) in probes {
            let up = http_ok(port, &path).await;
            let mut s = lock(&st);
            if let Some(p) = s.pods.get_mut(&k) {
                let alive = p
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                p.ready = up && alive;
            }
        }
        let mut s = lock(&st);
        let sets: Vec<Key> = s
            .objects
            .keys()
            .filter(|(p, _, _)| p == "statefulsets")
            .cloned()
            .collect();
        for key in sets {
            reconcile(&mut s, &key, &root);
        }
    }
}

fn probe_path(s: &State, p: &Pod) -> String {
    s.objects
        .get(&("statefulsets".into(), p.ns.clone(), p.set.clone()))
        .and_then(|o| {
            o.pointer("/spec/template/spec/containers/0/readinessProbe/httpGet/path")
                .and_then(Json::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "/healthz".into())
}

async fn http_ok(port: u16, path: &str) -> bool {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(
            String::from_utf8_lossy(&buf).starts_with("HTTP/1.0 200")
                || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        )
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn reconcile(s: &mut State, key: &Key, root: &std::path::Path) {
    let Some(set) = s.objects.get(key).cloned() else {
        return;
    };
    let (ns, name) = (key.1.clone(), key.2.clone());
    let replicas = set["spec"]["replicas"].as_u64().unwrap_or(1) as u32;
    let rev = revision(&name, &set["spec"]["template"]);
    let on_delete = set["spec"]["updateStrategy"]["type"] == "OnDelete";
    // Scale down: highest ordinals first.
    let extra: Vec<(String, String)> = s
        .pods
        .iter()
        .filter(|(_, p)| p.ns == ns && p.set == name && p.ordinal >= replicas)
        .map(|(k, _)| k.clone())
        .collect();
    for k in extra {
        if let Some(mut p) = s.pods.remove(&k) {
            p.stop();
        }
    }
    // Missing ordinals start at once (Parallel), on the update revision.
    for i in 0..replicas {
        let pod = format!("{name}-{i}");
        if !s.pods.contains_key(&(ns.clone(), pod.clone())) {
            start_pod(s, &set, &ns, &name, i, &rev, root);
        }
    }
    let mine = |s: &State| -> Vec<(u32, String, bool)> {
        let mut v: Vec<_> = s
            .pods
            .values()
            .filter(|p| p.ns == ns && p.set == name)
            .map(|p| (p.ordinal, p.revision.clone(), p.ready))
            .collect();
        v.sort();
        v
    };
    let pods = mine(s);
    // RollingUpdate: with every pod Ready, replace the highest one still on an old revision.
    if !on_delete && pods.iter().all(|(_, _, ready)| *ready) {
        if let Some((i, _, _)) = pods.iter().rev().find(|(_, r, _)| *r != rev) {
            let k = (ns.clone(), format!("{name}-{i}"));
            if let Some(mut p) = s.pods.remove(&k) {
                p.stop();
            }
            start_pod(s, &set, &ns, &name, *i, &rev, root);
        }
    }
    let pods = mine(s);
    let ready = pods.iter().filter(|p| p.2).count();
    let updated = pods.iter().filter(|p| p.1 == rev).count();
    let current_rev = if updated == pods.len() {
        rev.clone()
    } else {
        set["status"]["currentRevision"]
            .as_str()
            .unwrap_or(&rev)
            .to_string()
    };
    let status = json!({
        "observedGeneration": set["metadata"]["generation"],
        "replicas": pods.len(), "readyReplicas": ready, "availableReplicas": ready,
        "currentReplicas": pods.iter().filter(|p| p.1 == current_rev).count(),
        "updatedReplicas": updated, "currentRevision": current_rev, "updateRevision": rev,
    });
    if let Some(o) = s.objects.get_mut(key) {
        o["status"] = status;
    }
}

fn start_pod(
    s: &mut State,
    set: &Json,
    ns: &str,
    name: &str,
    ordinal: u32,
    rev: &str,
    root: &std::path::Path,
) {
    let pod = format!("{name}-{ordinal}");
    s.starts += 1;
    let started = s.starts;
    let tmpl = &set["spec"]["template"];
    let c = &tmpl["spec"]["containers"][0];
    let headless = set["spec"]["serviceName"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let dir = root.join(ns).join(&pod).join(started.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("nats.log");
    let mut make = || -> Result<(Child, BTreeMap<u16, u16>), String> {
        // Container ports -> this pod's loopback ports.
        let mut ports = BTreeMap::new();
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(cp) = p["containerPort"].as_u64() {
                ports.insert(cp as u16, nats_test_server::free_port());
            }
        }
        for std_port in [4222u16, 8222] {
            ports
                .entry(std_port)
                .or_insert_with(nats_test_server::free_port);
        }
        ports.insert(6222, cluster_port(s, ns, &pod));
        // Volumes: configMap -> files, claim templates -> the claim's directory, emptyDir -> dir.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or("");
            let path = m["mountPath"].as_str().unwrap_or("").to_string();
            let vol = tmpl["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vname)
                .cloned();
            let local = dir.join(format!("vol-{vname}"));
            std::fs::create_dir_all(&local).map_err(|e| e.to_string())?;
            if let Some(v) = &vol {
                // A configMap volume, or a projected one of configMaps and Secrets.
                let mut sources: Vec<Json> = vec![v.clone()];
                sources.extend(
                    v["projected"]["sources"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
                for src in &sources {
                    if let Some(cm) = src["configMap"]["name"].as_str() {
                        let data = s
                            .objects
                            .get(&("configmaps".into(), ns.into(), cm.into()))
                            .ok_or(format!("configmap {cm} not found"))?["data"]
                            .clone();
                        for (k, text) in data.as_object().into_iter().flatten() {
                            std::fs::write(local.join(k), text.as_str().unwrap_or(""))
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    // A projected Secret names it `name`, a Secret volume `secretName`.
                    if let Some(sn) = src["secret"]["name"]
                        .as_str()
                        .or(src["secret"]["secretName"].as_str())
                    {
                        let data = s
                            .objects
                            .get(&("secrets".into(), ns.into(), sn.into()))
                            .ok_or(format!("secret {sn} not found"))?["data"]
                            .clone();
                        let items: Vec<(String, String)> = match src["secret"]["items"].as_array() {
                            Some(items) => items
                                .iter()
                                .map(|i| {
                                    (
                                        i["key"].as_str().unwrap_or("").to_string(),
                                        i["path"].as_str().unwrap_or("").to_string(),
                                    )
                                })
                                .collect(),
                            None => data
                                .as_object()
                                .into_iter()
                                .flatten()
                                .map(|(k, _)| (k.clone(), k.clone()))
                                .collect(),
                        };
                        for (key, path) in items {
                            let b64 = data[&key]
                                .as_str()
                                .ok_or(format!("secret {sn} has no key {key}"))?;
                            let bytes = base64::engine::general_purpose::STANDARD
                                .decode(b64)
                                .map_err(|e| e.to_string())?;
                            std::fs::write(local.join(path), bytes).map_err(|e| e.to_string())?;
                        }
                    }
                }
            } else {
                // A claim template: its claim lives on across pod restarts.
                let claim = format!("{vname}-{name}-{ordinal}");
                let key = (ns.to_string(), claim.clone());
                let cdir = s
                    .claims
                    .entry(key)
                    .or_insert_with(|| root.join(ns).join("claims").join(&claim))
                    .clone();
                std::fs::create_dir_all(&cdir).map_err(|e| e.to_string())?;
                let tmpl_claim = set["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["metadata"]["name"] == vname)
                    .cloned()
                    .unwrap_or(json!({}));
                s.objects.entry(("persistentvolumeclaims".into(), ns.into(), claim.clone())).or_insert_with(|| {
                    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim, "namespace": ns, "labels": set["spec"]["selector"]["matchLabels"], "uid": format!("uid-pvc-{claim}")},
                        "spec": tmpl_claim["spec"], "status": {"phase": "Bound"}})
                });
                mounts.push((path, cdir));
                continue;
            }
            mounts.push((path, local));
        }
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        // Env as the kubelet resolves it.
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().unwrap_or("").to_string();
            let v = if let Some(v) = e["value"].as_str() {
                let mut v = v.to_string();
                for (ek, ev) in &env {
                    v = v.replace(&format!("$({ek})"), ev);
                }
                v
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod.clone()
            } else if let Some(sk) = e["valueFrom"]["secretKeyRef"].as_object() {
                let sname = sk["name"].as_str().unwrap_or("");
                let skey = sk["key"].as_str().unwrap_or("");
                let data = s
                    .objects
                    .get(&("secrets".into(), ns.into(), sname.into()))
                    .ok_or(format!("secret {sname} not found"))?["data"][skey]
                    .as_str()
                    .ok_or(format!("secret {sname} has no key {skey}"))?
                    .to_string();
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?
            } else {
                String::new()
            };
            env.push((k, v));
        }
        // The config file the args name, with this pod's ports, paths and route hosts.
        let args: Vec<String> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        let conf_path = args
            .iter()
            .position(|a| a == "--config" || a == "-c")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or("the container args name no --config file")?;
        let (mnt, local) = mounts
            .iter()
            .find(|(m, _)| conf_path.starts_with(m.as_str()))
            .ok_or("the config file is not on a mounted volume")?;
        let conf_local = local.join(conf_path[mnt.len()..].trim_start_matches('/'));
        let conf = std::fs::read_to_string(&conf_local).map_err(|e| format!("{conf_path}: {e}"))?;
        // Files nats.conf includes (relative to it): rewritten the same way, written beside
        // the rewritten nats.conf.
        let mut files = vec![("nats.conf".to_string(), conf)];
        for line in files[0].1.clone().lines() {
            if let Some(inc) = line.trim().strip_prefix("include ") {
                let inc = inc.trim().trim_matches('"').to_string();
                let base = conf_local.parent().unwrap_or(std::path::Path::new("."));
                let text = std::fs::read_to_string(base.join(&inc))
                    .map_err(|e| format!("include {inc}: {e}"))?;
                files.push((inc, text));
            }
        }
        let route_std = 6222u16;
        for (file, conf) in files {
            let mut text = String::new();
            for line in conf.lines() {
                let mut l = line.to_string();
                if l.contains("://") {
                    // Routes: every pod's headless DNS name -> its loopback cluster port.
                    for i in 0..16u32 {
                        let peer = format!("{name}-{i}");
                        let pport = cluster_port(s, ns, &peer);
                        for host in [
                            format!("{peer}.{headless}.{ns}.svc.cluster.local"),
                            format!("{peer}.{headless}.{ns}.svc"),
                            format!("{peer}.{headless}.{ns}"),
                            format!("{peer}.{headless}"),
                        ] {
                            l = l.replace(
                                &format!("{host}:{route_std}"),
                                &format!("127.0.0.1:{pport}"),
                            );
                        }
                    }
                } else if !l.trim_start().starts_with("password:") {
                    // (a password's digits are not a port)
                    for (std_port, local) in &ports {
                        l = replace_number(&l, *std_port, *local);
                    }
                    l = l.replace("0.0.0.0", "127.0.0.1");
                    for (m, dirp) in &mounts {
                        l = l.replace(m.as_str(), &dirp.display().to_string());
                    }
                }
                text.push_str(&l);
                text.push('\n');
            }
            std::fs::write(dir.join(&file), &text).map_err(|e| e.to_string())?;
        }
        let conf_file = dir.join("nats.conf");
        let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(nats_test_server::binary())
            .arg("-c")
            .arg(&conf_file)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| e.to_string())?;
        Ok((child, ports))
    };
    let (child, ports) = match make() {
        Ok(x) => (Some(x.0), x.1),
        Err(e) => {
            let _ = std::fs::write(&log, format!("fake kubelet: cannot start the pod: {e}\n"));
            (None, BTreeMap::new())
        }
    };
    s.pods.insert(
        (ns.to_string(), pod.clone()),
        Pod {
            ns: ns.into(),
            name: pod,
            set: name.into(),
            ordinal,
            revision: rev.into(),
            labels: tmpl["metadata"]["labels"].clone(),
            ports,
            child,
            ready: false,
            dir,
            log,
            started,
        },
    );
}

/// A pod's route port, allocated on first mention (a peer's config may name it before it runs).
fn cluster_port(s: &mut State, ns: &str, pod: &str) -> u16 {
    *s.cluster_ports
        .entry((ns.to_string(), pod.to_string()))
        .or_insert_with(nats_test_server::free_port)
}

/// Replaces the number `from` where it stands alone (not inside a longer number).
fn replace_number(line: &str, from: u16, to: u16) -> String {
    let from = from.to_string();
    let b = line.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < line.len() {
        if line[i..].starts_with(&from)
            && (i == 0 || !b[i - 1].is_ascii_digit())
            && b.get(i + from.len()).is_none_or(|c| !c.is_ascii_digit())
        {
            out.push_str(&to.to_string());
            i += from.len();
        } else {
            let ch = line[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}
