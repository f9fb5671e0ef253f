//! Destroy: deletes in dependency order, and which local brokers are down.

use super::Provider;
use crate::iac::drivers::{self, stream, Kind};
use crate::pb::iac::{ActionError, DestroyResult, ResourceRef};
use std::collections::BTreeSet;

impl Provider {
    /// Deletes in dependency order (consumers, streams, brokers); already gone is success. The
    /// streams and consumers of a local broker that is itself being destroyed and no longer
    /// runs go with its store.
    pub async fn destroy(&self, refs: &[ResourceRef]) -> DestroyResult {
        let mut result = DestroyResult::default();
        let mut ordered: Vec<(Kind, &ResourceRef)> = Vec::new();
        for r in refs {
            match Kind::parse(&r.r#type) {
                Ok(k) => ordered.push((k, r)),
                Err(e) => result.errors.push(ActionError {
                    resource: r.name.clone(),
                    action: "delete".into(),
                    error: crate::error_chain::render(&e),
                }),
            }
        }
        ordered.sort_by_key(|(k, _)| Kind::DELETE_ORDER.iter().position(|o| o == k));
        let down = self.local_brokers_down(
            refs.iter()
                .filter(|r| r.r#type == drivers::BROKER_TYPE)
                .map(|r| r.name.clone())
                .collect(),
        );
        for (kind, r) in ordered {
            let res = if kind != Kind::Broker && self.on_broker(r, &down) {
                self.ctx
                    .state
                    .update(|s| {
                        s.resources.remove(&r.name);
                    })
                    .map(|_| ())
            } else {
                self.delete(kind.type_name(), r).await
            };
            match res {
                Ok(()) => result.destroyed.push(r.name.clone()),
                Err(e) => result.errors.push(ActionError {
                    resource: r.name.clone(),
                    action: "delete".into(),
                    error: crate::error_chain::render(&e),
                }),
            }
        }
        result
    }

    /// Local brokers (among `names`, or all when empty) none of whose processes answer.
    pub(super) fn local_brokers_down(&self, names: BTreeSet<String>) -> BTreeSet<String> {
        let Ok(state) = self.ctx.state.load() else {
            return BTreeSet::new();
        };
        state
            .brokers
            .iter()
            .filter(|(n, _)| names.is_empty() || names.contains(*n))
            .filter(|(n, r)| super::drivers::all_down(n, r))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(super) fn on_broker(&self, r: &ResourceRef, brokers: &BTreeSet<String>) -> bool {
        if brokers.is_empty() {
            return false;
        }
        let Ok(state) = self.ctx.state.load() else {
            return false;
        };
        stream::locate(&state, r, &r.r#type)
            .is_some_and(|l| l.servers.is_empty() && brokers.contains(&l.broker))
    }
}
