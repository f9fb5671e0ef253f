//! `digitalocean.app_platform` behind the deploy-target seam: the broker's app is created or
//! updated through the Apps API and reached over its websocket url with the configured auth.

use super::api::{ApiConfig, ApiError, AppsApi};
use super::ops::{self, OpsError};
use super::record::AppRecord;
use super::{desired_view, outputs, validate, AppAuth, AppDesired, COMPARED_KEYS};
use crate::iac::ctx::Ctx;
use crate::iac::error::{DriverError, PlatformClass};
use crate::iac::kind::BROKER_TYPE;
use crate::iac::state::{AuthRecord, BrokerRecord, TargetRecord};
use crate::iac::targets::api::{label, Applied, BrokerDesired, BrokerTarget, Platform};
use crate::iac::values::{config_problems, str_field};
use crate::providers::DeployTarget;
use serde_json::{json, Map, Value as Json};

pub struct AppPlatform;

fn desired(d: &BrokerDesired) -> Result<AppDesired, DriverError> {
    validate(&d.spec.name, &d.config)
        .map_err(|lines| config_problems(BROKER_TYPE, &d.spec.name, lines))
}

fn platform_error(what: &str, e: impl Into<OpsError>) -> DriverError {
    let e = e.into();
    let class = match &e {
        OpsError::Api(
            ApiError::NoToken | ApiError::Unauthorized { .. } | ApiError::Forbidden { .. },
        ) => PlatformClass::Auth,
        OpsError::Api(ApiError::BadUrl { .. } | ApiError::Unprocessable { .. })
        | OpsError::NotOurs { .. } => PlatformClass::Invalid,
        OpsError::Api(ApiError::RateLimited { .. } | ApiError::Transport { .. }) => {
            PlatformClass::Unavailable
        }
        OpsError::Api(ApiError::DeployTimeout { .. }) => PlatformClass::Timeout,
        _ => PlatformClass::Failed,
    };
    DriverError::Platform {
        what: what.to_string(),
        class,
        source: Box::new(e),
    }
}

fn client(ctx: &Ctx, what: &str) -> Result<AppsApi, DriverError> {
    ApiConfig::resolve(
        ctx.provider_str("digitalocean_token"),
        ctx.provider_str("digitalocean_api_url"),
    )
    .map(AppsApi::new)
    .map_err(|e| platform_error(what, e))
}

#[tonic::async_trait]
impl BrokerTarget for AppPlatform {
    fn offer(&self) -> &'static str {
        "digitalocean.app_platform (one non-durable broker as an App Platform app)"
    }

    fn check(&self, d: &BrokerDesired) -> Result<(), DriverError> {
        desired(d).map(|_| ())
    }

    fn provider_id(&self, name: &str, rec: &BrokerRecord) -> String {
        app(rec)
            .map(|a| a.app_id.clone())
            .unwrap_or_else(|| name.to_string())
    }

    /// The app always has credentials; keeping them out of outputs spares wfctl a secrets
    /// provider (streams and consumers read them from the provider's state file, the workflow
    /// app from its own environment).
    fn credentials_in_outputs(&self) -> bool {
        false
    }

    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]) {
        const KEYS: [&str; 13] = [
            "provider",
            "deploy_target",
            "replicas",
            "prevent_destroy",
            "bind",
            COMPARED_KEYS[0],
            COMPARED_KEYS[1],
            COMPARED_KEYS[2],
            COMPARED_KEYS[3],
            COMPARED_KEYS[4],
            COMPARED_KEYS[5],
            COMPARED_KEYS[6],
            COMPARED_KEYS[7],
        ];
        // A region cannot change in place (the app would have to move).
        (&KEYS, &["provider", "deploy_target", "region"])
    }

    fn replicas(&self, _: &BrokerDesired) -> u32 {
        1
    }

    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>) {
        if let Ok(a) = desired(d) {
            if let Some(v) = desired_view(&a).as_object() {
                m.extend(v.clone());
            }
        }
    }

    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
    ) -> Result<Applied, DriverError> {
        let what = label(name);
        let a = desired(d)?;
        let api = client(ctx, &what)?;
        let state = ctx.state.load()?;
        let old = state.brokers.get(name);
        let recorded_id = old.and_then(app).map(|r| r.app_id.clone());
        // SECRET values read back encrypted, so a changed credential is only visible here.
        let force = old
            .map(|r| str_field(&r.outputs, "auth_fingerprint"))
            .is_some_and(|fp| !fp.is_empty() && fp != a.auth.fingerprint());
        let app = ops::apply(&api, &a, recorded_id.as_deref(), force)
            .await
            .map_err(|e| platform_error(&what, e))?;
        let mut out = outputs(&a, &app);
        let url = str_field(&out, "url").to_string();
        if url.is_empty() {
            return Err(DriverError::invalid(
                &what,
                format!("App Platform app {} is ACTIVE but has no live url", app.id),
            ));
        }
        out["name"] = json!(name);
        let (token, user, password) = match &a.auth {
            AppAuth::Token(t) => (t.expose().to_string(), String::new(), String::new()),
            AppAuth::UserPassword { user, password } => {
                (String::new(), user.clone(), password.expose().to_string())
            }
        };
        let record = BrokerRecord {
            target: DeployTarget::DigitalOceanApp,
            urls: vec![url],
            auth: AuthRecord {
                token,
                user,
                password,
                ..Default::default()
            },
            replicas: 1,
            connect_timeout_ms: d.spec.conn.connect_timeout.as_millis() as u64,
            request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
            deployed: Some(TargetRecord::AppPlatform(AppRecord {
                app_id: app.id.clone(),
                app_name: a.app_name.clone(),
            })),
            prevent_destroy: d.spec.prevent_destroy,
            bind: d.spec.bind,
            outputs: Json::Null,
            pg: None,
            kafka: None,
        };
        Ok(Applied {
            record,
            outputs: out,
        })
    }

    async fn platform(
        &self,
        ctx: &Ctx,
        what: &str,
        rec: &BrokerRecord,
    ) -> Result<Platform, DriverError> {
        let Some(a) = app(rec) else {
            return Ok(Platform::Untracked);
        };
        let api = client(ctx, what)?;
        match ops::read(&api, &a.app_id)
            .await
            .map_err(|e| platform_error(what, e))?
        {
            None => Ok(Platform::Gone),
            Some(app) => Ok(Platform::Live(ops::live_outputs(&rec.outputs, &app))),
        }
    }

    async fn delete(&self, ctx: &Ctx, what: &str, rec: &BrokerRecord) -> Result<(), DriverError> {
        let (Some(a), false) = (app(rec), rec.bind) else {
            return Ok(());
        };
        let api = client(ctx, what)?;
        api.delete(&a.app_id)
            .await
            .map_err(|e| platform_error(what, e))?;
        tracing::info!(app = %a.app_name, app_id = %a.app_id, "App Platform app deleted");
        Ok(())
    }
}

/// The app this target recorded for a broker (none on another target).
fn app(rec: &BrokerRecord) -> Option<&AppRecord> {
    match &rec.deployed {
        Some(TargetRecord::AppPlatform(a)) => Some(a),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compared_keys_cover_the_view_and_region_forces_a_replace() {
        let (keys, force) = AppPlatform.compared_keys();
        for k in COMPARED_KEYS {
            assert!(keys.contains(k), "{k}");
        }
        assert!(force.contains(&"region") && !force.contains(&"version"));
    }
}
