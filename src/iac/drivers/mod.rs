//! One driver per resource type. Create/read/update/delete are async over a shared NATS
//! connection (or, for a `provider: pgchannel` broker, a pool on its database: `pg/`, chosen
//! per call in `route.rs`); the diffs they are planned with are pure (`iac::plan`). What they
//! share lives here: the resource kinds, the output shape, how a stream or consumer finds its
//! broker, and the per-process connection caches.

pub mod broker;
mod bus;
pub mod consumer;
pub(crate) mod kafka;
pub mod kv;
pub mod kv_entry;
mod nats;
pub mod pg;
mod route;
pub mod stream;
mod tail;

pub use tail::{forget_broker, record_and_output, record_placed, Placed, Record};

#[cfg(test)]
pub use crate::iac::values::bool_field;
pub use crate::iac::values::{
    config_object, decode_config, duration_from_json, duration_json, i64_field, str_field,
    strings_field,
};

use super::error::DriverError;
use super::state::{BrokerRecord, ProviderState};
use crate::nats::{ConnSettings, NatsConn};
use crate::pb::iac::{ResourceRef, ResourceSpec};
use crate::secret::Secret;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pub use crate::iac::kind::{
    Kind, BROKER_TYPE, CONSUMER_TYPE, KV_ENTRY_TYPE, KV_TYPE, OBJECT_STORE_TYPE, STREAM_TYPE,
};

impl Kind {
    /// The driver of this kind: the one place that maps a resource type to its code.
    pub(crate) fn driver(self) -> &'static dyn Resource {
        match self {
            Kind::Broker => &BrokerDriver,
            Kind::Stream => &StreamDriver,
            Kind::Consumer => &ConsumerDriver,
            Kind::Kv => &BucketDriver::<false>,
            Kind::ObjectStore => &BucketDriver::<true>,
            Kind::KvEntry => &KvEntryDriver,
        }
    }
}

/// What a driver returns for Create/Read/Update: the host persists `provider_id` and
/// `outputs` (a JSON object echoing every field Diff compares).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub provider_id: String,
    pub outputs: Json,
    pub sensitive: Vec<String>,
    pub status: String,
}

/// The one shape every resource type's driver has: decode into the runtime's own spec,
/// create-or-adopt and update in place (`apply`), read (by name when the provider_id is empty),
/// an idempotent delete, a health check, and a pure diff against persisted outputs; and the
/// facts the provider reports about the type (capability tier and operations, sensitive output
/// keys, the keys drift compares without a spec).
pub(crate) trait Driver {
    type Spec: Send + Sync;
    const KIND: Kind;
    /// Capability tier: 1 = infrastructure the others depend on, 2 = what lives on it.
    const TIER: i32;
    const OPERATIONS: &'static [&'static str] = &["create", "read", "update", "delete"];
    /// Output keys holding credentials (wfctl routes them to its secrets provider).
    const SENSITIVE: &'static [&'static str] = &[];
    /// The server-side settings drift compares when no spec is given.
    const DRIFT_KEYS: &'static [&'static str];
    fn decode(name: &str, config_json: &[u8]) -> Result<Self::Spec, DriverError>;
    /// No I/O: the provider state only resolves which broker a stream or consumer names.
    /// `name` is the resource's, for errors.
    fn diff(
        name: &str,
        spec: &Self::Spec,
        state: &ProviderState,
        current: &Json,
    ) -> Result<Vec<super::plan::Change>, DriverError>;
    /// Plan-time facts only the live broker knows, added to `changes` (Diff): a change its
    /// release cannot make in place becomes a replace, and a replace says what it destroys.
    /// Never fails: an unreachable broker is said in the plan.
    fn plan_report(
        _ctx: &Ctx,
        _spec: &Self::Spec,
        _state: &ProviderState,
        changes: Vec<super::plan::Change>,
    ) -> impl Future<Output = Vec<super::plan::Change>> + Send {
        std::future::ready(changes)
    }
    fn apply(
        ctx: &Ctx,
        name: &str,
        spec: &Self::Spec,
    ) -> impl Future<Output = Result<Output, DriverError>> + Send;
    fn read(ctx: &Ctx, r: &ResourceRef)
        -> impl Future<Output = Result<Output, DriverError>> + Send;
    fn delete(ctx: &Ctx, r: &ResourceRef) -> impl Future<Output = Result<(), DriverError>> + Send;
    fn health(
        ctx: &Ctx,
        r: &ResourceRef,
    ) -> impl Future<Output = Result<(bool, String), DriverError>> + Send;
    /// What of this type lives on `broker` (a recorded broker), as (resource name, outputs).
    fn enumerate(
        ctx: &Ctx,
        broker: &str,
    ) -> impl Future<Output = Result<Vec<(String, Output)>, DriverError>> + Send;
    /// Only types whose OPERATIONS include "scale" override this.
    fn scale(
        _ctx: &Ctx,
        _r: &ResourceRef,
        _replicas: i32,
    ) -> impl Future<Output = Result<Output, DriverError>> + Send {
        std::future::ready(Err(DriverError::Unsupported(format!(
            "Scale of {}",
            Self::KIND.type_name()
        ))))
    }
    fn troubleshoot(_ctx: &Ctx, _r: &ResourceRef) -> Result<Vec<(String, String)>, DriverError> {
        Err(DriverError::Unsupported(format!(
            "Troubleshoot of {}",
            Self::KIND.type_name()
        )))
    }
}

/// A driver behind one pointer, so the provider routes every call through `Kind::driver`
/// (the only match over resource types) instead of one match per operation.
#[tonic::async_trait]
pub(crate) trait Resource: Sync {
    fn tier(&self) -> i32;
    fn operations(&self) -> &'static [&'static str];
    fn sensitive(&self) -> &'static [&'static str];
    fn drift_keys(&self) -> &'static [&'static str];
    /// Decodes `spec` and diffs it against `current`.
    fn diff(
        &self,
        state: &ProviderState,
        spec: &ResourceSpec,
        current: &Json,
    ) -> Result<Vec<super::plan::Change>, DriverError>;
    /// Decodes `spec`, diffs it against `current` and adds what only the live broker knows.
    async fn diff_live(
        &self,
        ctx: &Ctx,
        state: &ProviderState,
        spec: &ResourceSpec,
        current: &Json,
    ) -> Result<Vec<super::plan::Change>, DriverError>;
    /// Decodes `spec` and applies it.
    async fn apply(&self, ctx: &Ctx, spec: &ResourceSpec) -> Result<Output, DriverError>;
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError>;
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError>;
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError>;
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError>;
    async fn scale(&self, ctx: &Ctx, r: &ResourceRef, replicas: i32)
        -> Result<Output, DriverError>;
    fn troubleshoot(
        &self,
        ctx: &Ctx,
        r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError>;
}

#[tonic::async_trait]
impl<D: Driver + Sync> Resource for D {
    fn tier(&self) -> i32 {
        D::TIER
    }
    fn operations(&self) -> &'static [&'static str] {
        D::OPERATIONS
    }
    fn sensitive(&self) -> &'static [&'static str] {
        D::SENSITIVE
    }
    fn drift_keys(&self) -> &'static [&'static str] {
        D::DRIFT_KEYS
    }
    fn diff(
        &self,
        state: &ProviderState,
        spec: &ResourceSpec,
        current: &Json,
    ) -> Result<Vec<super::plan::Change>, DriverError> {
        D::diff(
            &spec.name,
            &D::decode(&spec.name, &spec.config_json)?,
            state,
            current,
        )
    }
    async fn diff_live(
        &self,
        ctx: &Ctx,
        state: &ProviderState,
        spec: &ResourceSpec,
        current: &Json,
    ) -> Result<Vec<super::plan::Change>, DriverError> {
        let desired = D::decode(&spec.name, &spec.config_json)?;
        let changes = D::diff(&spec.name, &desired, state, current)?;
        Ok(D::plan_report(ctx, &desired, state, changes).await)
    }
    async fn apply(&self, ctx: &Ctx, spec: &ResourceSpec) -> Result<Output, DriverError> {
        let desired = D::decode(&spec.name, &spec.config_json)?;
        D::apply(ctx, &spec.name, &desired).await
    }
    async fn read(&self, ctx: &Ctx, r: &ResourceRef) -> Result<Output, DriverError> {
        D::read(ctx, r).await
    }
    async fn delete(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(), DriverError> {
        D::delete(ctx, r).await
    }
    async fn health(&self, ctx: &Ctx, r: &ResourceRef) -> Result<(bool, String), DriverError> {
        D::health(ctx, r).await
    }
    async fn enumerate(
        &self,
        ctx: &Ctx,
        broker: &str,
    ) -> Result<Vec<(String, Output)>, DriverError> {
        D::enumerate(ctx, broker).await
    }
    async fn scale(
        &self,
        ctx: &Ctx,
        r: &ResourceRef,
        replicas: i32,
    ) -> Result<Output, DriverError> {
        D::scale(ctx, r, replicas).await
    }
    fn troubleshoot(
        &self,
        ctx: &Ctx,
        r: &ResourceRef,
    ) -> Result<Vec<(String, String)>, DriverError> {
        D::troubleshoot(ctx, r)
    }
}

pub struct BrokerDriver;
pub struct StreamDriver;
pub struct ConsumerDriver;
/// A key-value bucket (`OBJECT` false) or an object store (true): one driver, two vocabularies.
pub struct BucketDriver<const OBJECT: bool>;
pub type KvDriver = BucketDriver<false>;
pub type ObjectStoreDriver = BucketDriver<true>;
pub struct KvEntryDriver;

/// The broker a stream or consumer spec resolves to, when that can be decided without I/O.
pub fn desired_broker(
    broker_ref: &str,
    servers: &[String],
    state: &ProviderState,
) -> Option<String> {
    if servers.iter().any(|s| !s.trim().is_empty()) {
        return Some(broker_ref.to_string());
    }
    broker_name(broker_ref, state)
}

/// Shared by every driver and target call in one plugin process: plain data
/// (`crate::iac::ctx`); connecting through a target's platform is the drivers' (below).
pub use crate::iac::ctx::Ctx;

/// What this process learned about reaching brokers, kept in the `Ctx` (`Ctx::slot`).
#[derive(Default)]
struct Reaches {
    /// Brokers whose platform was asked in this process whether they still exist.
    exist: Mutex<HashMap<String, bool>>,
    /// How this process reaches each broker (by name and recorded urls): the urls to dial
    /// and what keeps them open (a port-forward), `None` for the recorded urls.
    by_broker: tokio::sync::Mutex<HashMap<String, Option<Reached>>>,
}

/// A broker's urls as this process reaches them, and the tunnel that carries them.
struct Reached {
    urls: Vec<String>,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl Ctx {
    /// The NATS connections of this process.
    pub fn conns(&self) -> std::sync::Arc<ConnCache> {
        self.slot()
    }

    /// Connects to a stream's or consumer's broker. When the broker's platform says it no longer
    /// exists (asked once per broker per process), the answer is "not found" at once: its
    /// streams and consumers went with it.
    pub async fn connect(&self, what: &str, b: &BrokerConn) -> Result<NatsConn, DriverError> {
        if let Some(rec) = &b.record {
            let reaches = self.slot::<Reaches>();
            let known = reaches
                .exist
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&b.name)
                .copied();
            let exists = match known {
                Some(e) => e,
                None => {
                    let target = crate::iac::targets::for_target(&b.name, rec.target)?;
                    let exists = !matches!(
                        target.platform(self, what, rec).await?,
                        crate::iac::targets::Platform::Gone
                    );
                    reaches
                        .exist
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(b.name.clone(), exists);
                    exists
                }
            };
            if !exists {
                return Err(DriverError::not_found(format!(
                    "{what}: its broker {:?} no longer exists on its platform (its streams and consumers went with it)",
                    b.name
                )));
            }
        }
        self.conns()
            .connect(what, &self.reach(what, b).await?)
            .await
    }

    /// `b` with the urls this process reaches it through: the target's tunnel when the
    /// recorded urls only work inside its platform (`BrokerTarget::reach`), opened once per
    /// broker per process and kept open until the process ends or the broker is deleted.
    pub async fn reach(&self, what: &str, b: &BrokerConn) -> Result<BrokerConn, DriverError> {
        let Some(rec) = &b.record else {
            return Ok(b.clone());
        };
        let key = format!("{}|{}", b.name, rec.urls.join(","));
        let slot = self.slot::<Reaches>();
        let mut reaches = slot.by_broker.lock().await;
        if !reaches.contains_key(&key) {
            let target = crate::iac::targets::for_target(&b.name, rec.target)?;
            let reached = target.reach(self, what, rec).await?.map(|r| Reached {
                urls: r.urls,
                _guard: r.guard,
            });
            reaches.insert(key.clone(), reached);
        }
        let mut out = b.clone();
        if let Some(Some(r)) = reaches.get(&key) {
            out.settings.urls = r.urls.iter().map(Secret::new).collect();
        }
        Ok(out)
    }

    /// Closes the connections to a deleted broker and the tunnels that carried them.
    pub async fn forget(&self, name: &str, recorded_urls: &[String]) {
        let conns = self.conns();
        conns.evict(recorded_urls).await;
        let prefix = format!("{name}|");
        let gone: Vec<Reached> = {
            let slot = self.slot::<Reaches>();
            let mut reaches = slot.by_broker.lock().await;
            let keys: Vec<String> = reaches
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| reaches.remove(&k).flatten())
                .collect()
        };
        for r in gone {
            conns.evict(&r.urls).await;
        }
    }
}

/// Where a stream or consumer's broker is and how to reach it.
#[derive(Clone, Debug)]
pub struct BrokerConn {
    /// The broker resource name, or `""` when the resource names its servers itself.
    pub name: String,
    pub settings: ConnSettings,
    /// The provider's record of the broker (`None` when the resource names its servers).
    pub record: Option<BrokerRecord>,
}

impl BrokerConn {
    pub fn from_record(name: &str, r: &BrokerRecord) -> BrokerConn {
        let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let a = &r.auth;
        let ms = |v: u64, d: Duration| {
            if v == 0 {
                d
            } else {
                Duration::from_millis(v)
            }
        };
        BrokerConn {
            name: name.to_string(),
            settings: ConnSettings {
                urls: r.urls.iter().map(Secret::new).collect(),
                token: (!a.token.is_empty()).then(|| Secret::new(&a.token)),
                user: (!a.user.is_empty()).then(|| a.user.clone()),
                password: (!a.password.is_empty()).then(|| Secret::new(&a.password)),
                creds_file: opt(&a.creds_file),
                nkey_seed_file: opt(&a.nkey_seed_file),
                tls_ca_file: opt(&a.tls_ca_file),
                tls_cert_file: opt(&a.tls_cert_file),
                tls_key_file: opt(&a.tls_key_file),
                tls_required: a.tls_required,
                connection_name: format!("workflow-plugin-eventbus:iac:{name}"),
                connect_timeout: ms(r.connect_timeout_ms, Duration::from_secs(5)),
                request_timeout: ms(r.request_timeout_ms, Duration::from_secs(5)),
            },
            record: Some(r.clone()),
        }
    }

    pub fn from_servers(servers: &[String]) -> BrokerConn {
        BrokerConn {
            name: String::new(),
            settings: ConnSettings {
                urls: servers.iter().map(Secret::new).collect(),
                connection_name: "workflow-plugin-eventbus:iac".into(),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
            record: None,
        }
    }
}

/// Whether the broker's target runs processes of its own and none of them answers. Blocking.
pub fn all_down(name: &str, r: &BrokerRecord) -> bool {
    crate::iac::targets::for_target(name, r.target)
        .ok()
        .and_then(|t| t.probe(r))
        .is_some_and(|up| !up.iter().any(|u| *u))
}

/// The broker name a stream or consumer resolves to: `broker_ref`, else the only broker this
/// provider knows. `None` when that cannot be decided.
pub fn broker_name(broker_ref: &str, state: &ProviderState) -> Option<String> {
    if !broker_ref.is_empty() {
        return Some(broker_ref.to_string());
    }
    if state.brokers.len() == 1 {
        return state.brokers.keys().next().cloned();
    }
    None
}

/// Explicit `servers` on the resource, else the provider's record of `broker_ref` (or of the
/// only broker it knows).
pub fn resolve_broker(
    what: &str,
    broker_ref: &str,
    servers: &[String],
    state: &ProviderState,
    state_path: &std::path::Path,
) -> Result<BrokerConn, DriverError> {
    let servers: Vec<String> = servers
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !servers.is_empty() {
        let mut c = BrokerConn::from_servers(&servers);
        if let Some(r) = state.brokers.get(broker_ref) {
            // Same broker, explicit urls: keep its credentials.
            let mut from = BrokerConn::from_record(broker_ref, r);
            from.settings.urls = c.settings.urls;
            c = from;
        }
        c.name = broker_ref.to_string();
        return Ok(c);
    }
    if !broker_ref.is_empty() {
        return match state.brokers.get(broker_ref) {
            Some(r) => Ok(BrokerConn::from_record(broker_ref, r)),
            None => Err(DriverError::BrokerUnknown {
                what: what.to_string(),
                message: format!(
                    "broker_ref {broker_ref:?} is not a broker this provider created or adopted \
                     (no entry in {}); apply the infra.eventbus resource {broker_ref:?} first \
                     (same iac.provider module and state_dir), or set servers on this resource{}",
                    state_path.display(),
                    known(state)
                ),
            }),
        };
    }
    match state.brokers.len() {
        1 => {
            let (name, r) = state.brokers.iter().next().expect("one broker");
            Ok(BrokerConn::from_record(name, r))
        }
        0 => Err(DriverError::BrokerUnknown {
            what: what.to_string(),
            message: format!(
                "no broker: set broker_ref to the infra.eventbus resource that holds it (and apply \
                 that first), or set servers; {} records no brokers",
                state_path.display()
            ),
        }),
        _ => Err(DriverError::BrokerUnknown {
            what: what.to_string(),
            message: format!(
                "broker_ref is required when several brokers exist{}",
                known(state)
            ),
        }),
    }
}

fn known(state: &ProviderState) -> String {
    if state.brokers.is_empty() {
        String::new()
    } else {
        format!(
            " (known brokers: {})",
            state.brokers.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// One NATS connection per broker identity (urls + credentials) per plugin process.
#[derive(Default)]
pub struct ConnCache {
    conns: Mutex<HashMap<String, NatsConn>>,
}

impl ConnCache {
    /// One connection per server list and credentials: the same fingerprint the broker's
    /// drift compares, so two brokers that differ only in a client certificate never share.
    fn key(s: &ConnSettings) -> String {
        let urls: Vec<&str> = s.urls.iter().map(Secret::expose).collect();
        format!("{}|{}", urls.join(","), s.auth_fingerprint())
    }

    /// A connected handle, or `Unavailable` after the connect timeout.
    pub async fn connect(&self, what: &str, b: &BrokerConn) -> Result<NatsConn, DriverError> {
        let key = Self::key(&b.settings);
        let existing = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let conn = match existing {
            Some(c) => c,
            None => {
                let label = if b.name.is_empty() {
                    "servers"
                } else {
                    &b.name
                };
                let c = NatsConn::open(label, &b.settings)
                    .await
                    .map_err(|e| DriverError::nats(what, e))?;
                self.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key)
                    .or_insert(c)
                    .clone()
            }
        };
        conn.wait_connected(b.settings.connect_timeout)
            .await
            .map_err(|e| DriverError::nats(what, e))?;
        Ok(conn)
    }

    /// Closes and forgets the connections to these urls (a deleted broker).
    pub async fn evict(&self, urls: &[String]) {
        let prefix = format!("{}|", urls.join(","));
        let gone: Vec<NatsConn> = {
            let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<String> = m
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| m.remove(&k)).collect()
        };
        for c in gone {
            c.close().await;
        }
    }
}

/// Retries a JetStream API call that failed transiently (request timed out, no responders), as
/// the assets of a cluster that just restarted do for a few seconds; other results return at once.
pub async fn retry<T, E, Fut>(
    mut call: impl FnMut() -> Fut,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(250);
    for _ in 0..4 {
        match call().await {
            Err(e) if transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_in_config_form() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(120),
            Duration::from_millis(1500),
            Duration::new(3, 7),
        ] {
            assert_eq!(duration_from_json(Some(&duration_json(d))), d, "{d:?}");
        }
        assert_eq!(duration_json(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn config_json_must_be_an_object() {
        assert!(config_object("x", b"").unwrap().is_empty());
        assert!(config_object("x", b"null").unwrap().is_empty());
        let e = config_object("x", b"[1]").unwrap_err().to_string();
        assert!(e.contains("JSON object"), "{e}");
    }

    #[test]
    fn unknown_broker_names_the_state_file_and_the_fix() {
        let s = ProviderState::default();
        let e = resolve_broker(
            "stream \"S\"",
            "orders-bus",
            &[],
            &s,
            std::path::Path::new("/x/state.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("orders-bus") && e.contains("/x/state.json") && e.contains("servers"),
            "{e}"
        );
    }
}
