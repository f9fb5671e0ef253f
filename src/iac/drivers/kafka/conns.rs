//! One admin client per kafka cluster per plugin process (wfctl sends many calls to one
//! process), kept in `ctx.slot::<KafkaClients>()`; a group's offsets through a short-lived
//! consumer that carries the group id and never joins.

use crate::config::kafka::{KafkaClientConfig, SaslCredentials, SaslMechanism, SecurityProtocol};
use crate::iac::error::DriverError;
use crate::iac::state::KafkaRecord;
use crate::kafka::admin::{RdAdmin, RdOffsets};
use crate::kafka::{KafkaError, KafkaSettings};
use crate::secret::Secret;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// The bound of one admin request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn protocol(s: &str) -> SecurityProtocol {
    match s {
        "ssl" => SecurityProtocol::Ssl,
        "sasl_plaintext" => SecurityProtocol::SaslPlaintext,
        "sasl_ssl" => SecurityProtocol::SaslSsl,
        _ => SecurityProtocol::Plaintext,
    }
}

fn mechanism(s: &str) -> SaslMechanism {
    match s {
        "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
        "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
        _ => SaslMechanism::Plain,
    }
}

/// The record of what apply validated, from the broker config (the brokers resolved).
pub fn record_from(k: &KafkaClientConfig, brokers: Vec<String>) -> KafkaRecord {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    KafkaRecord {
        brokers,
        client_id: k.client_id.clone(),
        security_protocol: k.protocol.as_str().to_string(),
        ca_file: path(&k.ca_file),
        cert_file: path(&k.cert_file),
        key_file: path(&k.key_file),
        sasl_mechanism: k
            .sasl
            .as_ref()
            .map(|s| s.mechanism.as_str().to_string())
            .unwrap_or_default(),
        sasl_user: k
            .sasl
            .as_ref()
            .map(|s| s.username.clone())
            .unwrap_or_default(),
        sasl_password: k
            .sasl
            .as_ref()
            .map(|s| s.password.expose().to_string())
            .unwrap_or_default(),
        default_replication_factor: k.default_replication_factor.unwrap_or(0),
        min_insync_replicas: k.min_insync_replicas.unwrap_or(0),
        connect_timeout_ms: k.connect_timeout.as_millis() as u64,
    }
}

/// The client settings a recorded cluster connects with (built on the domain's plaintext
/// defaults, then the record's security, so fields the domain adds keep their defaults).
pub fn settings(r: &KafkaRecord) -> KafkaSettings {
    let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    let mut s = KafkaSettings::plaintext(&r.brokers.join(","));
    s.brokers = r.brokers.clone();
    let c = &mut s.config;
    c.brokers = r.brokers.clone();
    c.client_id = r.client_id.clone();
    c.protocol = protocol(&r.security_protocol);
    c.ca_file = opt(&r.ca_file);
    c.cert_file = opt(&r.cert_file);
    c.key_file = opt(&r.key_file);
    c.sasl = (!r.sasl_user.is_empty()).then(|| SaslCredentials {
        mechanism: mechanism(&r.sasl_mechanism),
        username: r.sasl_user.clone(),
        password: Secret::new(&r.sasl_password),
    });
    c.default_replication_factor =
        (r.default_replication_factor > 0).then_some(r.default_replication_factor);
    c.min_insync_replicas = (r.min_insync_replicas > 0).then_some(r.min_insync_replicas);
    if r.connect_timeout_ms > 0 {
        c.connect_timeout = Duration::from_millis(r.connect_timeout_ms);
    }
    s
}

impl crate::iac::ctx::Ctx {
    /// The kafka admin clients of this process.
    pub fn kafka(&self) -> std::sync::Arc<KafkaClients> {
        self.slot()
    }
}

#[derive(Default)]
pub struct KafkaClients {
    admins: Mutex<HashMap<String, RdAdmin>>,
}

impl KafkaClients {
    /// Keyed by broker, servers and a fingerprint of the credentials, so a changed password
    /// never reuses the old client.
    fn key(broker: &str, r: &KafkaRecord) -> String {
        format!(
            "{broker}|{}|{}",
            r.brokers.join(","),
            crate::secret::fingerprint(&[&r.sasl_password, &r.sasl_user, &r.security_protocol])
        )
    }

    /// The cluster's admin client (librdkafka connects lazily: the first request proves it).
    pub fn admin(&self, what: &str, broker: &str, r: &KafkaRecord) -> Result<RdAdmin, DriverError> {
        let key = Self::key(broker, r);
        let mut m = self.admins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = m.get(&key) {
            return Ok(a.clone());
        }
        let a =
            RdAdmin::new(&settings(r), REQUEST_TIMEOUT).map_err(|e| DriverError::kafka(what, e))?;
        m.insert(key, a.clone());
        Ok(a)
    }

    /// Forgets the clients of a deleted broker.
    pub fn evict(&self, broker: &str) {
        let prefix = format!("{broker}|");
        self.admins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(&prefix));
    }
}

/// Runs `f` on the blocking pool with a group's offsets client (librdkafka's offset calls
/// block), bounded by the request timeout of each call inside.
pub async fn with_offsets<T: Send + 'static>(
    what: &str,
    r: &KafkaRecord,
    group: &str,
    f: impl FnOnce(&RdOffsets) -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, DriverError> {
    let (settings, group) = (settings(r), group.to_string());
    tokio::task::spawn_blocking(move || {
        let o = RdOffsets::new(&settings, &group, REQUEST_TIMEOUT)?;
        f(&o)
    })
    .await
    .map_err(|e| DriverError::Worker {
        what: what.to_string(),
        source: e,
    })?
    .map_err(|e| DriverError::kafka(what, e))
}
