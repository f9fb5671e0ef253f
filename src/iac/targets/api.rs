//! What every deploy target provides to the broker driver (`drivers/broker.rs`), and the
//! validated broker config it receives. Kept apart from `mod.rs` so a target's file imports
//! this contract without importing the dispatch that imports it.

use crate::config::broker::BrokerSpec;
use crate::iac::drivers::{config_object, decode_config, Ctx, BROKER_TYPE};
use crate::iac::error::DriverError;
use crate::iac::state::BrokerRecord;
use crate::pb::eventbus::ClusterConfig;
use serde_json::{Map, Value as Json};
use std::path::PathBuf;

/// A validated broker config plus the raw values whose "unset" matters.
#[derive(Clone, Debug)]
pub struct BrokerDesired {
    pub spec: BrokerSpec,
    /// `replicas` as written (0 = not declared).
    pub declared_replicas: u32,
    pub max_file_store: i64,
    pub max_memory_store: i64,
    /// The whole decoded config, for the target sections the shared spec does not carry.
    pub config: ClusterConfig,
}

impl BrokerDesired {
    pub fn decode(name: &str, config_json: &[u8]) -> Result<BrokerDesired, DriverError> {
        let what = label(name);
        let m = config_object(&what, config_json)?;
        crate::config::broker::check_blank_auth(BROKER_TYPE, name, &m)?;
        decode_config(BROKER_TYPE, name, "ClusterConfig", m, |c: ClusterConfig| {
            let spec = BrokerSpec::validate(BROKER_TYPE, name, &c)?;
            let js = c.jetstream.unwrap_or_default();
            Ok(BrokerDesired {
                declared_replicas: c.replicas.max(0) as u32,
                max_file_store: js.max_storage_bytes.max(0),
                max_memory_store: js.max_memory_bytes.max(0),
                config: c,
                spec,
            })
        })
    }
}

pub fn label(name: &str) -> String {
    format!("{BROKER_TYPE} {name:?}")
}

/// What apply made or adopted: the record the state file keeps, and the target's own outputs
/// (the driver adds the compared view and the server version).
pub struct Applied {
    pub record: BrokerRecord,
    pub outputs: Json,
}

/// What the platform a target provisions on says about a recorded broker, beyond whether its
/// servers answer.
pub enum Platform {
    /// Nothing to ask (the target has no platform API).
    Untracked,
    /// The platform no longer has it (deleted out of band): its streams and consumers are gone.
    Gone,
    /// It exists; the recorded outputs with the compared fields as the platform shows them now.
    Live(Json),
}

/// How the machine running wfctl reaches a recorded broker when the record's urls only work
/// inside the platform (a ClusterIP Service): urls to use instead, and what keeps them working
/// (a port-forward) for as long as the plugin process uses them.
pub struct Reach {
    pub urls: Vec<String>,
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// One deploy target. Blocking work (processes, probes) runs inside `block`, never on the
/// async worker threads.
#[tonic::async_trait]
pub trait BrokerTarget: Sync {
    /// How the "not available yet" error offers this target: `<deploy_target> (<what it is>)`.
    fn offer(&self) -> &'static str;

    /// Target-specific checks of the config, at plan (Diff) and apply time; the error names the
    /// fields. No I/O.
    fn check(&self, _d: &BrokerDesired) -> Result<(), DriverError> {
        Ok(())
    }

    /// The provider id wfctl records (the broker's name unless the platform has its own id).
    fn provider_id(&self, name: &str, _rec: &BrokerRecord) -> String {
        name.to_string()
    }

    /// Whether credentials are echoed into outputs as sensitive strings (then wfctl needs a
    /// `secrets:` provider).
    fn credentials_in_outputs(&self) -> bool {
        true
    }

    /// Asks the platform about a recorded broker (read, drift, and whether its streams and
    /// consumers can still exist).
    async fn platform(
        &self,
        _ctx: &Ctx,
        _what: &str,
        _rec: &BrokerRecord,
    ) -> Result<Platform, DriverError> {
        Ok(Platform::Untracked)
    }

    /// How this process reaches the broker: `None` = through the record's urls (the default).
    /// Asked once per broker per process, before the first connection.
    async fn reach(
        &self,
        _ctx: &Ctx,
        _what: &str,
        _rec: &BrokerRecord,
    ) -> Result<Option<Reach>, DriverError> {
        Ok(None)
    }

    /// Keys of the broker view the diff compares, and which of them force a replace.
    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]);

    /// The cluster size the view shows and plan validation checks replication against.
    fn replicas(&self, d: &BrokerDesired) -> u32;

    /// Adds this target's compared settings to the view (pure apart from env fallbacks).
    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>);

    /// Create-or-adopt, and update in place.
    async fn apply(&self, ctx: &Ctx, name: &str, d: &BrokerDesired)
        -> Result<Applied, DriverError>;

    /// Per node, whether it answers; `None` when the target runs nothing of its own to probe
    /// (the driver's connection check is then the whole liveness test). Blocking.
    fn probe(&self, _rec: &BrokerRecord) -> Option<Vec<bool>> {
        None
    }

    /// Undo what apply did (stop what it started); adopted servers are only forgotten.
    async fn delete(
        &self,
        _ctx: &Ctx,
        _what: &str,
        _rec: &BrokerRecord,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    /// Log tails per node, when the target has logs of its own.
    fn troubleshoot(&self, _rec: &BrokerRecord) -> Option<Vec<(String, String)>> {
        None
    }
}

/// A configured path as the view and records show it (`""` = unset).
pub fn path_text(o: &Option<PathBuf>) -> String {
    o.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Runs blocking process work off the async threads.
pub async fn block<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T, super::nats_server::LocalError> + Send + 'static,
) -> Result<T, DriverError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|source| DriverError::Local { what, source }),
        Err(source) => Err(DriverError::Worker { what, source }),
    }
}

/// `nats://user:pass@host:4222` → `nats://host:4222` (through the one masking,
/// [`crate::secret::mask`]).
pub fn strip_userinfo(url: &str) -> String {
    crate::secret::mask(url, crate::secret::Userinfo::Dropped)
}
