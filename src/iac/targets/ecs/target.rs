//! `aws.ecs` behind the deploy-target seam: apply creates or adopts every AWS resource, starts
//! a new cluster's nodes together, and rolls an existing cluster one node at a time, each
//! waiting for its task and for JetStream to have caught up before the next.

use super::aws::{Aws, AwsError};
use super::config::{settings, EcsSettings, TARGET};
use super::ops::{self, NodeService};
use super::record::EcsRecord;
use super::render::{self, CLIENT_PORT};
use crate::iac::ctx::Ctx;
use crate::iac::error::DriverError;
use crate::iac::state::{AuthRecord, BrokerRecord, TargetRecord};
use crate::iac::targets::api::{label, Applied, BrokerDesired, BrokerTarget, Platform, Reach};
use crate::iac::targets::kubernetes::KubeAuth;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

pub struct AwsEcs;

pub static AWS_ECS: AwsEcs = AwsEcs;

const KEYS: [&str; 23] = [
    "provider",
    "deploy_target",
    "version",
    "replicas",
    "prevent_destroy",
    "bind",
    "region",
    "cluster",
    "vpc_id",
    "subnets",
    "image",
    "cpu",
    "memory",
    "volume_type",
    "volume_size_gib",
    "load_balancer",
    "client_access",
    "max_file_store",
    "max_memory_store",
    "auth_mode",
    "auth_fingerprint",
    "config_sha256",
    "desired_counts",
];
/// Another region, VPC or cluster is another set of resources; a load balancer's scheme
/// cannot change.
const REPLACE: [&str; 6] = [
    "provider",
    "deploy_target",
    "region",
    "vpc_id",
    "cluster",
    "load_balancer",
];

fn platform_error(what: &str, e: AwsError) -> DriverError {
    DriverError::Platform {
        what: what.to_string(),
        class: e.class(),
        source: Box::new(e),
    }
}

fn sha256_hex(s: &str) -> String {
    super::config::hex(&Sha256::digest(s.as_bytes()))
}

/// Every node's config and the credentials' fingerprint: changes with anything that rolls
/// the nodes.
fn config_sha256(broker: &str, s: &EcsSettings) -> String {
    let mut all = String::new();
    for i in 0..s.replicas {
        all.push_str(&render::nats_conf(broker, s, i));
        all.push_str(&render::command(s, i));
    }
    all.push_str(&auth_fingerprint(s));
    sha256_hex(&all)
}

fn auth_fingerprint(s: &EcsSettings) -> String {
    s.auth.as_ref().map(|a| a.fingerprint()).unwrap_or_default()
}

fn desired_counts(n: u32) -> String {
    vec!["1"; n as usize].join(",")
}

fn view_of(broker: &str, s: &EcsSettings) -> Map<String, Json> {
    let mut m = Map::new();
    let mut access: Vec<String> = s.client_cidrs.clone();
    access.extend(s.client_security_groups.iter().cloned());
    for (k, v) in [
        ("region", json!(s.region.clone().unwrap_or_default())),
        ("cluster", json!(s.cluster)),
        ("vpc_id", json!(s.vpc_id)),
        ("subnets", json!(s.subnets.join(","))),
        ("image", json!(s.image)),
        ("cpu", json!(s.cpu)),
        ("memory", json!(s.memory)),
        ("volume_type", json!(s.storage.kind())),
        ("volume_size_gib", json!(s.storage.size_gib())),
        ("load_balancer", json!(s.load_balancer.as_str())),
        ("client_access", json!(access.join(","))),
        ("max_file_store", json!(s.max_file_store)),
        ("max_memory_store", json!(s.max_memory_store)),
        (
            "auth_mode",
            json!(s.auth.as_ref().map(KubeAuth::mode).unwrap_or("none")),
        ),
        ("auth_fingerprint", json!(auth_fingerprint(s))),
        ("config_sha256", json!(config_sha256(broker, s))),
        ("desired_counts", json!(desired_counts(s.replicas))),
    ] {
        m.insert(k.into(), v);
    }
    m
}

/// Where this machine reaches the broker: the provider's `aws_reach` (a tunnel), else the
/// load balancer, else the in-VPC names (wfctl runs inside the VPC).
fn reach_url(ctx: &Ctx, lb_url: &str, in_vpc: &str) -> String {
    ctx.provider_str("aws_reach")
        .map(str::to_string)
        .unwrap_or_else(|| {
            if lb_url.is_empty() {
                in_vpc.to_string()
            } else {
                lb_url.to_string()
            }
        })
}

async fn connect_nats(url: &str, auth: &Option<KubeAuth>) -> Result<async_nats::Client, String> {
    let opts = match auth {
        Some(KubeAuth::Token(t)) => async_nats::ConnectOptions::with_token(t.expose().to_string()),
        Some(KubeAuth::UserPassword { user, password }) => {
            async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                password.expose().to_string(),
            )
        }
        None => async_nats::ConnectOptions::new(),
    };
    let servers: Vec<&str> = url.split(',').collect();
    tokio::time::timeout(
        Duration::from_secs(5),
        opts.connection_timeout(Duration::from_secs(3))
            .connect(servers.as_slice()),
    )
    .await
    .map_err(|_| format!("no answer from {url}"))?
    .map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// A node whose task was just replaced: its `server_name`, and when the new task was ready.
#[derive(Clone, Copy)]
struct Replaced<'a> {
    node: &'a str,
    ready_at: Instant,
}

/// One look at the cluster through `url`: the JetStream API answers (the meta group has a
/// leader) and every stream has a leader and every replica current and online. With
/// `replaced`, that node must also lead each of its streams or have been heard from by the
/// leader since its new task was ready: a leader reports a replica by what it last heard,
/// so until it hears from the new (empty) task it may still call it current, and replacing
/// the next node then could leave a quorum without the data.
async fn jetstream_state(
    url: &str,
    auth: &Option<KubeAuth>,
    replaced: Option<Replaced<'_>>,
) -> Result<(), String> {
    use futures::StreamExt;
    let c = connect_nats(url, auth).await?;
    let js = async_nats::jetstream::new(c);
    tokio::time::timeout(Duration::from_secs(5), js.query_account())
        .await
        .map_err(|_| "the JetStream API does not answer yet (no meta leader)".to_string())?
        .map_err(|e| format!("the JetStream API does not answer yet: {e}"))?;
    let mut names = js.stream_names();
    let mut lagging = Vec::new();
    while let Some(n) = tokio::time::timeout(Duration::from_secs(5), names.next())
        .await
        .map_err(|_| "listing streams timed out".to_string())?
    {
        let n = n.map_err(|e| format!("listing streams: {e}"))?;
        let info = tokio::time::timeout(Duration::from_secs(5), js.get_stream(&n))
            .await
            .map_err(|_| format!("stream {n}: no answer"))?
            .map_err(|e| format!("stream {n}: {e}"))?
            .cached_info()
            .clone();
        let Some(cl) = info.cluster else { continue };
        if cl.leader.as_deref().unwrap_or_default().is_empty() {
            lagging.push(format!("{n} has no leader"));
        }
        for r in &cl.replicas {
            if !r.current || r.offline || r.lag.unwrap_or(0) > 0 {
                lagging.push(format!(
                    "{n} on {} is {}",
                    r.name,
                    if r.offline { "offline" } else { "catching up" }
                ));
            } else if let Some(x) = replaced.filter(|x| x.node == r.name) {
                if r.active >= x.ready_at.elapsed() {
                    lagging.push(format!(
                        "{n} on {} not yet heard from since its replacement",
                        r.name
                    ));
                }
            }
        }
    }
    if lagging.is_empty() {
        Ok(())
    } else {
        Err(lagging.join(", "))
    }
}

/// How long the JetStream state must hold after a node's replacement: the stream leaders see
/// the new (empty) task, and report it behind, only at their next exchange with it, so a good
/// look right after it started proves nothing.
fn stable_window() -> Duration {
    std::env::var("EVENTBUS_ECS_STABLE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10))
}

/// Waits until [`jetstream_state`] holds on every look for `stable` (at least two looks).
async fn wait_jetstream(
    url: &str,
    auth: &Option<KubeAuth>,
    timeout: Duration,
    poll: Duration,
    stable: Duration,
    replaced: Option<Replaced<'_>>,
) -> Result<(), AwsError> {
    let start = Instant::now();
    let mut good_since: Option<Instant> = None;
    let mut looks = 0;
    loop {
        match jetstream_state(url, auth, replaced).await {
            Ok(()) => {
                let since = *good_since.get_or_insert_with(Instant::now);
                looks += 1;
                if looks >= 2 && since.elapsed() >= stable {
                    return Ok(());
                }
            }
            Err(state) => {
                good_since = None;
                looks = 0;
                if start.elapsed() >= timeout {
                    return Err(AwsError::NotReady {
                        what: format!(
                            "the JetStream cluster at {}",
                            crate::iac::targets::strip_userinfo(url)
                        ),
                        waited: timeout,
                        state: format!("{state} (set the provider's aws_reach to a tunnel into the VPC if this machine cannot reach it)"),
                    });
                }
                tracing::info!(%state, "waiting for JetStream");
            }
        }
        tokio::time::sleep(poll.min(Duration::from_secs(1))).await;
    }
}

impl AwsEcs {
    async fn run_apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
        s: &EcsSettings,
    ) -> Result<Applied, AwsError> {
        let aws = Aws::connect(s.region.as_deref(), s.endpoint_url.as_deref()).await?;
        let poll = ops::poll_interval();
        let old = ctx
            .state
            .load()
            .ok()
            .and_then(|st| st.brokers.get(name).cloned())
            .and_then(|b| ecs(&b).cloned());
        let (cluster_arn, created) = ops::ensure_cluster(&aws, s).await?;
        let cluster_created = created
            || old
                .as_ref()
                .is_some_and(|o| o.cluster_created && o.cluster == s.cluster);
        ops::ensure_log_group(&aws, s).await?;
        let sg = ops::ensure_security_group(&aws, s).await?;
        let secret_arn = match render::secret(s) {
            Some(v) => Some(ops::ensure_secret(&aws, s, &v).await?),
            None => None,
        };
        let namespace_id = ops::ensure_namespace(&aws, s, poll).await?;
        let mut registries = Vec::new();
        for i in 0..s.replicas {
            registries.push(ops::ensure_discovery(&aws, s, &namespace_id, i).await?);
        }
        let lb = ops::ensure_load_balancer(&aws, s, &sg).await?;
        let lb_url = lb
            .as_ref()
            .map(|b| format!("nats://{}:{CLIENT_PORT}", b.dns))
            .unwrap_or_default();
        let in_vpc = render::in_vpc_url(s);
        let url = reach_url(ctx, &lb_url, &in_vpc);

        let names: Vec<String> = (0..s.replicas).map(|i| s.names.service(i)).collect();
        let mut task_defs = Vec::new();
        for i in 0..s.replicas {
            let t = render::node_task(name, s, i, secret_arn.as_deref(), &aws.region)
                .map_err(AwsError::Conflict)?;
            task_defs.push(ops::register_task(&aws, s, &t).await?);
        }
        let now = ops::services(&aws, &s.cluster, &names).await?;
        let mut arns = vec![String::new(); names.len()];
        let mut fresh = Vec::new();
        for (i, current) in now.iter().enumerate() {
            if current.is_none() {
                let n = NodeService {
                    name: names[i].clone(),
                    task_definition: &task_defs[i],
                    registry_arn: &registries[i],
                    security_group: &sg,
                    target_group: lb.as_ref().map(|b| b.target_group.as_str()),
                };
                arns[i] = ops::create_service(&aws, s, &n).await?;
                fresh.push(i);
            }
        }
        let task_ready = |i: usize| {
            ops::wait_task(
                &aws,
                &s.cluster,
                &names[i],
                &task_defs[i],
                s.ready_timeout,
                poll,
            )
        };
        // A new cluster's nodes start together: a lone node has no meta quorum to wait for.
        for &i in &fresh {
            task_ready(i).await?;
        }
        let t0 = Instant::now();
        if !fresh.is_empty() {
            wait_jetstream(&url, &s.auth, s.ready_timeout, poll, Duration::ZERO, None).await?;
            tracing::info!(broker = %name, nodes = fresh.len(), waited_ms = t0.elapsed().as_millis() as u64, "new nodes joined");
        }
        // Existing nodes whose definition or count changed roll one at a time.
        for (i, current) in now.iter().enumerate() {
            let Some(cur) = current else { continue };
            arns[i] = cur.arn.clone();
            if cur.task_definition == task_defs[i] && cur.desired == 1 {
                continue;
            }
            tracing::info!(broker = %name, node = i, "rolling node");
            ops::update_service(&aws, &s.cluster, &names[i], &task_defs[i]).await?;
            task_ready(i).await?;
            let node = s.names.node(i as u32);
            let replaced = Replaced {
                node: &node,
                ready_at: Instant::now(),
            };
            wait_jetstream(
                &url,
                &s.auth,
                s.ready_timeout,
                poll,
                stable_window(),
                Some(replaced),
            )
            .await?;
            tracing::info!(broker = %name, node = i, "node replaced and caught up");
        }
        // Nodes a smaller replica count no longer has (their task definitions stay recorded
        // for delete).
        if let Some(o) = &old {
            let extra: Vec<String> = o
                .services
                .iter()
                .filter(|x| !names.contains(x))
                .cloned()
                .collect();
            if !extra.is_empty() {
                let gone = EcsRecord {
                    cluster: o.cluster.clone(),
                    services: extra,
                    ..Default::default()
                };
                ops::delete_all(&aws, &gone).await?;
            }
        }
        let mut all_task_defs = task_defs.clone();
        if let Some(o) = &old {
            for t in &o.task_definitions {
                if !all_task_defs.contains(t) && !task_defs.iter().any(|x| same_family(x, t)) {
                    all_task_defs.push(t.clone());
                }
            }
        }
        let rec = EcsRecord {
            region: aws.region.clone(),
            endpoint_url: s.endpoint_url.clone().unwrap_or_default(),
            cluster: s.cluster.clone(),
            cluster_created,
            services: names.clone(),
            discovery_services: registries,
            task_definitions: all_task_defs,
            namespace_id: namespace_id.clone(),
            security_group_id: sg.clone(),
            load_balancer_arn: lb.as_ref().map(|b| b.arn.clone()).unwrap_or_default(),
            target_group_arn: lb
                .as_ref()
                .map(|b| b.target_group.clone())
                .unwrap_or_default(),
            listener_arn: lb.as_ref().map(|b| b.listener.clone()).unwrap_or_default(),
            secret_arn: secret_arn.clone().unwrap_or_default(),
            log_group: s.names.log_group.clone(),
            lb_url: lb_url.clone(),
        };
        let primary = if lb_url.is_empty() {
            in_vpc.clone()
        } else {
            lb_url.clone()
        };
        let mut out = Json::Object(view_of(name, s));
        for (k, v) in [
            ("name", json!(name)),
            ("target", json!(TARGET)),
            ("url", json!(primary)),
            ("in_vpc_url", json!(in_vpc)),
            (
                "load_balancer_dns",
                json!(lb.as_ref().map(|b| b.dns.clone()).unwrap_or_default()),
            ),
            ("cluster_arn", json!(cluster_arn)),
            ("service_arns", json!(arns.join(","))),
            ("task_definition_arns", json!(task_defs.join(","))),
            ("namespace_id", json!(namespace_id)),
            ("security_group_id", json!(sg)),
            ("secret_arn", json!(secret_arn.unwrap_or_default())),
            ("log_group", json!(s.names.log_group)),
            (
                "server_names",
                json!((0..s.replicas)
                    .map(|i| s.names.node(i))
                    .collect::<Vec<_>>()
                    .join(",")),
            ),
            ("cluster_size", json!(s.replicas)),
            (
                "durable",
                json!(s.replicas > 1 || s.storage.survives_task()),
            ),
        ] {
            out[k] = v;
        }
        let (token, user, password) = match &s.auth {
            Some(KubeAuth::Token(t)) => (t.expose().to_string(), String::new(), String::new()),
            Some(KubeAuth::UserPassword { user, password }) => {
                (String::new(), user.clone(), password.expose().to_string())
            }
            None => Default::default(),
        };
        tracing::info!(broker = %name, replicas = s.replicas, url = %primary, "broker ready");
        Ok(Applied {
            record: BrokerRecord {
                target: crate::providers::DeployTarget::AwsEcs,
                urls: vec![primary],
                auth: AuthRecord {
                    token,
                    user,
                    password,
                    ..Default::default()
                },
                replicas: s.replicas,
                connect_timeout_ms: d.spec.conn.connect_timeout.as_millis() as u64,
                request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
                deployed: Some(TargetRecord::Ecs(rec)),
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

fn same_family(a: &str, b: &str) -> bool {
    let fam = |x: &str| {
        x.rsplit('/')
            .next()
            .and_then(|f| f.rsplit_once(':'))
            .map(|(f, _)| f.to_string())
    };
    fam(a).is_some() && fam(a) == fam(b)
}

async fn recorded_aws(r: &EcsRecord) -> Result<Aws, AwsError> {
    Aws::connect(
        Some(r.region.as_str()).filter(|x| !x.is_empty()),
        Some(r.endpoint_url.as_str()).filter(|x| !x.is_empty()),
    )
    .await
}

#[tonic::async_trait]
impl BrokerTarget for AwsEcs {
    fn offer(&self) -> &'static str {
        "aws.ecs (a JetStream cluster as one Fargate service per node, through the AWS APIs)"
    }

    fn check(&self, d: &BrokerDesired) -> Result<(), DriverError> {
        settings(d).map(|_| ())
    }

    fn provider_id(&self, name: &str, rec: &BrokerRecord) -> String {
        ecs(rec)
            .map(|e| format!("{}/{}", e.cluster, name))
            .unwrap_or_else(|| name.to_string())
    }

    /// The credentials live in Secrets Manager and the provider's state file; keeping them
    /// out of outputs spares wfctl a secrets provider.
    fn credentials_in_outputs(&self) -> bool {
        false
    }

    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&KEYS, &REPLACE)
    }

    fn replicas(&self, d: &BrokerDesired) -> u32 {
        d.spec.replicas
    }

    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>) {
        if let Ok(s) = settings(d) {
            m.extend(view_of(&d.spec.name, &s));
        }
    }

    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
    ) -> Result<Applied, DriverError> {
        let what = label(name);
        let s = settings(d)?;
        self.run_apply(ctx, name, d, &s)
            .await
            .map_err(|e| platform_error(&what, e))
    }

    async fn reach(
        &self,
        ctx: &Ctx,
        _what: &str,
        rec: &BrokerRecord,
    ) -> Result<Option<Reach>, DriverError> {
        if ecs(rec).is_none() {
            return Ok(None);
        }
        Ok(ctx.provider_str("aws_reach").map(|u| Reach {
            urls: u.split(',').map(str::to_string).collect(),
            guard: Box::new(()),
        }))
    }

    /// GONE when a node's service is missing (deleted out of band); otherwise the recorded
    /// outputs with the desired counts and definitions as ECS has them now.
    async fn platform(
        &self,
        _ctx: &Ctx,
        what: &str,
        rec: &BrokerRecord,
    ) -> Result<Platform, DriverError> {
        let Some(e) = ecs(rec) else {
            return Ok(Platform::Untracked);
        };
        let aws = recorded_aws(e).await.map_err(|x| platform_error(what, x))?;
        let now = ops::services(&aws, &e.cluster, &e.services)
            .await
            .map_err(|x| platform_error(what, x))?;
        if now.iter().any(Option::is_none) {
            return Ok(Platform::Gone);
        }
        let mut o = rec.outputs.clone();
        let counts: Vec<String> = now
            .iter()
            .flatten()
            .map(|x| x.desired.to_string())
            .collect();
        o["desired_counts"] = json!(counts.join(","));
        let recorded: Vec<&str> =
            crate::iac::values::str_field(&rec.outputs, "task_definition_arns")
                .split(',')
                .collect();
        let live: Vec<String> = now
            .iter()
            .flatten()
            .map(|x| x.task_definition.clone())
            .collect();
        if live.iter().zip(recorded.iter()).any(|(l, r)| l != r) {
            o["config_sha256"] = json!(format!("changed out of band: {}", live.join(",")));
            o["task_definition_arns"] = json!(live.join(","));
        }
        Ok(Platform::Live(o))
    }

    async fn delete(&self, _ctx: &Ctx, what: &str, rec: &BrokerRecord) -> Result<(), DriverError> {
        let (Some(e), false) = (ecs(rec), rec.bind) else {
            return Ok(());
        };
        let aws = recorded_aws(e).await.map_err(|x| platform_error(what, x))?;
        ops::delete_all(&aws, e)
            .await
            .map_err(|x| platform_error(what, x))?;
        tracing::info!(cluster = %e.cluster, services = e.services.len(), "broker deleted");
        Ok(())
    }
}

/// What this target made for a broker (none on another target).
fn ecs(rec: &BrokerRecord) -> Option<&EcsRecord> {
    match &rec.deployed {
        Some(TargetRecord::Ecs(e)) => Some(e),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_force_replace_only_for_identity() {
        let (keys, force) = AWS_ECS.compared_keys();
        for k in force {
            assert!(keys.contains(k), "{k}");
        }
        for k in [
            "version",
            "replicas",
            "cpu",
            "config_sha256",
            "desired_counts",
        ] {
            assert!(keys.contains(&k) && !force.contains(&k), "{k}");
        }
    }
}
