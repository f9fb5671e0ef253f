//! `infra.eventbus` / `eventbus.broker`: the running broker that owns the one NATS connection
//! every stream, consumer, step and trigger shares. Its config is `config::broker::BrokerSpec`.

pub use crate::config::broker::{BrokerSpec, LocalSpec};
use crate::nats::names::env_key;
use crate::nats::{NatsConn, NatsError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use tokio::sync::Mutex;

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
}

impl BrokerModule {
    pub fn new(spec: BrokerSpec) -> Self {
        BrokerModule {
            spec,
            conn: RwLock::new(None),
            stopped: AtomicBool::new(false),
            open_lock: Mutex::new(()),
        }
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
    }
}
