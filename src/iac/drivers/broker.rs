//! `infra.eventbus`: a broker, on one of the deploy targets in `iac::targets` (which holds
//! everything that differs per target; this file holds what every target shares).
//!
//! - Apply runs the target's create-or-adopt, records the broker, then checks the servers answer
//!   and have JetStream.
//! - Read and health probe the target's own processes (if any) and connect.
//! - Delete is refused while streams or consumers recorded on the broker remain.
//! - Targets this provider cannot provision yet fail at Diff and Create with an error naming
//!   the ones it can.
//!
//! The diff is over a flat "view" of the compared settings that the outputs echo.

use super::{str_field, BrokerConn, Ctx, Output};
use crate::iac::drivers::Record;
use crate::iac::error::DriverError;
use crate::iac::plan::{field, Change};
use crate::iac::state::{BrokerRecord, ProviderState};
use crate::iac::targets::{for_target, label, BrokerTarget, Platform};
pub use crate::iac::targets::{strip_userinfo, BrokerDesired};
use crate::pb::iac::ResourceRef;
use serde_json::{json, Map, Value as Json};

pub fn decode(name: &str, config_json: &[u8]) -> Result<BrokerDesired, DriverError> {
    BrokerDesired::decode(name, config_json)
}

/// The broker's target, or the "not available yet" error.
pub fn check_target(d: &BrokerDesired) -> Result<&'static dyn BrokerTarget, DriverError> {
    let t = for_target(&d.spec.name, d.spec.target)?;
    t.check(d)?;
    Ok(t)
}

/// The compared settings as the config asks for them (pure apart from the env fallback of
/// `self_hosted` urls, which the runtime applies the same way).
pub fn desired_view(d: &BrokerDesired) -> Result<Json, DriverError> {
    let t = check_target(d)?;
    let s = &d.spec;
    let mut m = Map::new();
    m.insert("provider".into(), json!(s.provider.as_str()));
    m.insert("deploy_target".into(), json!(s.target.as_str()));
    m.insert("version".into(), json!(s.version));
    m.insert("prevent_destroy".into(), json!(s.prevent_destroy));
    m.insert("bind".into(), json!(s.bind));
    m.insert("replicas".into(), json!(t.replicas(d)));
    t.view(d, &mut m);
    Ok(Json::Object(m))
}

/// Key-by-key over the broker view; absent keys count as their zero value.
pub fn diff(d: &BrokerDesired, current: &Json) -> Result<Vec<Change>, DriverError> {
    let want = desired_view(d)?;
    let (keys, force) = check_target(d)?.compared_keys();
    let zero = |v: &Json| match v {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty(),
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.is_empty(),
    };
    let mut out = Vec::new();
    for key in keys {
        let (w, h) = (field(&want, key), field(current, key));
        let same = w == h || (zero(&w) && zero(&h));
        // Keys an older output lacks are not drift, except the identity ones.
        let missing_ok = h.is_null() && !force.contains(key);
        if !same && !missing_ok {
            out.push(Change {
                path: key.to_string(),
                old: h,
                new: w,
                force_new: force.contains(key),
            });
        }
    }
    Ok(out)
}

/// Connects and checks JetStream; returns the server's version.
async fn verify(ctx: &Ctx, what: &str, b: &BrokerConn) -> Result<String, DriverError> {
    let b = &ctx.reach(what, b).await?;
    let conn = ctx.conns().connect(what, b).await?;
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

/// Create-or-adopt, and Update.
pub async fn apply(ctx: &Ctx, name: &str, d: &BrokerDesired) -> Result<Output, DriverError> {
    let target = check_target(d)?;
    let what = label(name);
    let view = desired_view(d)?;
    let applied = target.apply(ctx, name, d).await?;
    let (mut record, mut outputs) = (applied.record, applied.outputs);
    // Record first: processes that are running must be findable even if the check fails.
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
    let sensitive = if target.credentials_in_outputs() {
        sensitive_outputs(d, m)
    } else {
        Vec::new()
    };
    record.outputs = outputs;
    let provider_id = target.provider_id(name, &record);
    super::record_and_output(
        ctx,
        name,
        Record::Broker(Box::new(record)),
        provider_id,
        sensitive,
    )
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

pub fn record_for<'a>(
    state: &'a ProviderState,
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
    let target = for_target(name, rec.target)?;
    let probed = rec.clone();
    let up = crate::iac::targets::block(what.clone(), move || Ok(target.probe(&probed))).await?;
    if let Some(up) = up {
        if !up.iter().any(|u| *u) {
            return Err(DriverError::not_found(format!(
                "{what}: none of its nats-server processes answers; apply starts them again on the same data"
            )));
        }
        if up.iter().any(|u| !*u) {
            status = "degraded";
        }
    }
    let live = match target.platform(ctx, &what, rec).await? {
        Platform::Gone => {
            return Err(DriverError::not_found(format!(
                "{what}: its platform no longer has it (deleted out of band); apply creates it again, empty"
            )))
        }
        Platform::Live(o) => Some(o),
        Platform::Untracked => None,
    };
    let b = BrokerConn::from_record(name, rec);
    let version = verify(ctx, &what, &b).await?;
    let mut outputs = if let Some(o) = live {
        o
    } else if rec.outputs.is_object() {
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
        provider_id: target.provider_id(name, rec),
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
    refuse_delete(&state, &name, &rec)?;
    for_target(&name, rec.target)?
        .delete(ctx, &what, &rec)
        .await?;
    ctx.forget(&name, &rec.urls).await;
    super::forget_broker(ctx, &name)
}

/// Why a recorded broker may not be deleted yet (every provider): `prevent_destroy`, or
/// streams/consumers still recorded on it.
pub fn refuse_delete(
    state: &ProviderState,
    name: &str,
    rec: &BrokerRecord,
) -> Result<(), DriverError> {
    let what = label(name);
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
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}

/// Log tails of a local broker's processes.
pub fn troubleshoot(ctx: &Ctx, r: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
    let state = ctx.state.load()?;
    let Some((name, rec)) = record_for(&state, r) else {
        return Err(DriverError::not_found(label(&r.name)));
    };
    for_target(name, rec.target)?
        .troubleshoot(rec)
        .ok_or_else(|| DriverError::Unsupported(format!("Troubleshoot of a {} broker", rec.target)))
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
    fn a_target_without_its_section_names_what_it_needs() {
        let t = "aws.ecs";
        let d = decode(
            "bus",
            format!(r#"{{"provider":"nats","deploy_target":"{t}"}}"#).as_bytes(),
        )
        .unwrap();
        let e = check_target(&d)
            .err()
            .expect("incomplete config")
            .to_string();
        assert!(
            e.contains("aws.vpc_id")
                && e.contains("aws.subnets")
                && !e.contains("not available yet"),
            "{e}"
        );
    }

    #[test]
    fn views_hide_credentials() {
        let d = decode(
            "bus",
            br#"{"provider":"nats","deploy_target":"self_hosted","dsn":"nats://al:hunter2@h:4222","auth":{"token":"s3cr3t"}}"#,
        );
        // dsn with userinfo and a token is two auth methods only when user/password are explicit.
        let d = d.unwrap();
        let v = desired_view(&d).unwrap().to_string();
        assert!(!v.contains("hunter2") && !v.contains("s3cr3t"), "{v}");
        assert!(v.contains("nats://h:4222"), "{v}");
    }
}
