//! The `aws:` section of a broker config for `aws.ecs`, validated, with defaults applied and
//! the AWS resource names derived from the broker name. Pure: no I/O.

use crate::iac::error::DriverError;
use crate::iac::kind::BROKER_TYPE;
use crate::iac::targets::api::BrokerDesired;
use crate::iac::targets::kubernetes::{name_base, KubeAuth};
use crate::iac::values::config_problems;
use crate::secret::quote;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

pub const TARGET: &str = "aws.ecs";
pub const DEFAULT_CPU: &str = "1024";
pub const DEFAULT_MEMORY: &str = "2048";
pub const DEFAULT_VOLUME_GIB: u32 = 20;
/// Fargate's task ephemeral storage range.
pub const EPHEMERAL_GIB: std::ops::RangeInclusive<u32> = 21..=200;
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_LOG_RETENTION_DAYS: i32 = 14;
/// The retention periods CloudWatch Logs accepts.
pub const LOG_RETENTION_DAYS: [i32; 22] = [
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
];
pub const REPLICAS: [u32; 3] = [1, 3, 5];
/// Tag keys every created resource carries; user tags may not override them.
pub const TAG_MANAGED_BY: &str = "managed-by";
pub const TAG_BROKER: &str = "eventbus-broker";
pub const MANAGED_BY: &str = "workflow-plugin-eventbus";
/// EBS volume types ECS can manage for a task that suit a JetStream store.
pub const EBS_TYPES: [&str; 4] = ["gp3", "gp2", "io1", "io2"];

/// Where a node's JetStream store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// An EBS volume ECS creates with each task and deletes with it.
    Ebs {
        volume_type: String,
        size_gib: u32,
        role_arn: String,
    },
    /// The task's own ephemeral storage.
    Ephemeral { size_gib: u32 },
    /// A directory per node on an EFS file system (NFS: unsupported by the NATS team).
    Efs { file_system_id: String },
}

impl Storage {
    pub fn kind(&self) -> &str {
        match self {
            Storage::Ebs { volume_type, .. } => volume_type,
            Storage::Ephemeral { .. } => "ephemeral",
            Storage::Efs { .. } => "efs",
        }
    }

    pub fn size_gib(&self) -> u32 {
        match self {
            Storage::Ebs { size_gib, .. } | Storage::Ephemeral { size_gib } => *size_gib,
            Storage::Efs { .. } => 0,
        }
    }

    /// Whether a node's store outlives its task.
    pub fn survives_task(&self) -> bool {
        matches!(self, Storage::Efs { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    Internal,
    None,
    Public,
}

impl LoadBalancer {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancer::Internal => "internal",
            LoadBalancer::None => "none",
            LoadBalancer::Public => "public",
        }
    }

    fn parse(s: &str) -> Option<LoadBalancer> {
        match s.to_ascii_lowercase().as_str() {
            "" | "internal" => Some(LoadBalancer::Internal),
            "none" => Some(LoadBalancer::None),
            "public" | "internet-facing" => Some(LoadBalancer::Public),
            _ => None,
        }
    }
}

/// AWS names of one broker's resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcsNames {
    pub base: String,
    /// Cloud Map private DNS namespace: `<base>.nats.local`.
    pub namespace: String,
    pub security_group: String,
    /// Network Load Balancer and target group (32 characters at most).
    pub load_balancer: String,
    pub target_group: String,
    pub secret: String,
    pub log_group: String,
}

impl EcsNames {
    pub fn new(broker: &str) -> EcsNames {
        let base = name_base(broker);
        let short = short_name(&base, 27);
        EcsNames {
            namespace: format!("{base}.nats.local"),
            security_group: format!("{base}-nats"),
            load_balancer: format!("{short}-nats"),
            target_group: format!("{short}-4222"),
            secret: format!("eventbus/{base}/nats-auth"),
            log_group: format!("/eventbus/{base}/nats"),
            base,
        }
    }

    /// A node's `server_name`, and its Cloud Map service (`nats-<i>.<namespace>`).
    pub fn node(&self, i: u32) -> String {
        format!("nats-{i}")
    }

    /// A node's ECS service and task definition family.
    pub fn service(&self, i: u32) -> String {
        format!("{}-nats-{i}", self.base)
    }

    /// A node's route and in-VPC host name.
    pub fn host(&self, i: u32) -> String {
        format!("{}.{}", self.node(i), self.namespace)
    }
}

/// `base` when it fits `max`, else a prefix and a hash of the whole (load balancer and target
/// group names are 32 characters at most).
fn short_name(base: &str, max: usize) -> String {
    if base.len() <= max {
        return base.to_string();
    }
    let digest = Sha256::digest(base.as_bytes());
    let head = base[..max - 7].trim_end_matches('-');
    format!("{head}-{}", hex(&digest[..3]))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The validated `aws:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct EcsSettings {
    pub names: EcsNames,
    pub replicas: u32,
    pub version: String,
    pub image: String,
    /// `None` = the AWS chain's region.
    pub region: Option<String>,
    pub cluster: String,
    pub vpc_id: String,
    pub subnets: Vec<String>,
    pub execution_role_arn: String,
    pub task_role_arn: Option<String>,
    pub cpu: String,
    pub memory: String,
    pub memory_mib: i64,
    pub storage: Storage,
    pub load_balancer: LoadBalancer,
    pub client_cidrs: Vec<String>,
    pub client_security_groups: Vec<String>,
    /// User tags plus ours.
    pub tags: BTreeMap<String, String>,
    pub endpoint_url: Option<String>,
    pub ready_timeout: Duration,
    pub log_retention_days: i32,
    pub max_file_store: i64,
    pub max_memory_store: i64,
    pub auth: Option<KubeAuth>,
}

fn id_ok(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|h| {
        (8..=17).contains(&h.len())
            && h.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

fn role_arn_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace))
}

fn region_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

fn cidr_ok(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}

/// Fargate's CPU/memory pairs: memory (MiB) allowed for each CPU size.
fn fargate_memory_ok(cpu: u32, mem: i64) -> Option<bool> {
    let (lo, hi, step) = match cpu {
        256 => return Some([512, 1024, 2048].contains(&mem)),
        512 => (1024, 4096, 1024),
        1024 => (2048, 8192, 1024),
        2048 => (4096, 16384, 1024),
        4096 => (8192, 30720, 1024),
        8192 => (16384, 61440, 4096),
        16384 => (32768, 122880, 8192),
        _ => return None,
    };
    Some((lo..=hi).contains(&mem) && mem % step == 0)
}

fn tag_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

/// Every problem of the `aws:` section (and the broker fields this target constrains), one
/// `field: message` line each.
pub fn validate(d: &BrokerDesired) -> Result<EcsSettings, Vec<String>> {
    let mut p: Vec<String> = Vec::new();
    let mut field = |f: &str, m: String| p.push(format!("{f}: {m}"));
    let c = &d.config;
    let a = c.aws.clone().unwrap_or_default();
    let name = &d.spec.name;

    let replicas = d.spec.replicas;
    if !REPLICAS.contains(&replicas) {
        field(
            "replicas",
            format!(
                "{replicas} is not possible on {TARGET}: use 1, 3 or 5 (a JetStream cluster needs a majority of its \
                 servers; {replicas} nodes tolerate no more lost nodes than {} would)",
                replicas.saturating_sub(1)
            ),
        );
    }

    let version = c.version.trim().trim_start_matches('v').to_string();
    let image = if !a.image.is_empty() {
        if a.image.chars().any(char::is_whitespace) {
            field(
                "aws.image",
                format!("{} is not an image reference", quote(&a.image)),
            );
        }
        a.image.clone()
    } else if version.is_empty() || version == "latest" {
        field(
            "version",
            format!(
                "is required for {TARGET} (it picks the nats:<version>-alpine image); pin a release such as \
                 \"2.10.29\", or set aws.image"
            ),
        );
        String::new()
    } else {
        format!("nats:{version}-alpine")
    };

    let region = match (a.region.trim(), c.region.trim()) {
        ("", "") => None,
        (r, top) if !r.is_empty() && !top.is_empty() && r != top => {
            field(
                "aws.region",
                format!(
                    "{} differs from region {}; set one of them",
                    quote(r),
                    quote(top)
                ),
            );
            None
        }
        (r, top) => Some(if r.is_empty() { top } else { r }.to_string()),
    };
    if let Some(r) = &region {
        if !region_ok(r) {
            field(
                "aws.region",
                format!("{} is not an AWS region such as us-east-1", quote(r)),
            );
        }
    }

    let cluster = if a.cluster.is_empty() {
        name_base(name)
    } else {
        a.cluster.clone()
    };
    if cluster.is_empty()
        || cluster.len() > 255
        || !cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        field(
            "aws.cluster",
            format!(
                "{} is not an ECS cluster name (1-255 of A-Z a-z 0-9 - _)",
                quote(&cluster)
            ),
        );
    }

    if a.vpc_id.is_empty() {
        field(
            "aws.vpc_id",
            "is required (the VPC the broker's tasks run in, vpc-...)".into(),
        );
    } else if !id_ok(&a.vpc_id, "vpc-") {
        field(
            "aws.vpc_id",
            format!(
                "{} is not a VPC id (vpc- and 8 or 17 hex digits)",
                quote(&a.vpc_id)
            ),
        );
    }
    if a.subnets.is_empty() {
        field(
            "aws.subnets",
            "is required: the private subnets of aws.vpc_id the tasks and the load balancer use, ideally one per \
             availability zone"
                .into(),
        );
    }
    for s in &a.subnets {
        if !id_ok(s, "subnet-") {
            field(
                "aws.subnets",
                format!(
                    "{} is not a subnet id (subnet- and 8 or 17 hex digits)",
                    quote(s)
                ),
            );
        }
    }
    if a.execution_role_arn.is_empty() {
        field(
            "aws.execution_role_arn",
            "is required: an IAM role ARN (arn:aws:iam::<account>:role/<name>) ECS uses to pull the image, read the \
             broker's secret (secretsmanager:GetSecretValue) and write its logs (logs:CreateLogStream, PutLogEvents)"
                .into(),
        );
    } else if !role_arn_ok(&a.execution_role_arn) {
        field(
            "aws.execution_role_arn",
            format!(
                "{} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
                quote(&a.execution_role_arn)
            ),
        );
    }
    let task_role_arn = (!a.task_role_arn.is_empty()).then(|| a.task_role_arn.clone());
    if let Some(r) = &task_role_arn {
        if !role_arn_ok(r) {
            field(
                "aws.task_role_arn",
                format!(
                    "{} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
                    quote(r)
                ),
            );
        }
    }

    let cpu = if a.cpu.is_empty() {
        DEFAULT_CPU.to_string()
    } else {
        a.cpu.clone()
    };
    let memory = if a.memory.is_empty() {
        DEFAULT_MEMORY.to_string()
    } else {
        a.memory.clone()
    };
    let memory_mib = memory.parse::<i64>().unwrap_or(0);
    match cpu.parse::<u32>().ok().and_then(|n| fargate_memory_ok(n, memory_mib)) {
        None => field(
            "aws.cpu",
            format!("{} is not a Fargate CPU size; use 256, 512, 1024, 2048, 4096, 8192 or 16384", quote(&cpu)),
        ),
        Some(false) => field(
            "aws.memory",
            format!(
                "{} (MiB) does not go with aws.cpu {cpu} on Fargate; e.g. cpu 1024 takes 2048..8192 in steps of 1024",
                quote(&memory)
            ),
        ),
        Some(true) => {}
    }

    let volume_type = if a.volume_type.is_empty() {
        "gp3".to_string()
    } else {
        a.volume_type.to_ascii_lowercase()
    };
    let size = |default: u32| {
        if a.volume_size_gib == 0 {
            default
        } else {
            a.volume_size_gib.max(0) as u32
        }
    };
    let storage = if EBS_TYPES.contains(&volume_type.as_str()) {
        let size_gib = size(DEFAULT_VOLUME_GIB);
        let min = if volume_type.starts_with("io") { 4 } else { 1 };
        if a.volume_size_gib < 0 || !(min..=16384).contains(&size_gib) {
            field(
                "aws.volume_size_gib",
                format!("{} is not a {volume_type} volume size; use {min}..=16384 (0 = {DEFAULT_VOLUME_GIB})", a.volume_size_gib),
            );
        }
        if a.infrastructure_role_arn.is_empty() {
            field(
                "aws.infrastructure_role_arn",
                format!(
                    "is required with aws.volume_type {volume_type}: ECS creates each task's volume with this role \
                     (the AWS managed policy AmazonECSInfrastructureRolePolicyForVolumes)"
                ),
            );
        } else if !role_arn_ok(&a.infrastructure_role_arn) {
            field(
                "aws.infrastructure_role_arn",
                format!(
                    "{} is not an IAM role ARN",
                    quote(&a.infrastructure_role_arn)
                ),
            );
        }
        Storage::Ebs {
            volume_type: volume_type.clone(),
            size_gib,
            role_arn: a.infrastructure_role_arn.clone(),
        }
    } else if volume_type == "ephemeral" {
        let size_gib = size(*EPHEMERAL_GIB.start());
        if a.volume_size_gib < 0 || !EPHEMERAL_GIB.contains(&size_gib) {
            field(
                "aws.volume_size_gib",
                format!(
                    "{} is not a Fargate ephemeral storage size; use 21..=200 (0 = 21)",
                    a.volume_size_gib
                ),
            );
        }
        Storage::Ephemeral { size_gib }
    } else if volume_type == "efs" {
        if !a.acknowledge_nfs_unsupported {
            field(
                "aws.acknowledge_nfs_unsupported",
                "must be true with aws.volume_type efs: EFS is NFS, and the NATS team does not support JetStream \
                 stores on NFS (stale file handles and failed R3 stream creation are reported on Fargate with EFS); \
                 prefer gp3, or deploy_target aws.eks for durable volumes"
                    .into(),
            );
        }
        if !id_ok(&a.efs_file_system_id, "fs-") {
            field(
                "aws.efs_file_system_id",
                format!("{} is not an EFS file system id (fs-...); it is required with aws.volume_type efs", quote(&a.efs_file_system_id)),
            );
        }
        Storage::Efs {
            file_system_id: a.efs_file_system_id.clone(),
        }
    } else {
        field(
            "aws.volume_type",
            format!(
                "{} is not a volume type; use gp3 (default), gp2, io1, io2, ephemeral or efs",
                quote(&a.volume_type)
            ),
        );
        Storage::Ephemeral {
            size_gib: *EPHEMERAL_GIB.start(),
        }
    };
    if volume_type != "efs" && (a.acknowledge_nfs_unsupported || !a.efs_file_system_id.is_empty()) {
        field(
            "aws.efs_file_system_id",
            "only applies with aws.volume_type efs".into(),
        );
    }
    if replicas == 1 && !storage.survives_task() && !a.acknowledge_data_loss {
        field(
            "aws.acknowledge_data_loss",
            format!(
                "must be true with replicas 1: on {TARGET} a node's store ({}) goes with its task, so every \
                 replacement (deploy, crash, host retirement) loses all streams and messages; use replicas 3 \
                 (nodes are replaced one at a time and re-sync from their peers)",
                storage.kind()
            ),
        );
    }

    let load_balancer = LoadBalancer::parse(&a.load_balancer).unwrap_or_else(|| {
        field(
            "aws.load_balancer",
            format!(
                "{} is not a load balancer mode; use internal (default), none or public",
                quote(&a.load_balancer)
            ),
        );
        LoadBalancer::Internal
    });
    for cidr in &a.client_cidrs {
        if !cidr_ok(cidr) {
            field(
                "aws.client_cidrs",
                format!("{} is not a CIDR block such as 10.0.0.0/16", quote(cidr)),
            );
        }
    }
    for g in &a.client_security_groups {
        if !id_ok(g, "sg-") {
            field(
                "aws.client_security_groups",
                format!("{} is not a security group id (sg-...)", quote(g)),
            );
        }
    }
    if a.client_cidrs.is_empty() && a.client_security_groups.is_empty() {
        field(
            "aws.client_cidrs",
            "name at least one CIDR block here or a group in aws.client_security_groups: the broker's security \
             group opens the client port 4222 only to them"
                .into(),
        );
    }

    let mut tags: BTreeMap<String, String> =
        a.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (k, v) in &tags {
        if k.is_empty()
            || k.len() > 128
            || !tag_chars(k)
            || k.to_ascii_lowercase().starts_with("aws:")
        {
            field(
                "aws.tags",
                format!(
                    "{} is not a tag key (1-128 of letters, digits, spaces and _.:/=+-@, not aws:)",
                    quote(k)
                ),
            );
        } else if v.len() > 256 || !tag_chars(v) {
            field("aws.tags", format!("the value of {} is not a tag value (at most 256 of letters, digits, spaces and _.:/=+-@)", quote(k)));
        }
        if k == TAG_MANAGED_BY || k == TAG_BROKER {
            field(
                "aws.tags",
                format!("{} is set by the provider; pick another key", quote(k)),
            );
        }
    }
    if tags.len() > 40 {
        field("aws.tags", format!("{} tags are too many; AWS allows 50 per resource and the provider adds its own, so use at most 40", tags.len()));
    }
    tags.insert(TAG_MANAGED_BY.into(), MANAGED_BY.into());
    tags.insert(
        TAG_BROKER.into(),
        name.chars()
            .filter(|c| tag_chars(&c.to_string()))
            .take(256)
            .collect(),
    );

    let endpoint_url = (!a.endpoint_url.is_empty()).then(|| a.endpoint_url.clone());
    if let Some(u) = &endpoint_url {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.contains(char::is_whitespace)
        {
            field(
                "aws.endpoint_url",
                format!("{} is not an http(s) url", quote(u)),
            );
        }
    }
    let ready_timeout = match &a.ready_timeout {
        None => DEFAULT_READY_TIMEOUT,
        Some(t) if t.seconds > 0 && t.nanos >= 0 => Duration::new(t.seconds as u64, t.nanos as u32),
        Some(_) => {
            field(
                "aws.ready_timeout",
                "must be a positive duration such as \"600s\"".into(),
            );
            DEFAULT_READY_TIMEOUT
        }
    };
    let log_retention_days = if a.log_retention_days == 0 {
        DEFAULT_LOG_RETENTION_DAYS
    } else {
        a.log_retention_days
    };
    if !LOG_RETENTION_DAYS.contains(&log_retention_days) {
        field(
            "aws.log_retention_days",
            format!("{log_retention_days} is not a CloudWatch Logs retention; use one of 1, 3, 5, 7, 14 (default), 30, 60, 90, ... 3653"),
        );
    }

    // The store must fit its volume, with a tenth left for the filesystem and the store's index.
    let volume_bytes = i64::from(storage.size_gib()) << 30;
    let default_file_store = volume_bytes / 10 * 9;
    let max_file_store = if d.max_file_store == 0 {
        default_file_store
    } else {
        d.max_file_store
    };
    if volume_bytes > 0 && max_file_store > volume_bytes {
        field(
            "jetstream.max_storage_bytes",
            format!("{max_file_store} does not fit the {} GiB volume (aws.volume_size_gib); use at most {volume_bytes} (0 = {default_file_store})", storage.size_gib()),
        );
    }
    let memory_bytes = memory_mib << 20;
    let max_memory_store = d.max_memory_store;
    if memory_bytes > 0 && max_memory_store > memory_bytes / 2 {
        field(
            "jetstream.max_memory_bytes",
            format!("{max_memory_store} leaves the server too little of the task's {memory} MiB (aws.memory); use at most {}", memory_bytes / 2),
        );
    }

    let conn = &d.spec.conn;
    let auth = KubeAuth::from_conn(conn, TARGET, "Secrets Manager", &mut field);
    if auth.is_none() && load_balancer == LoadBalancer::Public {
        field(
            "auth",
            "is required with aws.load_balancer public: the broker is reachable from the internet; set auth.token, \
             or auth.user and auth.password"
                .into(),
        );
    }
    if conn.tls_ca_file.is_some() || conn.tls_cert_file.is_some() || conn.tls_required {
        field(
            "tls",
            format!("{TARGET} does not configure TLS on the server yet; remove tls"),
        );
    }

    let settings = EcsSettings {
        names: EcsNames::new(name),
        replicas,
        version,
        image,
        region,
        cluster,
        vpc_id: a.vpc_id.clone(),
        subnets: a.subnets.clone(),
        execution_role_arn: a.execution_role_arn.clone(),
        task_role_arn,
        cpu,
        memory,
        memory_mib,
        storage,
        load_balancer,
        client_cidrs: a.client_cidrs.clone(),
        client_security_groups: a.client_security_groups.clone(),
        tags,
        endpoint_url,
        ready_timeout,
        log_retention_days,
        max_file_store,
        max_memory_store,
        auth,
    };
    if p.is_empty() {
        Ok(settings)
    } else {
        Err(p)
    }
}

/// The settings of `d`, or one error naming every bad field.
pub fn settings(d: &BrokerDesired) -> Result<EcsSettings, DriverError> {
    validate(d).map_err(|lines| config_problems(BROKER_TYPE, &d.spec.name, lines))
}

#[cfg(test)]
pub(crate) mod tests_support {
    use serde_json::json;

    pub fn base() -> serde_json::Value {
        json!({
            "provider": "nats", "deploy_target": "aws.ecs", "version": "2.10.29", "replicas": 3,
            "auth": {"token": "ecsTok3n"},
            "aws": {
                "region": "us-east-1",
                "vpc_id": "vpc-0123456789abcdef0",
                "subnets": ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"],
                "execution_role_arn": "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
                "infrastructure_role_arn": "arn:aws:iam::123456789012:role/ecsInfrastructureRole",
                "client_cidrs": ["10.0.0.0/16"]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::base;
    use super::*;
    use serde_json::json;

    fn problems(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut c = base();
        edit(&mut c);
        let d = BrokerDesired::decode("bus", c.to_string().as_bytes()).unwrap();
        validate(&d).unwrap_err().join("\n")
    }

    #[test]
    fn defaults_and_names() {
        let d = BrokerDesired::decode("orders-bus", base().to_string().as_bytes()).unwrap();
        let s = validate(&d).unwrap();
        assert_eq!(s.image, "nats:2.10.29-alpine");
        assert_eq!(s.cluster, "orders-bus");
        assert_eq!((s.cpu.as_str(), s.memory.as_str()), ("1024", "2048"));
        assert_eq!(s.storage.kind(), "gp3");
        assert_eq!(s.storage.size_gib(), 20);
        assert_eq!(s.load_balancer, LoadBalancer::Internal);
        assert_eq!(s.names.host(2), "nats-2.orders-bus.nats.local");
        assert_eq!(s.names.service(0), "orders-bus-nats-0");
        assert_eq!(s.tags[TAG_MANAGED_BY], MANAGED_BY);
        let long = EcsNames::new("a-very-long-broker-name-that-goes-on-and-on-and-on");
        assert!(
            long.load_balancer.len() <= 32 && long.target_group.len() <= 32,
            "{long:?}"
        );
    }

    #[test]
    fn every_bad_value_is_one_line_naming_the_field_and_what_is_valid() {
        for (edit, want) in [
            (
                Box::new(|c: &mut serde_json::Value| c["aws"]["vpc_id"] = json!(""))
                    as Box<dyn FnOnce(&mut serde_json::Value)>,
                "aws.vpc_id: is required",
            ),
            (
                Box::new(|c| c["aws"]["vpc_id"] = json!("vpc-XYZ")),
                "aws.vpc_id: \"vpc-XYZ\" is not a VPC id",
            ),
            (
                Box::new(|c| c["aws"]["subnets"] = json!([])),
                "aws.subnets: is required",
            ),
            (
                Box::new(|c| c["aws"]["subnets"] = json!(["sub-1"])),
                "aws.subnets: \"sub-1\" is not a subnet id",
            ),
            (
                Box::new(|c| c["aws"]["execution_role_arn"] = json!("")),
                "aws.execution_role_arn: is required",
            ),
            (
                Box::new(|c| c["aws"]["execution_role_arn"] = json!("role")),
                "aws.execution_role_arn: \"role\" is not an IAM role ARN",
            ),
            (
                Box::new(|c| c["aws"]["cpu"] = json!("300")),
                "aws.cpu: \"300\" is not a Fargate CPU size",
            ),
            (
                Box::new(|c| c["aws"]["memory"] = json!("1000")),
                "aws.memory: \"1000\" (MiB) does not go with aws.cpu 1024",
            ),
            (
                Box::new(|c| c["aws"]["volume_type"] = json!("st9")),
                "aws.volume_type: \"st9\" is not a volume type",
            ),
            (
                Box::new(|c| c["aws"]["volume_size_gib"] = json!(99999)),
                "aws.volume_size_gib: 99999 is not a gp3 volume size",
            ),
            (
                Box::new(|c| c["aws"]["infrastructure_role_arn"] = json!("")),
                "aws.infrastructure_role_arn: is required with aws.volume_type gp3",
            ),
            (
                Box::new(|c| c["aws"]["load_balancer"] = json!("external")),
                "aws.load_balancer: \"external\" is not a load balancer mode",
            ),
            (
                Box::new(|c| c["aws"]["client_cidrs"] = json!(["10.0.0.0/40"])),
                "aws.client_cidrs: \"10.0.0.0/40\" is not a CIDR block",
            ),
            (
                Box::new(|c| c["aws"]["client_cidrs"] = json!([])),
                "aws.client_cidrs: name at least one CIDR",
            ),
            (
                Box::new(|c| c["aws"]["client_security_groups"] = json!(["group"])),
                "aws.client_security_groups: \"group\" is not a security group id",
            ),
            (
                Box::new(|c| c["aws"]["region"] = json!("mars")),
                "aws.region: \"mars\" is not an AWS region",
            ),
            (
                Box::new(|c| c["aws"]["tags"] = json!({"aws:x": "1"})),
                "aws.tags: \"aws:x\" is not a tag key",
            ),
            (
                Box::new(|c| c["aws"]["tags"] = json!({"managed-by": "me"})),
                "aws.tags: \"managed-by\" is set by the provider",
            ),
            (
                Box::new(|c| c["aws"]["endpoint_url"] = json!("localhost:5000")),
                "aws.endpoint_url: \"localhost:5000\" is not an http(s) url",
            ),
            (
                Box::new(|c| c["aws"]["log_retention_days"] = json!(2)),
                "aws.log_retention_days: 2 is not a CloudWatch Logs retention",
            ),
            (
                Box::new(|c| c["replicas"] = json!(2)),
                "replicas: 2 is not possible on aws.ecs",
            ),
            (
                Box::new(|c| c["replicas"] = json!(1)),
                "aws.acknowledge_data_loss: must be true with replicas 1",
            ),
            (
                Box::new(|c| c["aws"]["volume_type"] = json!("efs")),
                "aws.acknowledge_nfs_unsupported: must be true with aws.volume_type efs",
            ),
            (
                Box::new(|c| {
                    c["aws"]["load_balancer"] = json!("public");
                    c["auth"] = json!({});
                }),
                "auth: is required with aws.load_balancer public",
            ),
            (
                Box::new(|c| c["version"] = json!("")),
                "version: is required for aws.ecs",
            ),
        ] {
            let got = problems(edit);
            assert!(
                got.lines().any(|l| l.starts_with(want)),
                "want {want:?} in:\n{got}"
            );
        }
    }

    #[test]
    fn acknowledgements_let_r1_and_efs_through() {
        let mut c = base();
        c["replicas"] = json!(1);
        c["aws"]["acknowledge_data_loss"] = json!(true);
        let d = BrokerDesired::decode("bus", c.to_string().as_bytes()).unwrap();
        assert!(validate(&d).is_ok());
        let mut c = base();
        c["aws"]["volume_type"] = json!("efs");
        c["aws"]["efs_file_system_id"] = json!("fs-0123456789abcdef0");
        c["aws"]["acknowledge_nfs_unsupported"] = json!(true);
        let d = BrokerDesired::decode("bus", c.to_string().as_bytes()).unwrap();
        assert!(validate(&d).unwrap().storage.survives_task());
    }
}
