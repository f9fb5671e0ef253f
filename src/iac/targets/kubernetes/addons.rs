//! What the NATS Helm chart offers on top of the basic JetStream cluster, for the `kubernetes`
//! and `aws.eks` targets: TLS for clients and routes (from a Secret or a cert-manager
//! Certificate), websocket and leafnode listeners, the prometheus-nats-exporter sidecar with
//! an optional PodMonitor, and the pod's scheduling knobs. `validate` checks the config's
//! fields (one `field: message` line each); the renderer reads the result. Pure: no I/O.

use crate::config::decode::struct_to_json;
use crate::pb::eventbus::KubernetesTargetConfig;
use crate::secret::quote;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;

/// Listener ports, as the chart numbers them.
pub const WEBSOCKET_PORT: u16 = 8080;
pub const LEAFNODE_PORT: u16 = 7422;
pub const EXPORTER_PORT: u16 = 7777;
/// The exporter the chart runs beside nats-server, and the release it pins.
pub const EXPORTER_IMAGE: &str = "natsio/prometheus-nats-exporter";
pub const EXPORTER_TAG: &str = "0.20.1";
pub const EXPORTER_CONTAINER: &str = "prom-exporter";
pub const EXPORTER_PORT_NAME: &str = "prom-metrics";
/// The chart's config reloader: watches files, sends nats-server SIGHUP when one changes.
pub const RELOADER_IMAGE: &str = "natsio/nats-server-config-reloader:0.23.0";
pub const RELOADER_CONTAINER: &str = "reloader";
/// Where the TLS Secret is mounted in the nats container.
pub const TLS_DIR: &str = "/etc/nats-certs/tls";
pub const TLS_VOLUME: &str = "tls";
pub const DEFAULT_CERT_KEY: &str = "tls.crt";
pub const DEFAULT_KEY_KEY: &str = "tls.key";
pub const DEFAULT_CA_KEY: &str = "ca.crt";
pub const CERT_MANAGER_GROUP: &str = "cert-manager.io";
/// Leafnode remote url schemes nats-server connects with.
const LEAF_SCHEMES: [&str; 5] = ["nats-leaf", "nats", "tls", "ws", "wss"];

/// Where the certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// An existing Secret the user manages.
    Secret,
    /// A cert-manager Certificate rendered with the broker, written to `<base>-tls`.
    CertManager {
        issuer_name: String,
        issuer_kind: String,
        issuer_group: String,
        extra_dns_names: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub source: TlsSource,
    /// The Secret the pods mount (the user's, or the one cert-manager writes).
    pub secret_name: String,
    pub cert_key: String,
    pub key_key: String,
    pub ca_key: String,
    /// Clients must present a certificate (mutual TLS on the client port).
    pub verify: bool,
    /// The routes between the pods use TLS (only with more than one replica).
    pub routes: bool,
    /// The reloader sidecar's image (`image:tag`): a renewed certificate is reloaded in place.
    pub reloader_image: String,
}

impl TlsSettings {
    pub fn cert_file(&self) -> String {
        format!("{TLS_DIR}/{}", self.cert_key)
    }
    pub fn key_file(&self) -> String {
        format!("{TLS_DIR}/{}", self.key_key)
    }
    pub fn ca_file(&self) -> String {
        format!("{TLS_DIR}/{}", self.ca_key)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebsocketSettings {
    pub port: u16,
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafnodeSettings {
    pub port: u16,
    pub tls: bool,
    pub remotes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExporterSettings {
    /// `image:tag`.
    pub image: String,
    pub pod_monitor: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountSettings {
    /// Rendered with the broker (else it must exist).
    pub create: bool,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

/// The validated Helm-grade settings; all `None`/empty = the basic cluster, rendered exactly
/// as before they existed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Addons {
    pub tls: Option<TlsSettings>,
    pub websocket: Option<WebsocketSettings>,
    pub leafnodes: Option<LeafnodeSettings>,
    pub exporter: Option<ExporterSettings>,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Option<Affinity>,
    pub priority_class_name: Option<String>,
    pub image_pull_secrets: Vec<String>,
    pub service_account: Option<ServiceAccountSettings>,
}

/// A DNS subdomain (RFC 1123): what most object names must be.
pub fn is_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A Secret data key: `[-._a-zA-Z0-9]+`, at most 253.
fn secret_key_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// A DNS name for a certificate: a subdomain, optionally `*.` in front.
fn dns_name_ok(s: &str) -> bool {
    let rest = s.strip_prefix("*.").unwrap_or(s);
    is_subdomain(rest)
}

fn port_of(f: &str, p: i32, default: u16, field: &mut impl FnMut(&str, String)) -> u16 {
    match p {
        0 => default,
        1..=65535 => p as u16,
        _ => {
            field(
                f,
                format!("{p} is not a port; use 1-65535 (default {default})"),
            );
            default
        }
    }
}

fn or_default(s: &str, d: &str) -> String {
    if s.is_empty() {
        d.to_string()
    } else {
        s.to_string()
    }
}

/// A leafnode remote: `scheme://host[:port]`, no credentials (they would land in the
/// ConfigMap), no spaces or quotes.
fn remote_problem(u: &str) -> Option<String> {
    let Some((scheme, rest)) = u.split_once("://") else {
        return Some("has no scheme".into());
    };
    if !LEAF_SCHEMES.contains(&scheme) {
        return Some(format!(
            "scheme {scheme} is not one of {}",
            LEAF_SCHEMES.join(", ")
        ));
    }
    if rest.contains('@') {
        return Some(
            "carries credentials, which would be written into the ConfigMap; authenticate the remote otherwise"
                .into(),
        );
    }
    let host = rest.split(['/', '?']).next().unwrap_or("");
    if host.is_empty()
        || u.chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        return Some("is not a url".into());
    }
    None
}

/// Round-trips `v` through the typed Kubernetes struct: an unknown field or a value of the
/// wrong type makes the two differ (the typed decoder ignores fields it does not know).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Json) -> Result<T, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    match first_difference(v, &back, "") {
        None => Ok(t),
        Some(path) => Err(format!(
            "{path} is not a field of it (or has the wrong type)"
        )),
    }
}

/// The first path where `want` has something `got` lacks or spells differently.
fn first_difference(want: &Json, got: &Json, at: &str) -> Option<String> {
    match (want, got) {
        (Json::Object(a), Json::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            Some(w) => first_difference(v, w, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{at}[{i}]"))),
        (Json::Number(a), Json::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        _ => Some(if at.is_empty() {
            "the value".into()
        } else {
            at.trim_start_matches('.').to_string()
        }),
    }
}

/// Validates the Helm-grade fields of `k`; `base` is the broker's name base (default names),
/// `key_ok`/`label_value_ok` the label rules of the caller.
pub fn validate(
    k: &KubernetesTargetConfig,
    base: &str,
    field: &mut impl FnMut(&str, String),
    key_ok: impl Fn(&str) -> bool,
    label_value_ok: impl Fn(&str) -> bool,
) -> Addons {
    let mut a = Addons::default();

    if let Some(t) = &k.tls {
        let cm = t.cert_manager.as_ref();
        let source = match (t.secret_name.is_empty(), cm) {
            (false, Some(_)) => {
                field(
                    "kubernetes.tls",
                    "set secret_name (an existing Secret) or cert_manager (a Certificate rendered with the broker), not both".into(),
                );
                TlsSource::Secret
            }
            (true, None) => {
                field(
                    "kubernetes.tls",
                    "needs secret_name (an existing Secret with tls.crt, tls.key and ca.crt) or cert_manager.issuer_name".into(),
                );
                TlsSource::Secret
            }
            (false, None) => {
                if !is_subdomain(&t.secret_name) {
                    field(
                        "kubernetes.tls.secret_name",
                        format!(
                            "{} is not a Secret name (lowercase DNS subdomain)",
                            quote(&t.secret_name)
                        ),
                    );
                }
                TlsSource::Secret
            }
            (true, Some(c)) => {
                if c.issuer_name.is_empty() || !is_subdomain(&c.issuer_name) {
                    field(
                        "kubernetes.tls.cert_manager.issuer_name",
                        format!(
                            "{} is not an issuer name; name the cert-manager Issuer or ClusterIssuer that signs the certificate",
                            quote(&c.issuer_name)
                        ),
                    );
                }
                let group = or_default(&c.issuer_group, CERT_MANAGER_GROUP);
                let kind = or_default(&c.issuer_kind, "Issuer");
                if group == CERT_MANAGER_GROUP && kind != "Issuer" && kind != "ClusterIssuer" {
                    field(
                        "kubernetes.tls.cert_manager.issuer_kind",
                        format!("{} is not Issuer (default) or ClusterIssuer", quote(&kind)),
                    );
                }
                if !is_subdomain(&group) {
                    field(
                        "kubernetes.tls.cert_manager.issuer_group",
                        format!("{} is not an API group", quote(&group)),
                    );
                }
                for n in &c.dns_names {
                    if !dns_name_ok(n) {
                        field(
                            "kubernetes.tls.cert_manager.dns_names",
                            format!(
                                "{} is not a DNS name (lowercase, optionally *. in front)",
                                quote(n)
                            ),
                        );
                    }
                }
                TlsSource::CertManager {
                    issuer_name: c.issuer_name.clone(),
                    issuer_kind: kind,
                    issuer_group: group,
                    extra_dns_names: c.dns_names.clone(),
                }
            }
        };
        let mut key = |f: &str, v: &str, d: &str| {
            let v = or_default(v, d);
            if !secret_key_ok(&v) {
                field(
                    f,
                    format!("{} is not a Secret key (letters, digits, - . _)", quote(&v)),
                );
            }
            v
        };
        let cert_key = key("kubernetes.tls.cert_key", &t.cert_key, DEFAULT_CERT_KEY);
        let key_key = key("kubernetes.tls.key_key", &t.key_key, DEFAULT_KEY_KEY);
        let ca_key = key("kubernetes.tls.ca_key", &t.ca_key, DEFAULT_CA_KEY);
        let reloader_image = or_default(&t.reloader_image, RELOADER_IMAGE);
        if reloader_image.chars().any(char::is_whitespace) || reloader_image.ends_with(':') {
            field(
                "kubernetes.tls.reloader_image",
                format!("{} is not an image reference", quote(&reloader_image)),
            );
        }
        let secret_name = match source {
            TlsSource::Secret => t.secret_name.clone(),
            TlsSource::CertManager { .. } => format!("{base}-tls"),
        };
        a.tls = Some(TlsSettings {
            source,
            secret_name,
            cert_key,
            key_key,
            ca_key,
            verify: t.verify,
            routes: t.routes.unwrap_or(true),
            reloader_image,
        });
    }
    let has_tls = a.tls.is_some();

    let mut ports: Vec<(&str, u16)> = vec![("client", 4222), ("cluster", 6222), ("monitor", 8222)];
    if let Some(w) = &k.websocket {
        let port = port_of("kubernetes.websocket.port", w.port, WEBSOCKET_PORT, field);
        match (w.tls, w.no_tls) {
            (true, true) => field(
                "kubernetes.websocket",
                "set tls or no_tls, not both".into(),
            ),
            (false, false) => field(
                "kubernetes.websocket",
                "needs tls: true (with kubernetes.tls's certificate) or no_tls: true (plain; TLS ends in front of it, at an ingress)".into(),
            ),
            (true, false) if !has_tls => field(
                "kubernetes.websocket.tls",
                "needs kubernetes.tls (the certificate it serves)".into(),
            ),
            _ => {}
        }
        ports.push(("websocket", port));
        a.websocket = Some(WebsocketSettings { port, tls: w.tls });
    }
    if let Some(l) = &k.leafnodes {
        let port = port_of("kubernetes.leafnodes.port", l.port, LEAFNODE_PORT, field);
        if l.tls && !has_tls {
            field(
                "kubernetes.leafnodes.tls",
                "needs kubernetes.tls (the certificate it serves)".into(),
            );
        }
        for r in &l.remotes {
            if let Some(p) = remote_problem(r) {
                field("kubernetes.leafnodes.remotes", format!("{} {p}", quote(r)));
            }
        }
        ports.push(("leafnodes", port));
        a.leafnodes = Some(LeafnodeSettings {
            port,
            tls: l.tls,
            remotes: l.remotes.clone(),
        });
    }
    if let Some(m) = &k.metrics {
        if m.pod_monitor && !m.exporter {
            field(
                "kubernetes.metrics.pod_monitor",
                "needs exporter: true (the PodMonitor scrapes the exporter's port)".into(),
            );
        }
        let image = or_default(&m.image, EXPORTER_IMAGE);
        let tag = or_default(&m.tag, EXPORTER_TAG);
        if image.chars().any(|c| c.is_whitespace() || c == '@') || image.ends_with(':') {
            field(
                "kubernetes.metrics.image",
                format!("{} is not an image name (without tag)", quote(&image)),
            );
        }
        if !(1..=128).contains(&tag.len())
            || !tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            field(
                "kubernetes.metrics.tag",
                format!("{} is not an image tag", quote(&tag)),
            );
        }
        if m.exporter {
            ports.push(("metrics exporter", EXPORTER_PORT));
            a.exporter = Some(ExporterSettings {
                image: format!("{image}:{tag}"),
                pod_monitor: m.pod_monitor,
            });
        }
    }
    for (i, (what, p)) in ports.iter().enumerate() {
        if let Some((other, _)) = ports[..i].iter().find(|(_, q)| q == p) {
            field(
                "kubernetes",
                format!("the {what} port {p} is also the {other} port; pick another"),
            );
        }
    }

    for (i, t) in k.tolerations.iter().enumerate() {
        let f = format!("kubernetes.tolerations[{i}]");
        let operator = or_default(&t.operator, "Equal");
        if operator != "Equal" && operator != "Exists" {
            field(
                &f,
                format!("operator {} is not Equal or Exists", quote(&operator)),
            );
        }
        if operator == "Exists" && !t.value.is_empty() {
            field(&f, "operator Exists takes no value".into());
        }
        if t.key.is_empty() && operator != "Exists" {
            field(
                &f,
                "needs a key (or operator Exists, which tolerates every taint)".into(),
            );
        }
        if !t.key.is_empty() && !key_ok(&t.key) {
            field(&f, format!("{} is not a taint key", quote(&t.key)));
        }
        if !["", "NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&t.effect.as_str()) {
            field(
                &f,
                format!(
                    "effect {} is not NoSchedule, PreferNoSchedule, NoExecute or empty (all)",
                    quote(&t.effect)
                ),
            );
        }
        if t.toleration_seconds.is_some() && t.effect != "NoExecute" {
            field(
                &f,
                "toleration_seconds only applies to effect NoExecute".into(),
            );
        }
        a.tolerations.push(Toleration {
            key: (!t.key.is_empty()).then(|| t.key.clone()),
            operator: Some(operator),
            value: (!t.value.is_empty()).then(|| t.value.clone()),
            effect: (!t.effect.is_empty()).then(|| t.effect.clone()),
            toleration_seconds: t.toleration_seconds,
        });
    }
    for (key, value) in &k.node_selector {
        if !key_ok(key) || !label_value_ok(value) {
            field(
                "kubernetes.node_selector",
                format!(
                    "{}: {} is not a node label (key optional prefix/ then 1-63 of A-Z a-z 0-9 - _ .; value the same, at most 63)",
                    quote(key),
                    quote(value)
                ),
            );
        }
    }
    a.node_selector = k
        .node_selector
        .iter()
        .map(|(x, y)| (x.clone(), y.clone()))
        .collect();
    if let Some(s) = &k.affinity {
        let v = Json::Object(struct_to_json(s));
        match typed::<Affinity>(&v) {
            Ok(t) => a.affinity = Some(t),
            Err(e) => field(
                "kubernetes.affinity",
                format!(
                    "not a Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity as the API spells them): {e}"
                ),
            ),
        }
    }
    if !k.priority_class_name.is_empty() {
        if !is_subdomain(&k.priority_class_name) {
            field(
                "kubernetes.priority_class_name",
                format!(
                    "{} is not a PriorityClass name (lowercase DNS subdomain)",
                    quote(&k.priority_class_name)
                ),
            );
        }
        a.priority_class_name = Some(k.priority_class_name.clone());
    }
    for (i, s) in k.image_pull_secrets.iter().enumerate() {
        if !is_subdomain(s) {
            field(
                "kubernetes.image_pull_secrets",
                format!(
                    "{} is not a Secret name (lowercase DNS subdomain)",
                    quote(s)
                ),
            );
        } else if k.image_pull_secrets[..i].contains(s) {
            field(
                "kubernetes.image_pull_secrets",
                format!("{} is listed twice", quote(s)),
            );
        }
    }
    a.image_pull_secrets = k.image_pull_secrets.clone();
    if let Some(sa) = &k.service_account {
        let name = if sa.name.is_empty() && sa.create {
            base.to_string()
        } else {
            sa.name.clone()
        };
        if name.is_empty() {
            field(
                "kubernetes.service_account",
                "needs name (an existing ServiceAccount) or create: true (one named after the broker)".into(),
            );
        } else if !is_subdomain(&name) {
            field(
                "kubernetes.service_account.name",
                format!(
                    "{} is not a ServiceAccount name (lowercase DNS subdomain)",
                    quote(&name)
                ),
            );
        }
        if !sa.create && !sa.annotations.is_empty() {
            field(
                "kubernetes.service_account.annotations",
                "only apply with create: true (an existing ServiceAccount is not changed)".into(),
            );
        }
        let annotations: BTreeMap<String, String> = sa
            .annotations
            .iter()
            .map(|(x, y)| (x.clone(), y.clone()))
            .collect();
        for key in annotations.keys() {
            if !key_ok(key) {
                field(
                    "kubernetes.service_account.annotations",
                    format!("{} is not an annotation key", quote(key)),
                );
            }
        }
        a.service_account = Some(ServiceAccountSettings {
            create: sa.create,
            name,
            annotations,
        });
    }
    a
}

/// A `tls { }` block of nats.conf, indented by `indent`, with the mounted Secret's files.
pub fn tls_block(t: &TlsSettings, verify: bool, indent: &str) -> String {
    let q = crate::nats::server_conf::quoted;
    let mut s = format!(
        "{indent}tls {{\n{indent}  cert_file: {}\n{indent}  key_file: {}\n{indent}  ca_file: {}\n",
        q(&t.cert_file()),
        q(&t.key_file()),
        q(&t.ca_file())
    );
    if verify {
        s.push_str(&format!("{indent}  verify: true\n"));
    }
    s.push_str(&format!("{indent}}}\n"));
    s
}

/// The reloader's arguments: the pid file nats-server writes, and the certificate files to
/// watch (nats.conf itself changes only with a rollout: the pod template's checksum).
pub fn reloader_args(t: &TlsSettings, pid_file: &str) -> Vec<String> {
    let mut v = vec!["-pid".to_string(), pid_file.to_string()];
    for f in [t.cert_file(), t.key_file(), t.ca_file()] {
        v.push("-config".into());
        v.push(f);
    }
    v
}

/// The top-level blocks nats.conf gets beyond the shared renderer's: client `tls`,
/// `websocket`, `leafnodes`.
pub fn conf_blocks(a: &Addons) -> String {
    let q = crate::nats::server_conf::quoted;
    let mut c = String::new();
    if let Some(t) = &a.tls {
        c.push_str("# client connections: TLS with the mounted certificate\n");
        c.push_str(&tls_block(t, t.verify, ""));
    }
    if let Some(w) = &a.websocket {
        c.push_str(&format!(
            "websocket {{\n  listen: {}\n",
            q(&format!("0.0.0.0:{}", w.port))
        ));
        match (&a.tls, w.tls) {
            (Some(t), true) => c.push_str(&tls_block(t, false, "  ")),
            _ => c.push_str("  no_tls: true\n"),
        }
        c.push_str("}\n");
    }
    if let Some(l) = &a.leafnodes {
        c.push_str(&format!(
            "leafnodes {{\n  listen: {}\n  no_advertise: true\n",
            q(&format!("0.0.0.0:{}", l.port))
        ));
        if let (Some(t), true) = (&a.tls, l.tls) {
            c.push_str(&tls_block(t, false, "  "));
        }
        if !l.remotes.is_empty() {
            let urls: Vec<String> = l
                .remotes
                .iter()
                .map(|u| format!("    {{ url: {} }}", q(u)))
                .collect();
            c.push_str(&format!("  remotes: [\n{}\n  ]\n", urls.join("\n")));
        }
        c.push_str("}\n");
    }
    c
}

/// The exporter's arguments: the chart's endpoint set (jsz because JetStream is always on,
/// leafz with a leafnode listener), reading the monitor port over loopback.
pub fn exporter_args(a: &Addons, monitor_port: u16) -> Vec<String> {
    let mut v: Vec<String> = vec![
        format!("-port={EXPORTER_PORT}"),
        "-connz".into(),
        "-routez".into(),
        "-subz".into(),
        "-varz".into(),
        "-prefix=nats".into(),
        "-use_internal_server_id".into(),
        "-jsz=all".into(),
    ];
    if a.leafnodes.is_some() {
        v.push("-leafz".into());
    }
    v.push(format!("http://localhost:{monitor_port}/"));
    v
}

/// The names a certificate for the broker must carry: the client Service's (short to fully
/// qualified), every pod under the headless Service (the route urls' hosts), `localhost` and
/// 127.0.0.1 (a port-forward, through which wfctl's machine reaches the broker), and the
/// user's extra names.
pub fn dns_names(
    client: &str,
    headless: &str,
    namespace: &str,
    cluster_domain: &str,
    extra: &[String],
) -> Vec<String> {
    let mut v = Vec::new();
    for (prefix, svc) in [("", client), ("*.", headless)] {
        v.push(format!("{prefix}{svc}"));
        v.push(format!("{prefix}{svc}.{namespace}"));
        v.push(format!("{prefix}{svc}.{namespace}.svc"));
        v.push(format!("{prefix}{svc}.{namespace}.svc.{cluster_domain}"));
    }
    v.push("localhost".into());
    for e in extra {
        if !v.contains(e) {
            v.push(e.clone());
        }
    }
    v
}

/// The cert-manager Certificate (cert-manager.io/v1) for `t`, when cert-manager is asked.
pub fn certificate(t: &TlsSettings, metadata: Json, dns: Vec<String>) -> Option<Json> {
    let TlsSource::CertManager {
        issuer_name,
        issuer_kind,
        issuer_group,
        ..
    } = &t.source
    else {
        return None;
    };
    Some(json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": metadata,
        "spec": {
            "secretName": t.secret_name,
            "issuerRef": {"name": issuer_name, "kind": issuer_kind, "group": issuer_group},
            "dnsNames": dns,
            "ipAddresses": ["127.0.0.1"],
            // Routes are mutual TLS: every pod presents its certificate as a client too.
            "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
        }
    }))
}

/// The PodMonitor (monitoring.coreos.com/v1) that has Prometheus scrape the exporter.
pub fn pod_monitor(metadata: Json, selector: &BTreeMap<String, String>) -> Json {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector},
            "podMetricsEndpoints": [{"port": EXPORTER_PORT_NAME}],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::targets::api::BrokerDesired;
    use crate::iac::targets::kubernetes::config::{validate as settings, Flavor};

    fn problems(kubernetes: Json, top: Json) -> String {
        let mut c = json!({"provider": "nats", "deploy_target": "kubernetes", "version": "2.10.29",
            "replicas": 3, "kubernetes": kubernetes});
        for (k, v) in top.as_object().unwrap() {
            c[k] = v.clone();
        }
        let d = BrokerDesired::decode("bus", c.to_string().as_bytes()).unwrap();
        match settings(&d, Flavor::Kubernetes) {
            Ok(_) => String::new(),
            Err(lines) => lines.join("\n"),
        }
    }

    #[test]
    fn helm_settings_are_refused_one_line_each_naming_the_field() {
        for (k, top, want) in [
            (
                json!({"tls": {}}),
                json!({}),
                "kubernetes.tls: needs secret_name",
            ),
            (
                json!({"tls": {"secret_name": "x", "cert_manager": {"issuer_name": "ca"}}}),
                json!({}),
                "not both",
            ),
            (
                json!({"tls": {"secret_name": "Bad_Name"}}),
                json!({}),
                "kubernetes.tls.secret_name",
            ),
            (
                json!({"tls": {"secret_name": "x", "cert_key": "a/b"}}),
                json!({}),
                "kubernetes.tls.cert_key",
            ),
            (
                json!({"tls": {"cert_manager": {"issuer_name": "ca", "issuer_kind": "Vault"}}}),
                json!({}),
                "kubernetes.tls.cert_manager.issuer_kind",
            ),
            (
                json!({"tls": {"cert_manager": {}}}),
                json!({}),
                "kubernetes.tls.cert_manager.issuer_name",
            ),
            (
                json!({"tls": {"secret_name": "x", "verify": true}}),
                json!({}),
                "tls.cert_file: kubernetes.tls.verify",
            ),
            (
                json!({}),
                json!({"tls": {"ca_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")}}),
                "serve TLS only with kubernetes.tls",
            ),
            (
                json!({"websocket": {}}),
                json!({}),
                "kubernetes.websocket: needs tls: true",
            ),
            (
                json!({"websocket": {"tls": true, "no_tls": true}}),
                json!({}),
                "not both",
            ),
            (
                json!({"websocket": {"tls": true}}),
                json!({}),
                "kubernetes.websocket.tls: needs kubernetes.tls",
            ),
            (
                json!({"websocket": {"no_tls": true, "port": 70000}}),
                json!({}),
                "kubernetes.websocket.port",
            ),
            (
                json!({"websocket": {"no_tls": true, "port": 4222}}),
                json!({}),
                "also the client port",
            ),
            (
                json!({"leafnodes": {"tls": true}}),
                json!({}),
                "kubernetes.leafnodes.tls",
            ),
            (
                json!({"leafnodes": {"remotes": ["http://x"]}}),
                json!({}),
                "kubernetes.leafnodes.remotes",
            ),
            (
                json!({"metrics": {"pod_monitor": true}}),
                json!({}),
                "kubernetes.metrics.pod_monitor: needs exporter",
            ),
            (
                json!({"metrics": {"exporter": true, "tag": "a b"}}),
                json!({}),
                "kubernetes.metrics.tag",
            ),
            (
                json!({"tolerations": [{"operator": "Maybe", "key": "k"}]}),
                json!({}),
                "kubernetes.tolerations[0]: operator",
            ),
            (
                json!({"tolerations": [{"value": "v"}]}),
                json!({}),
                "needs a key",
            ),
            (
                json!({"tolerations": [{"key": "k", "effect": "NoSchedule", "toleration_seconds": 5}]}),
                json!({}),
                "toleration_seconds only applies",
            ),
            (
                json!({"node_selector": {"pool": "has space"}}),
                json!({}),
                "kubernetes.node_selector",
            ),
            (
                json!({"affinity": {"nodeAfinity": {}}}),
                json!({}),
                "kubernetes.affinity: not a Kubernetes Affinity",
            ),
            (
                json!({"priority_class_name": "High"}),
                json!({}),
                "kubernetes.priority_class_name",
            ),
            (
                json!({"image_pull_secrets": ["a", "a"]}),
                json!({}),
                "listed twice",
            ),
            (
                json!({"service_account": {}}),
                json!({}),
                "kubernetes.service_account: needs name",
            ),
            (
                json!({"service_account": {"name": "x", "annotations": {"a": "b"}}}),
                json!({}),
                "only apply with create: true",
            ),
        ] {
            let e = problems(k.clone(), top.clone());
            assert!(e.contains(want), "{k} {top}: {e}");
            assert_eq!(e.lines().count(), 1, "{k} {top}: {e}");
        }
        // A full, valid set passes.
        let ok = problems(
            json!({
                "tls": {"cert_manager": {"issuer_name": "ca", "issuer_kind": "ClusterIssuer"}, "verify": true},
                "websocket": {"tls": true}, "leafnodes": {"tls": true, "remotes": ["nats-leaf://hub:7422"]},
                "metrics": {"exporter": true, "pod_monitor": true},
                "tolerations": [{"key": "dedicated", "value": "nats", "effect": "NoSchedule"}, {"operator": "Exists"}],
                "node_selector": {"pool": "nats"}, "priority_class_name": "high",
                "image_pull_secrets": ["regcred"], "service_account": {"create": true},
                "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "x"}}}]}}
            }),
            json!({"tls": {"ca_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "cert_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "key_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")}}),
        );
        assert_eq!(ok, "");
    }

    #[test]
    fn typed_round_trips_refuse_unknown_fields_and_wrong_types() {
        let ok = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["nats"]}]}]}}});
        assert!(typed::<Affinity>(&ok).is_ok());
        let typo = json!({"nodeAfinity": {}});
        assert!(typed::<Affinity>(&typo)
            .unwrap_err()
            .contains("nodeAfinity"));
        let deep = json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "x", "labelSelectr": {}}}]}});
        let e = typed::<Affinity>(&deep).unwrap_err();
        assert!(e.contains("labelSelectr"), "{e}");
        assert!(typed::<Affinity>(&json!({"nodeAffinity": 3})).is_err());
    }

    #[test]
    fn remotes_need_a_leafnode_scheme_and_no_credentials() {
        assert_eq!(remote_problem("nats-leaf://hub.example.com:7422"), None);
        assert_eq!(remote_problem("tls://hub:7422"), None);
        assert!(remote_problem("http://hub").unwrap().contains("scheme"));
        assert!(remote_problem("nats-leaf://u:p@hub")
            .unwrap()
            .contains("credentials"));
        assert!(remote_problem("hub:7422").is_some());
        assert!(remote_problem("nats://").is_some());
    }

    #[test]
    fn certificate_names_cover_the_route_hosts_and_the_client_service() {
        let d = dns_names(
            "bus",
            "bus-headless",
            "ns",
            "cluster.local",
            &["nats.example.com".into()],
        );
        assert!(d.contains(&"bus.ns.svc.cluster.local".to_string()));
        assert!(d.contains(&"*.bus-headless.ns.svc.cluster.local".to_string()));
        assert!(d.contains(&"localhost".to_string()));
        assert_eq!(d.last().map(String::as_str), Some("nats.example.com"));
        assert!(d.iter().all(|n| dns_name_ok(n)));
    }
}
