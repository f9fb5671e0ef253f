//! The target's operations over the Apps API: apply (create or update, then wait for ACTIVE),
//! read, delete and drift. Everything the provider records comes back from `apply`.

use super::api::{ApiError, App, AppsApi};
use super::{spec, AppDesired};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// The first line of every nats.conf this provider renders; an app without it was not made here
/// and is never taken over.
const OURS: &str = "# Written by workflow-plugin-eventbus for infra.eventbus";

fn env_value(app_spec: &Json, key: &str) -> Option<String> {
    app_spec
        .pointer("/services/0/envs")
        .and_then(Json::as_array)?
        .iter()
        .find(|e| e["key"] == key)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

fn is_ours(app: &App) -> bool {
    env_value(&app.spec, spec::ENV_CONFIG).is_some_and(|c| c.starts_with(OURS))
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("an App Platform app named {name:?} (id {id}) already exists in this account and was not created by this provider; rename the broker or remove that app")]
    NotOurs { name: String, id: String },
}

/// Creates the app, or brings an existing one (by recorded id, else by name) to the desired spec.
/// `force` redeploys even when the visible spec is unchanged (a SECRET value changed: the API
/// only ever shows it encrypted).
pub async fn apply(
    api: &AppsApi,
    d: &AppDesired,
    recorded_id: Option<&str>,
    force: bool,
) -> Result<App, OpsError> {
    let desired = spec::app_spec(d);
    let mut existing = None;
    if let Some(id) = recorded_id.filter(|id| !id.is_empty()) {
        match api.get(id).await {
            Ok(a) => existing = Some(a),
            Err(e) if e.is_not_found() => {
                tracing::warn!(broker = %d.broker, app_id = id, "recorded App Platform app is gone; creating it again (its data went with it)");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if existing.is_none() {
        existing = api.find_by_name(&d.app_name).await?;
    }
    let app = match existing {
        None => {
            api.propose(&desired, None).await?;
            let app = api.create(&desired).await?;
            tracing::info!(broker = %d.broker, app = %d.app_name, app_id = %app.id, "App Platform app created; waiting for its deployment");
            api.wait_active(&app, d.deploy_timeout).await?
        }
        Some(a) if !is_ours(&a) => {
            return Err(OpsError::NotOurs {
                name: d.app_name.clone(),
                id: a.id,
            })
        }
        Some(a) => {
            if force || spec::managed_view(&a.spec) != spec::managed_view(&desired) {
                api.propose(&desired, Some(&a.id)).await?;
                let u = api.update(&a.id, &desired).await?;
                tracing::info!(broker = %d.broker, app = %d.app_name, app_id = %a.id, "App Platform app updated; waiting for its deployment (the broker restarts with an empty store)");
                api.wait_active(&u, d.deploy_timeout).await?
            } else if a.live_url.is_empty() || !a.pending_deployment.is_empty() {
                api.wait_active(&a, d.deploy_timeout).await?
            } else {
                a
            }
        }
    };
    Ok(app)
}

/// The app, or `None` when it no longer exists.
pub async fn read(api: &AppsApi, id: &str) -> Result<Option<App>, ApiError> {
    match api.get(id).await {
        Ok(a) => Ok(Some(a)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Recorded outputs with the compared fields as the live app has them (drift reads these).
pub fn live_outputs(recorded: &Json, live: &App) -> Json {
    let mut o = recorded.clone();
    let svc = live
        .spec
        .pointer("/services/0")
        .cloned()
        .unwrap_or(Json::Null);
    if let Some(tag) = svc.pointer("/image/tag").and_then(Json::as_str) {
        o["version"] = Json::String(tag.trim_end_matches("-alpine").to_string());
    }
    if let Some(size) = svc.get("instance_size_slug") {
        o["instance_size"] = size.clone();
    }
    if let Some(port) = svc.get("http_port") {
        o["http_port"] = port.clone();
    }
    if let Some(conf) = env_value(&live.spec, spec::ENV_CONFIG) {
        o["config_sha256"] = Json::String(sha256_hex(&conf));
    }
    if let Some(url) = spec::websocket_url(&live.live_url) {
        o["url"] = Json::String(url);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_secrets_are_not_drift_but_a_changed_config_is() {
        let d = crate::iac::targets::app_platform::tests_support::desired("bus");
        let mut live = App {
            id: "x".into(),
            spec: spec::app_spec(&d),
            ..Default::default()
        };
        let outputs = crate::iac::targets::app_platform::outputs(&d, &live);
        if let Some(envs) = live
            .spec
            .pointer_mut("/services/0/envs")
            .and_then(Json::as_array_mut)
        {
            for e in envs {
                if e["type"] == "SECRET" {
                    e["value"] = Json::String("EV[1:abcdef]".into());
                }
            }
        }
        // What drift compares: the recorded outputs against the live ones.
        let changed = |live: &App| -> Vec<&str> {
            let now = live_outputs(&outputs, live);
            ["version", "instance_size", "http_port", "config_sha256"]
                .into_iter()
                .filter(|k| now[*k] != outputs[*k])
                .collect()
        };
        assert!(changed(&live).is_empty());
        live.spec["services"][0]["envs"][0]["value"] = Json::String("port: 1".into());
        live.spec["services"][0]["image"]["tag"] = Json::String("2.9.0-alpine".into());
        assert_eq!(changed(&live), vec!["version", "config_sha256"]);
    }
}
