//! The `digitalocean.app_platform` deploy target: one App Platform app per broker, single
//! node, provisioned through the DigitalOcean Apps API.
//!
//! Facts this target is built on (the platform, not a choice of ours):
//! - App Platform has no volumes. A container's disk (2 GiB at most) is wiped on every deploy,
//!   restart and instance replacement, so every stream, consumer and message goes with it. The
//!   broker config must say it accepts that (`app_platform.acknowledge_data_loss`) and outputs
//!   carry `durable: false`.
//! - Instances of one service are load-balanced behind one name and have no stable identity,
//!   so they cannot be cluster routes for each other: one instance, no `cluster {}`.
//! - Internal DNS reaches only components of the same app, and the public edge speaks only
//!   HTTP(S). NATS's websocket listener on the app's HTTP port, behind the edge's TLS, is the one
//!   way in from other apps and from the operator's machine, hence mandatory client auth.
//!
//! `spec` renders the app spec, `api` talks to the Apps API; this file validates the broker
//! config for this target and turns API answers into outputs.

pub mod api;
mod desired;
pub mod ops;
pub mod record;
pub mod spec;
mod target;

use desired::hex;
pub use desired::{AppAuth, AppDesired};
pub use target::AppPlatform;

use crate::nats::server_conf::{env_safe_secret, ENV_SAFE_SECRET_RULE};
use crate::pb::eventbus::ClusterConfig;
use crate::secret::Secret;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const TARGET: &str = "digitalocean.app_platform";
pub const DEFAULT_INSTANCE_SIZE: &str = "apps-s-1vcpu-1gb";
pub const DEFAULT_HTTP_PORT: u16 = 8080;
pub const DEFAULT_DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);
/// Half the 2 GiB disk: the rest is the image's files, the config and the store's own overhead;
/// a container whose disk fills up is replaced (and loses everything).
pub const MAX_FILE_STORE: i64 = 1 << 30;
pub const DEFAULT_MAX_MEMORY_STORE: i64 = 256 << 20;
/// App Platform region slugs.
pub const REGIONS: [&str; 10] = [
    "atl", "nyc", "sfo", "tor", "ams", "fra", "lon", "blr", "sgp", "syd",
];

/// The app (and service) name: the broker's name when it is already a valid App Platform name
/// (`^[a-z][a-z0-9-]{0,30}[a-z0-9]$`), otherwise a cleaned-up prefix plus a hash of the full name,
/// so two brokers never share an app (and names like `Bus_A` and `bus-a` stay apart).
pub fn app_name(broker: &str) -> String {
    let valid = broker.len() >= 2
        && broker.len() <= 32
        && broker.starts_with(|c: char| c.is_ascii_lowercase())
        && broker.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && broker
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
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
    clean.truncate(24);
    let clean = clean.trim_end_matches('-');
    let digest = Sha256::digest(broker.as_bytes());
    format!("{clean}-{}", &hex(&digest[..3]))
}

/// `field: message` lines, every problem at once.
struct Problems(Vec<String>);

impl Problems {
    fn field(&mut self, field: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }
}

fn duration(d: &Option<prost_types::Duration>) -> Option<Duration> {
    d.as_ref()
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
}

fn negative(d: &Option<prost_types::Duration>) -> bool {
    d.as_ref().is_some_and(|d| d.seconds < 0 || d.nanos < 0)
}

/// Validates the target's part of a broker config; every problem at once, one line each
/// (`field: message`, the field named as in the config).
pub fn validate(name: &str, c: &ClusterConfig) -> Result<AppDesired, Vec<String>> {
    let mut p = Problems(Vec::new());
    let ap = c.app_platform.clone().unwrap_or_default();
    if !ap.acknowledge_data_loss {
        p.field(
            "app_platform.acknowledge_data_loss",
            "App Platform has no volumes: this broker's streams, consumers and messages are lost on every deploy, \
             restart and instance replacement; set app_platform.acknowledge_data_loss: true to accept that, or use \
             deploy_target kubernetes (DOKS with persistent volumes) for data that must survive",
        );
    }
    if c.version.trim().is_empty() {
        p.field(
            "version",
            "is required for digitalocean.app_platform (it picks the nats:<version>-alpine image); pin a release such as \"2.10.29\"",
        );
    } else if c.version.eq_ignore_ascii_case("latest") {
        p.field(
            "version",
            "\"latest\" is not allowed; pin a nats-server release such as \"2.10.29\"",
        );
    }
    if c.replicas > 1 {
        p.field(
            "replicas",
            format!(
                "{} is not possible on digitalocean.app_platform: it runs one nats-server (instances of one App Platform \
                 service cannot address each other as cluster routes and have no disk that survives); use replicas 1, \
                 or deploy_target kubernetes on DOKS for a clustered JetStream",
                c.replicas
            ),
        );
    }
    let region = c.region.trim();
    if !region.is_empty() && !REGIONS.contains(&region) {
        p.field(
            "region",
            format!(
                "{region:?} is not an App Platform region; use one of {} (region groups, not datacenters like nyc1)",
                REGIONS.join(", ")
            ),
        );
    }
    let auth = c.auth.clone().unwrap_or_default();
    let auth = if !auth.creds_file.is_empty() || !auth.nkey_seed_file.is_empty() {
        p.field(
            "auth",
            "digitalocean.app_platform supports auth.token or auth.user + auth.password (delivered as SECRET env vars); creds_file and nkey_seed_file are not supported",
        );
        None
    } else if !auth.token.is_empty() {
        if !env_safe_secret(&auth.token) {
            p.field("auth.token", format!("must be {ENV_SAFE_SECRET_RULE}"));
        }
        Some(AppAuth::Token(Secret::new(&auth.token)))
    } else if !auth.user.is_empty() && !auth.password.is_empty() {
        if !env_safe_secret(&auth.user) {
            p.field("auth.user", format!("must be {ENV_SAFE_SECRET_RULE}"));
        }
        if !env_safe_secret(&auth.password) {
            p.field("auth.password", format!("must be {ENV_SAFE_SECRET_RULE}"));
        }
        Some(AppAuth::UserPassword {
            user: auth.user.clone(),
            password: Secret::new(&auth.password),
        })
    } else {
        p.field(
            "auth",
            "is required for digitalocean.app_platform: the broker is reachable from the internet through the app's \
             websocket url; set auth.token (e.g. \"${NATS_TOKEN}\"), or auth.user and auth.password",
        );
        None
    };
    let js = c.jetstream.unwrap_or_default();
    let max_file_store = if js.max_storage_bytes == 0 {
        MAX_FILE_STORE
    } else {
        js.max_storage_bytes
    };
    if !(1..=MAX_FILE_STORE).contains(&max_file_store) {
        p.field(
            "jetstream.max_storage_bytes",
            format!(
                "{max_file_store} does not fit App Platform's 2 GiB container disk; use 1..={MAX_FILE_STORE} (0 = {MAX_FILE_STORE})"
            ),
        );
    }
    let max_memory_store = if js.max_memory_bytes == 0 {
        DEFAULT_MAX_MEMORY_STORE
    } else {
        js.max_memory_bytes
    };
    if max_memory_store < 0 {
        p.field(
            "jetstream.max_memory_bytes",
            "must be positive (0 = 256 MiB)",
        );
    }
    let http_port = match ap.http_port {
        0 => DEFAULT_HTTP_PORT,
        p @ 1..=65535 if ![spec::CLIENT_PORT as i32, spec::MONITOR_PORT as i32].contains(&p) => {
            p as u16
        }
        other => {
            p.field(
                "app_platform.http_port",
                format!("{other} is not usable; use a port 1..=65535 other than 4222 and 8222 (default 8080)"),
            );
            DEFAULT_HTTP_PORT
        }
    };
    let instance_size = if ap.instance_size.is_empty() {
        DEFAULT_INSTANCE_SIZE.to_string()
    } else {
        ap.instance_size.clone()
    };
    if !instance_size
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        p.field(
            "app_platform.instance_size",
            format!("{instance_size:?} is not an instance size slug (e.g. apps-s-1vcpu-1gb)"),
        );
    }
    if negative(&ap.deploy_timeout) || duration(&ap.deploy_timeout) == Some(Duration::ZERO) {
        p.field(
            "app_platform.deploy_timeout",
            "must be a positive duration such as \"600s\"",
        );
    }
    let d = AppDesired {
        broker: name.to_string(),
        app_name: app_name(name),
        version: c.version.trim().trim_start_matches('v').to_string(),
        region: (!region.is_empty()).then(|| region.to_string()),
        instance_size,
        http_port,
        max_file_store,
        max_memory_store,
        auth: auth.unwrap_or(AppAuth::Token(Secret::default())),
        deploy_timeout: duration(&ap.deploy_timeout).unwrap_or(DEFAULT_DEPLOY_TIMEOUT),
    };
    if p.0.is_empty() {
        Ok(d)
    } else {
        Err(p.0)
    }
}

/// What this target compares between config and outputs, and which of those force a replace.
pub const COMPARED_KEYS: &[&str] = &[
    "version",
    "region",
    "instance_size",
    "http_port",
    "max_file_store",
    "max_memory_store",
    "auth_mode",
    "auth_fingerprint",
];
/// A region cannot change in place (the app would have to move).
pub const REPLACE_KEYS: &[&str] = &["region"];

/// The compared settings as the config asks for them.
pub fn desired_view(d: &AppDesired) -> Json {
    json!({
        "version": d.version,
        "region": d.region.clone().unwrap_or_default(),
        "instance_size": d.instance_size,
        "http_port": d.http_port,
        "max_file_store": d.max_file_store,
        "max_memory_store": d.max_memory_store,
        "auth_mode": d.auth.mode(),
        "auth_fingerprint": d.auth.fingerprint(),
    })
}

/// Outputs of an ACTIVE app: the app id is the provider id.
pub fn outputs(d: &AppDesired, app: &api::App) -> Json {
    let mut o = desired_view(d);
    let m = o.as_object_mut().expect("object");
    let region = if app.region.is_empty() {
        d.region.clone().unwrap_or_default()
    } else {
        app.region.clone()
    };
    // The region the config asked for (empty = DigitalOcean's default) stays what the diff
    // compares; the one the app landed in is reported beside it.
    m.insert("app_region".into(), json!(region));
    m.insert("app_id".into(), json!(app.id));
    m.insert("app_name".into(), json!(d.app_name));
    m.insert(
        "url".into(),
        json!(spec::websocket_url(&app.live_url).unwrap_or_default()),
    );
    m.insert("live_url".into(), json!(app.live_url));
    m.insert("internal_url".into(), json!(spec::internal_url(d)));
    m.insert("image".into(), json!(spec::image_ref(&d.version)));
    m.insert("durable".into(), json!(false));
    m.insert("cluster_size".into(), json!(1));
    m.insert(
        "config_sha256".into(),
        json!(hex(&Sha256::digest(spec::render_config(d).as_bytes()))),
    );
    o
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn desired(name: &str) -> AppDesired {
        AppDesired {
            broker: name.into(),
            app_name: app_name(name),
            version: "2.10.29".into(),
            region: None,
            instance_size: DEFAULT_INSTANCE_SIZE.into(),
            http_port: DEFAULT_HTTP_PORT,
            max_file_store: MAX_FILE_STORE,
            max_memory_store: DEFAULT_MAX_MEMORY_STORE,
            auth: AppAuth::Token(Secret::new("someToken")),
            deploy_timeout: DEFAULT_DEPLOY_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Json) -> ClusterConfig {
        let mut base = json!({
            "provider": "nats", "deploy_target": TARGET, "version": "2.10.29",
            "auth": {"token": "s3cretToken"},
            "app_platform": {"acknowledge_data_loss": true}
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        ClusterConfig {
            provider: base["provider"].as_str().unwrap().into(),
            deploy_target: TARGET.into(),
            version: base["version"].as_str().unwrap_or_default().into(),
            replicas: base.get("replicas").and_then(Json::as_i64).unwrap_or(0) as i32,
            region: base
                .get("region")
                .and_then(Json::as_str)
                .unwrap_or("")
                .into(),
            auth: Some(crate::pb::eventbus::NatsAuth {
                token: base["auth"]
                    .get("token")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .into(),
                ..Default::default()
            }),
            app_platform: Some(crate::pb::eventbus::AppPlatformTargetConfig {
                acknowledge_data_loss: base["app_platform"]["acknowledge_data_loss"]
                    .as_bool()
                    .unwrap_or(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn app_names_are_dns_safe_and_distinct() {
        assert_eq!(app_name("bmw-eventbus"), "bmw-eventbus");
        let a = app_name("BMW_Eventbus");
        let b = app_name("bmw-eventbus");
        assert_ne!(a, b);
        for n in [
            "BMW_Eventbus",
            "1bus",
            "x",
            "a-very-long-broker-name-that-is-over-32-chars",
            "bus-",
        ] {
            let s = app_name(n);
            assert!(s.len() >= 2 && s.len() <= 32, "{s}");
            assert!(s.starts_with(|c: char| c.is_ascii_lowercase()), "{s}");
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{s}"
            );
            assert!(!s.ends_with('-'), "{s}");
        }
    }

    #[test]
    fn refusals_name_field_and_the_way_out() {
        let e = validate("bus", &cfg(json!({"replicas": 3})))
            .unwrap_err()
            .join("\n");
        assert!(e.contains("replicas") && e.contains("kubernetes"), "{e}");
        let e = validate("bus", &cfg(json!({"version": "latest"})))
            .unwrap_err()
            .join("\n");
        assert!(e.contains("version"), "{e}");
        let e = validate("bus", &cfg(json!({"version": ""})))
            .unwrap_err()
            .join("\n");
        assert!(e.contains("is required"), "{e}");
        let e = validate("bus", &cfg(json!({"auth": {}})))
            .unwrap_err()
            .join("\n");
        assert!(e.contains("auth: is required"), "{e}");
        let e = validate(
            "bus",
            &cfg(json!({"app_platform": {"acknowledge_data_loss": false}})),
        )
        .unwrap_err()
        .join("\n");
        assert!(e.contains("acknowledge_data_loss: true"), "{e}");
        let e = validate("bus", &cfg(json!({"region": "nyc1"})))
            .unwrap_err()
            .join("\n");
        assert!(e.contains("region"), "{e}");
        let d = validate("bus", &cfg(json!({}))).unwrap();
        assert_eq!(d.max_file_store, MAX_FILE_STORE);
    }
}
