//! `kubernetes` and `aws.eks` behind the deploy-target seam: the rendered objects are
//! server-side applied through the Kubernetes API, apply waits for the rollout and the JetStream
//! meta cluster, and wfctl's machine reaches the broker through a port-forward (or the client
//! Service's load balancer when there is one).

use super::apply::{self as k8s, Wait};
use super::client::{self, Access, KubeError};
use super::config::{Flavor, KubeAuth, ServiceType, ANNOTATION_CONFIG};
use super::forward::Tunnel;
use super::record::KubeRecord;
use super::render::{render, Rendered, CLIENT_PORT, MONITOR_PORT};
use crate::iac::ctx::Ctx;
use crate::iac::error::DriverError;
use crate::iac::state::{AuthRecord, BrokerRecord, TargetRecord};
use crate::iac::targets::api::{
    label, path_text, Applied, BrokerDesired, BrokerTarget, Platform, Reach,
};
use crate::iac::values::str_field;
use crate::providers::DeployTarget;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct KubernetesTarget(pub Flavor);

pub static KUBERNETES: KubernetesTarget = KubernetesTarget(Flavor::Kubernetes);
pub static AWS_EKS: KubernetesTarget = KubernetesTarget(Flavor::Eks);

/// Compared keys of the view: the shared ones, then this target's.
const KEYS: [&str; 19] = [
    "provider",
    "deploy_target",
    "version",
    "replicas",
    "prevent_destroy",
    "bind",
    "namespace",
    "image",
    "storage_size",
    "storage_class",
    "cpu",
    "memory",
    "max_file_store",
    "max_memory_store",
    "service_type",
    "auth_mode",
    "auth_fingerprint",
    "config_sha256",
    "manifest_sha256",
];
/// A StatefulSet's claim templates cannot change (the API server refuses), and another
/// namespace is another set of objects: these replace the broker (its data goes with it unless
/// the claims are kept).
const REPLACE: [&str; 5] = [
    "provider",
    "deploy_target",
    "namespace",
    "storage_size",
    "storage_class",
];

fn platform_error(what: &str, e: KubeError) -> DriverError {
    DriverError::Platform {
        what: what.to_string(),
        class: e.class(),
        source: Box::new(e),
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every object body as applied: changes with anything rendered (labels, resources, probes ...).
fn manifest_sha256(r: &Rendered) -> String {
    let all: Vec<&Json> = r.objects.iter().map(|o| &o.body).collect();
    sha256_hex(&serde_json::to_string(&all).unwrap_or_default())
}

fn view_of(r: &Rendered) -> Map<String, Json> {
    let s = &r.settings;
    let (mode, fingerprint) = match &s.auth {
        Some(a) => (a.mode(), a.fingerprint()),
        None => ("none", String::new()),
    };
    let mut m = Map::new();
    m.insert("namespace".into(), json!(s.namespace));
    m.insert("image".into(), json!(s.image));
    m.insert("storage_size".into(), json!(s.storage_size));
    m.insert(
        "storage_class".into(),
        json!(s.storage_class.clone().unwrap_or_default()),
    );
    m.insert("cpu".into(), json!(s.cpu));
    m.insert("memory".into(), json!(s.memory));
    m.insert("max_file_store".into(), json!(s.max_file_store));
    m.insert("max_memory_store".into(), json!(s.max_memory_store));
    m.insert("service_type".into(), json!(s.service_type.as_str()));
    m.insert("auth_mode".into(), json!(mode));
    m.insert("auth_fingerprint".into(), json!(fingerprint));
    m.insert("config_sha256".into(), json!(r.config_sha256));
    m.insert("manifest_sha256".into(), json!(manifest_sha256(r)));
    m
}

/// The cluster: the provider's `kubeconfig`, the broker's `kubernetes.context` else the
/// provider's `kube_context`.
fn access(ctx: &Ctx, r: &Rendered) -> Access {
    Access {
        kubeconfig: ctx.provider_str("kubeconfig").map(PathBuf::from),
        context: r
            .settings
            .context
            .clone()
            .or_else(|| ctx.provider_str("kube_context").map(String::from)),
    }
}

fn recorded_access(k: &KubeRecord) -> Access {
    Access {
        kubeconfig: (!k.kubeconfig.is_empty()).then(|| PathBuf::from(&k.kubeconfig)),
        context: (!k.context.is_empty()).then(|| k.context.clone()),
    }
}

fn selector_of(r: &Rendered) -> BTreeMap<String, String> {
    r.objects
        .iter()
        .find(|o| o.kind == "StatefulSet")
        .and_then(|o| o.body.pointer("/spec/selector/matchLabels"))
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default()
}

/// The load balancer's address of the client Service, waited for within the apply's budget.
async fn external_url(c: &kube::Client, ns: &str, svc: &str, w: Wait) -> Result<String, KubeError> {
    let start = Instant::now();
    loop {
        if let Some(s) = k8s::service(c, ns, svc).await? {
            let ingress = s
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress)
                .unwrap_or_default();
            if let Some(addr) = ingress
                .iter()
                .find_map(|i| i.hostname.clone().or_else(|| i.ip.clone()))
            {
                return Ok(format!("nats://{addr}:{CLIENT_PORT}"));
            }
        }
        if start.elapsed() >= w.timeout {
            return Err(KubeError::NotReady {
                what: format!("the load balancer of service {svc} in {ns}"),
                waited: w.timeout,
                state: format!("no ingress address yet (kubectl -n {ns} describe service {svc})"),
            });
        }
        tracing::info!(service = %svc, namespace = %ns, "waiting for the load balancer's address");
        tokio::time::sleep(w.interval).await;
    }
}

impl KubernetesTarget {
    fn deploy_target(&self) -> DeployTarget {
        match self.0 {
            Flavor::Kubernetes => DeployTarget::Kubernetes,
            Flavor::Eks => DeployTarget::AwsEks,
        }
    }

    async fn run_apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
        what: &str,
    ) -> Result<Applied, KubeError> {
        let r = render(name, d, self.0).map_err(|e| KubeError::Invalid(e.to_string()))?;
        let s = &r.settings;
        let ns = s.namespace.clone();
        let acc = access(ctx, &r);
        let c = client::connect(&acc).await?;
        let old = ctx
            .state
            .load()
            .ok()
            .and_then(|st| st.brokers.get(name).cloned())
            .and_then(|b| kube(&b).cloned());
        k8s::ensure_namespace(&c, &ns).await?;
        let bodies: Vec<Json> = r.objects.iter().map(|o| o.body.clone()).collect();
        let applied = k8s::apply_all(&c, &ns, &bodies).await?;
        tracing::info!(broker = %name, namespace = %ns, objects = applied.len(), "objects applied; waiting for the pods");
        // Objects an earlier apply made that this one no longer renders (auth turned off).
        if let Some(o) = old.as_ref().filter(|o| o.namespace == ns) {
            let stale: Vec<_> = o
                .objects
                .iter()
                .filter(|x| !applied.contains(x))
                .cloned()
                .collect();
            k8s::delete_all(&c, &ns, &stale).await?;
        }
        // One budget (kubernetes.ready_timeout) for the rollout, the meta cluster and the
        // load balancer together.
        let w = Wait::from_env(s.ready_timeout);
        let start = Instant::now();
        let left = |w: Wait| Wait {
            timeout: w.timeout.saturating_sub(start.elapsed()),
            ..w
        };
        k8s::wait_rollout(&c, &ns, &r.names.stateful_set, w).await?;
        let selector = selector_of(&r);
        k8s::wait_meta(&c, &ns, &selector, MONITOR_PORT, r.replicas, left(w)).await?;
        let external = match s.service_type {
            ServiceType::LoadBalancer => external_url(&c, &ns, &r.names.client, left(w)).await?,
            _ => String::new(),
        };
        let (token, user, password) = match &s.auth {
            Some(KubeAuth::Token(t)) => (t.expose().to_string(), String::new(), String::new()),
            Some(KubeAuth::UserPassword { user, password }) => {
                (String::new(), user.clone(), password.expose().to_string())
            }
            None => Default::default(),
        };
        let url = if external.is_empty() {
            r.in_cluster_url.clone()
        } else {
            external.clone()
        };
        let kube = KubeRecord {
            kubeconfig: acc
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            context: acc.context.clone().unwrap_or_default(),
            namespace: ns.clone(),
            stateful_set: r.names.stateful_set.clone(),
            client_service: r.names.client.clone(),
            claim: r.names.claim.clone(),
            selector,
            objects: applied,
            delete_pvcs: s.delete_pvcs,
            external_url: external.clone(),
        };
        let mut out = Json::Object(view_of(&r));
        let names = &r.names;
        for (k, v) in [
            ("name", json!(name)),
            ("url", json!(url)),
            ("in_cluster_url", json!(r.in_cluster_url)),
            ("external_url", json!(external)),
            ("stateful_set", json!(names.stateful_set)),
            ("service", json!(names.client)),
            ("headless_service", json!(names.headless)),
            ("config_map", json!(names.config_map)),
            (
                "secret",
                json!(if s.auth.is_some() {
                    names.secret.as_str()
                } else {
                    ""
                }),
            ),
            ("pod_disruption_budget", json!(names.pdb)),
            ("pvc_prefix", json!(names.pvc_prefix)),
            ("cluster_size", json!(r.replicas)),
            ("durable", json!(true)),
            ("delete_pvcs", json!(s.delete_pvcs)),
        ] {
            out[k] = v;
        }
        tracing::info!(broker = %name, %what, namespace = %ns, replicas = r.replicas, "broker ready");
        Ok(Applied {
            record: BrokerRecord {
                target: self.deploy_target(),
                urls: vec![url],
                auth: AuthRecord {
                    token,
                    user,
                    password,
                    // With kubernetes.tls the servers require TLS; the top-level tls says
                    // which CA (and client certificate) this provider connects with.
                    tls_ca_file: path_text(&d.spec.conn.tls_ca_file),
                    tls_cert_file: path_text(&d.spec.conn.tls_cert_file),
                    tls_key_file: path_text(&d.spec.conn.tls_key_file),
                    tls_required: d.spec.conn.tls_required || s.addons.tls.is_some(),
                    ..Default::default()
                },
                replicas: r.replicas,
                connect_timeout_ms: d.spec.conn.connect_timeout.as_millis() as u64,
                request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
                deployed: Some(TargetRecord::Kubernetes(kube)),
                pg: None,
                kafka: None,
                prevent_destroy: d.spec.prevent_destroy,
                bind: d.spec.bind,
                outputs: Json::Null,
            },
            outputs: out,
        })
    }
}

/// Recorded outputs with the compared fields as the cluster has them now.
fn live_outputs(recorded: &Json, set: &k8s_openapi::api::apps::v1::StatefulSet) -> Json {
    let mut o = recorded.clone();
    let spec = set.spec.as_ref();
    if let Some(n) = spec.and_then(|s| s.replicas) {
        o["replicas"] = json!(n);
    }
    let pod = spec.and_then(|s| s.template.spec.as_ref());
    if let Some(image) = pod
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
    {
        o["image"] = json!(image);
    }
    if let Some(sum) = spec
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_CONFIG))
    {
        o["config_sha256"] = json!(sum);
    }
    if let Some(claim) = spec
        .and_then(|s| s.volume_claim_templates.as_ref())
        .and_then(|v| v.first())
        .and_then(|c| c.spec.as_ref())
    {
        if let Some(size) = claim
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
        {
            o["storage_size"] = json!(size.0);
        }
        o["storage_class"] = json!(claim.storage_class_name.clone().unwrap_or_default());
    }
    o
}

#[tonic::async_trait]
impl BrokerTarget for KubernetesTarget {
    fn offer(&self) -> &'static str {
        match self.0 {
            Flavor::Kubernetes => {
                "kubernetes (a durable JetStream cluster as a StatefulSet, through the Kubernetes API)"
            }
            Flavor::Eks => "aws.eks (the same on EKS: gp3 volumes, zone spread)",
        }
    }

    fn check(&self, d: &BrokerDesired) -> Result<(), DriverError> {
        render(&d.spec.name, d, self.0).map(|_| ())
    }

    fn provider_id(&self, name: &str, rec: &BrokerRecord) -> String {
        kube(rec)
            .map(|k| format!("{}/{}", k.namespace, k.stateful_set))
            .unwrap_or_else(|| name.to_string())
    }

    /// The credentials live in the broker's Secret and the provider's state file; keeping them
    /// out of outputs spares wfctl a secrets provider.
    fn credentials_in_outputs(&self) -> bool {
        false
    }

    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&KEYS, &REPLACE)
    }

    fn replicas(&self, d: &BrokerDesired) -> u32 {
        super::config::settings(&d.spec.name, d, self.0)
            .map(|s| s.replicas)
            .unwrap_or(d.spec.replicas)
    }

    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>) {
        if let Ok(r) = render(&d.spec.name, d, self.0) {
            m.extend(view_of(&r));
        }
    }

    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
    ) -> Result<Applied, DriverError> {
        let what = label(name);
        // Config problems surface as the renderer words them.
        render(name, d, self.0)?;
        self.run_apply(ctx, name, d, &what)
            .await
            .map_err(|e| platform_error(&what, e))
    }

    /// A port-forward to the broker's Ready pods, unless the client Service has an external
    /// address, or the provider's `kube_reach: direct` says the recorded urls work from here
    /// (wfctl running inside the cluster).
    async fn reach(
        &self,
        ctx: &Ctx,
        what: &str,
        rec: &BrokerRecord,
    ) -> Result<Option<Reach>, DriverError> {
        let Some(k) = kube(rec) else {
            return Ok(None);
        };
        if !k.external_url.is_empty() || ctx.provider_str("kube_reach") == Some("direct") {
            return Ok(None);
        }
        let c = client::connect(&recorded_access(k))
            .await
            .map_err(|e| platform_error(what, e))?;
        let t = Tunnel::open(c, k.namespace.clone(), k.selector.clone(), CLIENT_PORT)
            .await
            .map_err(|e| platform_error(what, e))?;
        Ok(Some(Reach {
            urls: vec![t.url()],
            guard: Box::new(t),
        }))
    }

    async fn platform(
        &self,
        _ctx: &Ctx,
        what: &str,
        rec: &BrokerRecord,
    ) -> Result<Platform, DriverError> {
        let Some(k) = kube(rec) else {
            return Ok(Platform::Untracked);
        };
        let c = client::connect(&recorded_access(k))
            .await
            .map_err(|e| platform_error(what, e))?;
        match k8s::stateful_set(&c, &k.namespace, &k.stateful_set)
            .await
            .map_err(|e| platform_error(what, e))?
        {
            None => Ok(Platform::Gone),
            Some(set) => Ok(Platform::Live(live_outputs(&rec.outputs, &set))),
        }
    }

    async fn delete(&self, _ctx: &Ctx, what: &str, rec: &BrokerRecord) -> Result<(), DriverError> {
        let (Some(k), false) = (kube(rec), rec.bind) else {
            return Ok(());
        };
        let c = client::connect(&recorded_access(k))
            .await
            .map_err(|e| platform_error(what, e))?;
        k8s::delete_all(&c, &k.namespace, &k.objects)
            .await
            .map_err(|e| platform_error(what, e))?;
        if k.delete_pvcs {
            let gone = k8s::delete_claims(
                &c,
                &k.namespace,
                std::slice::from_ref(&k.claim),
                &k.stateful_set,
            )
            .await
            .map_err(|e| platform_error(what, e))?;
            tracing::info!(namespace = %k.namespace, claims = gone.len(), "broker deleted with its volume claims");
        } else {
            tracing::info!(namespace = %k.namespace, statefulset = %k.stateful_set, url = %str_field(&rec.outputs, "in_cluster_url"),
                "broker deleted; its volume claims are kept (kubernetes.delete_pvcs: true removes them)");
        }
        Ok(())
    }
}

/// What this target applied for a broker (none on another target).
fn kube(rec: &BrokerRecord) -> Option<&KubeRecord> {
    match &rec.deployed {
        Some(TargetRecord::Kubernetes(k)) => Some(k),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_and_namespace_force_a_replace_and_the_rest_updates_in_place() {
        let (keys, force) = KUBERNETES.compared_keys();
        for k in force {
            assert!(keys.contains(k), "{k}");
        }
        for k in ["replicas", "version", "service_type", "config_sha256"] {
            assert!(keys.contains(&k) && !force.contains(&k), "{k}");
        }
        assert!(force.contains(&"storage_class") && force.contains(&"namespace"));
    }

    #[test]
    fn views_show_no_credentials() {
        let d = BrokerDesired::decode(
            "bus",
            br#"{"provider":"nats","deploy_target":"kubernetes","version":"2.10.29","replicas":3,"auth":{"token":"s3cretTok"}}"#,
        )
        .unwrap();
        let mut m = Map::new();
        KUBERNETES.view(&d, &mut m);
        let v = Json::Object(m).to_string();
        assert!(!v.contains("s3cretTok"), "{v}");
        assert!(v.contains("\"auth_mode\":\"token\""), "{v}");
        assert_eq!(KUBERNETES.replicas(&d), 3);
    }
}
