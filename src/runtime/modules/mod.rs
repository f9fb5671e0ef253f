//! Runtime modules: broker, stream and consumer. Each is validated at Create into a spec, and
//! Init/Start/Stop act on that spec only.

pub mod broker;

use crate::runtime::provider::{Declaration, Declares, Provider, ProviderError};
// The specs live in the NATS layer, shared with the IaC drivers; runtime code names them here.
pub use crate::nats::{consumer, stream};
use broker::{BrokerModule, ForProvider, Open};
use consumer::ConsumerSpec;
use std::sync::Arc;
use std::time::Duration;
use stream::StreamSpec;
use tokio::sync::Mutex;

/// How long a stream or consumer Start waits for its broker to be reachable.
pub const BROKER_WAIT: Duration = Duration::from_secs(10);

/// Something the broker must hold as declared: a stream or a consumer spec.
pub trait Ensure: Send + Sync {
    fn declares(&self) -> Declares<'_>;
    fn label(&self) -> String;
}

impl Ensure for StreamSpec {
    fn declares(&self) -> Declares<'_> {
        Declares::Stream(self)
    }
    fn label(&self) -> String {
        format!("stream {:?}", self.name)
    }
}

impl Ensure for ConsumerSpec {
    fn declares(&self) -> Declares<'_> {
        Declares::Consumer(self)
    }
    fn label(&self) -> String {
        format!("consumer {:?} on stream {:?}", self.durable, self.stream)
    }
}

/// A stream or consumer module: its spec, ensured on the server at most once per process
/// (at Start, or at first use when the host never sends Start, as under wfctl).
pub struct Declared<S> {
    pub module: String,
    pub type_name: String,
    pub spec: S,
    ensured: Mutex<bool>,
}

pub type StreamModule = Declared<StreamSpec>;
pub type ConsumerModule = Declared<ConsumerSpec>;

impl<S: Ensure> Declared<S> {
    pub fn new(type_name: &str, module: &str, spec: S) -> Self {
        Declared {
            module: module.into(),
            type_name: type_name.into(),
            spec,
            ensured: Mutex::new(false),
        }
    }

    /// Ensures on the broker's provider (opened if needed).
    pub async fn ensure(&self, broker: &BrokerModule) -> Result<(), ProviderError> {
        struct Job<'a, S>(&'a Declared<S>);
        impl<S: Ensure> ForProvider for Job<'_, S> {
            type Out = Result<(), ProviderError>;
            async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
                let p = P::open(broker).await?;
                self.0.ensure_on(&*p).await
            }
        }
        broker.dispatch(Job(self)).await
    }

    /// Ensures on an opened provider.
    pub async fn ensure_on<P: Provider>(&self, p: &P) -> Result<(), ProviderError> {
        let mut done = self.ensured.lock().await;
        if *done {
            return Ok(());
        }
        p.ready(BROKER_WAIT).await?;
        let outcome = p
            .ensure(Declaration {
                type_name: &self.type_name,
                module: &self.module,
                what: self.spec.declares(),
            })
            .await?;
        tracing::info!(resource = %self.spec.label(), %outcome, "ensured");
        *done = true;
        Ok(())
    }

    /// Forgets that it was ensured (it was deleted behind our back).
    pub async fn invalidate(&self) {
        *self.ensured.lock().await = false;
    }
}

pub type SharedBroker = Arc<BrokerModule>;

/// Start of a key-value bucket or object store module: its stream ensured on the broker, when
/// the broker's provider has such buckets at all (else one line naming the provider).
pub async fn ensure_bucket(m: &StreamModule, broker: &BrokerModule) -> Result<(), ProviderError> {
    struct Job<'a>(&'a StreamModule);
    impl ForProvider for Job<'_> {
        type Out = Result<(), ProviderError>;
        async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
            let p = P::open(broker).await?;
            let object = crate::nats::kv::OBJ.bucket_of(&self.0.spec.name).is_some();
            let (has, what) = if object {
                (p.object_store().is_some(), "object stores")
            } else {
                (p.key_value().is_some(), "key-value buckets")
            };
            if !has {
                return Err(crate::runtime::steps::bucket::lacks(
                    broker,
                    what,
                    &self.0.type_name,
                ));
            }
            self.0.ensure_on(&*p).await
        }
    }
    broker.dispatch(Job(m)).await
}
