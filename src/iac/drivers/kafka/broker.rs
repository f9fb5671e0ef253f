//! `infra.eventbus` with `provider: kafka`: adopts a Kafka cluster the operator runs
//! (`deploy_target: self_hosted`, the only kafka target; the others are refused at plan).
//!
//! - Apply validates the kafka part of the config (`config::kafka`, the runtime's own checks),
//!   resolves the bootstrap servers (config, else `EVENTBUS_<NAME>_URI` in wfctl's
//!   environment), proves the cluster answers (metadata) and records the servers and client
//!   security so the topics and groups on this broker reach it in later plugin processes.
//! - Outputs carry the servers, client id, security protocol, SASL mechanism and user and a
//!   fingerprint that changes with the credentials, never the password itself (nothing here is
//!   sensitive, so wfctl needs no secrets provider). The password stays in the provider's own
//!   0600 state file, as NATS credentials do.
//! - Delete only forgets the cluster (it was adopted); it is refused while topics or groups are
//!   recorded on it or `prevent_destroy` is set.

use super::conns::{self, REQUEST_TIMEOUT};
use crate::iac::drivers::broker::{record_for, refuse_delete, BrokerDesired};
use crate::iac::drivers::{forget_broker, record_and_output, Record};
use crate::iac::drivers::{Ctx, Output, BROKER_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::{field, Change};
use crate::iac::state::{AuthRecord, BrokerRecord, KafkaRecord};
use crate::iac::targets::label;
use crate::pb::iac::ResourceRef;
use crate::providers::DeployTarget;
use serde_json::{json, Map, Value as Json};

pub const PROVIDER: &str = "kafka";

/// The view's keys the diff compares; only a change of provider forces a replace (new servers
/// or credentials re-point the record in place: nothing was provisioned).
pub const COMPARED: &[&str] = &[
    "provider",
    "deploy_target",
    "brokers",
    "client_id",
    "security_protocol",
    "sasl_mechanism",
    "sasl_user",
    "auth_fingerprint",
    "default_replication_factor",
    "min_insync_replicas",
    "prevent_destroy",
    "bind",
];
const FORCE: &[&str] = &["provider"];

/// Kafka clusters are adopted, never deployed: `self_hosted` only (one line naming what works).
fn check_target(name: &str, d: &BrokerDesired) -> Result<(), DriverError> {
    if d.spec.target == DeployTarget::SelfHosted {
        return Ok(());
    }
    Err(DriverError::invalid(
        label(name),
        format!(
            "config.deploy_target: {:?} is not available for provider kafka; use deploy_target self_hosted (adopt a Kafka cluster you run: dsn kafka://host:9092 or kafka.brokers)",
            d.spec.target.as_str()
        ),
    ))
}

/// The pure checks of a kafka broker config (no env, no I/O).
pub fn check(name: &str, d: &BrokerDesired) -> Result<(), DriverError> {
    check_target(name, d)?;
    crate::config::kafka::validate(BROKER_TYPE, name, &d.config)?;
    Ok(())
}

/// What the record keeps: the kafka part of the config, validated as the runtime validates it,
/// with the servers resolved (config, else `EVENTBUS_<NAME>_URI`).
pub fn record_of(name: &str, d: &BrokerDesired) -> Result<KafkaRecord, DriverError> {
    check_target(name, d)?;
    let k = crate::config::kafka::validate(BROKER_TYPE, name, &d.config)?;
    let brokers = k
        .resolve_brokers()
        .map_err(|e| DriverError::invalid(label(name), e))?;
    Ok(conns::record_from(&k, brokers))
}

pub(super) fn view_of(r: &KafkaRecord, prevent_destroy: bool, bind: bool) -> Json {
    json!({
        "provider": PROVIDER,
        "deploy_target": DeployTarget::SelfHosted.as_str(),
        "brokers": r.brokers,
        "client_id": r.client_id,
        "security_protocol": r.security_protocol,
        "sasl_mechanism": r.sasl_mechanism,
        "sasl_user": r.sasl_user,
        "auth_fingerprint": crate::secret::fingerprint(&[
            &r.sasl_password, &r.ca_file, &r.cert_file, &r.key_file
        ]),
        "default_replication_factor": r.default_replication_factor,
        "min_insync_replicas": r.min_insync_replicas,
        "prevent_destroy": prevent_destroy,
        "bind": bind,
    })
}

/// Pure but for the env fallback of the servers (the runtime reads the same variable).
pub fn diff(name: &str, d: &BrokerDesired, current: &Json) -> Result<Vec<Change>, DriverError> {
    let want = view_of(&record_of(name, d)?, d.spec.prevent_destroy, d.spec.bind);
    let unset = |v: &Json| match v {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty(),
        _ => false,
    };
    Ok(COMPARED
        .iter()
        .filter_map(|key| {
            let (w, h) = (field(&want, key), field(current, key));
            (w != h && !(unset(&w) && unset(&h))).then(|| Change {
                path: key.to_string(),
                old: h,
                new: w,
                force_new: FORCE.contains(key),
            })
        })
        .collect())
}

pub(super) fn outputs(name: &str, view: &Json, cluster_brokers: usize) -> Json {
    let mut m: Map<String, Json> = view.as_object().cloned().unwrap_or_default();
    m.insert("name".into(), json!(name));
    m.insert("cluster_brokers".into(), json!(cluster_brokers));
    m.insert(
        "brokers_env".into(),
        json!(format!(
            "EVENTBUS_{}_URI",
            crate::nats::names::env_key(name)
        )),
    );
    Json::Object(m)
}

/// Metadata from the cluster, bounded: proves it answers with these settings.
async fn ping(ctx: &Ctx, what: &str, name: &str, r: &KafkaRecord) -> Result<usize, DriverError> {
    let admin = ctx.kafka().admin(what, name, r)?;
    match tokio::time::timeout(REQUEST_TIMEOUT * 2, admin.cluster_brokers()).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(DriverError::kafka(what, e)),
        Err(_) => Err(DriverError::kafka(
            what,
            crate::kafka::KafkaError::TimedOut("Metadata"),
        )),
    }
}

/// Adopt (create) and update: validate, reach the cluster, record, output.
pub async fn apply(ctx: &Ctx, name: &str, d: &BrokerDesired) -> Result<Output, DriverError> {
    let what = label(name);
    let rec = record_of(name, d)?;
    let n = ping(ctx, &what, name, &rec).await?;
    tracing::info!(broker = name, servers = %rec.brokers.join(","), cluster_brokers = n, "kafka cluster adopted");
    let view = view_of(&rec, d.spec.prevent_destroy, d.spec.bind);
    let outputs = outputs(name, &view, n);
    let record = BrokerRecord {
        // Adopted: the cluster runs wherever the operator runs it.
        target: DeployTarget::SelfHosted,
        urls: Vec::new(),
        auth: AuthRecord::default(),
        replicas: 0,
        connect_timeout_ms: rec.connect_timeout_ms,
        request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        deployed: None,
        prevent_destroy: d.spec.prevent_destroy,
        bind: d.spec.bind,
        outputs: outputs.clone(),
        pg: None,
        kafka: Some(rec),
    };
    record_and_output(
        ctx,
        name,
        Record::Broker(Box::new(record)),
        name.to_string(),
        Vec::new(),
    )
}

/// Found when recorded; the cluster must answer (an unreachable cluster is an error, never
/// "gone": its topics may well still be there).
pub async fn read(
    ctx: &Ctx,
    name: &str,
    rec: &BrokerRecord,
    k: &KafkaRecord,
) -> Result<Output, DriverError> {
    let n = ping(ctx, &label(name), name, k).await?;
    Ok(Output {
        provider_id: name.to_string(),
        outputs: outputs(name, &view_of(k, rec.prevent_destroy, rec.bind), n),
        sensitive: Vec::new(),
        status: "running".into(),
    })
}

/// Forgets the cluster (its topics and groups stay).
pub async fn delete(ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
    let state = ctx.state.load()?;
    let Some((name, rec)) = record_for(&state, r) else {
        return Ok(());
    };
    let name = name.clone();
    refuse_delete(&state, &name, rec)?;
    ctx.kafka().evict(&name);
    tracing::info!(broker = %name, "kafka broker forgotten; the cluster and its topics are left as they are (adopted, not created)");
    forget_broker(ctx, &name)
}

pub async fn health(
    ctx: &Ctx,
    name: &str,
    rec: &BrokerRecord,
    k: &KafkaRecord,
) -> Result<(bool, String), DriverError> {
    match read(ctx, name, rec, k).await {
        Ok(o) => Ok((
            true,
            format!(
                "kafka cluster {} (running), {} broker(s)",
                k.brokers.join(","),
                o.outputs["cluster_brokers"]
            ),
        )),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}
