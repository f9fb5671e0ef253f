//! `infra.eventbus`: a broker, per deploy target.
//!
//! - `self_hosted`: the servers the operator names (`dsn`/`servers`, else
//!   `EVENTBUS_<NAME>_URI` / `NATS_URL`) are adopted: Create checks they answer and have
//!   JetStream, and records how to reach them; Delete only forgets them.
//! - `local`: nats-server processes on this machine (`iac::local`), recorded with their pids and
//!   ports so the next plugin process finds them.
//! - every other target fails at Diff and Create with a "not yet" naming the alternatives.
//!
//! The diff is over a flat "view" of the compared settings that the outputs echo.

use super::{
    bool_field, config_object, decode_config, fingerprint, str_field, BrokerConn, Ctx, Output,
    BROKER_TYPE,
};
use crate::iac::error::DriverError;
use crate::iac::local::{self, LocalRecord};
use crate::iac::state::{AuthRecord, BrokerRecord};
use crate::pb::eventbus::ClusterConfig;
use crate::pb::iac::ResourceRef;
use crate::providers::DeployTarget;
use crate::runtime::modules::broker::BrokerSpec;
use crate::secret::Secret;
use serde_json::{json, Map, Value as Json};
use std::path::{Path, PathBuf};

/// A validated broker config plus the raw values whose "unset" matters.
#[derive(Clone, Debug)]
pub struct BrokerDesired {
    pub spec: BrokerSpec,
    /// `replicas` as written (0 = not declared).
    pub declared_replicas: u32,
    pub max_file_store: i64,
    pub max_memory_store: i64,
}

pub fn decode(name: &str, config_json: &[u8]) -> Result<BrokerDesired, DriverError> {
    let what = format!("{BROKER_TYPE} {name:?}");
    let m = config_object(&what, config_json)?;
    let c: ClusterConfig = decode_config(BROKER_TYPE, name, "ClusterConfig", m)?;
    let spec = BrokerSpec::validate(BROKER_TYPE, name, &c)?;
    let js = c.jetstream.unwrap_or_default();
    Ok(BrokerDesired {
        spec,
        declared_replicas: c.replicas.max(0) as u32,
        max_file_store: js.max_storage_bytes.max(0),
        max_memory_store: js.max_memory_bytes.max(0),
    })
}

/// Only `local` and `self_hosted` are provisioned by this provider today.
pub fn check_target(d: &BrokerDesired) -> Result<(), DriverError> {
    match d.spec.target {
        DeployTarget::Local | DeployTarget::SelfHosted => Ok(()),
        other => Err(DriverError::NotYet {
            broker: d.spec.name.clone(),
            target: other.as_str().to_string(),
        }),
    }
}

/// Keys the diff compares, and which of them force a replace.
pub fn compared_keys(target: &str) -> (&'static [&'static str], &'static [&'static str]) {
    if target == DeployTarget::Local.as_str() {
        (
            &[
                "provider",
                "deploy_target",
                "version",
                "replicas",
                "local_binary",
                "local_state_dir",
                "local_client_port",
                "max_file_store",
                "max_memory_store",
                "remove_data_on_delete",
                "prevent_destroy",
                "bind",
            ],
            &["provider", "deploy_target", "replicas", "local_state_dir"],
        )
    } else {
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
}

/// `nats://user:pass@host:4222` → `nats://host:4222`.
pub fn strip_userinfo(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let host = match rest.split_once('/') {
        Some((auth, _)) => auth,
        None => rest,
    };
    let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    format!("{scheme}{host}")
}

fn auth_fingerprint(spec: &BrokerSpec) -> String {
    let c = &spec.conn;
    let p = |o: &Option<PathBuf>| {
        o.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    fingerprint(&[
        c.token.as_ref().map(Secret::expose).unwrap_or_default(),
        c.user.as_deref().unwrap_or_default(),
        c.password.as_ref().map(Secret::expose).unwrap_or_default(),
        &p(&c.creds_file),
        &p(&c.nkey_seed_file),
        &p(&c.tls_ca_file),
        &p(&c.tls_cert_file),
        &p(&c.tls_key_file),
        if c.tls_required { "tls" } else { "" },
    ])
}

fn server_list(spec: &BrokerSpec) -> Vec<String> {
    let mut s: Vec<String> = spec
        .resolve_urls()
        .iter()
        .map(|u| strip_userinfo(u.expose()))
        .collect();
    s.sort();
    s
}

/// The compared settings as the config asks for them (pure apart from the env fallback of
/// `self_hosted` urls, which the runtime applies the same way).
pub fn desired_view(d: &BrokerDesired) -> Json {
    let s = &d.spec;
    let p = |o: &Option<PathBuf>| {
        o.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let mut v = json!({
        "provider": s.provider.as_str(),
        "deploy_target": s.target.as_str(),
        "version": s.version,
        "prevent_destroy": s.prevent_destroy,
        "bind": s.bind,
    });
    let m = v.as_object_mut().expect("object");
    if s.target == DeployTarget::Local {
        m.insert("replicas".into(), json!(s.replicas));
        m.insert("local_binary".into(), json!(p(&s.local.binary)));
        m.insert("local_state_dir".into(), json!(p(&s.local.state_dir)));
        m.insert("local_client_port".into(), json!(s.local.client_port));
        m.insert("max_file_store".into(), json!(d.max_file_store));
        m.insert("max_memory_store".into(), json!(d.max_memory_store));
        m.insert(
            "remove_data_on_delete".into(),
            json!(s.local.remove_data_on_delete),
        );
    } else {
        m.insert("replicas".into(), json!(d.declared_replicas));
        m.insert("servers".into(), json!(server_list(s)));
        m.insert("auth_fingerprint".into(), json!(auth_fingerprint(s)));
    }
    v
}

fn auth_record(spec: &BrokerSpec) -> AuthRecord {
    let c = &spec.conn;
    let p = |o: &Option<PathBuf>| {
        o.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
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
        creds_file: p(&c.creds_file),
        nkey_seed_file: p(&c.nkey_seed_file),
        tls_ca_file: p(&c.tls_ca_file),
        tls_cert_file: p(&c.tls_cert_file),
        tls_key_file: p(&c.tls_key_file),
        tls_required: c.tls_required,
    }
}

fn label(name: &str) -> String {
    format!("{BROKER_TYPE} {name:?}")
}

/// Connects and checks JetStream; returns the server's version.
async fn verify(ctx: &Ctx, what: &str, b: &BrokerConn) -> Result<String, DriverError> {
    let conn = ctx.conns.connect(what, b).await?;
    conn.js.query_account().await.map_err(|e| {
        DriverError::refused(
            what,
            format!(
                "JetStream is not available on {} ({e}); start nats-server with -js or enable jetstream in its config",
                b.settings.redacted_urls()
            ),
        )
    })?;
    Ok(conn.client.server_info().version)
}

/// Runs blocking process work off the async threads.
async fn block<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T, local::LocalError> + Send + 'static,
) -> Result<T, DriverError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|source| DriverError::Local { what, source }),
        Err(e) => Err(DriverError::invalid(what, format!("worker failed: {e}"))),
    }
}

/// Create-or-adopt, and Update.
pub async fn apply(ctx: &Ctx, name: &str, d: &BrokerDesired) -> Result<Output, DriverError> {
    check_target(d)?;
    let what = label(name);
    let view = desired_view(d);
    let (record, mut outputs) = match d.spec.target {
        DeployTarget::Local => apply_local(ctx, name, d).await?,
        _ => apply_self_hosted(name, d)?,
    };
    // Record first: processes that are running must be findable even if the check fails.
    let mut record = record;
    ctx.state.update(|s| {
        s.brokers.insert(name.to_string(), record.clone());
    })?;
    let b = BrokerConn::from_record(name, &record);
    let version = verify(ctx, &what, &b).await?;
    let m = outputs.as_object_mut().expect("object");
    for (k, v) in view.as_object().expect("object") {
        m.insert(k.clone(), v.clone());
    }
    m.insert("server_version".into(), json!(version));
    let sensitive = sensitive_outputs(d, m);
    record.outputs = outputs.clone();
    ctx.state.update(|s| {
        s.brokers.insert(name.to_string(), record.clone());
    })?;
    Ok(Output {
        provider_id: name.to_string(),
        outputs,
        sensitive,
        status: "running".into(),
    })
}

/// Credentials go into outputs only as strings marked sensitive (wfctl routes them to its
/// secrets provider).
fn sensitive_outputs(d: &BrokerDesired, m: &mut Map<String, Json>) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(t) = &d.spec.conn.token {
        m.insert("token".into(), json!(t.expose()));
        keys.push("token".to_string());
    }
    if let (Some(u), Some(p)) = (&d.spec.conn.user, &d.spec.conn.password) {
        m.insert("user".into(), json!(u));
        m.insert("password".into(), json!(p.expose()));
        keys.push("password".to_string());
    }
    keys
}

fn apply_self_hosted(name: &str, d: &BrokerDesired) -> Result<(BrokerRecord, Json), DriverError> {
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
        target: DeployTarget::SelfHosted.as_str().into(),
        urls: urls.iter().map(|u| u.expose().to_string()).collect(),
        auth: auth_record(&d.spec),
        replicas: d.declared_replicas,
        connect_timeout_ms: d.spec.conn.connect_timeout.as_millis() as u64,
        request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
        local: None,
        prevent_destroy: d.spec.prevent_destroy,
        bind: d.spec.bind,
        outputs: Json::Null,
    };
    Ok((
        record,
        json!({"name": name, "url": shown.join(","), "urls": shown}),
    ))
}

fn data_dir(ctx: &Ctx, name: &str, d: &BrokerDesired) -> PathBuf {
    match &d.spec.local.state_dir {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.clone()),
        None => ctx.state.dir().join("brokers").join(local::safe_name(name)),
    }
}

async fn apply_local(
    ctx: &Ctx,
    name: &str,
    d: &BrokerDesired,
) -> Result<(BrokerRecord, Json), DriverError> {
    let what = label(name);
    let state = ctx.state.load()?;
    let existing = state
        .brokers
        .get(name)
        .filter(|r| r.target == DeployTarget::Local.as_str())
        .and_then(|r| r.local.clone());
    if existing.is_none() && d.spec.bind {
        return Err(DriverError::refused(
            &what,
            "bind is set and this provider runs no local broker of that name; bind adopts and never starts servers",
        ));
    }
    let configured_binary = d.spec.local.binary.clone();
    let binary = block(what.clone(), move || {
        local::find_binary(configured_binary.as_deref())
    })
    .await?;
    let b2 = binary.clone();
    let found = block(what.clone(), move || local::binary_version(&b2)).await?;
    if !local::version_matches(&d.spec.version, &found) {
        return Err(DriverError::Local {
            what,
            source: local::LocalError::Version {
                binary: binary.display().to_string(),
                found,
                pinned: d.spec.version.clone(),
            },
        });
    }
    let dir = data_dir(ctx, name, d);
    let replicas = d.spec.replicas.max(1);
    let client_port = d.spec.local.client_port;
    let broker = name.to_string();
    let desired = LocalRecord {
        binary: binary.display().to_string(),
        configured_binary: d
            .spec
            .local
            .binary
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        server_version: found,
        data_dir: dir.display().to_string(),
        configured_state_dir: d
            .spec
            .local
            .state_dir
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cluster_name: format!("eventbus-{}", local::safe_name(name)),
        client_port,
        max_file_store: d.max_file_store,
        max_memory_store: d.max_memory_store,
        remove_data_on_delete: d.spec.local.remove_data_on_delete,
        nodes: Vec::new(),
    };
    let rec = match existing {
        Some(old) => {
            if old.nodes.len() as u32 != replicas || old.data_dir != desired.data_dir {
                return Err(DriverError::refused(
                    &what,
                    format!(
                        "a local broker of this name already runs {} node(s) with data in {}; replicas and local.state_dir \
                         cannot change in place (plan shows a replace; delete the broker first)",
                        old.nodes.len(),
                        old.data_dir
                    ),
                ));
            }
            block(what.clone(), move || {
                let ports_changed = old.client_port != desired.client_port;
                let config_changed = old.binary != desired.binary
                    || old.max_file_store != desired.max_file_store
                    || old.max_memory_store != desired.max_memory_store;
                let mut rec = LocalRecord {
                    nodes: old.nodes.clone(),
                    ..desired
                };
                if ports_changed {
                    local::stop_all(&old);
                    rec.nodes = local::plan_nodes(
                        &broker,
                        replicas,
                        client_port,
                        Path::new(&rec.data_dir),
                    )?;
                    local::start_all(&mut rec, &broker)?;
                } else if config_changed {
                    local::heal(&mut rec, &broker)?;
                    local::rolling_restart(&mut rec, &broker)?;
                } else {
                    local::heal(&mut rec, &broker)?;
                }
                Ok(rec)
            })
            .await?
        }
        None => {
            block(what.clone(), move || {
                let mut rec = desired;
                rec.nodes =
                    local::plan_nodes(&broker, replicas, client_port, Path::new(&rec.data_dir))?;
                local::start_all(&mut rec, &broker)?;
                Ok(rec)
            })
            .await?
        }
    };
    let urls = rec.urls();
    let outputs = json!({
        "name": name,
        "url": urls.join(","),
        "urls": urls,
        "cluster_name": if rec.nodes.len() > 1 { rec.cluster_name.clone() } else { String::new() },
        "data_dir": rec.data_dir,
        "binary": rec.binary,
        "nodes": rec.nodes.iter().map(|n| json!({
            "server_name": n.server_name,
            "client_port": n.client_port,
            "cluster_port": n.cluster_port,
            "monitor_port": n.monitor_port,
            "pid": n.pid,
        })).collect::<Vec<_>>(),
    });
    let record = BrokerRecord {
        target: DeployTarget::Local.as_str().into(),
        urls: rec.urls(),
        auth: AuthRecord::default(),
        replicas,
        connect_timeout_ms: 5000,
        request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
        local: Some(rec),
        prevent_destroy: d.spec.prevent_destroy,
        bind: d.spec.bind,
        outputs: Json::Null,
    };
    Ok((record, outputs))
}

fn record_for<'a>(
    state: &'a crate::iac::state::ProviderState,
    r: &ResourceRef,
) -> Option<(&'a String, &'a BrokerRecord)> {
    state
        .brokers
        .get_key_value(&r.name)
        .or_else(|| state.brokers.get_key_value(&r.provider_id))
}

/// Found when recorded and answering; a local broker none of whose processes answer is not
/// found (apply restarts it on the same data).
pub async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
    let state = ctx.state.load()?;
    let Some((name, rec)) = record_for(&state, r) else {
        return Err(DriverError::not_found(format!(
            "{}: this provider has no record of that broker in {}",
            label(&r.name),
            ctx.state.path().display()
        )));
    };
    let what = label(name);
    let mut status = "running";
    if let Some(l) = rec.local.clone() {
        let up = block(what.clone(), move || Ok(local::probe(&l))).await?;
        if !up.iter().any(|u| *u) {
            return Err(DriverError::not_found(format!(
                "{what}: none of its nats-server processes answers; apply starts them again on the same data"
            )));
        }
        if up.iter().any(|u| !*u) {
            status = "degraded";
        }
    }
    let b = BrokerConn::from_record(name, rec);
    let version = verify(ctx, &what, &b).await?;
    let mut outputs = if rec.outputs.is_object() {
        rec.outputs.clone()
    } else {
        json!({"name": name, "url": rec.urls.iter().map(|u| strip_userinfo(u)).collect::<Vec<_>>().join(",")})
    };
    outputs["server_version"] = json!(version);
    let sensitive = ["token", "password"]
        .iter()
        .filter(|k| outputs.get(**k).is_some())
        .map(|k| k.to_string())
        .collect();
    Ok(Output {
        provider_id: name.clone(),
        outputs,
        sensitive,
        status: status.into(),
    })
}

/// Stops what this provider started (local), forgets what it adopted (self_hosted, bind).
/// Refused while streams or consumers recorded on this broker remain, so a broker is never
/// removed from under them.
pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some((name, rec)) = record_for(&state, r) else {
        return Ok(());
    };
    let (name, rec) = (name.clone(), rec.clone());
    let what = label(&name);
    if rec.prevent_destroy {
        return Err(DriverError::refused(
            &what,
            "prevent_destroy is set; set prevent_destroy: false and apply before deleting",
        ));
    }
    let dependents: Vec<String> = state
        .resources
        .iter()
        .filter(|(_, res)| res.broker == name && res.servers.is_empty() && !res.released)
        .map(|(n, _)| n.clone())
        .collect();
    if !dependents.is_empty() {
        return Err(DriverError::refused(
            &what,
            format!(
                "streams/consumers still recorded on this broker: {}; delete them first (give them depends_on: [{name}] so wfctl orders the deletes)",
                dependents.join(", ")
            ),
        ));
    }
    if let (Some(l), false) = (rec.local.clone(), rec.bind) {
        block(what.clone(), move || {
            local::stop_all(&l);
            if l.remove_data_on_delete {
                local::remove_data(&l);
            }
            Ok(())
        })
        .await?;
    }
    ctx.conns.evict(&rec.urls).await;
    ctx.state.update(|s| {
        s.brokers.remove(&name);
        s.resources
            .retain(|_, res| !(res.released && res.broker == name));
    })?;
    Ok(())
}

pub async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
    match read(ctx, r).await {
        Ok(o) => Ok((
            o.status == "running",
            format!(
                "{} ({}), nats-server {}",
                str_field(&o.outputs, "url"),
                o.status,
                str_field(&o.outputs, "server_version")
            ),
        )),
        Err(e) if e.is_not_found() => Err(e),
        Err(e) => Ok((false, crate::runtime::render(&e))),
    }
}

/// Log tails of a local broker's processes.
pub fn troubleshoot(ctx: &Ctx, r: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
    let state = ctx.state.load()?;
    let Some((_, rec)) = record_for(&state, r) else {
        return Err(DriverError::not_found(label(&r.name)));
    };
    let Some(l) = &rec.local else {
        return Err(DriverError::Unsupported(format!(
            "Troubleshoot of a {} broker",
            rec.target
        )));
    };
    Ok(l.nodes
        .iter()
        .map(|n| (n.server_name.clone(), local::log_tail(n, 40)))
        .collect())
}

/// Whether the outputs say this broker is `local` (for drift and destroy decisions).
pub fn is_local_outputs(o: &Json) -> bool {
    str_field(o, "deploy_target") == DeployTarget::Local.as_str()
}

pub fn prevent_destroy_outputs(o: &Json) -> bool {
    bool_field(o, "prevent_destroy")
}

impl super::Driver for super::BrokerDriver {
    type Spec = BrokerDesired;
    const KIND: super::Kind = super::Kind::Broker;
    fn decode(name: &str, config_json: &[u8]) -> Result<BrokerDesired, DriverError> {
        decode(name, config_json)
    }
    /// Unsupported targets fail here, at plan time.
    fn diff(
        spec: &BrokerDesired,
        _: &crate::iac::state::ProviderState,
        current: &Json,
    ) -> Result<Vec<crate::iac::plan::Change>, DriverError> {
        check_target(spec)?;
        Ok(crate::iac::plan::diff_broker(spec, current))
    }
    async fn apply(ctx: &Ctx, name: &str, spec: &BrokerDesired) -> Result<Output, DriverError> {
        apply(ctx, name, spec).await
    }
    async fn read(ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        read(ctx, r).await
    }
    async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        delete(ctx, r).await
    }
    async fn health(ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        health(ctx, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_stripped_from_output_urls() {
        assert_eq!(strip_userinfo("nats://u:p@h:4222"), "nats://h:4222");
        assert_eq!(strip_userinfo("tls://tok@h:4443/x"), "tls://h:4443");
        assert_eq!(strip_userinfo("h:4222"), "h:4222");
    }

    #[test]
    fn other_targets_are_not_yet() {
        for t in [
            "kubernetes",
            "digitalocean.app_platform",
            "aws.ecs",
            "aws.eks",
        ] {
            let d = decode(
                "bus",
                format!(r#"{{"provider":"nats","deploy_target":"{t}"}}"#).as_bytes(),
            )
            .unwrap();
            let e = check_target(&d).unwrap_err().to_string();
            assert!(
                e.contains(t) && e.contains("local") && e.contains("self_hosted"),
                "{e}"
            );
        }
    }

    #[test]
    fn views_hide_credentials() {
        let d = decode(
            "bus",
            br#"{"provider":"nats","deploy_target":"self_hosted","dsn":"nats://al:hunter2@h:4222","auth":{"token":"s3cr3t"}}"#,
        );
        // dsn with userinfo and a token is two auth methods only when user/password are explicit.
        let d = d.unwrap();
        let v = desired_view(&d).to_string();
        assert!(!v.contains("hunter2") && !v.contains("s3cr3t"), "{v}");
        assert!(v.contains("nats://h:4222"), "{v}");
    }
}
