//! `trigger.eventbus.subscribe`: the trigger module whose worker lives on the plugin's task
//! tracker, not on the StartModule RPC (Go defect B2). Its config is in spec.rs, the door to the
//! host in launch.rs; both are leaves the worker and the runtime take.

pub mod batch;
mod batch_run;
pub mod launch;
pub mod marks;
pub mod payload;
pub mod run;
pub mod spec;

use super::error::RuntimeError;
use super::registry::Registry;
use super::types::TRIGGER_TYPE;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use launch::{Launcher, TriggerCall};
pub use spec::{
    parse_duration, AckMode, TriggerSpec, DEFAULT_MAX_IN_FLIGHT, DEFAULT_NAK_DELAY, MAX_IN_FLIGHT,
};

/// A trigger instance: its spec and, once started, its worker's cancel token and tasks.
pub struct TriggerModule {
    pub spec: TriggerSpec,
    parent: CancellationToken,
    running: Mutex<Option<(CancellationToken, TaskTracker)>>,
}

pub const STOP_DRAIN: Duration = Duration::from_secs(5);

impl TriggerModule {
    pub fn new(spec: TriggerSpec, parent: CancellationToken) -> Self {
        TriggerModule {
            spec,
            parent,
            running: Mutex::new(None),
        }
    }

    pub fn uses_broker(&self, broker: &str) -> bool {
        self.spec.broker_ref.is_empty() || self.spec.broker_ref == broker
    }

    fn component(&self) -> String {
        format!("{TRIGGER_TYPE} {:?}", self.spec.workflow_type)
    }

    /// Binds the consumer (bounded) and leaves the worker running on its own task.
    pub async fn start(&self, registry: &Registry) -> Result<(), RuntimeError> {
        if self.running.lock().map(|r| r.is_some()).unwrap_or(false) {
            return Ok(()); // a second Start is a no-op, and Start after Stop restarts (Go B15)
        }
        let component = self.component();
        let broker = registry.broker(&self.spec.broker_ref, &component)?;
        let token = self.parent.child_token();
        let tracker = TaskTracker::new();
        let start = run::Start {
            rt: registry.clone(),
            spec: self.spec.clone(),
            broker: broker.clone(),
            stop: token.clone(),
            tasks: tracker.clone(),
        };
        broker
            .dispatch(start)
            .await
            .map_err(|e| RuntimeError::broker(&component, e))?;
        if let Ok(mut r) = self.running.lock() {
            *r = Some((token, tracker));
        }
        tracing::info!(trigger = %self.spec.workflow_type, consumer = %self.spec.durable, stream = %self.spec.stream, "trigger started");
        Ok(())
    }

    /// Stops fetching, then waits (bounded) for in-flight pipelines to finish their ack or nak.
    pub async fn stop(&self) {
        stop_together(
            std::slice::from_ref(self),
            tokio::time::Instant::now() + STOP_DRAIN,
        )
        .await;
    }

    /// Stops fetching and hands back the work still in flight (None when not running).
    fn halt(&self) -> Option<TaskTracker> {
        let (token, tracker) = self.running.lock().ok().and_then(|mut r| r.take())?;
        token.cancel();
        tracker.close();
        Some(tracker)
    }
}

/// Stops several triggers together: every one stops fetching first, then all drain their
/// in-flight pipelines against one deadline. One after another, each drain (seconds with a slow
/// pipeline) delayed the next trigger's stop past the host's shutdown budget, and the triggers
/// not yet stopped kept starting pipelines meanwhile. Returns true when all drained in time.
pub async fn stop_together<T: std::borrow::Borrow<TriggerModule>>(
    triggers: &[T],
    deadline: tokio::time::Instant,
) -> bool {
    let halted: Vec<(&TriggerModule, TaskTracker)> = triggers
        .iter()
        .filter_map(|t| t.borrow().halt().map(|tr| (t.borrow(), tr)))
        .collect();
    let late: Vec<String> =
        futures::future::join_all(halted.iter().map(|(t, tracker)| async move {
            match tokio::time::timeout_at(deadline, tracker.wait()).await {
                Ok(()) => None,
                Err(_) => Some(t.spec.workflow_type.clone()),
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
    if !late.is_empty() {
        tracing::warn!(triggers = ?late, "in-flight messages did not finish before the stop deadline; they will be redelivered");
    }
    late.is_empty()
}
