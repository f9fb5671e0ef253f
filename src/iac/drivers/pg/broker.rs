//! `infra.eventbus` with `provider: pgchannel`: adopts a PostgreSQL database.
//!
//! - Apply connects with the dsn (config, else `EVENTBUS_<NAME>_URI` in wfctl's environment),
//!   which creates the pgchannel schema when it is missing, and records the dsn so the streams
//!   and consumers on this broker reach the database in later plugin processes.
//! - Outputs carry the dsn with its password replaced, never the password itself (so nothing
//!   here is sensitive and wfctl needs no secrets provider), plus the tables and schema version.
//! - Delete only forgets the database: it was adopted, and its tables hold the operator's
//!   events. It is refused, as for NATS, while streams or consumers are recorded on it or
//!   `prevent_destroy` is set.

use super::conns;
use crate::iac::drivers::broker::{record_for, refuse_delete, BrokerDesired};
use crate::iac::drivers::{forget_broker, record_and_output, Record};
use crate::iac::drivers::{str_field, Ctx, Output};
use crate::iac::error::DriverError;
use crate::iac::plan::{field, Change};
use crate::iac::state::{AuthRecord, BrokerRecord, PgRecord};
use crate::iac::targets::label;
use crate::pb::iac::ResourceRef;
use crate::providers::DeployTarget;
use serde_json::{json, Map, Value as Json};

/// The view's keys the diff compares; only a change of provider forces a replace (a new dsn
/// re-points the record in place: nothing was provisioned that a replace would move).
pub const COMPARED: &[&str] = &[
    "provider",
    "dsn",
    "auth_fingerprint",
    "max_conns",
    "poll_interval",
    "prevent_destroy",
    "bind",
];
const FORCE: &[&str] = &["provider"];

/// The pgchannel tables (`crate::pg` owns them; listed in outputs for the operator).
pub const TABLES: &[&str] = &[
    "eventbus_streams",
    "eventbus_events",
    "eventbus_consumers",
    "eventbus_event_deliveries",
];

pub fn is_pg(d: &BrokerDesired) -> bool {
    d.spec.pg.is_some()
}

/// What the record keeps: the dsn from config, else from `EVENTBUS_<NAME>_URI` (the runtime
/// reads the same variable, so wfctl and the runtime adopt the same database).
pub fn record_of(name: &str, d: &BrokerDesired) -> Result<PgRecord, DriverError> {
    let Some(pg) = &d.spec.pg else {
        return Err(DriverError::invalid(label(name), "not a pgchannel broker"));
    };
    let dsn = d.spec.resolve_pg_dsn().ok_or_else(|| {
        DriverError::invalid(
            label(name),
            format!(
                "pgchannel needs the database to adopt: set dsn, or {} in wfctl's environment",
                d.spec.pg_env_var()
            ),
        )
    })?;
    Ok(PgRecord {
        dsn: dsn.expose().to_string(),
        max_conns: pg.max_conns,
        poll_interval_ms: pg.poll_interval.as_millis() as u64,
        connect_timeout_ms: pg.connect_timeout.as_millis() as u64,
    })
}

/// The compared settings: the dsn redacted, and a fingerprint that changes with the password.
pub fn desired_view(name: &str, d: &BrokerDesired) -> Result<Json, DriverError> {
    let r = record_of(name, d)?;
    Ok(view_of(name, &r, d.spec.prevent_destroy, d.spec.bind))
}

fn view_of(name: &str, r: &PgRecord, prevent_destroy: bool, bind: bool) -> Json {
    let s = conns::settings(name, r);
    json!({
        "provider": super::spec::PROVIDER,
        "dsn": s.redacted_dsn(),
        "auth_fingerprint": crate::secret::fingerprint(&[&r.dsn]),
        "max_conns": s.max_conns,
        "poll_interval": crate::iac::drivers::duration_json(s.poll_interval),
        "prevent_destroy": prevent_destroy,
        "bind": bind,
    })
}

pub fn diff(name: &str, d: &BrokerDesired, current: &Json) -> Result<Vec<Change>, DriverError> {
    let want = desired_view(name, d)?;
    let mut out = Vec::new();
    for key in COMPARED {
        let (w, h) = (field(&want, key), field(current, key));
        let unset = |v: &Json| v.is_null() || v == &json!(false);
        if w == h || (unset(&w) && unset(&h)) {
            continue;
        }
        out.push(Change {
            path: key.to_string(),
            old: h,
            new: w,
            force_new: FORCE.contains(key),
        });
    }
    Ok(out)
}

fn outputs(name: &str, view: &Json) -> Json {
    let mut m: Map<String, Json> = view.as_object().cloned().unwrap_or_default();
    m.insert("name".into(), json!(name));
    m.insert("tables".into(), json!(TABLES));
    // The version this plugin brings the schema to (connect migrated it there if it was older).
    m.insert("schema_version".into(), json!(crate::pg::SCHEMA_VERSION));
    // The runtime module reads the same variable when its config has no dsn.
    m.insert(
        "dsn_env".into(),
        json!(format!(
            "EVENTBUS_{}_URI",
            crate::nats::names::env_key(name)
        )),
    );
    Json::Object(m)
}

/// Adopt (create) and update: connect (creating the schema when missing), record, output.
pub async fn apply(ctx: &Ctx, name: &str, d: &BrokerDesired) -> Result<Output, DriverError> {
    let what = label(name);
    let pg = record_of(name, d)?;
    let view = desired_view(name, d)?;
    let started = std::time::Instant::now();
    let bus = ctx.pg().connect(&what, name, &pg).await?;
    tracing::info!(
        broker = name,
        dsn = %bus.redacted_dsn(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pgchannel database adopted; schema present"
    );
    let outputs = outputs(name, &view);
    let rec = BrokerRecord {
        // Nothing is deployed for pgchannel: the database runs wherever the operator runs it,
        // which is what self_hosted means for NATS. No code path dispatches on it (`pg` is set).
        target: DeployTarget::SelfHosted,
        urls: Vec::new(),
        auth: AuthRecord::default(),
        replicas: 1,
        connect_timeout_ms: pg.connect_timeout_ms,
        request_timeout_ms: 0,
        deployed: None,
        prevent_destroy: d.spec.prevent_destroy,
        bind: d.spec.bind,
        outputs: outputs.clone(),
        pg: Some(pg),
        kafka: None,
    };
    record_and_output(
        ctx,
        name,
        Record::Broker(Box::new(rec)),
        name.to_string(),
        Vec::new(),
    )
}

/// Found when recorded; the database must answer (an unreachable database is an error, never
/// "gone": its rows may well still be there).
pub async fn read(
    ctx: &Ctx,
    name: &str,
    rec: &BrokerRecord,
    pg: &PgRecord,
) -> Result<Output, DriverError> {
    let what = label(name);
    let bus = ctx.pg().connect(&what, name, pg).await?;
    // The pool may be this process's cached one: one cheap query against the streams table
    // proves the database answers now (the domain has no ping of its own).
    bus.stream("")
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    let view = view_of(name, pg, rec.prevent_destroy, rec.bind);
    Ok(Output {
        provider_id: name.to_string(),
        outputs: outputs(name, &view),
        sensitive: Vec::new(),
        status: "running".into(),
    })
}

/// Forgets the database (its tables and events stay).
pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some((name, rec)) = record_for(&state, r) else {
        return Ok(());
    };
    let name = name.clone();
    refuse_delete(&state, &name, rec)?;
    ctx.pg().evict(&name).await;
    tracing::info!(
        broker = %name,
        "pgchannel broker forgotten; its database and tables are left as they are (adopted, not created)"
    );
    forget_broker(ctx, &name)
}

pub async fn health(
    ctx: &Ctx,
    name: &str,
    rec: &BrokerRecord,
    pg: &PgRecord,
) -> Result<(bool, String), DriverError> {
    match read(ctx, name, rec, pg).await {
        Ok(o) => Ok((
            true,
            format!(
                "{} (running), pgchannel schema {}",
                str_field(&o.outputs, "dsn"),
                o.outputs["schema_version"]
            ),
        )),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}
