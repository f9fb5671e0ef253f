//! `infra.eventbus` / `eventbus.broker`: the running broker that owns the one connection every
//! stream, consumer, step and trigger shares. Its config is `config::broker::BrokerSpec`.
//!
//! This is the one place that chooses a provider. The provider is fixed by the config at
//! Create; `BrokerModule::dispatch` runs a job (a step's work, a trigger's worker) with the
//! provider's concrete type, so the steps and the trigger are written once, generic over
//! `runtime::provider::Provider`, and stay statically dispatched. The NATS arm runs inline so
//! its futures (publish, ack) keep their measured size; every other arm is boxed. Opening,
//! starting, closing and the Init warning go through the same dispatch: the opened provider
//! sits type-erased in one slot, so a provider adds its arm here and nothing else.

pub use crate::config::broker::{BrokerSpec, LocalSpec};
use crate::kafka::provider::KafkaProvider;
use crate::nats::provider::NatsProvider;
use crate::pg::provider::PgProvider;
use crate::providers::Provider as Kind;
use crate::runtime::provider::{Connect, Provider, ProviderError};
use futures::future::{Either, FutureExt};
use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::Mutex;

/// A provider the broker module can open: how it is reached from its broker module.
pub trait Open: Connect {
    /// The opened provider (opened on first use), or why the broker cannot be used now. A
    /// shared handle: taking it is one reference count, not a copy of the client.
    fn open(broker: &BrokerModule)
        -> impl Future<Output = Result<Arc<Self>, ProviderError>> + Send;
}

impl<P: Connect> Open for P {
    async fn open(broker: &BrokerModule) -> Result<Arc<Self>, ProviderError> {
        broker
            .opened::<P>()
            .await?
            .map_err(|detail| broker.unavailable(detail))
    }
}

/// A job that runs against whichever provider the broker uses.
pub trait ForProvider: Send {
    type Out;
    fn run<P: Open>(self, broker: &BrokerModule) -> impl Future<Output = Self::Out> + Send;
}

/// What the slot holds once opened: the provider, or (degraded) why there is none.
#[derive(Clone)]
enum Slot {
    Open(Arc<dyn Any + Send + Sync>),
    Unconfigured(String),
}

/// A broker module instance: spec plus its (lazily opened) connection.
///
/// StopModule closes the connection and forgets it; StartModule (or the next use after it)
/// opens a fresh one. A closed client never reconnects, so keeping it made every later
/// publish fail.
pub struct BrokerModule {
    pub spec: BrokerSpec,
    /// `None` not opened yet (or closed by Stop); else the provider this broker's config names.
    slot: RwLock<Option<Slot>>,
    /// Set by StopModule, cleared by StartModule: between the two, steps are told the broker
    /// module is stopped instead of silently reopening it.
    stopped: AtomicBool,
    open_lock: Mutex<()>,
}

impl BrokerModule {
    pub fn new(spec: BrokerSpec) -> Self {
        BrokerModule {
            spec,
            slot: RwLock::new(None),
            stopped: AtomicBool::new(false),
            open_lock: Mutex::new(()),
        }
    }

    /// Runs `job` with this broker's provider type: the single provider dispatch. Not an
    /// `async fn`, so the job is not kept a second time beside the future that owns it.
    pub fn dispatch<'a, J: ForProvider + 'a>(
        &'a self,
        job: J,
    ) -> impl Future<Output = J::Out> + Send + 'a {
        match self.spec.provider {
            // Kinesis is refused by the config's validation: no broker module is created for it.
            Kind::Nats | Kind::Kinesis => Either::Left(job.run::<NatsProvider>(self)),
            Kind::Pgchannel => Either::Right(job.run::<PgProvider>(self).boxed()),
            Kind::Kafka => Either::Right(job.run::<KafkaProvider>(self).boxed()),
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
    pub async fn warn_unconfigured(&self) {
        struct Job;
        impl ForProvider for Job {
            type Out = Option<String>;
            async fn run<P: Open>(self, broker: &BrokerModule) -> Option<String> {
                P::unconfigured(&broker.spec)
            }
        }
        if let Some(detail) = self.dispatch(Job).await {
            tracing::warn!(broker = %self.spec.name, "{detail}; steps using this broker will fail until one is set");
        }
    }

    /// StartModule: clears a previous Stop and opens the connection, so a bad address or an
    /// unreachable database fails Start with its reason.
    pub async fn start(&self) -> Result<(), ProviderError> {
        struct Job;
        impl ForProvider for Job {
            type Out = Result<(), ProviderError>;
            async fn run<P: Open>(self, broker: &BrokerModule) -> Result<(), ProviderError> {
                match broker.opened::<P>().await? {
                    Err(detail) if !P::STARTS_UNCONFIGURED => Err(broker.unavailable(detail)),
                    _ => Ok(()),
                }
            }
        }
        self.stopped.store(false, Ordering::SeqCst);
        self.dispatch(Job).await
    }

    fn unavailable(&self, detail: String) -> ProviderError {
        ProviderError::Unavailable {
            broker: self.spec.name.clone(),
            detail,
        }
    }

    fn check_running(&self) -> Result<(), ProviderError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(self.unavailable(
                "the broker module was stopped (StopModule); StartModule connects it again".into(),
            ));
        }
        Ok(())
    }

    fn slot(&self) -> Option<Slot> {
        self.slot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The provider, opened once; `Ok(Err(detail))` is degraded: no address configured.
    /// Steps on modules that were created but never started (wfctl pipeline run) come here too.
    async fn opened<P: Connect>(&self) -> Result<Result<Arc<P>, String>, ProviderError> {
        self.check_running()?;
        if let Some(s) = self.slot() {
            return Ok(taken::<P>(s));
        }
        // Boxed: async-nats' connect future is ~10 KB, and inline it made every step's future
        // that size, copied into a fresh box on each ExecuteStep (callgrind: a fifth of the
        // plugin's instructions per publish were that memcpy).
        Box::pin(self.open_slot::<P>()).await
    }

    async fn open_slot<P: Connect>(&self) -> Result<Result<Arc<P>, String>, ProviderError> {
        let _guard = self.open_lock.lock().await;
        if let Some(s) = self.slot() {
            return Ok(taken::<P>(s));
        }
        let slot = match P::unconfigured(&self.spec) {
            Some(detail) => {
                tracing::warn!(broker = %self.spec.name, "{detail}; running degraded");
                Slot::Unconfigured(detail)
            }
            None => Slot::Open(Arc::new(P::connect(&self.spec).await?)),
        };
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = Some(slot.clone());
        Ok(taken::<P>(slot))
    }

    /// StopModule and shutdown: drains and forgets the connection.
    pub async fn close(&self) {
        struct Job(Option<Slot>);
        impl ForProvider for Job {
            type Out = ();
            async fn run<P: Open>(self, _: &BrokerModule) {
                if let Some(Ok(p)) = self.0.map(taken::<P>) {
                    p.close().await;
                }
            }
        }
        let _guard = self.open_lock.lock().await;
        self.stopped.store(true, Ordering::SeqCst);
        let taken = self.slot.write().unwrap_or_else(|p| p.into_inner()).take();
        self.dispatch(Job(taken)).await
    }
}

/// The slot's provider as `P` (the broker's provider never changes, so the cast holds).
fn taken<P: Connect>(slot: Slot) -> Result<Arc<P>, String> {
    match slot {
        Slot::Open(p) => p
            .downcast::<P>()
            .map_err(|_| "the broker's provider changed while it ran".into()),
        Slot::Unconfigured(detail) => Err(detail),
    }
}

/// Whether `token` has any provider's ack token shape: Create checks a literal token before
/// it knows the broker.
pub fn check_any_token(token: &str) -> Result<(), String> {
    if PgProvider::check_token(token).is_ok() || KafkaProvider::check_token(token).is_ok() {
        return Ok(());
    }
    NatsProvider::check_token(token).map_err(|e| {
        format!("{e}; a pgchannel token is \"<stream>:<consumer>:<id>\", a kafka token \"<topic>:<partition>:<offset>:<epoch>:<group>\"")
    })
}
