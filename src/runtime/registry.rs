//! What the steps and the trigger look up while they run: the declared broker, stream and
//! consumer modules, the host callback and the batch marks. A leaf under the runtime's root, so
//! the steps and the trigger take it instead of `Runtime` (which dispatches to them).

use super::error::RuntimeError;
use super::modules::broker::BrokerModule;
use super::modules::{ConsumerModule, StreamModule};
use super::trigger::launch::Launcher;
use super::trigger::marks::Marks;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub(super) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
pub(super) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A cheap cloneable handle over the lookup tables; `Runtime` fills them.
#[derive(Clone)]
pub struct Registry {
    tables: Arc<Tables>,
}

struct Tables {
    /// Broker modules by module name, for `broker_ref` resolution.
    brokers: RwLock<BTreeMap<String, Arc<BrokerModule>>>,
    streams: RwLock<Vec<Arc<StreamModule>>>,
    consumers: RwLock<Vec<Arc<ConsumerModule>>>,
    /// The host callback, once ConfigureCallback has run; triggers wait on it before fetching.
    launcher: tokio::sync::watch::Sender<Option<Arc<dyn Launcher>>>,
    batch_marks: Marks,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            tables: Arc::new(Tables {
                brokers: RwLock::default(),
                streams: RwLock::default(),
                consumers: RwLock::default(),
                launcher: tokio::sync::watch::Sender::new(None),
                batch_marks: Marks::default(),
            }),
        }
    }
}

impl Registry {
    pub(super) fn add_broker(&self, name: &str, broker: Arc<BrokerModule>) {
        write(&self.tables.brokers).insert(name.to_string(), broker);
    }

    pub(super) fn add_stream(&self, stream: Arc<StreamModule>) {
        write(&self.tables.streams).push(stream);
    }

    pub(super) fn add_consumer(&self, consumer: Arc<ConsumerModule>) {
        write(&self.tables.consumers).push(consumer);
    }

    pub(super) fn remove_broker(&self, broker: &Arc<BrokerModule>) {
        write(&self.tables.brokers).retain(|_, v| !Arc::ptr_eq(v, broker));
    }

    pub(super) fn remove_stream(&self, stream: &Arc<StreamModule>) {
        write(&self.tables.streams).retain(|v| !Arc::ptr_eq(v, stream));
    }

    pub(super) fn remove_consumer(&self, consumer: &Arc<ConsumerModule>) {
        write(&self.tables.consumers).retain(|v| !Arc::ptr_eq(v, consumer));
    }

    pub fn set_launcher(&self, launcher: Arc<dyn Launcher>) {
        self.tables.launcher.send_replace(Some(launcher));
    }

    pub(crate) fn launcher(&self) -> Option<Arc<dyn Launcher>> {
        self.tables.launcher.borrow().clone()
    }

    /// For a trigger about to take messages: the host callback, waiting (logged once) until
    /// ConfigureCallback has configured one; `None` when `stop` fires first. Nothing is taken
    /// before the host can run a pipeline: a message taken now could only be nak'ed, and every
    /// nak spends one of its max_deliver attempts.
    pub(crate) async fn launcher_or_stop(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        trigger: &str,
    ) -> Option<Arc<dyn Launcher>> {
        if let Some(l) = self.launcher() {
            return Some(l);
        }
        tracing::info!(trigger = %trigger, "waiting for the engine callback (ConfigureCallback) before taking messages");
        tokio::select! {
            _ = stop.cancelled() => None,
            l = self.wait_launcher() => Some(l),
        }
    }

    /// The host callback, waiting until ConfigureCallback has configured one.
    pub(crate) async fn wait_launcher(&self) -> Arc<dyn Launcher> {
        let mut rx = self.tables.launcher.subscribe();
        loop {
            if let Some(l) = rx.borrow_and_update().clone() {
                return l;
            }
            // The sender lives in `self`, so the channel cannot close while we wait.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Tokens of messages held by batch trigger runs, and what their pipelines did with them.
    pub(crate) fn batch_marks(&self) -> &Marks {
        &self.tables.batch_marks
    }

    /// `broker_ref` resolution with the Go plugin's single-broker fallback and ambiguity error.
    pub(crate) fn broker(
        &self,
        broker_ref: &str,
        component: &str,
    ) -> Result<Arc<BrokerModule>, RuntimeError> {
        let brokers = read(&self.tables.brokers);
        if !broker_ref.is_empty() {
            return brokers.get(broker_ref).cloned().ok_or_else(|| {
                RuntimeError::failed(
                    component,
                    format!(
                        "broker_ref {} names no declared eventbus.broker module (declared: [{}])",
                        crate::secret::quote(broker_ref),
                        brokers.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            });
        }
        match brokers.len() {
            0 => Err(RuntimeError::failed(
                component,
                "no broker_ref given and no eventbus.broker module is declared; add an eventbus.broker module or set broker_ref",
            )),
            1 => Ok(brokers.values().next().cloned().ok_or_else(|| RuntimeError::failed(component, "broker table changed"))?),
            _ => Err(RuntimeError::failed(
                component,
                format!(
                    "no broker_ref given and several brokers are declared ([{}]); set broker_ref to choose one",
                    brokers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// For stream/consumer modules: with no broker declared at all they stay registry-only
    /// (the Go plugin's legacy behaviour) instead of failing Start.
    pub(super) fn broker_for_module(
        &self,
        broker_ref: &str,
        component: &str,
    ) -> Result<Option<Arc<BrokerModule>>, RuntimeError> {
        if broker_ref.is_empty() && read(&self.tables.brokers).is_empty() {
            tracing::warn!(
                component,
                "no eventbus.broker declared; nothing is ensured on a server"
            );
            return Ok(None);
        }
        self.broker(broker_ref, component).map(Some)
    }

    pub(crate) fn stream_module(&self, name: &str) -> Option<Arc<StreamModule>> {
        read(&self.tables.streams)
            .iter()
            .find(|s| s.spec.name == name)
            .cloned()
    }

    /// Declared consumer modules with this durable name (optionally on one stream/broker).
    pub(crate) fn consumer_modules(&self, durable: &str) -> Vec<Arc<ConsumerModule>> {
        read(&self.tables.consumers)
            .iter()
            .filter(|c| c.spec.durable == durable)
            .cloned()
            .collect()
    }

    /// The declared consumer modules a step or trigger naming this durable reads through: on
    /// `stream` and `broker_ref` where those are given (a module without a broker_ref matches
    /// any broker).
    pub(crate) fn declared_consumers(
        &self,
        durable: &str,
        stream: &str,
        broker_ref: &str,
    ) -> Vec<Arc<ConsumerModule>> {
        self.consumer_modules(durable)
            .into_iter()
            .filter(|c| stream.is_empty() || c.spec.stream == stream)
            .filter(|c| {
                broker_ref.is_empty()
                    || c.spec.broker_ref.is_empty()
                    || c.spec.broker_ref == broker_ref
            })
            .collect()
    }
}
