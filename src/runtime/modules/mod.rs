//! Runtime modules: broker, stream and consumer. Each is validated at Create into a spec, and
//! Init/Start/Stop act on that spec only.

pub mod broker;

use crate::nats::NatsError;
use crate::pg::{Ensured, PgBus};
use broker::BusError;
// The specs live in the NATS layer, shared with the IaC drivers; runtime code names them here.
pub use crate::nats::{consumer, stream};
use broker::BrokerModule;
use consumer::ConsumerSpec;
use std::sync::Arc;
use std::time::Duration;
use stream::StreamSpec;
use tokio::sync::Mutex;

/// How long a stream or consumer Start waits for its broker to be reachable.
pub const BROKER_WAIT: Duration = Duration::from_secs(10);

/// Something the server must hold as declared: a stream or a consumer spec.
pub trait Ensure: Send + Sync {
    fn ensure<'a>(
        &'a self,
        conn: &'a crate::nats::NatsConn,
    ) -> futures::future::BoxFuture<'a, Result<stream::EnsureOutcome, NatsError>>;
    /// Provider pgchannel: the same declaration as rows in the bus's tables, converted by
    /// `crate::pg::spec` (as wfctl's plan does), so a setting pgchannel lacks is refused with
    /// the plan's words; `type_name` and `module` name the module in them.
    fn ensure_pg<'a>(
        &'a self,
        type_name: &'a str,
        module: &'a str,
        bus: &'a PgBus,
    ) -> futures::future::BoxFuture<'a, Result<Ensured, BusError>>;
    fn label(&self) -> String;
}

impl Ensure for StreamSpec {
    fn ensure<'a>(
        &'a self,
        conn: &'a crate::nats::NatsConn,
    ) -> futures::future::BoxFuture<'a, Result<stream::EnsureOutcome, NatsError>> {
        Box::pin(StreamSpec::ensure(self, conn))
    }
    fn ensure_pg<'a>(
        &'a self,
        type_name: &'a str,
        module: &'a str,
        bus: &'a PgBus,
    ) -> futures::future::BoxFuture<'a, Result<Ensured, BusError>> {
        Box::pin(async move {
            let def = crate::pg::spec::stream_def(type_name, module, self).map_err(refused)?;
            Ok(bus.ensure_stream(&def).await?)
        })
    }
    fn label(&self) -> String {
        format!("stream {:?}", self.name)
    }
}

impl Ensure for ConsumerSpec {
    fn ensure<'a>(
        &'a self,
        conn: &'a crate::nats::NatsConn,
    ) -> futures::future::BoxFuture<'a, Result<stream::EnsureOutcome, NatsError>> {
        Box::pin(ConsumerSpec::ensure(self, conn))
    }
    fn ensure_pg<'a>(
        &'a self,
        type_name: &'a str,
        module: &'a str,
        bus: &'a PgBus,
    ) -> futures::future::BoxFuture<'a, Result<Ensured, BusError>> {
        Box::pin(async move {
            let def = crate::pg::spec::consumer_def(type_name, module, self).map_err(refused)?;
            Ok(bus.ensure_consumer(&def).await?)
        })
    }
    fn label(&self) -> String {
        format!("consumer {:?} on stream {:?}", self.durable, self.stream)
    }
}

/// A declaration pgchannel refuses, in the plan's words; the first line's component is left
/// to the caller's error, which names the module already.
fn refused(e: crate::config::error::ConfigError) -> BusError {
    let text = e.to_string();
    let prefix = format!("{}: ", e.component);
    BusError::Invalid(text.strip_prefix(&prefix).unwrap_or(&text).to_string())
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

    pub async fn ensure(&self, broker: &BrokerModule) -> Result<(), NatsError> {
        let mut done = self.ensured.lock().await;
        if *done {
            return Ok(());
        }
        let conn = broker.require().await?;
        conn.wait_connected(BROKER_WAIT).await?;
        let outcome = self.spec.ensure(&conn).await?;
        tracing::info!(resource = %self.spec.label(), ?outcome, "ensured");
        *done = true;
        Ok(())
    }

    /// `ensure` on a pgchannel broker.
    pub async fn ensure_pg(&self, broker: &BrokerModule) -> Result<(), BusError> {
        let mut done = self.ensured.lock().await;
        if *done {
            return Ok(());
        }
        let bus = broker.require_pg().await?;
        let outcome = self
            .spec
            .ensure_pg(&self.type_name, &self.module, &bus)
            .await?;
        tracing::info!(resource = %self.spec.label(), ?outcome, "ensured (pgchannel)");
        *done = true;
        Ok(())
    }

    /// Forgets that it was ensured (it was deleted behind our back).
    pub async fn invalidate(&self) {
        *self.ensured.lock().await = false;
    }
}

pub type SharedBroker = Arc<BrokerModule>;
