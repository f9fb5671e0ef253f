//! `infra.eventbus` / `eventbus.broker` config, validated into a `BrokerSpec`: what the runtime
//! module connects with and what the IaC broker driver provisions.

use crate::config::error::{check_duration, MAX_DURATION};
use crate::config::error::{ConfigError, Problems};
use crate::config::kafka::KafkaClientConfig;
use crate::config::nats::ConnSettings;
use crate::config::pg::{self as pgcfg, PgConfig};
use crate::pb::eventbus::ClusterConfig;
use crate::providers::{self, DeployTarget, Provider};
use crate::secret::{quote, Secret};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub use crate::config::shared::{check_tls_files, env_key, DEFAULT_CONNECT_TIMEOUT};
/// The longest `dsn` (a comma-separated server list for NATS) or `servers` entry accepted.
pub const MAX_DSN_LEN: usize = 8 * 1024;

#[derive(Clone, Debug)]
pub struct LocalSpec {
    pub binary: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub client_port: u16,
    pub remove_data_on_delete: bool,
}

#[derive(Clone, Debug)]
pub struct BrokerSpec {
    pub name: String,
    pub type_name: String,
    pub provider: Provider,
    pub target: DeployTarget,
    pub version: String,
    pub replicas: u32,
    /// Explicit servers (`dsn`, comma-separated, or `servers`), before env fallbacks.
    pub explicit_urls: Vec<Secret>,
    pub conn: ConnSettings,
    pub local: LocalSpec,
    pub prevent_destroy: bool,
    pub bind: bool,
    pub protected: bool,
    /// Provider pgchannel only: the Postgres side (the NATS fields above are then unused).
    pub pg: Option<PgConfig>,
    /// Provider kafka only: brokers, TLS and SASL (the NATS fields above are then unused but
    /// for `conn.request_timeout`, the bound of a publish and an admin call).
    pub kafka: Option<KafkaClientConfig>,
    /// The plugin process's Prometheus endpoint, when this module asks for one.
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// `auth` keys given as blank strings. Decoded, a blank `token` is the same as no token, so
/// `auth: {token: "${T}"}` with `T` set but empty would provision a broker without client
/// authentication; the raw config still shows the key was written, and that is refused here,
/// one line per key, naming it.
pub fn check_blank_auth(
    type_name: &str,
    name: &str,
    raw: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ConfigError> {
    let mut p = Problems::new(type_name, name);
    if let Some(serde_json::Value::Object(auth)) = raw.get("auth") {
        for (key, v) in auth {
            if v.as_str().is_some_and(|s| s.trim().is_empty()) {
                p.field(
                    &format!("auth.{key}"),
                    "is empty (a ${VAR} that is set but empty?); give it a value or remove the key",
                );
            }
        }
    }
    p.finish(())
}

fn opt_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl crate::telemetry::BrokerId for BrokerSpec {
    fn broker_name(&self) -> &str {
        &self.name
    }
    fn provider_name(&self) -> &'static str {
        self.provider.as_str()
    }
}

impl BrokerSpec {
    pub fn validate(
        type_name: &str,
        name: &str,
        c: &ClusterConfig,
    ) -> Result<BrokerSpec, ConfigError> {
        let mut p = Problems::new(type_name, name);
        let (provider, target) = match providers::check(&c.provider, &c.deploy_target) {
            Ok(pt) => pt,
            Err((field, msg)) => {
                p.field(field, msg);
                (Provider::Nats, DeployTarget::SelfHosted)
            }
        };
        let is_kafka = provider == Provider::Kafka;
        // Kafka's section refuses `version` and the other NATS-only settings itself.
        if let Err((field, msg)) = providers::check_version(&c.version) {
            if !is_kafka {
                p.field(field, msg);
            }
        }
        if c.replicas < 0 || c.replicas > 9 {
            p.field(
                "replicas",
                format!("{} is out of range (1..=9; 0 means 1)", c.replicas),
            );
        }
        let is_pg = provider == Provider::Pgchannel;
        if !c.dsn.is_empty() && !c.servers.is_empty() && !is_kafka {
            p.field("dsn", "set either dsn or servers, not both");
        }
        // Bounded before anything parses or quotes them: a 1 MiB dsn was accepted, then never
        // connected and was echoed to stderr.
        let long = |v: &str| v.len() > MAX_DSN_LEN;
        let too_long = long(&c.dsn) || c.servers.iter().any(|s| long(s));
        if long(&c.dsn) {
            p.field(
                "dsn",
                format!(
                    "is {} bytes long; a dsn is limited to {MAX_DSN_LEN} bytes",
                    c.dsn.len()
                ),
            );
        }
        if let Some(i) = c.servers.iter().position(|s| long(s)) {
            p.field(
                &format!("servers[{i}]"),
                format!(
                    "is {} bytes long; a server url is limited to {MAX_DSN_LEN} bytes",
                    c.servers[i].len()
                ),
            );
        }
        let explicit: Vec<Secret> = if is_pg || is_kafka || too_long {
            Vec::new()
        } else if c.dsn.is_empty() {
            c.servers.iter().map(Secret::new).collect()
        } else {
            c.dsn.split(',').map(|s| Secret::new(s.trim())).collect()
        };
        // A password may contain a comma, so an entry of a split dsn can be a fragment of
        // userinfo that url redaction cannot recognise: when credentials are present anywhere
        // the entry is identified by position only.
        let credentials = c.dsn.contains('@');
        for (i, u) in explicit.iter().enumerate() {
            if async_nats::ServerAddr::from_str(u.expose()).is_err() {
                let field = if c.dsn.is_empty() {
                    format!("servers[{i}]")
                } else {
                    "dsn".into()
                };
                let shown = if credentials || u.expose().contains('@') {
                    format!(
                        "entry {} of {} (not shown: it carries credentials)",
                        i + 1,
                        explicit.len()
                    )
                } else {
                    quote(u.expose())
                };
                p.field(
                    &field,
                    format!(
                        "{shown} is not a NATS url (e.g. nats://127.0.0.1:4222 or tls://host:4222)"
                    ),
                );
            }
        }
        let auth = c.auth.clone().unwrap_or_default();
        let tls = c.tls.clone().unwrap_or_default();
        let token = (!auth.token.is_empty()).then(|| Secret::new(&auth.token));
        let user = (!auth.user.is_empty()).then(|| auth.user.clone());
        let password = (!auth.password.is_empty()).then(|| Secret::new(&auth.password));
        // Kafka checks its auth and tls blocks in its own section.
        if user.is_some() != password.is_some() && !is_kafka {
            p.field("auth", "user and password go together; set both or neither");
        }
        let methods = [
            token.is_some(),
            user.is_some(),
            !auth.creds_file.is_empty(),
            !auth.nkey_seed_file.is_empty(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if methods > 1 && !is_kafka {
            p.field(
                "auth",
                "choose one of token, user/password, creds_file or nkey_seed_file",
            );
        }
        for (field, path) in [
            ("auth.creds_file", &auth.creds_file),
            ("auth.nkey_seed_file", &auth.nkey_seed_file),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() && !is_kafka {
                p.field(field, format!("{} is not a readable file", quote(path)));
            }
        }
        if !is_kafka {
            check_tls_files(&mut p, &tls);
        }
        let mut timeouts = [None, None];
        for (slot, (field, d)) in timeouts.iter_mut().zip([
            ("connect_timeout", &c.connect_timeout),
            ("request_timeout", &c.request_timeout),
        ]) {
            match check_duration(d, MAX_DURATION) {
                Err(e) => p.field(field, e),
                Ok(Some(t)) if t.is_zero() => {
                    p.field(field, "must be a positive duration such as \"5s\"")
                }
                Ok(t) => *slot = t,
            }
        }
        let local = c.local.clone().unwrap_or_default();
        if c.local.is_some() && target != DeployTarget::Local && !is_kafka {
            p.field(
                "local",
                format!("only applies to deploy_target local (this broker uses {target})"),
            );
        }
        if c.kubernetes.is_some()
            && !matches!(target, DeployTarget::Kubernetes | DeployTarget::AwsEks)
        {
            p.field(
                "kubernetes",
                format!("only applies to deploy_target kubernetes or aws.eks (this broker uses {target})"),
            );
        }
        if c.aws.is_some() && target != DeployTarget::AwsEcs {
            p.field(
                "aws",
                format!("only applies to deploy_target aws.ecs (this broker uses {target})"),
            );
        }
        if !(0..=65535).contains(&local.client_port) {
            p.field(
                "local.client_port",
                format!("{} is not a port number", local.client_port),
            );
        }
        let pg = if is_pg && !too_long {
            Some(pg_config(&mut p, name, c, timeouts[0]))
        } else {
            let pg_only =
                !c.broker_target.is_empty() || !c.poll_interval.is_empty() || c.max_conns != 0;
            if !is_pg && !is_kafka && pg_only {
                tracing::warn!(broker = name, "broker_target, poll_interval and max_conns apply to provider pgchannel only; ignored");
            }
            None
        };
        let kafka = if is_kafka && !too_long {
            match crate::config::kafka::validate(type_name, name, c) {
                Ok(k) => Some(k),
                Err(e) => {
                    p.absorb(e);
                    None
                }
            }
        } else {
            None
        };
        let metrics_address = if c.metrics_address.trim().is_empty() {
            None
        } else {
            match crate::telemetry::parse_metrics_addr(&c.metrics_address) {
                Ok(a) => Some(a),
                Err(e) => {
                    p.field("metrics_address", e);
                    None
                }
            }
        };
        let spec = BrokerSpec {
            name: name.to_string(),
            type_name: type_name.to_string(),
            provider,
            target,
            version: c.version.clone(),
            replicas: c.replicas.max(1) as u32,
            explicit_urls: explicit,
            conn: ConnSettings {
                urls: Vec::new(),
                token,
                user,
                password,
                creds_file: opt_path(&auth.creds_file),
                nkey_seed_file: opt_path(&auth.nkey_seed_file),
                tls_ca_file: opt_path(&tls.ca_file),
                tls_cert_file: opt_path(&tls.cert_file),
                tls_key_file: opt_path(&tls.key_file),
                tls_required: tls.required,
                connection_name: if c.connection_name.is_empty() {
                    format!("workflow-plugin-eventbus:{name}")
                } else {
                    c.connection_name.clone()
                },
                connect_timeout: timeouts[0].unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                request_timeout: timeouts[1].unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            },
            local: LocalSpec {
                binary: opt_path(&local.binary),
                state_dir: opt_path(&local.state_dir),
                client_port: local.client_port.clamp(0, 65535) as u16,
                remove_data_on_delete: local.remove_data_on_delete,
            },
            prevent_destroy: c.prevent_destroy,
            bind: c.bind,
            protected: c.protected,
            pg,
            kafka,
            metrics_address,
        };
        p.finish(spec)
    }

    /// pgchannel: `dsn` > `EVENTBUS_<NAME>_URI` (the Go provider read no env var for it: B20).
    /// `None` for other providers or when neither is set.
    pub fn resolve_pg_dsn(&self) -> Option<Secret> {
        let pg = self.pg.as_ref()?;
        if let Some(d) = &pg.explicit_dsn {
            return Some(d.clone());
        }
        std::env::var(self.pg_env_var())
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| Secret::new(v.trim()))
    }

    pub fn pg_env_var(&self) -> String {
        format!("EVENTBUS_{}_URI", env_key(&self.name))
    }

    /// `dsn`/`servers` > `EVENTBUS_<NAME>_URI` > `NATS_URL`. Empty for pgchannel.
    pub fn resolve_urls(&self) -> Vec<Secret> {
        if self.pg.is_some() {
            return Vec::new();
        }
        if !self.explicit_urls.is_empty() {
            return self.explicit_urls.clone();
        }
        let from_env = std::env::var(format!("EVENTBUS_{}_URI", env_key(&self.name)))
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| {
                std::env::var("NATS_URL")
                    .ok()
                    .filter(|v| !v.trim().is_empty())
            });
        from_env
            .map(|v| v.split(',').map(|s| Secret::new(s.trim())).collect())
            .unwrap_or_default()
    }
}

/// The pgchannel checks, in the Go plugin's order where it had them, with its texts where they
/// were clear. NATS-only settings are refused rather than ignored: a `tls` block that silently
/// did nothing would leave a user believing the connection is encrypted.
fn pg_config(
    p: &mut Problems,
    name: &str,
    c: &ClusterConfig,
    connect_timeout: Option<Duration>,
) -> PgConfig {
    if !c.broker_target.is_empty() && c.broker_target != "in_process" {
        p.field(
            "broker_target",
            format!(
                "pgchannel requires broker_target=in_process (got {}); leave it empty or set in_process",
                quote(&c.broker_target)
            ),
        );
    }
    let env = format!("EVENTBUS_{}_URI", env_key(name));
    if c.dsn.trim().is_empty() {
        let from_env = std::env::var(&env).ok().filter(|v| !v.trim().is_empty());
        match from_env {
            None => p.field(
                "dsn",
                format!("pgchannel requires dsn (Postgres connection string), or {env} in the environment"),
            ),
            Some(v) => {
                if let Err(e) = pgcfg::check_dsn(&v) {
                    p.field("dsn", format!("(from {env}) {e}"));
                }
            }
        }
    } else if let Err(e) = pgcfg::check_dsn(&c.dsn) {
        p.field("dsn", e);
    }
    let max_conns = match pgcfg::check_max_conns(c.max_conns) {
        Ok(n) => n,
        Err(e) => {
            p.field("max_conns", e);
            pgcfg::DEFAULT_MAX_CONNS
        }
    };
    let poll_interval = match pgcfg::check_poll_interval(&c.poll_interval) {
        Ok(d) => d,
        Err(e) => {
            p.field("poll_interval", e);
            pgcfg::DEFAULT_POLL_INTERVAL
        }
    };
    let nats_only = "is a NATS setting; pgchannel takes its connection from dsn (TLS there too: sslmode, sslrootcert)";
    if !c.servers.is_empty() {
        p.field("servers", nats_only);
    }
    if c.auth.as_ref().is_some_and(|a| *a != Default::default()) {
        p.field("auth", nats_only);
    }
    if c.tls.as_ref().is_some_and(|t| *t != Default::default()) {
        p.field("tls", nats_only);
    }
    if c.local.is_some() {
        p.field(
            "local",
            "applies to provider nats with deploy_target local only",
        );
    }
    PgConfig {
        explicit_dsn: (!c.dsn.trim().is_empty()).then(|| Secret::new(c.dsn.trim())),
        max_conns,
        poll_interval,
        connect_timeout: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(f: impl FnOnce(&mut ClusterConfig)) -> Result<BrokerSpec, ConfigError> {
        let mut c = ClusterConfig {
            provider: "pgchannel".into(),
            dsn: "postgres://app:s3cret@127.0.0.1:5432/events?sslmode=disable".into(),
            ..Default::default()
        };
        f(&mut c);
        BrokerSpec::validate("eventbus.broker", "pgbus", &c)
    }

    fn kafka(f: impl FnOnce(&mut ClusterConfig)) -> Result<BrokerSpec, ConfigError> {
        let mut c = ClusterConfig {
            provider: "kafka".into(),
            deploy_target: "self_hosted".into(),
            dsn: "kafka://k1:9092,k2:9092".into(),
            ..Default::default()
        };
        f(&mut c);
        BrokerSpec::validate("eventbus.broker", "kbus", &c)
    }

    #[test]
    fn kafka_is_accepted_and_other_providers_settings_are_one_line_each() {
        let s = kafka(|c| {
            c.request_timeout = Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            })
        })
        .unwrap();
        assert_eq!(s.provider, Provider::Kafka);
        assert_eq!(
            s.kafka.as_ref().unwrap().brokers,
            vec!["k1:9092", "k2:9092"]
        );
        assert_eq!(s.conn.request_timeout, Duration::from_secs(2));
        assert!(s.resolve_urls().is_empty() && s.pg.is_none());
        let e = kafka(|c| {
            c.servers = vec!["nats://x:4222".into()];
            c.version = "2.10".into();
            c.auth = Some(crate::pb::eventbus::NatsAuth {
                token: "t0ken".into(),
                ..Default::default()
            });
            c.poll_interval = "1s".into();
            c.max_conns = 4;
        })
        .unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 5, "{text}");
        for field in [
            "servers",
            "version",
            "auth.token",
            "poll_interval",
            "max_conns",
        ] {
            assert!(
                text.contains(&format!("config.{field}: ")),
                "{field}: {text}"
            );
        }
        assert!(!text.contains("t0ken"), "{text}");
        assert!(text.starts_with("eventbus.broker \"kbus\": "), "{text}");
    }

    #[test]
    fn pgchannel_go_config_is_accepted() {
        let s = pg(|c| {
            c.broker_target = "in_process".into();
            c.deploy_target = "whatever-go-ignored".into();
            c.poll_interval = "250ms".into();
            c.max_conns = 4;
        })
        .unwrap();
        assert_eq!(s.provider, Provider::Pgchannel);
        let got = s.pg.as_ref().unwrap();
        assert_eq!(got.max_conns, 4);
        assert_eq!(got.poll_interval, Duration::from_millis(250));
        assert!(s.resolve_urls().is_empty());
        let d = pg(|_| {}).unwrap();
        assert_eq!(d.pg.as_ref().unwrap().max_conns, 16);
        assert_eq!(d.pg.as_ref().unwrap().poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn pgchannel_bad_values_are_one_line_each_without_the_password() {
        let e = pg(|c| {
            c.poll_interval = "fast".into();
            c.broker_target = "remote".into();
            c.max_conns = -2;
        })
        .unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 3, "{text}");
        assert!(
            text.contains("config.poll_interval: \"fast\" is not a positive duration"),
            "{text}"
        );
        assert!(
            text.contains("pgchannel requires broker_target=in_process (got \"remote\")"),
            "{text}"
        );
        assert!(text.contains("config.max_conns"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        let e = pg(|c| c.poll_interval = "0s".into()).unwrap_err();
        assert!(e.to_string().contains("poll_interval"), "{e}");
        let e = pg(|c| c.servers = vec!["nats://x:4222".into()]).unwrap_err();
        assert!(
            e.to_string().contains("config.servers: is a NATS setting"),
            "{e}"
        );
    }

    #[test]
    fn pgchannel_without_dsn_names_the_env_var() {
        let e = pg(|c| c.dsn.clear()).unwrap_err().to_string();
        assert!(
            e.contains(
                "pgchannel requires dsn (Postgres connection string), or EVENTBUS_PGBUS_URI"
            ),
            "{e}"
        );
    }
}
