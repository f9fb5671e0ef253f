//! The kafka part of a broker config: bootstrap brokers, client id, TLS and SASL, checked at load
//! with one line per problem. The domain layer (`crate::kafka`) turns a `KafkaClientConfig` into
//! librdkafka properties; config depends on nothing of it.
//!
//! Where things come from: brokers from `dsn` (`kafka://h1:9092,h2:9092`), `kafka.brokers` or
//! `kafka.bootstrap_servers` (the Go name), at most one of them, else `EVENTBUS_<NAME>_URI` at
//! connect; TLS files from `tls` (`ca_file`, `cert_file` + `key_file`); SASL credentials from
//! `auth.user` + `auth.password` with `kafka.sasl_mechanism` (PLAIN, SCRAM-SHA-256 or -512).
//! The password is a [`Secret`]: never in a log line, an error or a `Debug` print.

use crate::config::error::{ConfigError, Problems};
use crate::config::shared::env_key;
use crate::pb::eventbus::{ClusterConfig, KafkaSaslMechanism, KafkaSecurityProtocol};
use crate::secret::{quote, Secret};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka `sasl.mechanisms` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslCredentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// A validated kafka client config (no I/O done). `Debug` shows no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaClientConfig {
    /// `host:port` each; empty means `EVENTBUS_<NAME>_URI` is read at connect.
    pub brokers: Vec<String>,
    pub env_var: String,
    pub client_id: String,
    pub protocol: SecurityProtocol,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub sasl: Option<SaslCredentials>,
    pub default_replication_factor: Option<i32>,
    pub min_insync_replicas: Option<i32>,
    pub connect_timeout: Duration,
    /// `kafka.librdkafka_options`, checked by [`check_option`].
    pub options: Vec<(String, String)>,
}

impl KafkaClientConfig {
    /// The brokers to dial: the configured ones, else `EVENTBUS_<NAME>_URI` (same forms as
    /// `dsn`). Err names the variable when neither is set or the variable is malformed.
    pub fn resolve_brokers(&self) -> Result<Vec<String>, String> {
        if !self.brokers.is_empty() {
            return Ok(self.brokers.clone());
        }
        let v = std::env::var(&self.env_var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "no kafka brokers: set dsn, kafka.brokers or {} in the environment",
                    self.env_var
                )
            })?;
        parse_brokers(&v).map_err(|e| format!("{}: {e}", self.env_var))
    }
}

/// `kafka://h1:9092,h2:9092` or `h1:9092,h2:9092` into `host:port` entries. Userinfo is refused
/// (credentials go in `auth`, where they are handled as secrets) without echoing it.
pub fn parse_brokers(text: &str) -> Result<Vec<String>, String> {
    let body = text.trim();
    let body = body.strip_prefix("kafka://").unwrap_or(body);
    if let Some((scheme, _)) = body.split_once("://") {
        return Err(format!(
            "{} is not a kafka url (kafka://host:9092,host2:9092 or host:9092,host2:9092)",
            quote(scheme)
        ));
    }
    let mut out = Vec::new();
    for entry in body.split(',').map(str::trim) {
        out.push(check_broker(entry)?);
    }
    Ok(out)
}

fn check_broker(entry: &str) -> Result<String, String> {
    if entry.contains('@') {
        return Err(
            "a broker address carries credentials (not shown); put them in auth.user and auth.password"
                .into(),
        );
    }
    let entry = entry.trim_end_matches('/');
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err(format!("{} needs a port (host:9092)", quote(entry)));
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    if !host_ok {
        return Err(format!("{} is not a host:port", quote(entry)));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(entry.to_string()),
        _ => Err(format!("{} has no valid port (1..=65535)", quote(entry))),
    }
}

/// librdkafka properties the plugin sets itself, from the fields or for its delivery guarantees:
/// `kafka.librdkafka_options` may not override them.
const OWN_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "security.protocol",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transactional.id",
    "isolation.level",
];

/// One `kafka.librdkafka_options` entry: a lowercase dotted property name that is neither one
/// the plugin sets nor a credential or TLS setting (those go through `auth`, `tls`).
pub fn check_option(key: &str) -> Result<(), String> {
    let shaped = !key.is_empty()
        && key.len() <= 128
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'));
    if !shaped {
        return Err(format!(
            "{} is not a librdkafka property name (lowercase, dotted: linger.ms)",
            quote(key)
        ));
    }
    if key.starts_with("sasl.") || key.starts_with("ssl.") || key.starts_with("ssl_") {
        return Err(format!(
            "{key:?} is a security setting; use auth (user, password), kafka.sasl_mechanism and tls"
        ));
    }
    if OWN_OPTIONS.contains(&key) {
        return Err(format!(
            "{key:?} is set by the plugin (brokers, client_id, security, consumer groups, the idempotent producer and request_timeout decide it)"
        ));
    }
    Ok(())
}

/// The kafka checks of a broker config. NATS- and pgchannel-only settings are refused rather
/// than ignored, one line each.
pub fn validate(
    type_name: &str,
    name: &str,
    c: &ClusterConfig,
) -> Result<KafkaClientConfig, ConfigError> {
    let mut p = Problems::new(type_name, name);
    let k = c.kafka.clone().unwrap_or_default();
    let sources = [
        ("dsn", !c.dsn.trim().is_empty()),
        ("kafka.brokers", !k.brokers.is_empty()),
        (
            "kafka.bootstrap_servers",
            !k.bootstrap_servers.trim().is_empty(),
        ),
    ];
    let set: Vec<&str> = sources
        .iter()
        .filter(|(_, s)| *s)
        .map(|(f, _)| *f)
        .collect();
    if set.len() > 1 {
        p.field(
            set[1],
            format!(
                "set one of dsn, kafka.brokers or kafka.bootstrap_servers (also set: {})",
                set[0]
            ),
        );
    }
    let mut brokers = Vec::new();
    if !c.dsn.trim().is_empty() {
        match parse_brokers(&c.dsn) {
            Ok(b) => brokers = b,
            Err(e) => p.field("dsn", e),
        }
    } else if !k.brokers.is_empty() {
        for (i, b) in k.brokers.iter().enumerate() {
            match check_broker(b.trim()) {
                Ok(b) => brokers.push(b),
                Err(e) => p.field(&format!("kafka.brokers[{i}]"), e),
            }
        }
    } else if !k.bootstrap_servers.trim().is_empty() {
        match parse_brokers(&k.bootstrap_servers) {
            Ok(b) => brokers = b,
            Err(e) => p.field("kafka.bootstrap_servers", e),
        }
    }
    let env_var = format!("EVENTBUS_{}_URI", env_key(name));

    let tls = c.tls.clone().unwrap_or_default();
    let auth = c.auth.clone().unwrap_or_default();
    crate::config::shared::check_tls_files(&mut p, &tls);
    let tls_files = !tls.ca_file.is_empty() || !tls.cert_file.is_empty() || tls.required;
    let has_user = !auth.user.is_empty();
    if has_user == auth.password.is_empty() {
        p.field("auth", "user and password go together; set both or neither");
    }
    for (field, set) in [
        ("auth.token", !auth.token.is_empty()),
        ("auth.creds_file", !auth.creds_file.is_empty()),
        ("auth.nkey_seed_file", !auth.nkey_seed_file.is_empty()),
    ] {
        if set {
            p.field(field, "is a NATS credential; kafka uses auth.user + auth.password with kafka.sasl_mechanism");
        }
    }
    let protocol = match KafkaSecurityProtocol::try_from(k.security_protocol) {
        Ok(KafkaSecurityProtocol::Unspecified) => match (tls_files, has_user) {
            (false, false) => SecurityProtocol::Plaintext,
            (true, false) => SecurityProtocol::Ssl,
            (false, true) => SecurityProtocol::SaslPlaintext,
            (true, true) => SecurityProtocol::SaslSsl,
        },
        Ok(KafkaSecurityProtocol::Plaintext) => SecurityProtocol::Plaintext,
        Ok(KafkaSecurityProtocol::Ssl) => SecurityProtocol::Ssl,
        Ok(KafkaSecurityProtocol::SaslPlaintext) => SecurityProtocol::SaslPlaintext,
        Ok(KafkaSecurityProtocol::SaslSsl) => SecurityProtocol::SaslSsl,
        Err(_) => {
            p.field(
                "kafka.security_protocol",
                "must be KAFKA_SECURITY_PROTOCOL_PLAINTEXT, _SSL, _SASL_PLAINTEXT or _SASL_SSL",
            );
            SecurityProtocol::Plaintext
        }
    };
    if protocol.sasl() && !has_user {
        p.field(
            "auth",
            format!(
                "security protocol {} needs auth.user and auth.password",
                protocol.as_str()
            ),
        );
    }
    if !protocol.sasl() && has_user {
        p.field("auth", format!("is set but security protocol {} does not use SASL (use _SASL_PLAINTEXT or _SASL_SSL)", protocol.as_str()));
    }
    if !protocol.tls() && tls_files {
        p.field(
            "tls",
            format!(
                "is set but security protocol {} does not use TLS (use _SSL or _SASL_SSL)",
                protocol.as_str()
            ),
        );
    }
    let mechanism = match KafkaSaslMechanism::try_from(k.sasl_mechanism) {
        Ok(KafkaSaslMechanism::Unspecified | KafkaSaslMechanism::Plain) => SaslMechanism::Plain,
        Ok(KafkaSaslMechanism::ScramSha256) => SaslMechanism::ScramSha256,
        Ok(KafkaSaslMechanism::ScramSha512) => SaslMechanism::ScramSha512,
        Err(_) => {
            p.field(
                "kafka.sasl_mechanism",
                "must be KAFKA_SASL_MECHANISM_PLAIN, _SCRAM_SHA_256 or _SCRAM_SHA_512",
            );
            SaslMechanism::Plain
        }
    };
    if k.sasl_mechanism != 0 && !protocol.sasl() {
        p.field(
            "kafka.sasl_mechanism",
            "applies only with SASL (set auth.user and auth.password)",
        );
    }
    if protocol == SecurityProtocol::SaslPlaintext && mechanism == SaslMechanism::Plain {
        tracing::warn!(broker = name, "SASL PLAIN without TLS sends the password in clear text; use _SASL_SSL or a SCRAM mechanism");
    }
    for (field, v) in [
        (
            "kafka.default_replication_factor",
            k.default_replication_factor,
        ),
        ("kafka.min_insync_replicas", k.min_insync_replicas),
    ] {
        if !(0..=32).contains(&v) {
            p.field(
                field,
                format!("{v} is out of range (1..=32; 0 means the broker's default)"),
            );
        }
    }
    let client_id = if k.client_id.is_empty() {
        format!("workflow-plugin-eventbus:{name}")
    } else {
        k.client_id.clone()
    };
    if client_id.len() > 255 || client_id.chars().any(|c| c.is_control()) {
        p.field(
            "kafka.client_id",
            "must be at most 255 printable characters",
        );
    }
    let nats_only = "is a NATS setting; provider kafka does not use it";
    if !c.servers.is_empty() {
        p.field(
            "servers",
            "is a NATS setting; kafka brokers go in dsn (kafka://h1:9092,h2:9092) or kafka.brokers",
        );
    }
    if c.jetstream.is_some() {
        p.field("jetstream", nats_only);
    }
    if c.local.is_some() {
        p.field(
            "local",
            "applies to provider nats with deploy_target local only",
        );
    }
    if !c.connection_name.is_empty() {
        p.field(
            "connection_name",
            "is a NATS setting; kafka's is kafka.client_id",
        );
    }
    if !c.version.is_empty() {
        p.field("version", "pins a nats-server release; kafka brokers are adopted, not deployed (deploy_target self_hosted)");
    }
    if c.replicas > 1 {
        p.field("replicas", "is a NATS server count; kafka brokers are adopted, not deployed (deploy_target self_hosted)");
    }
    let pg_only = "applies to provider pgchannel only";
    if !c.broker_target.is_empty() {
        p.field("broker_target", pg_only);
    }
    if !c.poll_interval.is_empty() {
        p.field("poll_interval", pg_only);
    }
    if c.max_conns != 0 {
        p.field("max_conns", pg_only);
    }
    if c.kinesis.is_some() {
        p.field("kinesis", "applies to provider kinesis only");
    }
    let connect_timeout = match crate::nats::guard::check_duration(
        &c.connect_timeout,
        crate::nats::guard::MAX_DURATION,
    ) {
        Ok(Some(d)) if !d.is_zero() => d,
        Ok(_) => crate::config::shared::DEFAULT_CONNECT_TIMEOUT,
        Err(e) => {
            p.field("connect_timeout", e);
            crate::config::shared::DEFAULT_CONNECT_TIMEOUT
        }
    };
    let mut options: Vec<(String, String)> = Vec::new();
    for (key, value) in &k.librdkafka_options {
        match check_option(key) {
            Ok(()) if value.len() > 1024 || value.chars().any(char::is_control) => p.field(
                &format!("kafka.librdkafka_options.{key}"),
                "must be at most 1024 printable characters",
            ),
            Ok(()) => options.push((key.clone(), value.clone())),
            Err(e) => p.field("kafka.librdkafka_options", e),
        }
    }
    options.sort();
    let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    let spec = KafkaClientConfig {
        brokers,
        env_var,
        client_id,
        protocol,
        ca_file: opt(&tls.ca_file),
        cert_file: opt(&tls.cert_file),
        key_file: opt(&tls.key_file),
        sasl: has_user.then(|| SaslCredentials {
            mechanism,
            username: auth.user.clone(),
            password: Secret::new(&auth.password),
        }),
        default_replication_factor: (k.default_replication_factor > 0)
            .then_some(k.default_replication_factor),
        min_insync_replicas: (k.min_insync_replicas > 0).then_some(k.min_insync_replicas),
        connect_timeout,
        options,
    };
    p.finish(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::eventbus::{KafkaConfig, NatsAuth, NatsTls};

    fn cfg(f: impl FnOnce(&mut ClusterConfig)) -> Result<KafkaClientConfig, ConfigError> {
        let mut c = ClusterConfig {
            provider: "kafka".into(),
            deploy_target: "self_hosted".into(),
            ..Default::default()
        };
        f(&mut c);
        validate("eventbus.broker", "events", &c)
    }

    #[test]
    fn brokers_from_dsn_list_or_go_name() {
        let a = cfg(|c| c.dsn = "kafka://h1:9092, h2:9093".into()).unwrap();
        assert_eq!(a.brokers, vec!["h1:9092", "h2:9093"]);
        assert_eq!(a.protocol, SecurityProtocol::Plaintext);
        assert_eq!(a.client_id, "workflow-plugin-eventbus:events");
        let b = cfg(|c| {
            c.kafka = Some(KafkaConfig {
                brokers: vec!["10.0.0.1:9092".into()],
                client_id: "orders-svc".into(),
                ..Default::default()
            })
        })
        .unwrap();
        assert_eq!(b.brokers, vec!["10.0.0.1:9092"]);
        assert_eq!(b.client_id, "orders-svc");
        let g = cfg(|c| {
            c.kafka = Some(KafkaConfig {
                bootstrap_servers: "a:1,b:2".into(),
                ..Default::default()
            })
        })
        .unwrap();
        assert_eq!(g.brokers, vec!["a:1", "b:2"]);
    }

    #[test]
    fn env_var_fallback_is_named_when_missing() {
        let c = cfg(|_| {}).unwrap();
        assert!(c.brokers.is_empty());
        assert_eq!(c.env_var, "EVENTBUS_EVENTS_URI");
        let mut c2 = c.clone();
        c2.env_var = "EVENTBUS_KAFKA_TEST_SURELY_UNSET_URI".into();
        let e = c2.resolve_brokers().unwrap_err();
        assert!(e.contains("EVENTBUS_KAFKA_TEST_SURELY_UNSET_URI"), "{e}");
    }

    #[test]
    fn bad_brokers_are_one_line_each_and_credentials_are_not_echoed() {
        let e = cfg(|c| c.dsn = "kafka://user:hunter2@h1:9092".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.dsn: a broker address carries credentials"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = cfg(|c| c.dsn = "nats://h:4222".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nats\" is not a kafka url"), "{e}");
        let e = cfg(|c| {
            c.kafka = Some(KafkaConfig {
                brokers: vec!["h1".into(), "h2:0".into()],
                ..Default::default()
            })
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(
            e.problems[0].starts_with("config.kafka.brokers[0]: \"h1\" needs a port"),
            "{e}"
        );
        let e = cfg(|c| {
            c.dsn = "kafka://a:1".into();
            c.kafka = Some(KafkaConfig {
                brokers: vec!["b:2".into()],
                ..Default::default()
            });
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("set one of dsn, kafka.brokers"), "{e}");
    }

    #[test]
    fn sasl_scram_over_tls_and_the_password_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let c = cfg(|c| {
            c.dsn = "kafka://h:9093".into();
            c.tls = Some(NatsTls {
                ca_file: ca.to_string_lossy().into(),
                ..Default::default()
            });
            c.auth = Some(NatsAuth {
                user: "app".into(),
                password: "s3cret-pw".into(),
                ..Default::default()
            });
            c.kafka = Some(KafkaConfig {
                sasl_mechanism: KafkaSaslMechanism::ScramSha512 as i32,
                ..Default::default()
            });
        })
        .unwrap();
        assert_eq!(c.protocol, SecurityProtocol::SaslSsl);
        let sasl = c.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(sasl.password.expose(), "s3cret-pw");
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("s3cret-pw") && printed.contains("app"),
            "{printed}"
        );
        // Every error path with the password set: never echoed.
        let e = cfg(|c| {
            c.auth = Some(NatsAuth {
                user: "app".into(),
                password: "s3cret-pw".into(),
                token: "tok3n".into(),
                ..Default::default()
            });
            c.kafka = Some(KafkaConfig {
                security_protocol: KafkaSecurityProtocol::Plaintext as i32,
                sasl_mechanism: 99,
                ..Default::default()
            });
        })
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cret-pw") && !e.contains("tok3n"), "{e}");
        assert!(e.contains("config.auth.token: is a NATS credential"), "{e}");
        assert!(e.contains("does not use SASL"), "{e}");
        assert!(e.contains("config.kafka.sasl_mechanism: must be"), "{e}");
    }

    #[test]
    fn protocol_must_fit_the_settings() {
        let e = cfg(|c| {
            c.kafka = Some(KafkaConfig {
                security_protocol: KafkaSecurityProtocol::SaslSsl as i32,
                ..Default::default()
            })
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sasl_ssl needs auth.user and auth.password"),
            "{e}"
        );
        let e = cfg(|c| {
            c.tls = Some(NatsTls {
                cert_file: "/nonexistent/c.pem".into(),
                ..Default::default()
            })
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cert_file and key_file go together"), "{e}");
        assert!(
            e.contains("config.tls.cert_file: \"/nonexistent/c.pem\" is not a readable file"),
            "{e}"
        );
    }

    #[test]
    fn librdkafka_options_pass_unless_the_plugin_or_security_owns_them() {
        let opts = |pairs: &[(&str, &str)]| {
            cfg(|c| {
                c.kafka = Some(KafkaConfig {
                    librdkafka_options: pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                })
            })
        };
        let ok = opts(&[("linger.ms", "0"), ("batch.num.messages", "1")]).unwrap();
        assert_eq!(
            ok.options,
            vec![
                ("batch.num.messages".to_string(), "1".to_string()),
                ("linger.ms".to_string(), "0".to_string())
            ]
        );
        let e = opts(&[
            ("sasl.password", "hunter2"),
            ("enable.idempotence", "false"),
            ("Bad Key", "x"),
        ])
        .unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        let t = e.to_string();
        assert!(!t.contains("hunter2"), "{t}");
        assert!(t.contains("is a security setting"), "{t}");
        assert!(t.contains("is set by the plugin"), "{t}");
        assert!(t.contains("is not a librdkafka property name"), "{t}");
    }

    #[test]
    fn nats_and_pg_settings_are_refused_one_line_each() {
        let e = cfg(|c| {
            c.servers = vec!["nats://x:4222".into()];
            c.poll_interval = "1s".into();
            c.version = "2.10".into();
            c.connection_name = "x".into();
            c.jetstream = Some(Default::default());
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 5, "{e}");
        let t = e.to_string();
        for f in [
            "servers",
            "poll_interval",
            "version",
            "connection_name",
            "jetstream",
        ] {
            assert!(t.contains(&format!("config.{f}: ")), "{f}: {t}");
        }
    }
}
