//! What one broker node is on ECS: its nats.conf (through the renderer every target shares),
//! the secret the task reads its credentials from, and its task definition as the SDK's typed
//! request parts. Pure: no I/O.

use super::config::{hex, EcsSettings, Storage};
use crate::iac::targets::kubernetes::KubeAuth;
use crate::nats::server_conf::{routes_conf, ClusterConf, EnvAuth, Listen, ServerConf, ServerName};
use aws_sdk_ecs::types::{
    Compatibility, ContainerDefinition, EfsTransitEncryption, EfsVolumeConfiguration,
    EphemeralStorage, HealthCheck, KeyValuePair, LogConfiguration, LogDriver, MountPoint,
    NetworkMode, PortMapping, Secret, TransportProtocol, Ulimit, UlimitName, Volume,
};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const CLIENT_PORT: u16 = 4222;
pub const CLUSTER_PORT: u16 = 6222;
pub const MONITOR_PORT: u16 = 8222;
pub const CONTAINER: &str = "nats";
pub const VOLUME: &str = "data";
/// The task's working directory: the volume's mount point. Each node keeps its files in a
/// directory of its own below it (one EFS file system serves every node).
pub const DATA_DIR: &str = "/data";
pub const ENV_CONFIG: &str = "NATS_CONFIG";
pub const ENV_ROUTES: &str = "NATS_ROUTES";
pub const ENV_TOKEN: &str = "NATS_TOKEN";
pub const ENV_USER: &str = "NATS_USER";
pub const ENV_PASSWORD: &str = "NATS_PASSWORD";
/// The route user every node presents to its peers (the password is derived, see `secret`).
pub const ROUTE_USER: &str = "route";
/// Fargate's longest stop timeout.
pub const STOP_TIMEOUT_SECS: i32 = 120;

/// The nats.conf of node `i`: its fixed `server_name`, listeners on every address of the
/// task's network interface, routes to the other nodes' Cloud Map names (from the secret when
/// the broker has credentials), credentials as `$NATS_*` references.
pub fn nats_conf(broker: &str, s: &EcsSettings, i: u32) -> String {
    let n = &s.names;
    ServerConf {
        header: format!(
            "Written by workflow-plugin-eventbus for infra.eventbus {broker:?} (aws.ecs); node {} of ECS service {}.",
            n.node(i),
            n.service(i)
        ),
        server_name: ServerName::Fixed(n.node(i)),
        client: Listen::Addr(format!("0.0.0.0:{CLIENT_PORT}")),
        monitor: Listen::Addr(format!("0.0.0.0:{MONITOR_PORT}")),
        logfile: None,
        pid_file: Some("nats.pid".into()),
        lame_duck: None,
        store_dir: "jetstream".into(),
        max_file_store: s.max_file_store,
        max_memory_store: s.max_memory_store,
        cluster: (s.replicas > 1).then(|| ClusterConf {
            name: n.base.clone(),
            listen: format!("0.0.0.0:{CLUSTER_PORT}"),
            routes: if s.auth.is_some() {
                Vec::new()
            } else {
                route_urls(s)
            },
            no_advertise: true,
            include: s.auth.is_some().then(|| "routes.conf".to_string()),
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
    .render()
}

/// `nats://nats-<i>.<namespace>:6222` for every node.
pub fn route_urls(s: &EcsSettings) -> Vec<String> {
    (0..s.replicas)
        .map(|i| format!("nats://{}:{CLUSTER_PORT}", s.names.host(i)))
        .collect()
}

/// `nats://nats-0.<ns>:4222,...`: the url inside the VPC.
pub fn in_vpc_url(s: &EcsSettings) -> String {
    (0..s.replicas)
        .map(|i| format!("nats://{}:{CLIENT_PORT}", s.names.host(i)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The password routes present, derived from the client credentials and the broker's name
/// (it changes with them and is the same on every render).
fn route_password(auth: &KubeAuth, base: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"workflow-plugin-eventbus aws.ecs route password\0");
    h.update(base.as_bytes());
    h.update(b"\0");
    auth.hash_into(&mut h);
    hex(&h.finalize())
}

/// The Secrets Manager secret's JSON (credentials and the routes file), `None` without auth.
/// Secret text: it goes to Secrets Manager only.
pub fn secret(s: &EcsSettings) -> Option<String> {
    let a = s.auth.as_ref()?;
    let mut v = match a {
        KubeAuth::Token(t) => json!({"token": t.expose()}),
        KubeAuth::UserPassword { user, password } => {
            json!({"user": user, "password": password.expose()})
        }
    };
    if s.replicas > 1 {
        v["routes"] = json!(routes_conf(
            ROUTE_USER,
            &route_password(a, &s.names.base),
            &route_urls(s)
        ));
    }
    Some(v.to_string())
}

/// The secret's keys the task reads, as (environment variable, JSON key).
fn secret_keys(s: &EcsSettings) -> Vec<(&'static str, &'static str)> {
    let mut keys = match &s.auth {
        None => return Vec::new(),
        Some(KubeAuth::Token(_)) => vec![(ENV_TOKEN, "token")],
        Some(KubeAuth::UserPassword { .. }) => {
            vec![(ENV_USER, "user"), (ENV_PASSWORD, "password")]
        }
    };
    if s.replicas > 1 {
        keys.push((ENV_ROUTES, "routes"));
    }
    keys
}

/// The container's shell command: writes the config (and the routes file) into the node's
/// directory under the volume and execs nats-server on it.
pub fn command(s: &EcsSettings, i: u32) -> String {
    let routes = if s.auth.is_some() && s.replicas > 1 {
        format!(" && printf '%s' \"${ENV_ROUTES}\" > routes.conf")
    } else {
        String::new()
    };
    format!(
        "umask 077 && mkdir -p {node} && cd {node} && printf '%s' \"${ENV_CONFIG}\" > nats.conf{routes} && exec nats-server -c nats.conf",
        node = s.names.node(i)
    )
}

/// One node's RegisterTaskDefinition input.
#[derive(Clone, Debug)]
pub struct NodeTask {
    pub family: String,
    pub container: ContainerDefinition,
    pub volumes: Vec<Volume>,
    pub ephemeral: Option<EphemeralStorage>,
    pub nats_conf: String,
    /// Over everything registered: a task definition tagged with another value is stale.
    pub sha256: String,
}

fn pair(name: &str, value: &str) -> KeyValuePair {
    KeyValuePair::builder().name(name).value(value).build()
}

fn port(name: &str, p: u16) -> PortMapping {
    PortMapping::builder()
        .name(name)
        .container_port(p as i32)
        .protocol(TransportProtocol::Tcp)
        .build()
}

/// The task definition of node `i`. `secret_arn` is the broker's secret (with auth),
/// `region` where its logs go.
pub fn node_task(
    broker: &str,
    s: &EcsSettings,
    i: u32,
    secret_arn: Option<&str>,
    region: &str,
) -> Result<NodeTask, String> {
    let conf = nats_conf(broker, s, i);
    let bad = |e: aws_sdk_ecs::error::BuildError| format!("task definition of node {i}: {e}");
    let mut c = ContainerDefinition::builder()
        .name(CONTAINER)
        .image(&s.image)
        .essential(true)
        .entry_point("sh")
        .entry_point("-c")
        .command(command(s, i))
        .working_directory(DATA_DIR)
        // The whole task's memory, reserved for its one container.
        .memory_reservation(s.memory_mib as i32)
        .environment(pair(ENV_CONFIG, &conf))
        .environment(pair(
            "GOMEMLIMIT",
            &format!("{}MiB", s.memory_mib / 10 * 8),
        ))
        .port_mappings(port("client", CLIENT_PORT))
        .port_mappings(port("cluster", CLUSTER_PORT))
        .port_mappings(port("monitor", MONITOR_PORT))
        .health_check(
            HealthCheck::builder()
                .command("CMD-SHELL")
                .command(format!(
                    "wget -q -O /dev/null 'http://127.0.0.1:{MONITOR_PORT}/healthz?js-enabled-only=true' || exit 1"
                ))
                .interval(10)
                .timeout(5)
                .retries(3)
                .start_period(30)
                .build()
                .map_err(bad)?,
        )
        .stop_timeout(STOP_TIMEOUT_SECS)
        .ulimits(
            Ulimit::builder()
                .name(UlimitName::Nofile)
                .soft_limit(65536)
                .hard_limit(65536)
                .build()
                .map_err(bad)?,
        )
        .log_configuration(
            LogConfiguration::builder()
                .log_driver(LogDriver::Awslogs)
                .options("awslogs-group", &s.names.log_group)
                .options("awslogs-region", region)
                .options("awslogs-stream-prefix", s.names.node(i))
                .build()
                .map_err(bad)?,
        );
    if let Some(arn) = secret_arn {
        for (env, key) in secret_keys(s) {
            c = c.secrets(
                Secret::builder()
                    .name(env)
                    .value_from(format!("{arn}:{key}::"))
                    .build()
                    .map_err(bad)?,
            );
        }
    }
    let mut volumes = Vec::new();
    let mut ephemeral = None;
    match &s.storage {
        Storage::Ebs { .. } => {
            volumes.push(
                Volume::builder()
                    .name(VOLUME)
                    .configured_at_launch(true)
                    .build(),
            );
        }
        Storage::Efs { file_system_id } => {
            volumes.push(
                Volume::builder()
                    .name(VOLUME)
                    .efs_volume_configuration(
                        EfsVolumeConfiguration::builder()
                            .file_system_id(file_system_id)
                            .root_directory("/")
                            .transit_encryption(EfsTransitEncryption::Enabled)
                            .build()
                            .map_err(bad)?,
                    )
                    .build(),
            );
        }
        Storage::Ephemeral { size_gib } => {
            ephemeral = Some(
                EphemeralStorage::builder()
                    .size_in_gib(*size_gib as i32)
                    .build(),
            );
        }
    }
    if !volumes.is_empty() {
        c = c.mount_points(
            MountPoint::builder()
                .source_volume(VOLUME)
                .container_path(DATA_DIR)
                .build(),
        );
    }
    let container = c.build();
    let family = s.names.service(i);
    // Debug output is stable but for maps (log options): those are hashed sorted.
    let mut plain = container.clone();
    let logs: std::collections::BTreeMap<String, String> = plain
        .log_configuration
        .take()
        .and_then(|l| l.options)
        .map(|o| o.into_iter().collect())
        .unwrap_or_default();
    let sha256 = hex(&Sha256::digest(
        format!(
            "{family}\n{:?}\n{logs:?}\n{:?}\n{:?}\n{}\n{}\n{}\n{:?}\n{:?}\n{:?}",
            plain,
            volumes,
            ephemeral,
            s.cpu,
            s.memory,
            s.execution_role_arn,
            s.task_role_arn,
            NetworkMode::Awsvpc,
            Compatibility::Fargate
        )
        .as_bytes(),
    ));
    Ok(NodeTask {
        family,
        container,
        volumes,
        ephemeral,
        nats_conf: conf,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::targets::api::BrokerDesired;
    use crate::iac::targets::ecs::config::validate;

    fn settings(edit: impl FnOnce(&mut serde_json::Value)) -> EcsSettings {
        let mut c = crate::iac::targets::ecs::config::tests_support::base();
        edit(&mut c);
        validate(&BrokerDesired::decode("bus", c.to_string().as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn config_and_task_definition_keep_secrets_out() {
        let s = settings(|_| {});
        let t = node_task(
            "bus",
            &s,
            1,
            Some("arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"),
            "us-east-1",
        )
        .unwrap();
        let all = format!("{t:?}");
        assert!(!all.contains("ecsTok3n"), "{all}");
        assert!(
            t.nats_conf.contains("server_name: \"nats-1\""),
            "{}",
            t.nats_conf
        );
        assert!(
            t.nats_conf.contains("include \"routes.conf\"")
                || t.nats_conf.contains("include routes.conf"),
            "{}",
            t.nats_conf
        );
        let secrets = t.container.secrets();
        assert_eq!(secrets.len(), 2, "{secrets:?}");
        assert!(secrets
            .iter()
            .any(|x| x.name() == ENV_TOKEN && x.value_from().ends_with(":token::")));
        let sec = secret(&s).unwrap();
        assert!(
            sec.contains("ecsTok3n") && sec.contains("nats-2.bus.nats.local:6222"),
            "{sec}"
        );
        // The same settings give the same definition; another node another one.
        let again = node_task(
            "bus",
            &s,
            1,
            Some("arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(t.sha256, again.sha256);
        let other = node_task(
            "bus",
            &s,
            2,
            Some("arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"),
            "us-east-1",
        )
        .unwrap();
        assert_ne!(t.sha256, other.sha256);
    }

    #[test]
    fn without_auth_routes_are_in_the_config() {
        let s = settings(|c| c["auth"] = serde_json::json!({}));
        assert!(secret(&s).is_none());
        let t = node_task("bus", &s, 0, None, "us-east-1").unwrap();
        assert!(
            t.nats_conf.contains("nats://nats-2.bus.nats.local:6222"),
            "{}",
            t.nats_conf
        );
        assert!(t.container.secrets().is_empty());
        assert!(!command(&s, 0).contains("routes.conf"));
    }
}
