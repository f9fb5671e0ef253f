//! The runtime face: modules, steps and the subscribe trigger, over NATS JetStream.
//!
//! `Runtime` is a cheap cloneable handle over the handle tables; the gRPC layer converts wire
//! requests into calls on it and renders its errors into the response `error` field.

pub mod error;
pub mod modules;
pub mod provider;
pub mod registry;
pub mod schema;
pub mod steps;
pub mod trigger;
pub mod types;

use crate::config::decode::{self, RawConfig};
use crate::config::error as config_error;
use crate::shutdown::Lifecycle;
use modules::broker::{BrokerModule, BrokerSpec};
use modules::consumer::ConsumerSpec;
use modules::stream::StreamSpec;
use modules::{ConsumerModule, StreamModule};
use registry::{read, write, Registry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use steps::Step;
use trigger::TriggerModule;
use types::{ModuleKind, StepKind};

pub use error::RuntimeError;
pub use steps::{ExecuteInput, StepOutput};
pub use trigger::{Launcher, TriggerCall};

// Shared with the IaC face, which must not depend on the runtime.
pub use crate::error_chain::render;

#[derive(Clone)]
pub(crate) enum ModuleHandle {
    Broker(Arc<BrokerModule>),
    Stream(Arc<StreamModule>),
    Consumer(Arc<ConsumerModule>),
    /// A key-value bucket or an object store: the stream the server keeps it as, declared like
    /// a stream module.
    Kv(Arc<StreamModule>),
    Trigger(Arc<TriggerModule>),
}

impl ModuleHandle {
    /// The module name from the engine's config; triggers are named by their workflow type.
    fn module_name(&self) -> Option<&str> {
        match self {
            ModuleHandle::Broker(b) => Some(&b.spec.name),
            ModuleHandle::Stream(s) | ModuleHandle::Kv(s) => Some(&s.module),
            ModuleHandle::Consumer(c) => Some(&c.module),
            ModuleHandle::Trigger(_) => None,
        }
    }

    fn type_name(&self) -> &str {
        match self {
            ModuleHandle::Broker(b) => &b.spec.type_name,
            ModuleHandle::Stream(s) | ModuleHandle::Kv(s) => &s.type_name,
            ModuleHandle::Consumer(c) => &c.type_name,
            ModuleHandle::Trigger(_) => types::TRIGGER_TYPE,
        }
    }
}

#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    lifecycle: Lifecycle,
    modules: RwLock<HashMap<String, ModuleHandle>>,
    steps: RwLock<HashMap<String, Arc<Step>>>,
    /// What the steps and triggers look up (brokers, streams, consumers, the host callback).
    registry: Registry,
    next_id: AtomicU64,
}

/// The longest module, step or trigger name accepted. Names are quoted in every error and log
/// line of their component and key the module table; a 10 KB name was accepted and echoed.
pub const MAX_COMPONENT_NAME: usize = 256;

/// Create-time bound on a component's name, one line.
fn check_component_name(type_name: &str, name: &str) -> Result<(), RuntimeError> {
    if name.len() <= MAX_COMPONENT_NAME {
        return Ok(());
    }
    let mut p = config_error::Problems::new(type_name, name);
    p.field(
        "name",
        format!(
            "is {} bytes long; names are limited to {MAX_COMPONENT_NAME} bytes",
            name.len()
        ),
    );
    Err(RuntimeError::Config(p.into_error()))
}

impl Runtime {
    pub fn new(lifecycle: Lifecycle) -> Self {
        Runtime {
            inner: Arc::new(Inner {
                lifecycle,
                modules: RwLock::default(),
                steps: RwLock::default(),
                registry: Registry::default(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Hands the host callback to the triggers.
    pub fn set_launcher(&self, launcher: Arc<dyn Launcher>) {
        self.inner.registry.set_launcher(launcher);
    }

    fn new_handle(&self, prefix: &str) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{n}-{:08x}", std::process::id())
    }

    // ------------------------------------------------------------------ modules

    pub fn create_module(
        &self,
        type_name: &str,
        name: &str,
        raw: RawConfig<'_>,
    ) -> Result<String, RuntimeError> {
        let Some(kind) = types::module_kind(type_name) else {
            return Err(RuntimeError::UnknownType {
                kind: "module",
                type_name: type_name.into(),
                known: types::module_type_names().join(", "),
            });
        };
        check_component_name(type_name, name)?;
        let problems = |lines: Vec<String>| {
            let mut p = config_error::Problems::new(type_name, name);
            p.raw(lines);
            RuntimeError::Config(p.finish(()).unwrap_err())
        };
        let full = types::qualified(kind.config_message());
        // Held until the new handle is in the table, so two creates of one name cannot both
        // pass the check. Create does no I/O.
        let mut modules = write(&self.inner.modules);
        if let Some(existing) = modules.values().find(|h| h.module_name() == Some(name)) {
            let mut p = config_error::Problems::new(type_name, name);
            p.field(
                "name",
                format!(
                    "a module named {name:?} already exists ({}); module names must be unique, so rename one of them",
                    existing.type_name()
                ),
            );
            return Err(RuntimeError::Config(p.into_error()));
        }
        let handle = match kind {
            ModuleKind::Broker => {
                let cfg = decode::decode(&full, raw).map_err(problems)?;
                let spec = BrokerSpec::validate(type_name, name, &cfg)?;
                let broker = Arc::new(BrokerModule::new(spec));
                self.inner.registry.add_broker(name, broker.clone());
                ModuleHandle::Broker(broker)
            }
            ModuleKind::Stream => {
                let cfg = decode::decode(&full, raw).map_err(problems)?;
                let spec = StreamSpec::validate(type_name, name, &cfg)?;
                let m = Arc::new(StreamModule::new(type_name, name, spec));
                self.inner.registry.add_stream(m.clone());
                ModuleHandle::Stream(m)
            }
            ModuleKind::Kv => {
                let cfg = decode::decode(&full, raw).map_err(problems)?;
                let spec = crate::nats::kv::KvSpec::validate(type_name, name, &cfg)?;
                let m = Arc::new(StreamModule::new(type_name, name, spec.stream));
                self.inner.registry.add_stream(m.clone());
                ModuleHandle::Kv(m)
            }
            ModuleKind::ObjectStore => {
                let cfg = decode::decode(&full, raw).map_err(problems)?;
                let spec = crate::nats::kv::KvSpec::validate_object_store(type_name, name, &cfg)?;
                let m = Arc::new(StreamModule::new(type_name, name, spec.stream));
                self.inner.registry.add_stream(m.clone());
                ModuleHandle::Kv(m)
            }
            ModuleKind::Consumer => {
                let cfg = decode::decode(&full, raw).map_err(problems)?;
                let spec = ConsumerSpec::validate(type_name, name, &cfg)?;
                let m = Arc::new(ConsumerModule::new(type_name, name, spec));
                self.inner.registry.add_consumer(m.clone());
                ModuleHandle::Consumer(m)
            }
        };
        let id = self.new_handle("mod");
        modules.insert(id.clone(), handle);
        drop(modules);
        tracing::debug!(module = name, r#type = type_name, handle = %id, "module created");
        Ok(id)
    }

    fn module(&self, id: &str) -> Result<ModuleHandle, RuntimeError> {
        read(&self.inner.modules)
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::UnknownHandle {
                kind: "module",
                id: id.into(),
            })
    }

    pub async fn init_module(&self, id: &str) -> Result<(), RuntimeError> {
        if let ModuleHandle::Broker(b) = self.module(id)? {
            b.warn_unconfigured().await;
        }
        Ok(())
    }

    pub async fn start_module(&self, id: &str) -> Result<(), RuntimeError> {
        match self.module(id)? {
            ModuleHandle::Broker(b) => {
                let component = format!("{} {:?}", b.spec.type_name, b.spec.name);
                crate::telemetry::serve_for_broker(&b.spec.name, b.spec.metrics_address)
                    .map_err(|e| RuntimeError::failed(&component, e.to_string()))?;
                b.start()
                    .await
                    .map_err(|e| RuntimeError::broker(component, e))
            }
            h @ (ModuleHandle::Stream(_) | ModuleHandle::Kv(_)) => {
                let (ModuleHandle::Stream(s) | ModuleHandle::Kv(s)) = &h else {
                    return Ok(());
                };
                let component = format!("{} {:?}", s.type_name, s.module);
                let Some(broker) = self
                    .inner
                    .registry
                    .broker_for_module(&s.spec.broker_ref, &component)?
                else {
                    return Ok(());
                };
                let ensured = if matches!(h, ModuleHandle::Kv(_)) {
                    modules::ensure_bucket(s, &broker).await
                } else {
                    s.ensure(&broker).await
                };
                ensured.map_err(|e| RuntimeError::broker(component, e))
            }
            ModuleHandle::Consumer(c) => {
                let component = format!("{} {:?}", c.type_name, c.module);
                let Some(broker) = self
                    .inner
                    .registry
                    .broker_for_module(&c.spec.broker_ref, &component)?
                else {
                    return Ok(());
                };
                // The stream module may start after us (no ordering between siblings).
                if let Some(stream) = self.inner.registry.stream_module(&c.spec.stream) {
                    stream
                        .ensure(&broker)
                        .await
                        .map_err(|e| RuntimeError::broker(component.clone(), e))?;
                }
                c.ensure(&broker)
                    .await
                    .map_err(|e| RuntimeError::broker(component, e))?;
                broker.watch_lag(&c.spec.stream, &c.spec.durable).await;
                Ok(())
            }
            ModuleHandle::Trigger(t) => t.start(&self.inner.registry).await,
        }
    }

    pub async fn stop_module(&self, id: &str) -> Result<(), RuntimeError> {
        match self.module(id)? {
            ModuleHandle::Trigger(t) => {
                t.stop().await;
                Ok(())
            }
            ModuleHandle::Broker(b) => {
                // Triggers on this broker stop before its connection closes.
                let triggers: Vec<Arc<TriggerModule>> = read(&self.inner.modules)
                    .values()
                    .filter_map(|h| match h {
                        ModuleHandle::Trigger(t) => Some(t.clone()),
                        _ => None,
                    })
                    .collect();
                let triggers: Vec<_> = triggers
                    .into_iter()
                    .filter(|t| t.uses_broker(&b.spec.name))
                    .collect();
                let deadline = tokio::time::Instant::now() + trigger::STOP_DRAIN;
                trigger::stop_together(&triggers, deadline).await;
                crate::telemetry::lag::forget_broker(&b.spec.name);
                b.close().await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub async fn destroy_module(&self, id: &str) -> Result<(), RuntimeError> {
        self.stop_module(id).await?;
        let removed = write(&self.inner.modules).remove(id);
        match removed {
            Some(ModuleHandle::Broker(b)) => self.inner.registry.remove_broker(&b),
            Some(ModuleHandle::Stream(s)) | Some(ModuleHandle::Kv(s)) => {
                self.inner.registry.remove_stream(&s)
            }
            Some(ModuleHandle::Consumer(c)) => self.inner.registry.remove_consumer(&c),
            _ => {}
        }
        Ok(())
    }

    // ------------------------------------------------------------------ lookups

    // ------------------------------------------------------------------ steps

    pub fn create_step(
        &self,
        type_name: &str,
        name: &str,
        raw: RawConfig<'_>,
    ) -> Result<String, RuntimeError> {
        let Some(kind) = types::step_kind(type_name) else {
            return Err(RuntimeError::UnknownType {
                kind: "step",
                type_name: type_name.into(),
                known: types::step_type_names().join(", "),
            });
        };
        check_component_name(type_name, name)?;
        let step = Step::create(kind, name, raw)?;
        let id = self.new_handle("step");
        write(&self.inner.steps).insert(id.clone(), Arc::new(step));
        Ok(id)
    }

    pub async fn execute_step(
        &self,
        id: &str,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let step = read(&self.inner.steps).get(id).cloned().ok_or_else(|| {
            RuntimeError::UnknownHandle {
                kind: "step",
                id: id.into(),
            }
        })?;
        step.execute(&self.inner.registry, input).await
    }

    pub fn destroy_step(&self, id: &str) -> Result<(), RuntimeError> {
        write(&self.inner.steps)
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| RuntimeError::UnknownHandle {
                kind: "step",
                id: id.into(),
            })
    }

    pub fn step_kind(&self, id: &str) -> Option<StepKind> {
        read(&self.inner.steps).get(id).map(|s| s.kind())
    }

    // ------------------------------------------------------------------ triggers

    pub fn create_trigger(
        &self,
        type_name: &str,
        name: &str,
        config: Option<&prost_types::Struct>,
    ) -> Result<String, RuntimeError> {
        if type_name != types::TRIGGER_TYPE {
            return Err(RuntimeError::UnknownType {
                kind: "trigger",
                type_name: type_name.into(),
                known: types::TRIGGER_TYPE.into(),
            });
        }
        check_component_name(type_name, name)?;
        let spec = trigger::TriggerSpec::from_struct(&self.inner.registry, name, config)?;
        let t = Arc::new(TriggerModule::new(spec, self.inner.lifecycle.child_token()));
        let id = self.new_handle("trg");
        write(&self.inner.modules).insert(id.clone(), ModuleHandle::Trigger(t));
        Ok(id)
    }

    /// Stops every trigger together (used by shutdown before connections close): all stop
    /// fetching at once and drain until `deadline`; then the broker connections close.
    pub async fn stop_all(&self, deadline: tokio::time::Instant) {
        let handles: Vec<ModuleHandle> = read(&self.inner.modules).values().cloned().collect();
        let triggers: Vec<Arc<TriggerModule>> = handles
            .iter()
            .filter_map(|h| match h {
                ModuleHandle::Trigger(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        trigger::stop_together(&triggers, deadline).await;
        for h in &handles {
            if let ModuleHandle::Broker(b) = h {
                b.close().await;
            }
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::steps::{ack::AckStep, publish::PublishStep};
    use super::{ExecuteInput, Runtime};
    use crate::config::decode::RawConfig;

    const NONE: RawConfig<'static> = RawConfig {
        typed: None,
        legacy: None,
    };

    fn input() -> ExecuteInput<'static> {
        ExecuteInput {
            typed_config: None,
            config: None,
            typed_input: None,
            current: None,
            trigger_data: None,
            step_outputs: None,
        }
    }

    /// Every ExecuteStep moves its step's future into a fresh box, so its size is paid per
    /// call. It once held async-nats' connect future inline (11 KB per publish; callgrind
    /// counted a fifth of the plugin's instructions in that memcpy).
    #[test]
    fn per_message_step_futures_stay_small() {
        let rt = Runtime::new(crate::shutdown::Lifecycle::new());
        let publish = PublishStep::create("p", NONE).unwrap();
        let ack = AckStep::create("a", NONE).unwrap();
        for (what, size) in [
            (
                "publish",
                std::mem::size_of_val(&publish.execute(&rt.inner.registry, input())),
            ),
            (
                "ack",
                std::mem::size_of_val(&ack.execute(&rt.inner.registry, input())),
            ),
            (
                "execute_step",
                std::mem::size_of_val(&rt.execute_step("x", input())),
            ),
        ] {
            assert!(size <= 4096, "{what} future is {size} bytes");
        }
    }
}
