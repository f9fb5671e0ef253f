//! The `kubernetes:` section of a broker config, validated, with the defaults of the flavor
//! applied, and the object names derived from the broker name. Pure: no I/O.

use super::addons::{self, Addons};
use crate::iac::error::DriverError;
use crate::iac::kind::BROKER_TYPE;
use crate::iac::targets::api::BrokerDesired;
use crate::iac::values::config_problems;
use crate::nats::server_conf::{env_safe_secret, ENV_SAFE_SECRET_RULE};
use crate::secret::{quote, Secret};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_STORAGE_SIZE: &str = "10Gi";
/// The EBS CSI driver's gp3 volume type; EKS does not create a class of this name itself.
pub const EKS_STORAGE_CLASS: &str = "gp3";
/// Small enough to schedule three pods on 2-vCPU/4-GiB nodes (DOKS' smallest useful size);
/// production JetStream wants 2 CPUs and 8Gi (README).
pub const DEFAULT_CPU: &str = "500m";
pub const DEFAULT_MEMORY: &str = "1Gi";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Replica counts a JetStream meta group can use: a majority survives one (3) or two (5)
/// lost pods; even sizes add a pod without adding tolerance.
pub const REPLICAS: [u32; 3] = [1, 3, 5];
/// Label keys the selector is built from; user labels may not override them.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_VERSION: &str = "app.kubernetes.io/version";
pub const MANAGED_BY: &str = "workflow-plugin-eventbus";
/// The broker name as written (it may not be a valid label value), on every object.
pub const ANNOTATION_BROKER: &str = "workflow-plugin-eventbus/broker";
/// On the pod template: changes with nats.conf and the credentials, so either rolls the pods.
pub const ANNOTATION_CONFIG: &str = "workflow-plugin-eventbus/config-sha256";
/// Longest name base: `<base>-headless` stays a 63-character DNS label and the StatefulSet's
/// `controller-revision-hash` label (`<sts>-<10 chars>`) a valid label value.
pub const MAX_BASE: usize = 40;

/// Plain Kubernetes, or EKS (gp3 storage class default, zone spread, internal NLB annotations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Kubernetes,
    Eks,
}

impl Flavor {
    pub fn target(self) -> &'static str {
        match self {
            Flavor::Kubernetes => "kubernetes",
            Flavor::Eks => "aws.eks",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    LoadBalancer,
    NodePort,
}

impl ServiceType {
    /// The spelling of `Service.spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::NodePort => "NodePort",
        }
    }

    fn parse(s: &str) -> Option<ServiceType> {
        match s.to_ascii_lowercase().as_str() {
            "" | "clusterip" | "cluster_ip" => Some(ServiceType::ClusterIp),
            "loadbalancer" | "load_balancer" => Some(ServiceType::LoadBalancer),
            "nodeport" | "node_port" => Some(ServiceType::NodePort),
            _ => None,
        }
    }
}

/// Client credentials the pods read from the Secret.
#[derive(Clone, Debug, PartialEq)]
pub enum KubeAuth {
    Token(Secret),
    UserPassword { user: String, password: Secret },
}

impl KubeAuth {
    /// The broker's credentials as the server's pods will read them: a token, or a user and
    /// password, each safe to pass through an environment variable; creds and nkey files are
    /// refused. `target` and `kept_in` (where the target stores them) word the refusal; each
    /// problem goes to `field` as (field, message).
    pub fn from_conn(
        conn: &crate::nats::ConnSettings,
        target: &str,
        kept_in: &str,
        field: &mut impl FnMut(&str, String),
    ) -> Option<KubeAuth> {
        if conn.creds_file.is_some() || conn.nkey_seed_file.is_some() {
            field(
                "auth",
                format!(
                    "{target} supports auth.token or auth.user + auth.password (kept in {kept_in}); \
                     creds_file and nkey_seed_file are not supported"
                ),
            );
            None
        } else if let Some(t) = &conn.token {
            if !env_safe_secret(t.expose()) {
                field("auth.token", format!("must be {ENV_SAFE_SECRET_RULE}"));
            }
            Some(KubeAuth::Token(t.clone()))
        } else if let (Some(u), Some(pw)) = (&conn.user, &conn.password) {
            if !env_safe_secret(u) {
                field("auth.user", format!("must be {ENV_SAFE_SECRET_RULE}"));
            }
            if !env_safe_secret(pw.expose()) {
                field("auth.password", format!("must be {ENV_SAFE_SECRET_RULE}"));
            }
            Some(KubeAuth::UserPassword {
                user: u.clone(),
                password: pw.clone(),
            })
        } else {
            None
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            KubeAuth::Token(_) => "token",
            KubeAuth::UserPassword { .. } => "user_password",
        }
    }

    /// Changes when a credential changes, without revealing it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        self.hash_into(&mut h);
        hex(&h.finalize()[..8])
    }

    /// Feeds the credentials (kind, user, secret) into `h`.
    pub fn hash_into(&self, h: &mut Sha256) {
        match self {
            KubeAuth::Token(t) => {
                h.update(b"token\0");
                h.update(t.expose().as_bytes());
            }
            KubeAuth::UserPassword { user, password } => {
                h.update(b"user\0");
                h.update(user.as_bytes());
                h.update(b"\0");
                h.update(password.expose().as_bytes());
            }
        }
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The validated `kubernetes:` section with the flavor's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct KubeSettings {
    pub flavor: Flavor,
    pub namespace: String,
    /// nats-server release the default image is picked by (`2.10.29`), `""` with an image.
    pub version: String,
    pub image: String,
    pub replicas: u32,
    /// PVC size per pod as written (`10Gi`) and in bytes.
    pub storage_size: String,
    pub storage_bytes: i64,
    /// `None` = the cluster's default class.
    pub storage_class: Option<String>,
    /// Requests = limits.
    pub cpu: String,
    pub memory: String,
    pub memory_bytes: i64,
    pub max_file_store: i64,
    /// 0 = nats-server's default (a share of GOMEMLIMIT).
    pub max_memory_store: i64,
    pub service_type: ServiceType,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_annotations: BTreeMap<String, String>,
    pub delete_pvcs: bool,
    pub zone_spread: bool,
    pub internal_load_balancer: bool,
    pub cluster_domain: String,
    /// kubeconfig context (`None` = the current one).
    pub context: Option<String>,
    pub ready_timeout: Duration,
    pub auth: Option<KubeAuth>,
    /// TLS, listeners, exporter, scheduling ([`super::addons`]).
    pub addons: Addons,
}

/// Object names derived from the broker name: every name carries the broker's name base, and
/// no suffix is a suffix of another of the same kind, so two brokers never collide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// DNS-1035 label from the broker name (hashed when the name is not one or is too long).
    pub base: String,
    pub secret: String,
    pub config_map: String,
    pub headless: String,
    pub client: String,
    pub stateful_set: String,
    pub pdb: String,
    pub network_policy: String,
    /// The claim template's name; PVCs are `<pvc_prefix><ordinal>`.
    pub claim: String,
    pub pvc_prefix: String,
}

impl Names {
    pub fn new(broker: &str) -> Names {
        let base = name_base(broker);
        Names {
            secret: format!("{base}-auth"),
            config_map: format!("{base}-config"),
            headless: format!("{base}-headless"),
            client: base.clone(),
            stateful_set: base.clone(),
            pdb: base.clone(),
            network_policy: base.clone(),
            claim: "js".into(),
            pvc_prefix: format!("js-{base}-"),
            base,
        }
    }

    /// `<sts>-<i>`: the pod, and its `server_name` in the JetStream cluster.
    pub fn pod(&self, i: u32) -> String {
        format!("{}-{i}", self.stateful_set)
    }
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The broker name when it is already a usable DNS label that does not end in one of our
/// suffixes; otherwise a cleaned-up prefix plus a hash of the whole name (`Bus_A` and `bus-a`
/// stay apart, long names stay short).
pub fn name_base(broker: &str) -> String {
    let reserved = ["-headless", "-config", "-auth"];
    if is_dns_label(broker, MAX_BASE) && !reserved.iter().any(|r| broker.ends_with(r)) {
        return broker.to_string();
    }
    let mut clean = String::new();
    for c in broker.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            clean.push(c);
        } else if !clean.ends_with('-') && !clean.is_empty() {
            clean.push('-');
        }
    }
    if !clean.starts_with(|c: char| c.is_ascii_lowercase()) {
        clean.insert_str(0, "nats-");
    }
    clean.truncate(MAX_BASE - 7);
    let clean = clean.trim_end_matches('-');
    let digest = Sha256::digest(broker.as_bytes());
    format!("{clean}-{}", hex(&digest[..3]))
}

/// A Kubernetes quantity in bytes (`10Gi`, `512Mi`, `1G`, `1000`); `None` when it is not one
/// (exponent forms like `1e3` are refused: nobody sizes a disk that way).
pub fn quantity_bytes(s: &str) -> Option<i64> {
    const UNITS: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, mult) = UNITS
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((s, 1.0));
    if !decimal(num) {
        return None;
    }
    let v = num.parse::<f64>().ok()? * mult;
    (1.0..9.2e18).contains(&v).then_some(v as i64)
}

fn decimal(s: &str) -> bool {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    !int.is_empty()
        && !frac.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

/// `500m`, `1`, `1.5`, `2000m`: positive.
fn cpu_ok(s: &str) -> bool {
    let n = s.strip_suffix('m').unwrap_or(s);
    decimal(n) && n.parse::<f64>().is_ok_and(|v| v > 0.0)
}

/// A label or annotation key: optional DNS-subdomain prefix and `/`, then a name of up to 63
/// characters of alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn key_ok(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(addons::is_subdomain);
    prefix_ok && !name.is_empty() && name.len() <= 63 && label_chars(name)
}

fn label_chars(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty() || (v.len() <= 63 && label_chars(v))
}

/// Validates the target's part of a broker config: every problem at once, one `field: message`
/// line each, the field named as in the config.
pub fn validate(d: &BrokerDesired, flavor: Flavor) -> Result<KubeSettings, Vec<String>> {
    let mut p: Vec<String> = Vec::new();
    let mut field = |f: &str, m: String| p.push(format!("{f}: {m}"));
    let c = &d.config;
    let k = c.kubernetes.clone().unwrap_or_default();
    let target = flavor.target();

    let replicas = d.spec.replicas;
    if !REPLICAS.contains(&replicas) {
        field(
            "replicas",
            format!(
                "{replicas} is not possible on {target}: use 1, 3 or 5 (a JetStream cluster needs a majority of its \
                 servers; {replicas} pods tolerate no more lost pods than {} would)",
                replicas - 1
            ),
        );
    }

    let namespace = if k.namespace.is_empty() {
        DEFAULT_NAMESPACE.to_string()
    } else {
        k.namespace.clone()
    };
    if !is_dns_label(&namespace, 63) {
        field(
            "kubernetes.namespace",
            format!(
                "{} is not a namespace name (lowercase letters, digits and -, starting with a letter, at most 63)",
                quote(&namespace)
            ),
        );
    }

    let version = c.version.trim().trim_start_matches('v').to_string();
    let image = if !k.image.is_empty() {
        if k.image.chars().any(|c| c.is_whitespace()) {
            field(
                "kubernetes.image",
                format!("{} is not an image reference", quote(&k.image)),
            );
        }
        k.image.clone()
    } else if version.is_empty() {
        field(
            "version",
            format!(
                "is required for {target} (it picks the nats:<version>-alpine image); pin a release such as \
                 \"2.10.29\", or set kubernetes.image"
            ),
        );
        String::new()
    } else {
        format!("nats:{version}-alpine")
    };

    let storage_size = if k.storage_size.is_empty() {
        DEFAULT_STORAGE_SIZE.to_string()
    } else {
        k.storage_size.clone()
    };
    let storage_bytes = quantity_bytes(&storage_size).unwrap_or_else(|| {
        field(
            "kubernetes.storage_size",
            format!(
                "{} is not a size; use a Kubernetes quantity such as 10Gi or 500Mi",
                quote(&storage_size)
            ),
        );
        0
    });
    let storage_class = match (k.storage_class.is_empty(), flavor) {
        (false, _) => Some(k.storage_class.clone()),
        (true, Flavor::Eks) => Some(EKS_STORAGE_CLASS.to_string()),
        (true, Flavor::Kubernetes) => None,
    };
    if let Some(sc) = &storage_class {
        if !sc.split('.').all(|l| is_dns_label(l, 63)) || sc.len() > 253 {
            field(
                "kubernetes.storage_class",
                format!("{} is not a StorageClass name", quote(sc)),
            );
        }
    }

    let res = k.resources.clone().unwrap_or_default();
    let cpu = if res.cpu.is_empty() {
        DEFAULT_CPU.to_string()
    } else {
        res.cpu.clone()
    };
    if !cpu_ok(&cpu) {
        field(
            "kubernetes.resources.cpu",
            format!("{} is not a CPU amount; use e.g. 500m or 2", quote(&cpu)),
        );
    }
    let memory = if res.memory.is_empty() {
        DEFAULT_MEMORY.to_string()
    } else {
        res.memory.clone()
    };
    let memory_bytes = match quantity_bytes(&memory) {
        Some(b) if b >= 64 << 20 => b,
        Some(_) => {
            field(
                "kubernetes.resources.memory",
                format!(
                    "{} is too little for nats-server with JetStream; use at least 64Mi (1Gi or more in production)",
                    quote(&memory)
                ),
            );
            0
        }
        None => {
            field(
                "kubernetes.resources.memory",
                format!(
                    "{} is not a size; use a Kubernetes quantity such as 1Gi",
                    quote(&memory)
                ),
            );
            0
        }
    };

    // The store must fit its volume; a tenth is left for the filesystem's own use and the
    // store's index files, so a full stream is refused by JetStream rather than the disk.
    let default_file_store = storage_bytes / 10 * 9;
    let max_file_store = if d.max_file_store == 0 {
        default_file_store
    } else {
        d.max_file_store
    };
    if storage_bytes > 0 && max_file_store > storage_bytes {
        field(
            "jetstream.max_storage_bytes",
            format!(
                "{max_file_store} does not fit the {storage_size} volume (kubernetes.storage_size); use at most \
                 {storage_bytes} (0 = {default_file_store})"
            ),
        );
    }
    let max_memory_store = d.max_memory_store;
    if memory_bytes > 0 && max_memory_store > memory_bytes / 2 {
        field(
            "jetstream.max_memory_bytes",
            format!(
                "{max_memory_store} leaves the server too little of its {memory} memory limit \
                 (kubernetes.resources.memory); use at most {} or raise the limit",
                memory_bytes / 2
            ),
        );
    }

    let service_type = ServiceType::parse(&k.service_type).unwrap_or_else(|| {
        field(
            "kubernetes.service_type",
            format!(
                "{} is not a Service type; use ClusterIP (default), LoadBalancer or NodePort",
                quote(&k.service_type)
            ),
        );
        ServiceType::ClusterIp
    });
    if k.internal_load_balancer {
        if flavor != Flavor::Eks {
            field(
                "kubernetes.internal_load_balancer",
                format!(
                    "only applies to deploy_target aws.eks (this broker uses {target}); set the provider's \
                     annotations in kubernetes.service_annotations instead"
                ),
            );
        } else if service_type != ServiceType::LoadBalancer {
            field(
                "kubernetes.internal_load_balancer",
                "needs kubernetes.service_type: LoadBalancer".to_string(),
            );
        }
    }

    let mut maps = Vec::new();
    for (f, m) in [
        ("kubernetes.labels", &k.labels),
        ("kubernetes.annotations", &k.annotations),
        ("kubernetes.service_annotations", &k.service_annotations),
    ] {
        let sorted: BTreeMap<String, String> =
            m.iter().map(|(a, b)| (a.clone(), b.clone())).collect();
        for (key, value) in &sorted {
            if !key_ok(key) {
                field(
                    f,
                    format!(
                        "{} is not a label/annotation key (optional prefix/, then 1-63 of A-Z a-z 0-9 - _ .)",
                        quote(key)
                    ),
                );
            } else if f == "kubernetes.labels" && !label_value_ok(value) {
                field(
                    f,
                    format!(
                        "the value of {} is not a label value (at most 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)",
                        quote(key)
                    ),
                );
            }
            if key.starts_with("app.kubernetes.io/") || key.starts_with(MANAGED_BY) {
                field(
                    f,
                    format!(
                        "{} is set by the provider (the selector and ownership use it); pick another key",
                        quote(key)
                    ),
                );
            }
        }
        maps.push(sorted);
    }
    let service_annotations = maps.pop().unwrap_or_default();
    let annotations = maps.pop().unwrap_or_default();
    let labels = maps.pop().unwrap_or_default();

    let cluster_domain = if k.cluster_domain.is_empty() {
        DEFAULT_CLUSTER_DOMAIN.to_string()
    } else {
        k.cluster_domain.clone()
    };
    if !cluster_domain.split('.').all(|l| is_dns_label(l, 63)) {
        field(
            "kubernetes.cluster_domain",
            format!(
                "{} is not a domain such as cluster.local",
                quote(&cluster_domain)
            ),
        );
    }
    let ready_timeout = match &k.ready_timeout {
        None => DEFAULT_READY_TIMEOUT,
        Some(t) if t.seconds > 0 && t.nanos >= 0 => Duration::new(t.seconds as u64, t.nanos as u32),
        Some(_) => {
            field(
                "kubernetes.ready_timeout",
                "must be a positive duration such as \"600s\"".to_string(),
            );
            DEFAULT_READY_TIMEOUT
        }
    };

    let conn = &d.spec.conn;
    let auth = KubeAuth::from_conn(conn, target, "a Secret", &mut field);
    if auth.is_none() && service_type != ServiceType::ClusterIp {
        field(
            "auth",
            format!(
                "is required with kubernetes.service_type {}: the broker is reachable from outside the cluster; set \
                 auth.token, or auth.user and auth.password",
                service_type.as_str()
            ),
        );
    }
    let addons = addons::validate(
        &k,
        &name_base(&d.spec.name),
        &mut field,
        key_ok,
        label_value_ok,
    );
    // The top-level `tls` is how the provider (and the runtime) connect; the servers' TLS is
    // kubernetes.tls.
    match &addons.tls {
        None if conn.tls_ca_file.is_some() || conn.tls_cert_file.is_some() || conn.tls_required => {
            field(
                "tls",
                format!(
                    "is how clients connect; the servers on {target} serve TLS only with kubernetes.tls (a Secret or \
                     cert-manager): set it, or remove tls"
                ),
            );
        }
        Some(t) if t.verify && (conn.tls_cert_file.is_none() || conn.tls_key_file.is_none()) => {
            field(
                "tls.cert_file",
                "kubernetes.tls.verify makes every client present a certificate, this provider too: set tls.cert_file \
                 and tls.key_file (and tls.ca_file for the servers' CA)"
                    .to_string(),
            );
        }
        _ => {}
    }

    let settings = KubeSettings {
        flavor,
        namespace,
        version,
        image,
        replicas,
        storage_size,
        storage_bytes,
        storage_class,
        cpu,
        memory,
        memory_bytes,
        max_file_store,
        max_memory_store,
        service_type,
        labels,
        annotations,
        service_annotations,
        delete_pvcs: k.delete_pvcs_on_delete,
        zone_spread: k.zone_spread.unwrap_or(flavor == Flavor::Eks),
        internal_load_balancer: k.internal_load_balancer,
        cluster_domain,
        context: (!k.context.is_empty()).then(|| k.context.clone()),
        ready_timeout,
        auth,
        addons,
    };
    if p.is_empty() {
        Ok(settings)
    } else {
        Err(p)
    }
}

/// The settings of `d` for `flavor`, or one error naming every bad field.
pub fn settings(
    name: &str,
    d: &BrokerDesired,
    flavor: Flavor,
) -> Result<KubeSettings, DriverError> {
    validate(d, flavor).map_err(|lines| config_problems(BROKER_TYPE, name, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired(name: &str, c: serde_json::Value) -> BrokerDesired {
        let mut base =
            json!({"provider": "nats", "deploy_target": "kubernetes", "version": "2.10.29"});
        for (k, v) in c.as_object().unwrap() {
            base[k] = v.clone();
        }
        BrokerDesired::decode(name, base.to_string().as_bytes()).unwrap()
    }

    fn problems(c: serde_json::Value, flavor: Flavor) -> String {
        validate(&desired("bus", c), flavor).unwrap_err().join("\n")
    }

    #[test]
    fn names_are_dns_labels_and_never_collide() {
        let n = Names::new("orders-bus");
        assert_eq!(
            (
                n.client.as_str(),
                n.headless.as_str(),
                n.config_map.as_str(),
                n.secret.as_str()
            ),
            (
                "orders-bus",
                "orders-bus-headless",
                "orders-bus-config",
                "orders-bus-auth"
            )
        );
        assert_eq!(n.pod(2), "orders-bus-2");
        // A broker named like another broker's derived object is hashed, not shared.
        for tricky in [
            "orders-bus-headless",
            "orders-bus-config",
            "orders-bus-auth",
        ] {
            let t = Names::new(tricky);
            assert_ne!(t.client, n.headless);
            assert_ne!(t.client, n.config_map);
            assert_ne!(t.config_map, n.config_map);
            assert_ne!(t.headless, n.headless);
        }
        assert_ne!(name_base("Bus_A"), name_base("bus-a"));
        for weird in [
            "Bus_A",
            "1bus",
            "x",
            "a-very-long-broker-name-that-is-far-over-forty-characters-long",
            "bus-",
            "ÜBER bus",
        ] {
            let b = name_base(weird);
            assert!(is_dns_label(&b, MAX_BASE), "{weird} -> {b}");
            assert!(is_dns_label(&format!("{b}-headless"), 63), "{b}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("10Gi"), Some(10 << 30));
        assert_eq!(quantity_bytes("500Mi"), Some(500 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("4096"), Some(4096));
        for bad in ["", "Gi", "10GB", "-1Gi", "1e3", "ten", "0", "1.Gi"] {
            assert_eq!(quantity_bytes(bad), None, "{bad}");
        }
        assert!(cpu_ok("500m") && cpu_ok("2") && cpu_ok("0.5"));
        assert!(!cpu_ok("0") && !cpu_ok("two") && !cpu_ok("1c"));
    }

    #[test]
    fn flavor_defaults() {
        let k = validate(&desired("bus", json!({})), Flavor::Kubernetes).unwrap();
        assert_eq!(k.namespace, "default");
        assert_eq!(k.storage_class, None);
        assert!(!k.zone_spread);
        assert_eq!(k.image, "nats:2.10.29-alpine");
        assert_eq!(k.max_file_store, (10i64 << 30) / 10 * 9);
        assert_eq!(k.replicas, 1);
        let e = validate(
            &desired("bus", json!({"deploy_target": "aws.eks"})),
            Flavor::Eks,
        )
        .unwrap();
        assert_eq!(e.storage_class.as_deref(), Some("gp3"));
        assert!(e.zone_spread);
        let e = validate(
            &desired(
                "bus",
                json!({"deploy_target": "aws.eks", "kubernetes": {"zone_spread": false, "storage_class": "gp2"}}),
            ),
            Flavor::Eks,
        )
        .unwrap();
        assert!(!e.zone_spread);
        assert_eq!(e.storage_class.as_deref(), Some("gp2"));
    }

    #[test]
    fn refusals_name_the_field_and_what_is_valid() {
        let k = Flavor::Kubernetes;
        for (c, want) in [
            (
                json!({"replicas": 2}),
                "replicas: 2 is not possible on kubernetes: use 1, 3 or 5",
            ),
            (json!({"replicas": 4}), "use 1, 3 or 5"),
            (
                json!({"kubernetes": {"namespace": "Bad_NS"}}),
                "kubernetes.namespace",
            ),
            (
                json!({"kubernetes": {"storage_size": "lots"}}),
                "kubernetes.storage_size: \"lots\" is not a size",
            ),
            (
                json!({"kubernetes": {"resources": {"cpu": "fast"}}}),
                "kubernetes.resources.cpu",
            ),
            (
                json!({"kubernetes": {"resources": {"memory": "1Mi"}}}),
                "at least 64Mi",
            ),
            (
                json!({"kubernetes": {"service_type": "Ingress"}}),
                "kubernetes.service_type",
            ),
            (
                json!({"kubernetes": {"service_type": "LoadBalancer"}}),
                "auth: is required with kubernetes.service_type LoadBalancer",
            ),
            (
                json!({"kubernetes": {"internal_load_balancer": true}}),
                "only applies to deploy_target aws.eks",
            ),
            (
                json!({"kubernetes": {"labels": {"app.kubernetes.io/name": "x"}}}),
                "set by the provider",
            ),
            (
                json!({"kubernetes": {"labels": {"team": "has spaces"}}}),
                "not a label value",
            ),
            (
                json!({"kubernetes": {"storage_size": "1Gi"}, "jetstream": {"max_storage_bytes": 2_000_000_000_i64}}),
                "jetstream.max_storage_bytes",
            ),
            (
                json!({"version": ""}),
                "version: is required for kubernetes",
            ),
            (
                json!({"auth": {"token": "has space"}}),
                "auth.token: must be",
            ),
            (
                json!({"kubernetes": {"ready_timeout": "0s"}}),
                "kubernetes.ready_timeout",
            ),
        ] {
            let e = problems(c.clone(), k);
            assert!(e.contains(want), "{c}: {e}");
        }
        let e = problems(
            json!({"deploy_target": "aws.eks", "kubernetes": {"internal_load_balancer": true}}),
            Flavor::Eks,
        );
        assert!(
            e.contains("needs kubernetes.service_type: LoadBalancer"),
            "{e}"
        );
        // Every problem at once.
        let e = problems(
            json!({"replicas": 2, "kubernetes": {"storage_size": "x"}}),
            k,
        );
        assert_eq!(e.lines().count(), 2, "{e}");
    }

    #[test]
    fn a_kubernetes_section_on_another_target_is_refused() {
        let c =
            json!({"provider": "nats", "deploy_target": "local", "kubernetes": {"namespace": "x"}});
        let e = BrokerDesired::decode("bus", c.to_string().as_bytes())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("kubernetes: only applies to deploy_target kubernetes or aws.eks"),
            "{e}"
        );
    }
}
