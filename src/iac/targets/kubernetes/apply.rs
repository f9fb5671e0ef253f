//! The broker's objects through the Kubernetes API: server-side apply in dependency order,
//! waiting for the StatefulSet's rollout and the JetStream meta cluster, reading the live
//! objects back, and deleting in reverse order (volume claims only when asked).
//!
//! Server-side apply (`PATCH ... application/apply-patch+yaml?fieldManager=...`) creates what
//! is missing and updates what exists in one call, and records which fields we own: a field
//! another manager set (an HPA's replicas, an admission webhook's defaults) is left alone, and a
//! field we stop sending is removed. `force` takes over fields last written by someone else
//! through `kubectl apply` of the same object: the infra file is the source of truth.

use super::client::{KubeError, FIELD_MANAGER};
use super::forward;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::Client;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One object this provider applied, as the state file records it (delete walks these).
pub use super::record::KubeObject as ObjRef;

pub fn obj_ref(body: &Json) -> Result<ObjRef, KubeError> {
    let s = |p: &str| {
        body.pointer(p)
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    let r = ObjRef {
        api_version: s("/apiVersion"),
        kind: s("/kind"),
        name: s("/metadata/name"),
    };
    if r.api_version.is_empty() || r.kind.is_empty() || r.name.is_empty() {
        return Err(KubeError::Invalid(format!(
            "a rendered object lacks apiVersion, kind or metadata.name: {}",
            body.to_string().chars().take(120).collect::<String>()
        )));
    }
    Ok(r)
}

fn label(r: &ObjRef) -> String {
    format!("{}/{}", r.kind, r.name)
}

fn api(client: &Client, ns: &str, r: &ObjRef) -> Api<DynamicObject> {
    let (group, version) = match r.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", r.api_version.as_str()),
    };
    let gvk = GroupVersionKind::gvk(group, version, &r.kind);
    // The plural of every kind we emit follows kube's regular rules (serviceaccounts, secrets,
    // certificates, configmaps, services, statefulsets, poddisruptionbudgets, networkpolicies,
    // podmonitors), so no discovery round trip is needed.
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

/// Makes sure the namespace exists (applied with only its name when missing). A user whose
/// rights stop at the namespace cannot read it (403): then it is taken as given.
pub async fn ensure_namespace(client: &Client, ns: &str) -> Result<(), KubeError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    match api.get_opt(ns).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            api.patch(ns, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&body))
                .await
                .map_err(|e| KubeError::api(format!("create namespace {ns}"), e))?;
            tracing::info!(namespace = %ns, "namespace created");
            Ok(())
        }
        Err(e) => {
            let e = KubeError::api(format!("read namespace {ns}"), e);
            if e.is_forbidden() {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// Server-side applies `objects` in the order given (dependencies first).
pub async fn apply_all(
    client: &Client,
    ns: &str,
    objects: &[Json],
) -> Result<Vec<ObjRef>, KubeError> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut done = Vec::new();
    for body in objects {
        let r = obj_ref(body)?;
        api(client, ns, &r)
            .patch(&r.name, &pp, &Patch::Apply(body))
            .await
            .map_err(|e| KubeError::api(format!("apply {} in {ns}", label(&r)), e))?;
        tracing::debug!(object = %label(&r), namespace = %ns, "applied");
        done.push(r);
    }
    Ok(done)
}

/// Deletes `objects` in reverse order; missing ones count as deleted.
pub async fn delete_all(client: &Client, ns: &str, objects: &[ObjRef]) -> Result<(), KubeError> {
    // Background: the StatefulSet's pods go with it through the garbage collector.
    let dp = DeleteParams::background();
    for r in objects.iter().rev() {
        match api(client, ns, r).delete(&r.name, &dp).await {
            Ok(_) => tracing::info!(object = %label(r), namespace = %ns, "deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(KubeError::api(format!("delete {} in {ns}", label(r)), e)),
        }
    }
    Ok(())
}

/// Deletes the volume claims the StatefulSet's claim templates made (`<template>-<set>-<n>`),
/// every ordinal there is (a scale-down leaves the higher ones).
pub async fn delete_claims(
    client: &Client,
    ns: &str,
    templates: &[String],
    set: &str,
) -> Result<Vec<String>, KubeError> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| KubeError::api(format!("list persistentvolumeclaims in {ns}"), e))?;
    let mut gone = Vec::new();
    for pvc in list.items {
        let Some(name) = pvc.metadata.name else {
            continue;
        };
        let ours = templates.iter().any(|t| {
            name.strip_prefix(&format!("{t}-{set}-"))
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        });
        if !ours {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {
                tracing::info!(claim = %name, namespace = %ns, "volume claim deleted");
                gone.push(name);
            }
            Err(e) => {
                return Err(KubeError::api(
                    format!("delete persistentvolumeclaim {name} in {ns}"),
                    e,
                ))
            }
        }
    }
    Ok(gone)
}

pub async fn stateful_set(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<StatefulSet>, KubeError> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    api.get_opt(name)
        .await
        .map_err(|e| KubeError::api(format!("read statefulset {name} in {ns}"), e))
}

pub async fn service(client: &Client, ns: &str, name: &str) -> Result<Option<Service>, KubeError> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    api.get_opt(name)
        .await
        .map_err(|e| KubeError::api(format!("read service {name} in {ns}"), e))
}

/// The StatefulSet's rollout as `kubectl rollout status` judges it: `Ok(())` when done, else
/// what it is waiting for.
pub fn rollout_state(s: &StatefulSet) -> Result<(), String> {
    let want = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let gen = s.metadata.generation.unwrap_or(0);
    let Some(st) = &s.status else {
        return Err("no status yet".into());
    };
    let observed = st.observed_generation.unwrap_or(0);
    if observed < gen {
        return Err(format!(
            "controller has not seen generation {gen} yet (at {observed})"
        ));
    }
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    if ready < want || st.replicas > want {
        return Err(format!("{ready}/{want} pods ready ({} exist)", st.replicas));
    }
    let rolling = s
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        .is_none_or(|t| t == "RollingUpdate");
    if rolling {
        let partition = s
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|u| u.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0);
        if updated < want - partition {
            return Err(format!("{updated}/{want} pods updated"));
        }
        if partition == 0 && st.current_revision != st.update_revision {
            return Err(format!(
                "revision {} rolling out (pods on {})",
                st.update_revision.as_deref().unwrap_or("?"),
                st.current_revision.as_deref().unwrap_or("?")
            ));
        }
    }
    Ok(())
}

/// How long and how often to wait.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub timeout: Duration,
    pub interval: Duration,
}

impl Wait {
    pub fn from_env(timeout: Duration) -> Wait {
        let interval = std::env::var("EVENTBUS_K8S_POLL_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(2));
        Wait { timeout, interval }
    }
}

/// Polls the StatefulSet until its rollout is complete, logging each new state.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    name: &str,
    w: Wait,
) -> Result<StatefulSet, KubeError> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let state = match stateful_set(client, ns, name).await? {
            None => "the StatefulSet does not exist".to_string(),
            Some(s) => match rollout_state(&s) {
                Ok(()) => {
                    tracing::info!(statefulset = %name, namespace = %ns, waited = ?start.elapsed(), "rollout complete");
                    return Ok(s);
                }
                Err(state) => state,
            },
        };
        if state != last {
            tracing::info!(statefulset = %name, namespace = %ns, %state, "waiting for the rollout");
            last = state;
        }
        if start.elapsed() >= w.timeout {
            return Err(KubeError::NotReady {
                what: format!("statefulset {name} in {ns}"),
                waited: w.timeout,
                state: format!("{last} (kubectl -n {ns} describe statefulset {name}; kubectl -n {ns} get events)"),
            });
        }
        tokio::time::sleep(w.interval).await;
    }
}

/// What a server's `/jsz` says about the JetStream meta cluster: `Ok` when JetStream is up and,
/// for a cluster, a meta leader is elected among at least `replicas` peers.
pub fn meta_state(jsz: &Json, replicas: u32) -> Result<(), String> {
    if jsz.get("config").is_none() && jsz.get("memory").is_none() {
        return Err("JetStream is not enabled on the server".into());
    }
    if replicas <= 1 {
        return Ok(());
    }
    let meta = jsz.get("meta_cluster").cloned().unwrap_or(Json::Null);
    let leader = meta.get("leader").and_then(Json::as_str).unwrap_or("");
    let size = meta.get("cluster_size").and_then(Json::as_u64).unwrap_or(0);
    if leader.is_empty() {
        return Err(format!("no JetStream meta leader yet ({size} peers known)"));
    }
    if size < replicas as u64 {
        return Err(format!(
            "meta cluster has {size} of {replicas} peers (leader {leader})"
        ));
    }
    Ok(())
}

/// Asks the broker's pods (through port-forwards to their monitoring port) until the
/// JetStream meta cluster is formed.
pub async fn wait_meta(
    client: &Client,
    ns: &str,
    selector: &BTreeMap<String, String>,
    monitor_port: u16,
    replicas: u32,
    w: Wait,
) -> Result<(), KubeError> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let state = match forward::ready_pods(client, ns, selector).await? {
            pods if pods.is_empty() => "no pod is Ready".to_string(),
            pods => match forward::http_get(client, ns, &pods[0], monitor_port, "/jsz").await {
                Ok((200, body)) => match serde_json::from_str::<Json>(&body) {
                    Ok(jsz) => match meta_state(&jsz, replicas) {
                        Ok(()) => {
                            tracing::info!(namespace = %ns, replicas, waited = ?start.elapsed(), "JetStream meta cluster formed");
                            return Ok(());
                        }
                        Err(s) => format!("{}: {s}", pods[0]),
                    },
                    Err(e) => format!("{}: /jsz is not JSON ({e})", pods[0]),
                },
                Ok((code, _)) => format!("{}: /jsz answered {code}", pods[0]),
                Err(e) => crate::error_chain::render(&e),
            },
        };
        if state != last {
            tracing::info!(namespace = %ns, %state, "waiting for the JetStream meta cluster");
            last = state;
        }
        if start.elapsed() >= w.timeout {
            return Err(KubeError::NotReady {
                what: format!("the JetStream meta cluster in {ns}"),
                waited: w.timeout,
                state: last,
            });
        }
        tokio::time::sleep(w.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sts(spec: Json, status: Json, generation: i64) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "bus", "generation": generation},
            "spec": spec, "status": status
        }))
        .unwrap()
    }

    #[test]
    fn rollouts_are_done_only_when_every_pod_runs_the_new_revision() {
        let spec = json!({"replicas": 3, "selector": {}, "serviceName": "h", "template": {}});
        let done = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3, "observedGeneration": 2,
            "currentRevision": "r2", "updateRevision": "r2"});
        assert_eq!(rollout_state(&sts(spec.clone(), done.clone(), 2)), Ok(()));
        let e = rollout_state(&sts(spec.clone(), done.clone(), 3)).unwrap_err();
        assert!(e.contains("generation 3"), "{e}");
        let mut rolling = done.clone();
        rolling["currentRevision"] = json!("r1");
        rolling["updatedReplicas"] = json!(3);
        assert!(rollout_state(&sts(spec.clone(), rolling, 2))
            .unwrap_err()
            .contains("r2"));
        let mut half = done;
        half["readyReplicas"] = json!(2);
        assert!(rollout_state(&sts(spec, half, 2))
            .unwrap_err()
            .contains("2/3"));
    }

    #[test]
    fn meta_cluster_needs_a_leader_and_every_peer() {
        let one = json!({"config": {}, "memory": 0});
        assert_eq!(meta_state(&one, 1), Ok(()));
        assert!(meta_state(&one, 3)
            .unwrap_err()
            .contains("no JetStream meta leader"));
        let two = json!({"config": {}, "meta_cluster": {"leader": "bus-0", "cluster_size": 2}});
        assert!(meta_state(&two, 3).unwrap_err().contains("2 of 3"));
        let three = json!({"config": {}, "meta_cluster": {"leader": "bus-1", "cluster_size": 3}});
        assert_eq!(meta_state(&three, 3), Ok(()));
        assert!(meta_state(&json!({}), 1).is_err());
    }

    #[test]
    fn object_refs_need_their_identity() {
        let r = obj_ref(
            &json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "bus"}}),
        )
        .unwrap();
        assert_eq!(label(&r), "StatefulSet/bus");
        assert!(obj_ref(&json!({"kind": "Service"})).is_err());
    }
}
