//! What every driver and target call in one plugin process shares, as plain data: the provider
//! state, the iac.provider module's config, and one slot per type for what a provider or a
//! target keeps for the life of the process (connection pools, tunnels). Nothing here knows a
//! provider or a target, so drivers and targets both use it without using each other.

use crate::iac::state::StateStore;
use serde_json::{Map, Value as Json};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct Ctx {
    pub state: StateStore,
    /// The iac.provider module's config (targets read their own keys from it, e.g. an API
    /// token, only when a broker on that target is used).
    pub provider_config: Map<String, Json>,
    /// One value per type, made on first use (`slot`).
    slots: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Ctx {
    pub fn new(state_dir: PathBuf) -> Self {
        Ctx {
            state: StateStore::new(state_dir),
            provider_config: Map::new(),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A provider config string (`None` when absent or empty).
    pub fn provider_str(&self, key: &str) -> Option<&str> {
        self.provider_config
            .get(key)
            .and_then(Json::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// This process's one `T` (a connection cache, say), made on first use: a provider or a
    /// target keeps its per-process state here without this file naming it.
    pub fn slot<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let entry = slots
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        match entry.downcast::<T>() {
            Ok(t) => t,
            // Not reached: each entry is keyed by its own type. A fresh one is still correct.
            Err(_) => {
                let t = Arc::new(T::default());
                slots.insert(TypeId::of::<T>(), t.clone());
                t
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_made_once_per_type() {
        #[derive(Default)]
        struct Counter(std::sync::atomic::AtomicU32);
        let ctx = Ctx::new(PathBuf::from("/nonexistent"));
        ctx.slot::<Counter>()
            .0
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            ctx.slot::<Counter>()
                .0
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert!(ctx.slot::<Vec<u8>>().is_empty());
    }
}
