//! The App Platform app spec of one broker: a single service running the official
//! `nats:<version>-alpine` image with the shared nats.conf renderer's output.
//!
//! App Platform gives an image component no config files and no volumes, so the config travels
//! in a GENERAL env var and the run command writes it to a file before exec'ing nats-server
//! (nats-server has no flags for JetStream limits, and exits 0 on a flag it does not know). The
//! alpine image has the `sh` this needs; its entrypoint runs a command that does not start with
//! `-` as given, and `sh -c '…'` works the same whether the platform hands the run command to
//! the entrypoint as words or to a shell. Secrets are SECRET env vars that the config references
//! as `$NAME`; they are never part of the config text.

use super::AppDesired;
use crate::nats::server_conf::{EnvAuth, Listen, ServerConf, ServerName, WebsocketConf};
use serde_json::{json, Value as Json};

pub const CLIENT_PORT: u16 = 4222;
pub const MONITOR_PORT: u16 = 8222;
pub const HEALTH_PATH: &str = "/healthz?js-enabled-only=true";
/// Env var names in the spec.
pub const ENV_CONFIG: &str = "NATS_CONFIG";
/// The interface nats-server binds: every interface in the container. (A stand-in for the
/// container's own network namespace can point it at one loopback address.)
pub const ENV_HOST: &str = "NATS_LISTEN_HOST";
pub const ENV_TOKEN: &str = "NATS_TOKEN";
pub const ENV_USER: &str = "NATS_USER";
pub const ENV_PASSWORD: &str = "NATS_PASSWORD";
/// Relative to the run command's working directory (`$TMPDIR`, else /tmp): the container's
/// own disk, wiped on every deploy and restart.
pub const STORE_DIR: &str = "nats-store";
pub const RUN_COMMAND: &str = "sh -c 'cd \"${TMPDIR:-/tmp}\" && printf \"%s\" \"$NATS_CONFIG\" > nats.conf && exec nats-server -c nats.conf'";

/// `2.10.29` → `2.10.29-alpine`.
pub fn image_tag(version: &str) -> String {
    format!("{}-alpine", version.trim_start_matches('v'))
}

pub fn image_ref(version: &str) -> String {
    format!("nats:{}", image_tag(version))
}

/// The nats.conf text the app runs (secrets as `$NAME` references only).
pub fn render_config(d: &AppDesired) -> String {
    ServerConf {
        header: format!(
            "Written by workflow-plugin-eventbus for infra.eventbus {:?} on App Platform; the store is wiped on every deploy and restart.",
            d.broker
        ),
        server_name: ServerName::Fixed(d.app_name.clone()),
        client: Listen::EnvHost {
            var: ENV_HOST.into(),
            port: CLIENT_PORT,
        },
        monitor: Listen::EnvHost {
            var: ENV_HOST.into(),
            port: MONITOR_PORT,
        },
        logfile: None,
        pid_file: None,
        lame_duck: None,
        store_dir: STORE_DIR.into(),
        max_file_store: d.max_file_store,
        max_memory_store: d.max_memory_store,
        cluster: None,
        websocket: Some(WebsocketConf { port: d.http_port }),
        auth: Some(match &d.auth {
            super::AppAuth::Token(_) => EnvAuth::Token {
                var: ENV_TOKEN.into(),
            },
            super::AppAuth::UserPassword { .. } => EnvAuth::UserPassword {
                user_var: ENV_USER.into(),
                password_var: ENV_PASSWORD.into(),
            },
        }),
    }
    .render()
}

fn env(key: &str, value: &str, secret: bool) -> Json {
    json!({
        "key": key,
        "value": value,
        "scope": "RUN_TIME",
        "type": if secret { "SECRET" } else { "GENERAL" },
    })
}

/// The whole app spec (what POST /v2/apps and PUT /v2/apps/{id} send, with secrets in clear).
pub fn app_spec(d: &AppDesired) -> Json {
    let mut envs = vec![
        env(ENV_CONFIG, &render_config(d), false),
        env(ENV_HOST, "0.0.0.0", false),
    ];
    match &d.auth {
        super::AppAuth::Token(t) => envs.push(env(ENV_TOKEN, t.expose(), true)),
        super::AppAuth::UserPassword { user, password } => {
            envs.push(env(ENV_USER, user, false));
            envs.push(env(ENV_PASSWORD, password.expose(), true));
        }
    }
    let mut spec = json!({
        "name": d.app_name,
        "services": [{
            "name": d.app_name,
            "image": {
                "registry_type": "DOCKER_HUB",
                "registry": "library",
                "repository": "nats",
                "tag": image_tag(&d.version),
            },
            "run_command": RUN_COMMAND,
            "instance_count": 1,
            "instance_size_slug": d.instance_size,
            "http_port": d.http_port,
            "internal_ports": [CLIENT_PORT, MONITOR_PORT],
            "health_check": {
                "http_path": HEALTH_PATH,
                "port": MONITOR_PORT,
                "initial_delay_seconds": 5,
                "period_seconds": 10,
                "timeout_seconds": 5,
                "success_threshold": 1,
                "failure_threshold": 6,
            },
            // Lame duck mode needs time to move clients off before the instance goes.
            "termination": {"drain_seconds": 15, "grace_period_seconds": 60},
            "envs": envs,
        }],
        "ingress": {"rules": [{
            "match": {"path": {"prefix": "/"}},
            "component": {"name": d.app_name},
        }]},
    });
    if let Some(r) = &d.region {
        spec["region"] = json!(r);
    }
    spec
}

/// The spec with every SECRET value replaced by a marker: what drift compares, since the API
/// returns SECRET values encrypted (`EV[...]`) on every read.
pub fn comparable(spec: &Json) -> Json {
    let mut s = spec.clone();
    if let Some(services) = s.get_mut("services").and_then(Json::as_array_mut) {
        for svc in services {
            if let Some(envs) = svc.get_mut("envs").and_then(Json::as_array_mut) {
                for e in envs {
                    if e.get("type").and_then(Json::as_str) == Some("SECRET") {
                        e["value"] = json!("<secret>");
                    }
                }
            }
        }
    }
    s
}

/// The fields of a live app spec that this provider sets, in comparable form (drift ignores
/// what the platform adds, such as defaults it fills in).
pub fn managed_view(spec: &Json) -> Json {
    let s = comparable(spec);
    let svc = s
        .get("services")
        .and_then(|v| v.get(0))
        .cloned()
        .unwrap_or(Json::Null);
    let mut envs: Vec<Json> = svc
        .get("envs")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| json!({"key": e["key"], "value": e["value"], "type": e.get("type").cloned().unwrap_or(json!("GENERAL"))}))
        .collect();
    envs.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    json!({
        "name": s.get("name"),
        "region": s.get("region"),
        "image": svc.get("image"),
        "run_command": svc.get("run_command"),
        "instance_count": svc.get("instance_count"),
        "instance_size_slug": svc.get("instance_size_slug"),
        "http_port": svc.get("http_port"),
        "internal_ports": svc.get("internal_ports"),
        "health_check_path": svc.get("health_check").and_then(|h| h.get("http_path")),
        "health_check_port": svc.get("health_check").and_then(|h| h.get("port")),
        "envs": envs,
    })
}

/// `https://x.ondigitalocean.app` → `wss://x.ondigitalocean.app`; `http` → `ws`.
pub fn websocket_url(live_url: &str) -> Option<String> {
    let live_url = live_url.trim().trim_end_matches('/');
    if let Some(rest) = live_url.strip_prefix("https://") {
        Some(format!("wss://{rest}"))
    } else {
        live_url
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
    }
}

/// The app-internal client url (reachable only from components of the same app).
pub fn internal_url(d: &AppDesired) -> String {
    format!("nats://{}:{CLIENT_PORT}", d.app_name)
}
