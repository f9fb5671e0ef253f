//! The Kubernetes objects of one broker, as typed `k8s-openapi` structs turned into the JSON
//! that server-side apply sends (and the `render` subcommand writes as YAML). Pure: no I/O.
//!
//! The shape follows what NATS recommends for a JetStream cluster on Kubernetes: a
//! StatefulSet whose pods name themselves after their pod name (stable `server_name` = stable
//! RAFT peer), route to each other over a headless Service that publishes pods before they are
//! Ready (peers must find each other to become Ready at all), start in parallel, keep their
//! store on a volume of their own, and drain clients in lame-duck mode before they stop.

use super::addons::{
    self, Addons, EXPORTER_CONTAINER, EXPORTER_PORT, EXPORTER_PORT_NAME, RELOADER_CONTAINER,
    TLS_DIR, TLS_VOLUME,
};
use super::config::{
    hex, settings, Flavor, KubeAuth, KubeSettings, Names, ServiceType, ANNOTATION_BROKER,
    ANNOTATION_CONFIG, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_VERSION, MANAGED_BY,
};
use crate::iac::error::DriverError;
use crate::iac::targets::api::BrokerDesired;
use crate::nats::server_conf::{
    quoted, routes_conf, ClusterConf, EnvAuth, LameDuck, Listen, ServerConf, ServerName,
};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, Secret, SecretKeySelector, SecretProjection, SecretVolumeSource, Service,
    ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{ByteString, Resource};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const CLIENT_PORT: u16 = 4222;
pub const CLUSTER_PORT: u16 = 6222;
pub const MONITOR_PORT: u16 = 8222;
pub const CONFIG_KEY: &str = "nats.conf";
pub const CONFIG_DIR: &str = "/etc/nats-config";
pub const PID_DIR: &str = "/var/run/nats";
pub const PID_FILE: &str = "/var/run/nats/nats.pid";
pub const STORE_DIR: &str = "/data";
pub const CONTAINER: &str = "nats";
/// Env var names in the pod.
pub const ENV_SERVER_NAME: &str = "SERVER_NAME";
pub const ENV_TOKEN: &str = "NATS_TOKEN";
pub const ENV_USER: &str = "NATS_USER";
pub const ENV_PASSWORD: &str = "NATS_PASSWORD";
/// Secret data keys.
pub const SECRET_TOKEN: &str = "token";
pub const SECRET_USER: &str = "user";
pub const SECRET_PASSWORD: &str = "password";
/// The Secret's key (and file name beside nats.conf) holding the routes with their
/// credentials and the cluster's `authorization` (3 or 5 replicas with `auth`).
pub const SECRET_ROUTES: &str = "routes.conf";
/// The user every route of a broker presents.
pub const ROUTE_USER: &str = "route";
/// Lame duck: clients move off over 30 s after a 10 s grace; the pod gets 60 s to stop.
pub const LAME_DUCK: LameDuck = LameDuck {
    duration_secs: 30,
    grace_secs: 10,
};
pub const TERMINATION_GRACE_SECS: i64 = 60;
/// The AWS Load Balancer Controller's annotations for an internal NLB targeting pod IPs.
pub const EKS_INTERNAL_NLB: [(&str, &str); 3] = [
    (
        "service.beta.kubernetes.io/aws-load-balancer-type",
        "external",
    ),
    (
        "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
        "ip",
    ),
    (
        "service.beta.kubernetes.io/aws-load-balancer-scheme",
        "internal",
    ),
];

/// One object as server-side apply sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedObject {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    /// The full object: apiVersion, kind, metadata, spec/data.
    pub body: Json,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub settings: KubeSettings,
    pub names: Names,
    pub replicas: u32,
    /// In apply (dependency) order: ServiceAccount (when created), Secret (with auth),
    /// Certificate (cert-manager), ConfigMap, NetworkPolicy, headless Service, client Service,
    /// StatefulSet, PodDisruptionBudget, PodMonitor. Delete walks it in reverse.
    pub objects: Vec<RenderedObject>,
    /// `nats://<client>.<ns>.svc.<cluster domain>:4222`.
    pub in_cluster_url: String,
    /// The nats.conf every pod reads (secrets only as `$NAME` references).
    pub nats_conf: String,
    /// sha256 of nats.conf and the credentials' fingerprint: the pod template annotation.
    pub config_sha256: String,
}

fn object<T: Resource + serde::Serialize>(
    o: &T,
    name: &str,
    namespace: &str,
) -> Result<RenderedObject, DriverError> {
    let body = serde_json::to_value(o).map_err(|e| {
        DriverError::invalid(
            format!("{} {name}", T::KIND),
            format!("cannot serialize: {e}"),
        )
    })?;
    Ok(RenderedObject {
        api_version: T::API_VERSION,
        kind: T::KIND,
        name: name.to_string(),
        namespace: namespace.to_string(),
        body,
    })
}

/// The nats.conf of a broker's pods, through the renderer every target shares.
pub fn nats_conf(broker: &str, s: &KubeSettings, n: &Names) -> String {
    let mut conf = ServerConf {
        header: format!(
            "Written by workflow-plugin-eventbus for infra.eventbus {broker:?} ({}); every pod of StatefulSet {} reads it.",
            s.flavor.target(),
            n.stateful_set
        ),
        server_name: ServerName::Env(ENV_SERVER_NAME.into()),
        client: Listen::Addr(format!("0.0.0.0:{CLIENT_PORT}")),
        monitor: Listen::Addr(format!("0.0.0.0:{MONITOR_PORT}")),
        logfile: None,
        pid_file: Some(PID_FILE.into()),
        lame_duck: Some(LAME_DUCK),
        store_dir: STORE_DIR.into(),
        max_file_store: s.max_file_store,
        max_memory_store: s.max_memory_store,
        cluster: (s.replicas > 1).then(|| ClusterConf {
            name: n.stateful_set.clone(),
            listen: format!("0.0.0.0:{CLUSTER_PORT}"),
            // With auth, the routes carry credentials: they come from the Secret; with route
            // TLS, the block's `tls` comes with them from the included file.
            routes: if routes_included(s) {
                Vec::new()
            } else {
                route_urls(s, n)
            },
            no_advertise: true,
            include: routes_included(s).then(|| SECRET_ROUTES.to_string()),
        }),
        websocket: None,
        auth: s.auth.as_ref().map(|a| match a {
            KubeAuth::Token(_) => EnvAuth::Token {
                var: ENV_TOKEN.into(),
            },
            KubeAuth::UserPassword { .. } => EnvAuth::UserPassword {
                user_var: ENV_USER.into(),
                password_var: ENV_PASSWORD.into(),
            },
        }),
    }
    .render();
    conf.push_str(&addons::conf_blocks(&s.addons));
    conf
}

/// Whether the routes use TLS: asked for (the default with kubernetes.tls), and there are routes.
fn route_tls(s: &KubeSettings) -> Option<&addons::TlsSettings> {
    s.addons.tls.as_ref().filter(|t| t.routes && s.replicas > 1)
}

/// Whether the cluster block includes its routes from `routes.conf` (the Secret's with auth,
/// else the ConfigMap's) rather than listing them.
fn routes_included(s: &KubeSettings) -> bool {
    s.replicas > 1 && (s.auth.is_some() || route_tls(s).is_some())
}

/// The route url of every pod: `nats://<pod>.<headless>.<ns>.svc.<domain>:6222`, `tls://`
/// with route TLS (the host is a name the certificate carries).
fn route_urls(s: &KubeSettings, n: &Names) -> Vec<String> {
    let domain = format!("{}.svc.{}", s.namespace, s.cluster_domain);
    let scheme = if route_tls(s).is_some() {
        "tls"
    } else {
        "nats"
    };
    (0..s.replicas)
        .map(|i| {
            format!(
                "{scheme}://{}.{}.{domain}:{CLUSTER_PORT}",
                n.pod(i),
                n.headless
            )
        })
        .collect()
}

/// The file the cluster block includes, when it does: the routes (with their credentials
/// under auth) and, with route TLS, the block's `tls` (routes always verify their peer).
fn routes_file(s: &KubeSettings, n: &Names) -> Option<String> {
    if !routes_included(s) {
        return None;
    }
    let mut text = match &s.auth {
        Some(a) => routes_conf(ROUTE_USER, &route_password(a, &n.base), &route_urls(s, n)),
        None => {
            let urls: Vec<String> = route_urls(s, n).iter().map(|u| quoted(u)).collect();
            format!("routes: [\n  {}\n]\n", urls.join("\n  "))
        }
    };
    if let Some(t) = route_tls(s) {
        text.push_str(&addons::tls_block(t, false, ""));
    }
    Some(text)
}

/// The password every route of a clustered broker with `auth` presents, derived from the
/// client credentials (so it changes with them and is the same on every render: plans and
/// `kubectl diff` stay quiet) under a label of its own and the broker's name: 64 hex digits
/// nobody computes without the client secret. Without `auth` there is nothing secret to
/// derive it from, and the client port is open anyway; the NetworkPolicy then alone keeps
/// the route port to the broker's pods.
fn route_password(auth: &KubeAuth, base: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"workflow-plugin-eventbus route password\0");
    h.update(base.as_bytes());
    h.update(b"\0");
    auth.hash_into(&mut h);
    hex(&h.finalize())
}

/// GOMEMLIMIT: 80 % of the memory limit, so the Go runtime collects before the kernel kills.
pub fn gomemlimit(memory_bytes: i64) -> String {
    format!("{}MiB", memory_bytes / 10 * 8 / (1 << 20))
}

fn port(name: &str, p: u16, app_protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p as i32,
        target_port: Some(IntOrString::String(name.into())),
        app_protocol: Some(app_protocol.into()),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// `tls` (`https` for an http protocol) when the port serves TLS, else `plain`.
fn tls_or(tls: bool, plain: &str) -> &str {
    match (tls, plain) {
        (false, p) => p,
        (true, "http") => "https",
        (true, _) => "tls",
    }
}

/// The websocket and leafnode ports, when they listen (both Services expose them, as the
/// chart's do).
fn listener_ports(a: &Addons) -> Vec<ServicePort> {
    let mut v = Vec::new();
    if let Some(l) = &a.leafnodes {
        v.push(port("leafnodes", l.port, tls_or(l.tls, "tcp")));
    }
    if let Some(w) = &a.websocket {
        v.push(port("websocket", w.port, tls_or(w.tls, "http")));
    }
    v
}

/// The config-reloader sidecar: a renewed certificate (cert-manager rewrites the Secret, the
/// kubelet the mounted files) makes nats-server reload its TLS settings without a restart.
fn reloader_container(t: &addons::TlsSettings) -> Container {
    Container {
        name: RELOADER_CONTAINER.into(),
        image: Some(t.reloader_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(addons::reloader_args(t, PID_FILE)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "pid".into(),
                mount_path: PID_DIR.into(),
                ..Default::default()
            },
            VolumeMount {
                name: TLS_VOLUME.into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

/// The prometheus-nats-exporter sidecar: reads the monitor port over the pod's loopback and
/// serves Prometheus metrics on its own port.
fn exporter_container(a: &Addons, image: &str) -> Container {
    Container {
        name: EXPORTER_CONTAINER.into(),
        image: Some(image.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(addons::exporter_args(a, MONITOR_PORT)),
        ports: Some(vec![ContainerPort {
            name: Some(EXPORTER_PORT_NAME.into()),
            container_port: EXPORTER_PORT as i32,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32, failures: i32, initial_delay: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("monitor".into()),
            ..Default::default()
        }),
        initial_delay_seconds: initial_delay,
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        success_threshold: Some(1),
        ..Default::default()
    }
}

fn spread(key: &str, selector: &BTreeMap<String, String>) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        when_unsatisfiable: "DoNotSchedule".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The object set of broker `name` for `flavor`. Pure; errors name the config field.
pub fn render(name: &str, d: &BrokerDesired, flavor: Flavor) -> Result<Rendered, DriverError> {
    render_settings(name, settings(name, d, flavor)?)
}

/// Renders already validated settings.
pub fn render_settings(name: &str, s: KubeSettings) -> Result<Rendered, DriverError> {
    let n = Names::new(name);
    let ns = s.namespace.clone();
    let selector: BTreeMap<String, String> = [
        (LABEL_NAME.to_string(), "nats".to_string()),
        (LABEL_INSTANCE.to_string(), n.base.clone()),
    ]
    .into();
    let mut labels = s.labels.clone();
    labels.extend(selector.clone());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    if !s.version.is_empty() {
        labels.insert(LABEL_VERSION.into(), s.version.clone());
    }
    let mut annotations = s.annotations.clone();
    annotations.insert(ANNOTATION_BROKER.into(), name.to_string());
    let meta = |object_name: &str| ObjectMeta {
        name: Some(object_name.to_string()),
        namespace: Some(ns.clone()),
        labels: Some(labels.clone()),
        annotations: Some(annotations.clone()),
        ..Default::default()
    };

    let conf = nats_conf(name, &s, &n);
    // The included routes file (its urls carry the route credentials with auth).
    let routes_file = routes_file(&s, &n);
    let mut h = Sha256::new();
    h.update(conf.as_bytes());
    h.update(b"\0");
    if let Some(a) = &s.auth {
        h.update(a.fingerprint().as_bytes());
    }
    if let Some(r) = &routes_file {
        h.update(b"\0");
        h.update(r.as_bytes());
    }
    let checksum = hex(&h.finalize());

    let mut objects = Vec::new();
    let a = &s.addons;
    let meta_json = |object_name: &str| -> Result<Json, DriverError> {
        serde_json::to_value(meta(object_name))
            .map_err(|e| DriverError::invalid(object_name.to_string(), e.to_string()))
    };

    // 0. The pods' ServiceAccount, when the broker brings its own.
    if let Some(sa) = a.service_account.as_ref().filter(|sa| sa.create) {
        let mut m = meta(&sa.name);
        let mut an = annotations.clone();
        an.extend(sa.annotations.clone());
        m.annotations = Some(an);
        let account = ServiceAccount {
            metadata: m,
            ..Default::default()
        };
        objects.push(object(&account, &sa.name, &ns)?);
    }

    // 1. Credentials, read by the pods as env vars that nats.conf references.
    let mut auth_env = Vec::new();
    if let Some(a) = &s.auth {
        let mut data = BTreeMap::new();
        match a {
            KubeAuth::Token(t) => {
                data.insert(SECRET_TOKEN.to_string(), ByteString(t.expose().into()));
                auth_env.push(secret_env(ENV_TOKEN, &n.secret, SECRET_TOKEN));
            }
            KubeAuth::UserPassword { user, password } => {
                data.insert(
                    SECRET_USER.to_string(),
                    ByteString(user.as_bytes().to_vec()),
                );
                data.insert(
                    SECRET_PASSWORD.to_string(),
                    ByteString(password.expose().into()),
                );
                auth_env.push(secret_env(ENV_USER, &n.secret, SECRET_USER));
                auth_env.push(secret_env(ENV_PASSWORD, &n.secret, SECRET_PASSWORD));
            }
        }
        if let Some(r) = &routes_file {
            data.insert(
                SECRET_ROUTES.to_string(),
                ByteString(r.clone().into_bytes()),
            );
        }
        let secret = Secret {
            metadata: meta(&n.secret),
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        };
        objects.push(object(&secret, &n.secret, &ns)?);
    }
    // The certificate cert-manager keeps in the Secret the pods mount, when asked.
    if let Some(cert) = a.tls.as_ref().and_then(|t| {
        let extra = match &t.source {
            addons::TlsSource::CertManager {
                extra_dns_names, ..
            } => extra_dns_names.clone(),
            addons::TlsSource::Secret => Vec::new(),
        };
        let dns = addons::dns_names(&n.client, &n.headless, &ns, &s.cluster_domain, &extra);
        meta_json(&n.base)
            .map(|m| addons::certificate(t, m, dns))
            .transpose()
    }) {
        objects.push(RenderedObject {
            api_version: "cert-manager.io/v1",
            kind: "Certificate",
            name: n.base.clone(),
            namespace: ns.clone(),
            body: cert?,
        });
    }

    // 2. nats.conf (and, without auth, the routes file it includes).
    let mut cm_data: BTreeMap<String, String> = [(CONFIG_KEY.to_string(), conf.clone())].into();
    if let (Some(r), None) = (&routes_file, &s.auth) {
        cm_data.insert(SECRET_ROUTES.to_string(), r.clone());
    }
    let cm = ConfigMap {
        metadata: meta(&n.config_map),
        data: Some(cm_data),
        ..Default::default()
    };
    objects.push(object(&cm, &n.config_map, &ns)?);

    // 3. Before any pod runs: the route port takes connections from the broker's own pods
    //    only; the client port stays open to all, and so does monitoring (the kubelet's
    //    probes and metrics scrapers use it; it serves no message data).
    let tcp = |p: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(p as i32)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let own_pods = LabelSelector {
        match_labels: Some(selector.clone()),
        ..Default::default()
    };
    let policy = NetworkPolicy {
        metadata: meta(&n.network_policy),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(own_pods.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(
                        [CLIENT_PORT, MONITOR_PORT]
                            .into_iter()
                            .chain(a.websocket.as_ref().map(|w| w.port))
                            .chain(a.leafnodes.as_ref().map(|l| l.port))
                            .chain(a.exporter.as_ref().map(|_| EXPORTER_PORT))
                            .map(tcp)
                            .collect(),
                    ),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(own_pods),
                        ..Default::default()
                    }]),
                    ports: Some(vec![tcp(CLUSTER_PORT)]),
                },
            ]),
            ..Default::default()
        }),
    };
    objects.push(object(&policy, &n.network_policy, &ns)?);

    // 4. Peer discovery: every pod gets a DNS name at once, Ready or not.
    let headless = Service {
        metadata: meta(&n.headless),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector.clone()),
            ports: Some({
                let mut v = vec![
                    port("nats", CLIENT_PORT, tls_or(a.tls.is_some(), "tcp")),
                    port(
                        "cluster",
                        CLUSTER_PORT,
                        tls_or(route_tls(&s).is_some(), "tcp"),
                    ),
                    port("monitor", MONITOR_PORT, "http"),
                ];
                v.extend(listener_ports(a));
                v
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    objects.push(object(&headless, &n.headless, &ns)?);

    // 5. Clients: the client port only (routes and monitoring stay on the headless Service).
    let mut client_meta = meta(&n.client);
    let mut svc_annotations = annotations.clone();
    if s.internal_load_balancer && s.flavor == Flavor::Eks {
        for (k, v) in EKS_INTERNAL_NLB {
            svc_annotations.insert(k.into(), v.into());
        }
    }
    svc_annotations.extend(s.service_annotations.clone());
    client_meta.annotations = Some(svc_annotations);
    let client = Service {
        metadata: client_meta,
        spec: Some(ServiceSpec {
            type_: Some(s.service_type.as_str().into()),
            selector: Some(selector.clone()),
            ports: Some({
                let mut v = vec![port("nats", CLIENT_PORT, tls_or(a.tls.is_some(), "tcp"))];
                v.extend(listener_ports(a));
                v
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    objects.push(object(&client, &n.client, &ns)?);

    // 6. The servers.
    let resources: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), Quantity(s.cpu.clone())),
        ("memory".to_string(), Quantity(s.memory.clone())),
    ]
    .into();
    let mut env_vars = vec![
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env(ENV_SERVER_NAME, "$(POD_NAME)"),
        env("GOMEMLIMIT", &gomemlimit(s.memory_bytes)),
    ];
    env_vars.extend(auth_env);
    let container = Container {
        name: CONTAINER.into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(env_vars),
        ports: Some(
            [
                ("nats", CLIENT_PORT),
                ("cluster", CLUSTER_PORT),
                ("monitor", MONITOR_PORT),
            ]
            .into_iter()
            .chain(a.websocket.as_ref().map(|w| ("websocket", w.port)))
            .chain(a.leafnodes.as_ref().map(|l| ("leafnodes", l.port)))
            .map(|(name, p)| ContainerPort {
                name: Some(name.to_string()),
                container_port: p as i32,
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect(),
        ),
        resources: Some(ResourceRequirements {
            requests: Some(resources.clone()),
            limits: Some(resources),
            ..Default::default()
        }),
        volume_mounts: Some(
            [
                VolumeMount {
                    name: "config".into(),
                    mount_path: CONFIG_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "pid".into(),
                    mount_path: PID_DIR.into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: n.claim.clone(),
                    mount_path: STORE_DIR.into(),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(a.tls.as_ref().map(|_| VolumeMount {
                name: TLS_VOLUME.into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }))
            .collect(),
        ),
        // Startup: the full check (meta group and assets recovered); readiness: the server
        // alone, so pods become Ready (and reachable) before a quorum exists; liveness: the
        // server with JetStream on, never the meta group, so a lost quorum restarts nothing.
        startup_probe: Some(probe("/healthz", 10, 90, Some(10))),
        readiness_probe: Some(probe("/healthz?js-server-only=true", 10, 3, Some(10))),
        liveness_probe: Some(probe("/healthz?js-enabled-only=true", 30, 3, Some(10))),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "nats-server".into(),
                        format!("--signal=ldm={PID_FILE}"),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // nats.conf, and beside it (projected from the Secret) the routes file it includes.
    let config_volume = match routes_file.as_ref().filter(|_| s.auth.is_some()) {
        None => Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: n.config_map.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Some(_) => Volume {
            name: "config".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: n.config_map.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        secret: Some(SecretProjection {
                            name: n.secret.clone(),
                            items: Some(vec![KeyToPath {
                                key: SECRET_ROUTES.into(),
                                path: SECRET_ROUTES.into(),
                                ..Default::default()
                            }]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let mut spreads = vec![spread("kubernetes.io/hostname", &selector)];
    if s.zone_spread {
        spreads.push(spread("topology.kubernetes.io/zone", &selector));
    }
    let mut pod_annotations = annotations.clone();
    pod_annotations.insert(ANNOTATION_CONFIG.into(), checksum.clone());
    let mut storage_requests = BTreeMap::new();
    storage_requests.insert("storage".to_string(), Quantity(s.storage_size.clone()));
    let mut claim_labels = selector.clone();
    claim_labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    let sts = StatefulSet {
        metadata: meta(&n.stateful_set),
        spec: Some(StatefulSetSpec {
            replicas: Some(s.replicas as i32),
            service_name: Some(n.headless.clone()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(if s.delete_pvcs { "Delete" } else { "Retain" }.into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: [container]
                        .into_iter()
                        .chain(a.tls.as_ref().map(reloader_container))
                        .chain(a.exporter.as_ref().map(|e| exporter_container(a, &e.image)))
                        .collect(),
                    // The reloader signals nats-server, a process of another container.
                    share_process_namespace: a.tls.as_ref().map(|_| true),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECS),
                    topology_spread_constraints: Some(spreads),
                    volumes: Some(
                        [
                            config_volume,
                            Volume {
                                name: "pid".into(),
                                empty_dir: Some(EmptyDirVolumeSource::default()),
                                ..Default::default()
                            },
                        ]
                        .into_iter()
                        .chain(a.tls.as_ref().map(|t| Volume {
                            name: TLS_VOLUME.into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(t.secret_name.clone()),
                                default_mode: Some(0o440),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }))
                        .collect(),
                    ),
                    tolerations: (!a.tolerations.is_empty()).then(|| a.tolerations.clone()),
                    node_selector: (!a.node_selector.is_empty()).then(|| a.node_selector.clone()),
                    affinity: a.affinity.clone(),
                    priority_class_name: a.priority_class_name.clone(),
                    image_pull_secrets: (!a.image_pull_secrets.is_empty()).then(|| {
                        a.image_pull_secrets
                            .iter()
                            .map(|name| LocalObjectReference { name: name.clone() })
                            .collect()
                    }),
                    service_account_name: a.service_account.as_ref().map(|sa| sa.name.clone()),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                // Claim templates cannot change after creation: only labels that never do.
                metadata: ObjectMeta {
                    name: Some(n.claim.clone()),
                    labels: Some(claim_labels),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: s.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(storage_requests),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    objects.push(object(&sts, &n.stateful_set, &ns)?);

    // 7. Voluntary disruptions (node drains) take one pod at a time.
    let pdb = PodDisruptionBudget {
        metadata: meta(&n.pdb),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    objects.push(object(&pdb, &n.pdb, &ns)?);

    // 8. Prometheus (the operator's) scrapes the exporter of every pod.
    if a.exporter.as_ref().is_some_and(|e| e.pod_monitor) {
        objects.push(RenderedObject {
            api_version: "monitoring.coreos.com/v1",
            kind: "PodMonitor",
            name: n.base.clone(),
            namespace: ns.clone(),
            body: addons::pod_monitor(meta_json(&n.base)?, &selector),
        });
    }

    Ok(Rendered {
        in_cluster_url: format!(
            "nats://{}.{}.svc.{}:{CLIENT_PORT}",
            n.client, s.namespace, s.cluster_domain
        ),
        replicas: s.replicas,
        settings: s,
        names: n,
        objects,
        nats_conf: conf,
        config_sha256: checksum,
    })
}

/// One YAML document: the same Value apply sends, so the bytes are what a review sees; every
/// string a YAML 1.1 reader would take for a bool, number or null quoted ([`super::yaml`]).
pub fn to_yaml(o: &RenderedObject) -> Result<String, DriverError> {
    Ok(super::yaml::to_yaml(&o.body))
}

/// Whether the service type exposes the broker outside the cluster.
pub fn external(s: &KubeSettings) -> bool {
    s.service_type != ServiceType::ClusterIp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rendered(name: &str, c: Json) -> Rendered {
        let mut base = json!({"provider": "nats", "deploy_target": "kubernetes", "version": "2.10.29", "replicas": 3});
        for (k, v) in c.as_object().unwrap() {
            base[k] = v.clone();
        }
        let d = BrokerDesired::decode(name, base.to_string().as_bytes()).unwrap();
        render(name, &d, Flavor::Kubernetes).unwrap()
    }

    fn checksum(r: &Rendered) -> Json {
        let sts = r.objects.iter().find(|o| o.kind == "StatefulSet").unwrap();
        sts.body["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG].clone()
    }

    #[test]
    fn objects_come_in_apply_order() {
        let r = rendered("bus", json!({"auth": {"token": "tok"}}));
        let kinds: Vec<&str> = r.objects.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [
                "Secret",
                "ConfigMap",
                "NetworkPolicy",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget"
            ]
        );
        for o in &r.objects {
            assert_eq!(o.body["apiVersion"], json!(o.api_version));
            assert_eq!(o.body["kind"], json!(o.kind));
            assert_eq!(o.body["metadata"]["name"], json!(o.name));
            assert_eq!(o.body["metadata"]["namespace"], json!("default"));
        }
        assert_eq!(
            r.in_cluster_url,
            "nats://bus.default.svc.cluster.local:4222"
        );
        // No auth, no Secret (and no secret env in the pod).
        let r = rendered("bus", json!({}));
        assert_eq!(r.objects[0].kind, "ConfigMap");
        assert!(!r.nats_conf.contains("authorization"));
    }

    #[test]
    fn a_config_or_credential_change_rolls_the_pods() {
        let a = rendered("bus", json!({"auth": {"token": "tokA"}}));
        let b = rendered("bus", json!({"auth": {"token": "tokB"}}));
        assert_eq!(a.nats_conf, b.nats_conf, "the token is never in nats.conf");
        assert_ne!(checksum(&a), checksum(&b));
        let c = rendered(
            "bus",
            json!({"auth": {"token": "tokA"}, "jetstream": {"max_memory_bytes": 1048576}}),
        );
        assert_ne!(checksum(&a), checksum(&c));
        assert_eq!(
            checksum(&a),
            checksum(&rendered("bus", json!({"auth": {"token": "tokA"}})))
        );
        let sts = a.objects.iter().find(|o| o.kind == "StatefulSet").unwrap();
        assert!(!serde_json::to_string(&sts.body).unwrap().contains("tokA"));
    }

    #[test]
    fn two_brokers_in_one_namespace_share_no_object() {
        let a = rendered("bus", json!({}));
        let b = rendered("bus-headless", json!({}));
        for x in &a.objects {
            for y in &b.objects {
                assert!(
                    !(x.kind == y.kind && x.name == y.name),
                    "{} {}",
                    x.kind,
                    x.name
                );
            }
        }
        assert!(!a.nats_conf.contains(&b.names.headless));
    }

    #[test]
    fn a_single_server_has_no_cluster_block() {
        let r = rendered("bus", json!({"replicas": 1}));
        assert!(!r.nats_conf.contains("cluster {"), "{}", r.nats_conf);
        let r = rendered("bus", json!({"replicas": 5}));
        assert_eq!(
            r.nats_conf
                .matches("bus-headless.default.svc.cluster.local:6222")
                .count(),
            5
        );
    }

    /// Issue 19 finding 3: with auth, routes authenticate, and their credentials are only in
    /// the Secret (the ConfigMap includes the file the pods get projected beside nats.conf);
    /// a NetworkPolicy keeps the route port to the broker's own pods.
    #[test]
    fn routes_authenticate_with_credentials_kept_in_the_secret() {
        let r = rendered("bus", json!({"auth": {"token": "tokA"}}));
        let secret = &r.objects[0];
        assert_eq!(secret.kind, "Secret");
        let routes = secret.body["data"][SECRET_ROUTES].as_str().unwrap();
        let routes = String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, routes).unwrap(),
        )
        .unwrap();
        let pw = route_password(&r.settings.auth.clone().unwrap(), "bus");
        assert_eq!(pw.len(), 64);
        assert!(routes.contains(&format!("password: \"{pw}\"")), "{routes}");
        assert_eq!(
            routes.matches(&format!("\"nats://route:{pw}@bus-")).count(),
            3,
            "{routes}"
        );
        for o in &r.objects[1..] {
            let text = o.body.to_string();
            assert!(!text.contains(&pw) && !text.contains("tokA"), "{}", o.kind);
        }
        assert!(
            r.nats_conf.contains("include \"routes.conf\""),
            "{}",
            r.nats_conf
        );
        assert!(
            !r.nats_conf.contains("nats://") && !r.nats_conf.contains("routes:"),
            "no route url in the ConfigMap"
        );
        let sts = r.objects.iter().find(|o| o.kind == "StatefulSet").unwrap();
        let sources = &sts.body["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"];
        assert_eq!(sources[0]["configMap"]["name"], json!("bus-config"));
        assert_eq!(sources[1]["secret"]["name"], json!("bus-auth"));
        assert_eq!(
            sources[1]["secret"]["items"][0]["path"],
            json!(SECRET_ROUTES)
        );
        // Another token, another route password; the same token, the same one.
        let other = rendered("bus", json!({"auth": {"token": "tokB"}}));
        assert_ne!(route_password(&other.settings.auth.unwrap(), "bus"), pw);
        assert_eq!(
            rendered("bus", json!({"auth": {"token": "tokA"}})).objects,
            r.objects
        );

        let np = r
            .objects
            .iter()
            .find(|o| o.kind == "NetworkPolicy")
            .unwrap();
        assert_eq!(np.body["apiVersion"], json!("networking.k8s.io/v1"));
        let spec = &np.body["spec"];
        let own = json!({"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "bus"});
        assert_eq!(spec["podSelector"]["matchLabels"], own);
        assert_eq!(spec["policyTypes"], json!(["Ingress"]));
        let rules = spec["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].get("from").is_none(), "clients from anywhere");
        assert_eq!(rules[0]["ports"][0]["port"], json!(4222));
        assert_eq!(rules[1]["from"][0]["podSelector"]["matchLabels"], own);
        assert_eq!(
            rules[1]["ports"],
            json!([{"port": 6222, "protocol": "TCP"}])
        );

        // One server: no routes, no routes file; without auth, routes listed (nothing secret
        // to derive credentials from), still behind the NetworkPolicy.
        let single = rendered("bus", json!({"auth": {"token": "tokA"}, "replicas": 1}));
        assert!(single.objects[0].body["data"].get(SECRET_ROUTES).is_none());
        let open = rendered("bus", json!({}));
        assert!(open.nats_conf.contains("routes: ["), "{}", open.nats_conf);
        assert!(open.objects.iter().any(|o| o.kind == "NetworkPolicy"));
    }
}

#[cfg(test)]
mod helm_tests {
    use super::*;
    use serde_json::json;

    fn rendered(c: Json) -> Rendered {
        let mut base = json!({"provider": "nats", "deploy_target": "kubernetes", "version": "2.10.29", "replicas": 3});
        for (k, v) in c.as_object().unwrap() {
            base[k] = v.clone();
        }
        let d = BrokerDesired::decode("bus", base.to_string().as_bytes()).unwrap();
        render("bus", &d, Flavor::Kubernetes).unwrap()
    }

    fn kinds(r: &Rendered) -> Vec<&str> {
        r.objects.iter().map(|o| o.kind).collect()
    }

    fn find<'a>(r: &'a Rendered, kind: &str) -> &'a Json {
        &r.objects.iter().find(|o| o.kind == kind).unwrap().body
    }

    #[test]
    fn tls_from_a_secret_covers_clients_and_routes_on_the_mounted_files() {
        let r = rendered(
            json!({"kubernetes": {"tls": {"secret_name": "bus-certs", "verify": true}},
            "tls": {"ca_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "cert_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "key_file": concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")}}),
        );
        let conf = &r.nats_conf;
        assert!(
            conf.contains("tls {\n  cert_file: \"/etc/nats-certs/tls/tls.crt\"\n  key_file: \"/etc/nats-certs/tls/tls.key\"\n  ca_file: \"/etc/nats-certs/tls/ca.crt\"\n  verify: true\n}"),
            "{conf}"
        );
        // Without auth the routes (tls:// urls and the cluster's tls block) are the
        // ConfigMap's routes.conf, beside nats.conf.
        assert!(conf.contains("include \"routes.conf\""), "{conf}");
        let cm = find(&r, "ConfigMap");
        let routes = cm["data"]["routes.conf"].as_str().unwrap();
        assert_eq!(routes.matches("\"tls://bus-").count(), 3, "{routes}");
        assert!(routes.contains("bus-0.bus-headless.default.svc.cluster.local:6222"));
        assert!(routes.contains("tls {\n  cert_file:"), "{routes}");
        assert!(
            !routes.contains("verify"),
            "routes always verify; the key is not needed"
        );
        let pod = &find(&r, "StatefulSet")["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["configMap"]["name"], json!("bus-config"));
        assert_eq!(
            pod["volumes"][2]["secret"]["secretName"],
            json!("bus-certs")
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"][3],
            json!({"name": "tls", "mountPath": "/etc/nats-certs/tls", "readOnly": true})
        );
        let headless = find(&r, "Service");
        assert_eq!(headless["spec"]["ports"][0]["appProtocol"], json!("tls"));
        assert_eq!(headless["spec"]["ports"][1]["appProtocol"], json!("tls"));
        assert!(!kinds(&r).contains(&"Certificate"));

        // With auth the routes file stays in the Secret, now with the tls block.
        let r = rendered(json!({"auth": {"token": "tokA"},
            "kubernetes": {"tls": {"secret_name": "bus-certs", "routes": true}}}));
        let secret = find(&r, "Secret");
        let routes = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            secret["data"][SECRET_ROUTES].as_str().unwrap(),
        )
        .unwrap();
        let routes = String::from_utf8(routes).unwrap();
        assert!(
            routes.contains("@bus-2.bus-headless") && routes.contains("\"tls://route:"),
            "{routes}"
        );
        assert!(routes.contains("tls {"), "{routes}");
        assert!(find(&r, "ConfigMap")["data"].get(SECRET_ROUTES).is_none());

        // Route TLS off: nats:// routes listed in nats.conf; one replica: no routes at all.
        let r = rendered(json!({"kubernetes": {"tls": {"secret_name": "c", "routes": false}}}));
        assert!(r.nats_conf.contains("\"nats://bus-0."), "{}", r.nats_conf);
        let r = rendered(json!({"replicas": 1, "kubernetes": {"tls": {"secret_name": "c"}}}));
        assert!(!r.nats_conf.contains("cluster {") && r.nats_conf.contains("tls {"));
    }

    #[test]
    fn cert_manager_listeners_exporter_and_scheduling_render_like_the_chart() {
        let r = rendered(json!({
            "auth": {"token": "tokA"},
            "kubernetes": {
                "namespace": "ev",
                "tls": {"cert_manager": {"issuer_name": "ca", "issuer_kind": "ClusterIssuer", "dns_names": ["nats.example.com"]}},
                "websocket": {"tls": true}, "leafnodes": {"tls": true, "remotes": ["nats-leaf://hub:7422"]},
                "metrics": {"exporter": true, "pod_monitor": true},
                "tolerations": [{"key": "dedicated", "value": "nats", "effect": "NoSchedule"}],
                "node_selector": {"pool": "nats"}, "priority_class_name": "high",
                "image_pull_secrets": ["regcred"],
                "service_account": {"create": true, "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}}
            }
        }));
        assert_eq!(
            kinds(&r),
            [
                "ServiceAccount",
                "Secret",
                "Certificate",
                "ConfigMap",
                "NetworkPolicy",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget",
                "PodMonitor"
            ]
        );
        let cert = find(&r, "Certificate");
        assert_eq!(cert["spec"]["secretName"], json!("bus-tls"));
        assert_eq!(
            cert["spec"]["issuerRef"],
            json!({"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        let dns: Vec<&str> = cert["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            dns.contains(&"*.bus-headless.ev.svc.cluster.local") && dns.contains(&"bus.ev.svc")
        );
        assert!(dns.contains(&"nats.example.com"));

        let conf = &r.nats_conf;
        assert!(
            conf.contains("websocket {\n  listen: \"0.0.0.0:8080\"\n  tls {"),
            "{conf}"
        );
        assert!(
            conf.contains("leafnodes {\n  listen: \"0.0.0.0:7422\"\n  no_advertise: true\n  tls {"),
            "{conf}"
        );
        assert!(
            conf.contains("remotes: [\n    { url: \"nats-leaf://hub:7422\" }\n  ]"),
            "{conf}"
        );

        let pod = &find(&r, "StatefulSet")["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][2]["secret"]["secretName"], json!("bus-tls"));
        let reloader = &pod["containers"][1];
        assert_eq!(reloader["name"], json!("reloader"));
        assert_eq!(
            reloader["image"],
            json!("natsio/nats-server-config-reloader:0.23.0")
        );
        assert_eq!(
            reloader["args"],
            json!([
                "-pid",
                "/var/run/nats/nats.pid",
                "-config",
                "/etc/nats-certs/tls/tls.crt",
                "-config",
                "/etc/nats-certs/tls/tls.key",
                "-config",
                "/etc/nats-certs/tls/ca.crt"
            ])
        );
        assert_eq!(pod["shareProcessNamespace"], json!(true));
        let exporter = &pod["containers"][2];
        assert_eq!(exporter["name"], json!("prom-exporter"));
        assert_eq!(
            exporter["image"],
            json!("natsio/prometheus-nats-exporter:0.20.1")
        );
        assert_eq!(
            exporter["args"],
            json!([
                "-port=7777",
                "-connz",
                "-routez",
                "-subz",
                "-varz",
                "-prefix=nats",
                "-use_internal_server_id",
                "-jsz=all",
                "-leafz",
                "http://localhost:8222/"
            ])
        );
        assert_eq!(
            exporter["ports"][0],
            json!({"name": "prom-metrics", "containerPort": 7777, "protocol": "TCP"})
        );
        let ports: Vec<&str> = pod["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            ports,
            ["nats", "cluster", "monitor", "websocket", "leafnodes"]
        );
        assert_eq!(pod["tolerations"][0]["key"], json!("dedicated"));
        assert_eq!(pod["nodeSelector"], json!({"pool": "nats"}));
        assert_eq!(pod["priorityClassName"], json!("high"));
        assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(pod["serviceAccountName"], json!("bus"));
        let sa = find(&r, "ServiceAccount");
        assert_eq!(
            sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
            json!("arn:x")
        );

        let client = &r
            .objects
            .iter()
            .filter(|o| o.kind == "Service")
            .nth(1)
            .unwrap()
            .body;
        assert_eq!(
            client["spec"]["ports"],
            json!([
                {"name": "nats", "port": 4222, "targetPort": "nats", "appProtocol": "tls", "protocol": "TCP"},
                {"name": "leafnodes", "port": 7422, "targetPort": "leafnodes", "appProtocol": "tls", "protocol": "TCP"},
                {"name": "websocket", "port": 8080, "targetPort": "websocket", "appProtocol": "https", "protocol": "TCP"}
            ])
        );
        let np = find(&r, "NetworkPolicy");
        let open: Vec<u64> = np["spec"]["ingress"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(open, [4222, 8222, 8080, 7422, 7777]);
        let pm = find(&r, "PodMonitor");
        assert_eq!(pm["apiVersion"], json!("monitoring.coreos.com/v1"));
        assert_eq!(
            pm["spec"]["podMetricsEndpoints"],
            json!([{"port": "prom-metrics"}])
        );
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "bus"})
        );
        // An existing ServiceAccount is referenced, not rendered.
        let r = rendered(json!({"kubernetes": {"service_account": {"name": "nats-sa"}}}));
        assert!(!kinds(&r).contains(&"ServiceAccount"));
        assert_eq!(
            find(&r, "StatefulSet")["spec"]["template"]["spec"]["serviceAccountName"],
            json!("nats-sa")
        );
    }
}
