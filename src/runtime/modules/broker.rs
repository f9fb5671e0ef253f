//! `infra.eventbus` / `eventbus.broker`: the running broker that owns the one connection every
//! stream, consumer, step and trigger shares. Its config is `config::broker::BrokerSpec`.
//!
//! This is the one place that chooses a provider. The provider is fixed by the config at
//! Create; `BrokerModule::dispatch` runs a job (a step's work, a trigger's worker) with the
//! provider's concrete type, so the steps and the trigger are written once, generic over
//! `runtime::provider::Provider`, and stay statically dispatched. The NATS arm runs inline so
//! its futures (publish, ack) keep their measured size; every other arm is boxed.

pub use crate::config::broker::{BrokerSpec, LocalSpec};
use crate::nats::names::env_key;
use crate::nats::provider::NatsProvider;
use crate::nats::NatsConn;
use crate::pg::provider::PgProvider;
use crate::pg::{PgBus, PgSettings};
use crate::runtime::provider::{Provider, ProviderError};
use futures::future::Either;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use tokio::sync::Mutex;

/// A provider the broker module can open: how it is reached from its broker module.
pub trait Open: Provider {
    /// The opened provider (opened on first use), or why the broker cannot be used now.
    fn open(broker: &BrokerModule) -> impl Future<Output = Result<Self, ProviderError>> + Send;
    /// Registers `stream`/`consumer` with the consumer-lag refresher (idempotent).
    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str);
}

/// A job that runs against whichever provider the broker uses.
pub trait ForProvider: Send {
    type Out;
    fn run<P: Open>(self, broker: &BrokerModule) -> impl Future<Output = Self::Out> + Send;
}

/// Which provider a broker module uses (from its config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nats,
    Pg,
}

/// A broker module instance: spec plus its (lazily opened) connection.
///
/// StopModule closes the connection and forgets it; StartModule (or the next use after it)
/// opens a fresh one. A closed client never reconnects, so keeping it made every later
/// publish fail.
pub struct BrokerModule {
    pub spec: BrokerSpec,
    /// NATS: `None` not opened yet (or closed by Stop); `Some(None)` degraded, no url configured.
    nats: RwLock<Option<Option<NatsProvider>>>,
    /// pgchannel: the pool, once opened.
    pg: RwLock<Option<PgProvider>>,
    /// Set by StopModule, cleared by StartModule: between the two, steps are told the broker
    /// module is stopped instead of silently reopening it.
    stopped: AtomicBool,
    open_lock: Mutex<()>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl BrokerModule {
    pub fn new(spec: BrokerSpec) -> Self {
        BrokerModule {
            spec,
            nats: RwLock::new(None),
            pg: RwLock::new(None),
            stopped: AtomicBool::new(false),
            open_lock: Mutex::new(()),
        }
    }

    fn kind(&self) -> Kind {
        if self.spec.pg.is_some() {
            Kind::Pg
        } else {
            Kind::Nats
        }
    }

    /// Runs `job` with this broker's provider type: the single provider dispatch. Not an
    /// `async fn`, so the job is not kept a second time beside the future that owns it.
    pub fn dispatch<'a, J: ForProvider + 'a>(
        &'a self,
        job: J,
    ) -> impl Future<Output = J::Out> + Send + 'a {
        match self.kind() {
            Kind::Nats => Either::Left(job.run::<NatsProvider>(self)),
            Kind::Pg => Either::Right(Box::pin(job.run::<PgProvider>(self))),
        }
    }

    /// Registers a consumer with the lag refresher on this broker's provider; best effort (an
    /// unreachable broker is reported by the caller's own start).
    pub async fn watch_lag(&self, stream: &str, consumer: &str) {
        struct Job<'a>(&'a str, &'a str);
        impl ForProvider for Job<'_> {
            type Out = ();
            async fn run<P: Open>(self, broker: &BrokerModule) {
                if let Ok(p) = P::open(broker).await {
                    p.watch_lag(&broker.spec.name, self.0, self.1);
                }
            }
        }
        self.dispatch(Job(stream, consumer)).await
    }

    /// InitModule: a warning when nothing says where the broker is (steps fail until it is set).
    pub fn warn_unconfigured(&self) {
        match self.kind() {
            Kind::Nats if self.spec.resolve_urls().is_empty() => {
                tracing::warn!(broker = %self.spec.name, "no broker url configured; steps using this broker will fail until one is set");
            }
            Kind::Pg if self.spec.resolve_pg_dsn().is_none() => {
                tracing::warn!(broker = %self.spec.name, "no Postgres dsn (dsn or {}); steps using this broker will fail until one is set", self.spec.pg_env_var());
            }
            _ => {}
        }
    }

    /// StartModule: clears a previous Stop and opens the connection, so a bad address or an
    /// unreachable database fails Start with its reason.
    pub async fn start(&self) -> Result<(), ProviderError> {
        self.stopped.store(false, Ordering::SeqCst);
        match self.kind() {
            // Degraded (no url) is not a Start failure: steps say how to configure one.
            Kind::Nats => self.nats_connection().await.map(|_| ()),
            Kind::Pg => self.pg_pool().await.map(|_| ()),
        }
    }

    fn check_running(&self) -> Result<(), ProviderError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "the broker module was stopped (StopModule); StartModule connects it again"
                    .into(),
            });
        }
        Ok(())
    }

    /// Opens the NATS connection once. `Ok(None)` is degraded mode: no URL configured anywhere.
    /// Steps on modules that were created but never started (wfctl pipeline run) come here too.
    async fn nats_connection(&self) -> Result<Option<NatsProvider>, ProviderError> {
        self.check_running()?;
        if let Some(c) = read(&self.nats) {
            return Ok(c);
        }
        // Boxed: async-nats' connect future is ~10 KB, and inline it made every step's future
        // that size, copied into a fresh box on each ExecuteStep (callgrind: a fifth of the
        // plugin's instructions per publish were that memcpy).
        Box::pin(self.open_nats()).await
    }

    async fn open_nats(&self) -> Result<Option<NatsProvider>, ProviderError> {
        let _guard = self.open_lock.lock().await;
        if let Some(c) = read(&self.nats) {
            return Ok(c);
        }
        let urls = self.spec.resolve_urls();
        let conn = if urls.is_empty() {
            tracing::warn!(broker = %self.spec.name, "no broker url (dsn, EVENTBUS_{}_URI or NATS_URL); running degraded", env_key(&self.spec.name));
            None
        } else {
            let mut settings = self.spec.conn.clone();
            settings.urls = urls;
            tracing::info!(broker = %self.spec.name, servers = %settings.redacted_urls(), "connecting");
            Some(NatsProvider::new(
                NatsConn::open(&self.spec.name, &settings).await?,
            ))
        };
        *self.nats.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// The pgchannel pool, opened (and the schema ensured) on first use.
    async fn pg_pool(&self) -> Result<PgProvider, ProviderError> {
        self.check_running()?;
        if let Some(b) = read(&self.pg) {
            return Ok(b);
        }
        // Boxed for the same reason as the NATS connect: only the first call pays for it.
        Box::pin(self.open_pg()).await
    }

    async fn open_pg(&self) -> Result<PgProvider, ProviderError> {
        let _guard = self.open_lock.lock().await;
        if let Some(b) = read(&self.pg) {
            return Ok(b);
        }
        let Some(cfg) = &self.spec.pg else {
            return Err(ProviderError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "not a pgchannel broker".into(),
            });
        };
        let Some(dsn) = self.spec.resolve_pg_dsn() else {
            return Err(ProviderError::Unavailable {
                broker: self.spec.name.clone(),
                detail: format!(
                    "no Postgres dsn: set dsn on the module or {} in the environment",
                    self.spec.pg_env_var()
                ),
            });
        };
        let settings = PgSettings {
            broker: self.spec.name.clone(),
            dsn: dsn.expose().to_string(),
            max_conns: cfg.max_conns,
            poll_interval: cfg.poll_interval,
            connect_timeout: cfg.connect_timeout,
        };
        tracing::info!(broker = %self.spec.name, dsn = %settings.redacted_dsn(), "connecting to PostgreSQL");
        let p = PgProvider {
            bus: PgBus::connect(settings).await?,
        };
        crate::telemetry::connection(&self.spec.name, "pgchannel", true);
        *self.pg.write().unwrap_or_else(|p| p.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// StopModule and shutdown: drains and forgets the connection.
    pub async fn close(&self) {
        let _guard = self.open_lock.lock().await;
        self.stopped.store(true, Ordering::SeqCst);
        let taken = self.nats.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Some(c)) = taken {
            c.close().await;
        }
        let pg = self.pg.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(b) = pg {
            crate::telemetry::connection(&self.spec.name, "pgchannel", false);
            b.close().await;
        }
    }
}

impl Open for NatsProvider {
    async fn open(broker: &BrokerModule) -> Result<Self, ProviderError> {
        match broker.nats_connection().await? {
            Some(c) => Ok(c),
            None => Err(ProviderError::Unavailable {
                broker: broker.spec.name.clone(),
                detail: format!(
                    "no broker url configured; set dsn on the module, EVENTBUS_{}_URI or NATS_URL",
                    env_key(&broker.spec.name)
                ),
            }),
        }
    }

    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str) {
        crate::telemetry::lag::watch_nats(broker, &self.conn.js, stream, consumer);
    }
}

impl Open for PgProvider {
    async fn open(broker: &BrokerModule) -> Result<Self, ProviderError> {
        broker.pg_pool().await
    }

    fn watch_lag(&self, broker: &str, stream: &str, consumer: &str) {
        crate::telemetry::lag::watch_pg(broker, &self.bus, stream, consumer);
    }
}

/// Whether `token` has any provider's ack token shape: Create checks a literal token before
/// it knows the broker.
pub fn check_any_token(token: &str) -> Result<(), String> {
    if PgProvider::check_token(token).is_ok() {
        return Ok(());
    }
    NatsProvider::check_token(token)
        .map_err(|e| format!("{e}; a pgchannel token is \"<stream>:<consumer>:<id>\""))
}
