//! Runtime modules: broker, stream and consumer. Each is validated at Create into a spec, and
//! Init/Start/Stop act on that spec only.

pub mod broker;
pub mod consumer;
pub mod stream;

use crate::nats::NatsError;
use broker::BrokerModule;
use consumer::ConsumerSpec;
use std::sync::Arc;
use std::time::Duration;
use stream::StreamSpec;
use tokio::sync::Mutex;

/// How long a stream or consumer Start waits for its broker to be reachable.
pub const BROKER_WAIT: Duration = Duration::from_secs(10);

pub struct StreamModule {
    pub module: String,
    pub type_name: String,
    pub spec: StreamSpec,
    ensured: Mutex<bool>,
}

pub struct ConsumerModule {
    pub module: String,
    pub type_name: String,
    pub spec: ConsumerSpec,
    ensured: Mutex<bool>,
}

impl StreamModule {
    pub fn new(type_name: &str, module: &str, spec: StreamSpec) -> Self {
        StreamModule {
            module: module.into(),
            type_name: type_name.into(),
            spec,
            ensured: Mutex::new(false),
        }
    }

    /// Ensures the stream once per process (Start, or first use when Start never comes).
    pub async fn ensure(&self, broker: &BrokerModule) -> Result<(), NatsError> {
        let mut done = self.ensured.lock().await;
        if *done {
            return Ok(());
        }
        let conn = broker.require().await?;
        conn.wait_connected(BROKER_WAIT).await?;
        let outcome = self.spec.ensure(&conn).await?;
        tracing::info!(stream = %self.spec.name, ?outcome, "stream ensured");
        *done = true;
        Ok(())
    }
}

impl ConsumerModule {
    pub fn new(type_name: &str, module: &str, spec: ConsumerSpec) -> Self {
        ConsumerModule {
            module: module.into(),
            type_name: type_name.into(),
            spec,
            ensured: Mutex::new(false),
        }
    }

    pub async fn ensure(&self, broker: &BrokerModule) -> Result<(), NatsError> {
        let mut done = self.ensured.lock().await;
        if *done {
            return Ok(());
        }
        let conn = broker.require().await?;
        conn.wait_connected(BROKER_WAIT).await?;
        let outcome = self.spec.ensure(&conn).await?;
        tracing::info!(consumer = %self.spec.durable, stream = %self.spec.stream, ?outcome, "consumer ensured");
        *done = true;
        Ok(())
    }

    /// Forgets that the consumer was ensured (it was deleted behind our back).
    pub async fn invalidate(&self) {
        *self.ensured.lock().await = false;
    }
}

pub type SharedBroker = Arc<BrokerModule>;
