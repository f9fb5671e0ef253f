//! The `self_hosted` deploy target: the servers the operator names (`dsn`/`servers`, else
//! `EVENTBUS_<NAME>_URI` / `NATS_URL`) are adopted. Apply records how to reach them (the driver
//! then checks they answer and have JetStream); delete only forgets them.

use super::api::{label, path_text, strip_userinfo, Applied, BrokerDesired, BrokerTarget};
use crate::config::broker::BrokerSpec;
use crate::iac::ctx::Ctx;
use crate::iac::error::DriverError;
use crate::iac::state::{AuthRecord, BrokerRecord};
use crate::providers::DeployTarget;
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

pub struct SelfHosted;

fn server_list(spec: &BrokerSpec) -> Vec<String> {
    let mut s: Vec<String> = spec
        .resolve_urls()
        .iter()
        .map(|u| strip_userinfo(u.expose()))
        .collect();
    s.sort();
    s
}

fn auth_record(spec: &BrokerSpec) -> AuthRecord {
    let c = &spec.conn;
    AuthRecord {
        token: c
            .token
            .as_ref()
            .map(|t| t.expose().to_string())
            .unwrap_or_default(),
        user: c.user.clone().unwrap_or_default(),
        password: c
            .password
            .as_ref()
            .map(|t| t.expose().to_string())
            .unwrap_or_default(),
        creds_file: path_text(&c.creds_file),
        nkey_seed_file: path_text(&c.nkey_seed_file),
        tls_ca_file: path_text(&c.tls_ca_file),
        tls_cert_file: path_text(&c.tls_cert_file),
        tls_key_file: path_text(&c.tls_key_file),
        tls_required: c.tls_required,
    }
}

/// What apply returns of an adopted broker: its urls without credentials (the driver adds the
/// compared view, the version and the credentials as sensitive keys).
#[derive(Serialize)]
struct SelfHostedOutputs<'a> {
    name: &'a str,
    url: String,
    urls: Vec<String>,
}

#[tonic::async_trait]
impl BrokerTarget for SelfHosted {
    fn offer(&self) -> &'static str {
        "self_hosted (servers you name with dsn/servers)"
    }

    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (
            &[
                "provider",
                "deploy_target",
                "version",
                "replicas",
                "servers",
                "auth_fingerprint",
                "prevent_destroy",
                "bind",
            ],
            &["provider", "deploy_target"],
        )
    }

    fn replicas(&self, d: &BrokerDesired) -> u32 {
        d.declared_replicas
    }

    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>) {
        m.insert("servers".into(), json!(server_list(&d.spec)));
        m.insert(
            "auth_fingerprint".into(),
            json!(d.spec.conn.auth_fingerprint()),
        );
    }

    async fn apply(&self, _: &Ctx, name: &str, d: &BrokerDesired) -> Result<Applied, DriverError> {
        let urls = d.spec.resolve_urls();
        if urls.is_empty() {
            return Err(DriverError::invalid(
                label(name),
                format!(
                    "self_hosted needs the servers to adopt: set dsn or servers, or EVENTBUS_{}_URI / NATS_URL in wfctl's environment",
                    crate::nats::names::env_key(name)
                ),
            ));
        }
        let shown: Vec<String> = urls.iter().map(|u| strip_userinfo(u.expose())).collect();
        let record = BrokerRecord {
            target: DeployTarget::SelfHosted,
            urls: urls.iter().map(|u| u.expose().to_string()).collect(),
            auth: auth_record(&d.spec),
            replicas: d.declared_replicas,
            connect_timeout_ms: d.spec.conn.connect_timeout.as_millis() as u64,
            request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
            deployed: None,
            prevent_destroy: d.spec.prevent_destroy,
            bind: d.spec.bind,
            outputs: Json::Null,
            pg: None,
            kafka: None,
        };
        Ok(Applied {
            record,
            outputs: serde_json::to_value(SelfHostedOutputs {
                name,
                url: shown.join(","),
                urls: shown,
            })
            .unwrap_or_default(),
        })
    }
}
