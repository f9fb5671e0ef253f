//! The provider's own small state file, `<state_dir>/state.json`.
//!
//! wfctl starts a fresh plugin per command and erases `${broker.url}` references outside
//! env_vars (docs/iac-host.md §1.3), so streams and consumers name their broker by plain name
//! and the provider records here what it learned when it created or adopted that broker: its
//! urls and credentials, and for the `local` target the nats-server processes it started. It
//! also keeps, per stream and consumer, where it lives and the per-resource flags that Delete
//! needs but never receives (`prevent_destroy`, `bind`).
//!
//! Writes are read-modify-write under an exclusive `flock` on `state.lock` (several plugin
//! processes may share a state dir), to a temp file that is fsynced and renamed over the old
//! one. The directory is 0700 and the file 0600: it can hold broker credentials, as wfctl's own
//! state holds the applied config.

use super::error::{DriverError, StateCause};
use super::files::{write_atomic, FileLock};
use super::targets::app_platform::record::AppRecord;
use super::targets::kubernetes::record::KubeRecord;
use super::targets::nats_server::LocalRecord;
use crate::providers::DeployTarget;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FILE: &str = "state.json";
const LOCK: &str = "state.lock";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderState {
    #[serde(default)]
    pub format: u32,
    /// Brokers by resource (module) name.
    #[serde(default)]
    pub brokers: BTreeMap<String, BrokerRecord>,
    /// Streams and consumers by resource (module) name.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceRecord>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthRecord {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creds_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nkey_seed_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_ca_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_key_file: String,
    #[serde(default)]
    pub tls_required: bool,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerRecord {
    /// Written as the `deploy_target` string (`local`, `self_hosted`), as every release has.
    #[serde(with = "target_name")]
    pub target: DeployTarget,
    /// Client urls as configured (they may carry credentials; never logged).
    pub urls: Vec<String>,
    #[serde(default)]
    pub auth: AuthRecord,
    /// Cluster size: the node count for `local`, the declared `replicas` for `self_hosted`
    /// (0 = not declared).
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub request_timeout_ms: u64,
    /// What the deploy target started or applied for this broker (none for `self_hosted`),
    /// written under the target's own key as every release has (`"local": {...}`).
    #[serde(flatten, with = "target_record")]
    pub deployed: Option<TargetRecord>,
    #[serde(default)]
    pub prevent_destroy: bool,
    #[serde(default)]
    pub bind: bool,
    /// Outputs of the last create/update, for drift detection.
    #[serde(default)]
    pub outputs: Json,
    /// Set for a `provider: pgchannel` broker: the database it adopted. Absent in records of
    /// NATS brokers (and in every file an earlier release wrote), which is how the stream and
    /// consumer drivers tell the two providers apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<PgRecord>,
    /// Set for a `provider: kafka` broker: the cluster it adopted (bootstrap servers and client
    /// security). Absent for NATS and pgchannel brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaRecord>,
}

impl BrokerRecord {
    /// The event-bus provider this broker is on: the record of a pgchannel broker holds its
    /// database (`pg`), that of a kafka broker its cluster (`kafka`), every other one is NATS.
    pub fn provider(&self) -> crate::providers::Provider {
        match (&self.pg, &self.kafka) {
            (Some(_), _) => crate::providers::Provider::Pgchannel,
            (None, Some(_)) => crate::providers::Provider::Kafka,
            (None, None) => crate::providers::Provider::Nats,
        }
    }
}

/// What a kafka broker's topics and consumer groups need to reach its cluster in a later
/// plugin process: the resolved bootstrap servers and the client's security settings.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KafkaRecord {
    pub brokers: Vec<String>,
    #[serde(default)]
    pub client_id: String,
    /// librdkafka's `security.protocol` value (`plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`).
    #[serde(default)]
    pub security_protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_file: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; empty without SASL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sasl_mechanism: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sasl_user: String,
    /// As NATS passwords are: only in this 0600 file, never in outputs or logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sasl_password: String,
    #[serde(default)]
    pub default_replication_factor: i32,
    #[serde(default)]
    pub min_insync_replicas: i32,
    #[serde(default)]
    pub connect_timeout_ms: u64,
}

/// The record of one deploy target, each defined in its target's folder. In the file it is the
/// target's key beside the broker's common fields (`"local": {...}`, `"app": {...}`,
/// `"kubernetes": {...}`), the shape of every release: a new target adds a variant here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TargetRecord {
    /// `local`: the nats-server processes started on this machine.
    #[serde(rename = "local")]
    Local(LocalRecord),
    /// `digitalocean.app_platform`: the app that runs the broker.
    #[serde(rename = "app")]
    AppPlatform(AppRecord),
    /// `kubernetes` / `aws.eks`: the cluster and the objects applied there.
    #[serde(rename = "kubernetes")]
    Kubernetes(KubeRecord),
    /// `aws.ecs`: the ECS services and the AWS resources around them.
    #[serde(rename = "ecs")]
    Ecs(crate::iac::targets::ecs::record::EcsRecord),
}

/// [`TargetRecord`] flattened into the broker record: at most one target key, and a target
/// record that does not parse is an error (serde's flattened `Option` would drop it silently,
/// and with it the processes or objects the record tracks).
mod target_record {
    use crate::iac::state::TargetRecord;
    use serde::de::{self, Deserializer, Visitor};
    use serde::{Deserialize, Serialize, Serializer};
    use serde_json::{Map, Value as Json};

    pub fn serialize<S: Serializer>(t: &Option<TargetRecord>, s: S) -> Result<S::Ok, S::Error> {
        t.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TargetRecord>, D::Error> {
        let keys = variant_keys();
        let rest = Map::<String, Json>::deserialize(d)?;
        let mut found: Map<String, Json> = rest
            .into_iter()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .collect();
        if found.len() > 1 {
            return Err(de::Error::custom(format!(
                "a broker record holds one deploy target record, found {}",
                found.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        match found.keys().next().cloned() {
            None => Ok(None),
            Some(k) => {
                let one = Json::Object(std::mem::take(&mut found));
                TargetRecord::deserialize(one)
                    .map(Some)
                    .map_err(|e| de::Error::custom(format!("{k}: {e}")))
            }
        }
    }

    /// The keys `TargetRecord` is written under, as its derived `Deserialize` names them.
    fn variant_keys() -> &'static [&'static str] {
        struct Probe;
        #[derive(Debug)]
        struct Keys(&'static [&'static str]);
        impl std::fmt::Display for Keys {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("variant probe")
            }
        }
        impl std::error::Error for Keys {}
        impl de::Error for Keys {
            fn custom<T: std::fmt::Display>(_: T) -> Self {
                Keys(&[])
            }
        }
        impl<'de> Deserializer<'de> for Probe {
            type Error = Keys;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Keys> {
                Err(Keys(&[]))
            }
            fn deserialize_enum<V: Visitor<'de>>(
                self,
                _: &'static str,
                variants: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Keys> {
                Err(Keys(variants))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                struct identifier ignored_any
            }
        }
        match TargetRecord::deserialize(Probe) {
            Err(Keys(k)) => k,
            Ok(_) => &[],
        }
    }
}

/// What a pgchannel broker's streams and consumers need to reach its database in a later
/// plugin process (wfctl erases `${bus.dsn}` references, docs/iac-host.md §1.3).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PgRecord {
    /// As configured or read from `EVENTBUS_<NAME>_URI`; it may carry a password, so it is
    /// never logged or put in outputs (this file is 0600, as for NATS credentials).
    pub dsn: String,
    #[serde(default)]
    pub max_conns: usize,
    #[serde(default)]
    pub poll_interval_ms: u64,
    #[serde(default)]
    pub connect_timeout_ms: u64,
}

mod target_name {
    use crate::providers::DeployTarget;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DeployTarget, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeployTarget, D::Error> {
        let s = String::deserialize(d)?;
        DeployTarget::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown deploy target {s:?} (known: {})",
                DeployTarget::ALL.map(DeployTarget::as_str).join(", ")
            ))
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceRecord {
    #[serde(rename = "type")]
    pub type_name: String,
    pub provider_id: String,
    /// Broker resource name ("" when the resource names its servers itself).
    #[serde(default)]
    pub broker: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    pub stream: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub durable: String,
    #[serde(default)]
    pub prevent_destroy: bool,
    #[serde(default)]
    pub bind: bool,
    /// A bound resource whose Delete ran: it stays on the server, later Deletes do nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    #[serde(default)]
    pub outputs: Json,
}

/// File identity used to skip re-parsing an unchanged file (wfctl sends many Diffs per plan).
type Stamp = (std::time::SystemTime, u64, u64, i64, i64);

#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    /// Serialises writers inside this process; `flock` serialises processes.
    lock: std::sync::Mutex<()>,
    cache: std::sync::Mutex<Option<(Stamp, ProviderState)>>,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore {
            dir: dir.into(),
            lock: std::sync::Mutex::new(()),
            cache: std::sync::Mutex::new(None),
        }
    }

    fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.path()).ok()?;
        Some((
            m.modified().ok()?,
            m.len(),
            m.ino(),
            m.ctime(),
            m.ctime_nsec(),
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn err(&self, source: impl Into<StateCause>) -> DriverError {
        DriverError::State {
            path: self.path().display().to_string(),
            source: source.into(),
        }
    }

    /// The current state; a missing file (or directory) is the empty state.
    pub fn load(&self) -> Result<ProviderState, DriverError> {
        let stamp = self.stamp();
        if let (Some(now), Some((seen, state))) = (
            stamp,
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref(),
        ) {
            if now == *seen {
                return Ok(state.clone());
            }
        }
        let state: ProviderState = match std::fs::read(self.path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.err(e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ProviderState::default())
            }
            Err(e) => return Err(self.err(e)),
        };
        if let Some(now) = stamp {
            *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, state.clone()));
        }
        Ok(state)
    }

    /// Read-modify-write under both locks; `f`'s result is returned after the write.
    pub fn update<T>(&self, f: impl FnOnce(&mut ProviderState) -> T) -> Result<T, DriverError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        create_private_dir(&self.dir).map_err(|e| self.err(e))?;
        let _flock = FileLock::exclusive(&self.dir.join(LOCK)).map_err(|e| self.err(e))?;
        let mut state = self.load()?;
        let out = f(&mut state);
        state.format = FORMAT;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| self.err(e))?;
        write_atomic(&self.path(), &bytes).map_err(|e| self.err(e))?;
        Ok(out)
    }
}

pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

// Records hold credentials (tokens, passwords, urls and dsns with userinfo): their Debug
// shows them masked, so a record in a log line or an error never carries a secret.

impl std::fmt::Debug for AuthRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("AuthRecord")
            .field("token", &hidden(&self.token))
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("creds_file", &self.creds_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl std::fmt::Debug for PgRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::secret::{mask, Userinfo};
        f.debug_struct("PgRecord")
            .field("dsn", &mask(&self.dsn, Userinfo::User))
            .field("max_conns", &self.max_conns)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for KafkaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("KafkaRecord")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("security_protocol", &self.security_protocol)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_user", &self.sasl_user)
            .field("sasl_password", &hidden(&self.sasl_password))
            .field(
                "default_replication_factor",
                &self.default_replication_factor,
            )
            .field("min_insync_replicas", &self.min_insync_replicas)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for BrokerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| crate::secret::redact_url(u))
            .collect();
        f.debug_struct("BrokerRecord")
            .field("target", &self.target)
            .field("urls", &urls)
            .field("auth", &self.auth)
            .field("replicas", &self.replicas)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("deployed", &self.deployed)
            .field("prevent_destroy", &self.prevent_destroy)
            .field("bind", &self.bind)
            .field("outputs", &self.outputs)
            .field("pg", &self.pg)
            .field("kafka", &self.kafka)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_state_is_empty_and_updates_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("nested/iac"));
        assert_eq!(store.load().unwrap(), ProviderState::default());
        store
            .update(|s| {
                s.brokers.insert(
                    "bus".into(),
                    BrokerRecord {
                        target: DeployTarget::SelfHosted,
                        urls: vec!["nats://127.0.0.1:4222".into()],
                        auth: AuthRecord::default(),
                        replicas: 0,
                        connect_timeout_ms: 0,
                        request_timeout_ms: 0,
                        deployed: None,
                        prevent_destroy: false,
                        bind: false,
                        outputs: Json::Null,
                        pg: None,
                        kafka: None,
                    },
                );
            })
            .unwrap();
        let s = store.load().unwrap();
        assert_eq!(s.format, FORMAT);
        assert_eq!(s.brokers["bus"].urls, vec!["nats://127.0.0.1:4222"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "state file must be private: {mode:o}");
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(StateStore::new(dir.path()));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = store.clone();
                std::thread::spawn(move || {
                    for j in 0..10 {
                        s.update(|st| {
                            st.resources.insert(
                                format!("r{i}-{j}"),
                                ResourceRecord {
                                    type_name: "infra.eventbus.stream".into(),
                                    ..Default::default()
                                },
                            );
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.load().unwrap().resources.len(), 80);
    }

    /// A state file in the shape the previous release wrote (target as a plain string) loads,
    /// and writes back with the same target strings.
    #[test]
    fn state_files_of_the_previous_release_load() {
        let text = include_str!("../../tests/fixtures/state-v1.json");
        let s: ProviderState = serde_json::from_str(text).unwrap();
        assert_eq!(s.brokers["bus"].target, DeployTarget::Local);
        let Some(TargetRecord::Local(local)) = &s.brokers["bus"].deployed else {
            panic!("the local broker's record: {:?}", s.brokers["bus"]);
        };
        assert_eq!(local.nodes.len(), 3);
        assert_eq!(s.brokers["edge"].target, DeployTarget::SelfHosted);
        assert!(s.brokers["edge"].prevent_destroy);
        let again: Json = serde_json::to_value(&s).unwrap();
        assert_eq!(again["brokers"]["bus"]["target"], "local");
        assert_eq!(again["brokers"]["edge"]["target"], "self_hosted");
        // NATS records have no pgchannel part, and write none back.
        assert!(s.brokers.values().all(|b| b.pg.is_none()));
        assert!(again["brokers"]["bus"].get("pg").is_none());
        // A pgchannel record written by this release reads back whole.
        let mut with_pg = s.clone();
        with_pg.brokers.get_mut("edge").unwrap().pg = Some(PgRecord {
            dsn: "postgres://u:pw@db:5432/app".into(),
            max_conns: 4,
            poll_interval_ms: 250,
            connect_timeout_ms: 5000,
        });
        let text = serde_json::to_string(&with_pg).unwrap();
        assert_eq!(
            serde_json::from_str::<ProviderState>(&text).unwrap(),
            with_pg
        );
        let bad = text.replacen("\"self_hosted\"", "\"mainframe\"", 1);
        let e = serde_json::from_str::<ProviderState>(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown deploy target \"mainframe\""), "{e}");
    }

    /// Every state file an earlier release wrote (per-target fields beside the common ones)
    /// loads into the typed target record and writes back byte for byte the same document.
    #[test]
    fn older_state_files_round_trip_through_the_typed_target_record() {
        let fixtures = [
            include_str!("../../tests/fixtures/state-v1.json"),
            include_str!("../../tests/fixtures/state-v1-targets.json"),
        ];
        let mut seen = Vec::new();
        for text in fixtures {
            let s: ProviderState = serde_json::from_str(text).unwrap();
            for (name, b) in &s.brokers {
                let variant = match &b.deployed {
                    None => "none",
                    Some(TargetRecord::Local(l)) => {
                        assert_eq!(l.nodes.len(), 3, "{name}");
                        "local"
                    }
                    Some(TargetRecord::AppPlatform(a)) => {
                        assert_eq!(a.app_name, "cloud-bus");
                        "app"
                    }
                    Some(TargetRecord::Kubernetes(k)) => {
                        assert!(!k.stateful_set.is_empty(), "{name}");
                        "kubernetes"
                    }
                    Some(TargetRecord::Ecs(_)) => "ecs",
                };
                seen.push((b.target.as_str(), variant));
            }
            let written = serde_json::to_value(&s).unwrap();
            let original: Json = serde_json::from_str(text).unwrap();
            assert_eq!(written, original, "the new shape writes what was read");
            let again: ProviderState = serde_json::from_value(written).unwrap();
            assert_eq!(again, s);
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                ("aws.eks", "kubernetes"),
                ("digitalocean.app_platform", "app"),
                ("kubernetes", "kubernetes"),
                ("local", "local"),
                ("self_hosted", "none"),
                ("self_hosted", "none"),
            ]
        );
    }

    /// A damaged target record is an error naming it, never a record silently dropped (the
    /// processes or objects it tracks would be orphaned); two target records are refused.
    #[test]
    fn a_bad_or_doubled_target_record_is_refused() {
        let text = include_str!("../../tests/fixtures/state-v1.json");
        let mut v: Json = serde_json::from_str(text).unwrap();
        v["brokers"]["bus"]["local"]["nodes"] = Json::from("three");
        let e = serde_json::from_value::<ProviderState>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("local"), "{e}");
        let mut v: Json = serde_json::from_str(text).unwrap();
        v["brokers"]["bus"]["app"] = serde_json::json!({"app_id": "x", "app_name": "y"});
        let e = serde_json::from_value::<ProviderState>(v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("one deploy target record") && e.contains("app, local"),
            "{e}"
        );
        // Keys that are not a target's (a later release's field) are ignored, as before.
        let mut v: Json = serde_json::from_str(text).unwrap();
        v["brokers"]["edge"]["future_field"] = Json::from(1);
        let s: ProviderState = serde_json::from_value(v).unwrap();
        assert_eq!(s.brokers["edge"].deployed, None);
    }

    /// Issue 19, the class of finding 2: a record's Debug never shows its credentials.
    #[test]
    fn record_debug_masks_credentials() {
        let rec = BrokerRecord {
            target: DeployTarget::SelfHosted,
            urls: vec!["nats://u:Url/Secret1@h:4222".into()],
            auth: AuthRecord {
                token: "TokSecret2".into(),
                password: "PwSecret3".into(),
                ..Default::default()
            },
            replicas: 0,
            connect_timeout_ms: 0,
            request_timeout_ms: 0,
            deployed: None,
            prevent_destroy: false,
            bind: false,
            outputs: Json::Null,
            pg: Some(PgRecord {
                dsn: "postgres://u:Pg/Secret4@db/x".into(),
                ..Default::default()
            }),
            kafka: None,
        };
        let shown = format!("{rec:?}");
        assert!(!shown.contains("Secret"), "{shown}");
        assert!(
            shown.contains("db/x") && shown.contains("h:4222"),
            "{shown}"
        );
    }
}
