//! `infra.eventbus` / `eventbus.broker`: the running broker that owns the one connection every
//! stream, consumer, step and trigger shares. Its config is `config::broker::BrokerSpec`.
//!
//! The backend is fixed by the provider at Create: a NATS connection, or (provider pgchannel) a
//! `PgBus` pool. Each has its own slot rather than one enum slot, so the NATS hot path (publish,
//! ack) reads its connection exactly as before and its step futures keep their size; every
//! caller that can meet both asks `is_pg()` first and takes the pgchannel path in
//! `runtime::pg`.

pub use crate::config::broker::{BrokerSpec, LocalSpec};
use crate::nats::names::env_key;
use crate::nats::{NatsConn, NatsError};
use crate::pg::{PgBus, PgError, PgSettings};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use tokio::sync::Mutex;

/// A failure on the pgchannel side of the runtime: the domain's error, or ours around it.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker {broker:?} is not connected ({detail})")]
    Unavailable { broker: String, detail: String },
    #[error("{op} timed out after {after:?}")]
    TimedOut {
        op: &'static str,
        after: std::time::Duration,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// A broker module instance: spec plus its (lazily opened) connection.
///
/// StopModule closes the connection and forgets it; StartModule (or the next use after it)
/// opens a fresh one. A closed client never reconnects, so keeping it made every later
/// publish fail.
pub struct BrokerModule {
    pub spec: BrokerSpec,
    /// `None`: not opened yet (or closed by Stop). `Some(None)`: degraded, no url configured.
    conn: RwLock<Option<Option<NatsConn>>>,
    /// Set by StopModule, cleared by StartModule: between the two, steps are told the broker
    /// module is stopped instead of silently reopening it.
    stopped: AtomicBool,
    open_lock: Mutex<()>,
    /// Provider pgchannel: the pool, once opened.
    pg: RwLock<Option<PgBus>>,
}

impl BrokerModule {
    pub fn new(spec: BrokerSpec) -> Self {
        BrokerModule {
            spec,
            conn: RwLock::new(None),
            stopped: AtomicBool::new(false),
            open_lock: Mutex::new(()),
            pg: RwLock::new(None),
        }
    }

    /// Provider pgchannel: steps, trigger and modules take the `runtime::pg` paths.
    pub fn is_pg(&self) -> bool {
        self.spec.pg.is_some()
    }

    /// StartModule of a pgchannel broker: clears a previous Stop and opens the pool, so a bad
    /// dsn or an unreachable database fails Start with its reason.
    pub async fn start_pg(&self) -> Result<(), BusError> {
        self.stopped.store(false, Ordering::SeqCst);
        self.require_pg().await.map(|_| ())
    }

    /// The pgchannel pool, opened (and the schema ensured) on first use.
    pub async fn require_pg(&self) -> Result<PgBus, BusError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "the broker module was stopped (StopModule); StartModule connects it again"
                    .into(),
            });
        }
        if let Some(b) = self.pg.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(b);
        }
        // Boxed for the same reason as the NATS connect: only the first call pays for it.
        Box::pin(self.open_pg()).await
    }

    async fn open_pg(&self) -> Result<PgBus, BusError> {
        let _guard = self.open_lock.lock().await;
        if let Some(b) = self.pg.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(b);
        }
        let Some(cfg) = &self.spec.pg else {
            return Err(BusError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "not a pgchannel broker".into(),
            });
        };
        let Some(dsn) = self.spec.resolve_pg_dsn() else {
            return Err(BusError::Unavailable {
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
        let bus = PgBus::connect(settings).await?;
        crate::telemetry::connection(&self.spec.name, "pgchannel", true);
        *self.pg.write().unwrap_or_else(|p| p.into_inner()) = Some(bus.clone());
        Ok(bus)
    }

    fn current(&self) -> Option<Option<NatsConn>> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// StartModule: clears a previous Stop and opens the connection.
    pub async fn start(&self) -> Result<Option<NatsConn>, NatsError> {
        self.stopped.store(false, Ordering::SeqCst);
        self.connection().await
    }

    /// Opens the connection once. `Ok(None)` is degraded mode: no URL configured anywhere.
    /// Steps on modules that were created but never started (wfctl pipeline run) come here too.
    pub async fn connection(&self) -> Result<Option<NatsConn>, NatsError> {
        if self.is_pg() {
            return Err(NatsError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "this broker uses provider pgchannel; this operation needs a nats broker"
                    .into(),
            });
        }
        if self.stopped.load(Ordering::SeqCst) {
            return Err(NatsError::Unavailable {
                broker: self.spec.name.clone(),
                detail: "the broker module was stopped (StopModule); StartModule connects it again"
                    .into(),
            });
        }
        if let Some(c) = self.current() {
            return Ok(c);
        }
        // Boxed: async-nats' connect future is ~10 KB, and inline it made every step's future
        // that size, copied into a fresh box on each ExecuteStep (callgrind: a fifth of the
        // plugin's instructions per publish were that memcpy).
        Box::pin(self.open()).await
    }

    async fn open(&self) -> Result<Option<NatsConn>, NatsError> {
        let _guard = self.open_lock.lock().await;
        if let Some(c) = self.current() {
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
            Some(NatsConn::open(&self.spec.name, &settings).await?)
        };
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// The connection or a clear error that says how to configure one.
    pub async fn require(&self) -> Result<NatsConn, NatsError> {
        match self.connection().await? {
            Some(c) => Ok(c),
            None => Err(NatsError::Unavailable {
                broker: self.spec.name.clone(),
                detail: format!(
                    "no broker url configured; set dsn on the module, EVENTBUS_{}_URI or NATS_URL",
                    env_key(&self.spec.name)
                ),
            }),
        }
    }

    /// StopModule and shutdown: drains and forgets the connection.
    pub async fn close(&self) {
        let _guard = self.open_lock.lock().await;
        self.stopped.store(true, Ordering::SeqCst);
        let taken = self.conn.write().unwrap_or_else(|p| p.into_inner()).take();
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
