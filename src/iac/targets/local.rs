//! The `local` deploy target: nats-server processes on this machine (`nats_server.rs`),
//! recorded with their pids and ports so the next plugin process finds them. Replicas and the
//! data directory cannot change in place (a replace); ports, binary and store limits can.

use super::api::{block, label, path_text, Applied, BrokerDesired, BrokerTarget};
use super::nats_server::{self, LocalRecord};
use crate::iac::ctx::Ctx;
use crate::iac::error::DriverError;
use crate::iac::files::FileLock;
use crate::iac::state::{create_private_dir, AuthRecord, BrokerRecord, TargetRecord};
use crate::providers::DeployTarget;
use serde::Serialize;
use serde_json::{json, Map, Value as Json};
use std::path::{Path, PathBuf};

pub struct Local;

#[tonic::async_trait]
impl BrokerTarget for Local {
    fn offer(&self) -> &'static str {
        "local (nats-server processes on this machine)"
    }

    fn compared_keys(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (
            &[
                "provider",
                "deploy_target",
                "version",
                "replicas",
                "local_binary",
                "local_state_dir",
                "local_client_port",
                "max_file_store",
                "max_memory_store",
                "remove_data_on_delete",
                "prevent_destroy",
                "bind",
            ],
            &["provider", "deploy_target", "replicas", "local_state_dir"],
        )
    }

    fn replicas(&self, d: &BrokerDesired) -> u32 {
        d.spec.replicas
    }

    fn view(&self, d: &BrokerDesired, m: &mut Map<String, Json>) {
        let s = &d.spec;
        m.insert("local_binary".into(), json!(path_text(&s.local.binary)));
        m.insert(
            "local_state_dir".into(),
            json!(path_text(&s.local.state_dir)),
        );
        m.insert("local_client_port".into(), json!(s.local.client_port));
        m.insert("max_file_store".into(), json!(d.max_file_store));
        m.insert("max_memory_store".into(), json!(d.max_memory_store));
        m.insert(
            "remove_data_on_delete".into(),
            json!(s.local.remove_data_on_delete),
        );
    }

    async fn apply(
        &self,
        ctx: &Ctx,
        name: &str,
        d: &BrokerDesired,
    ) -> Result<Applied, DriverError> {
        apply_local(ctx, name, d).await
    }

    fn probe(&self, rec: &BrokerRecord) -> Option<Vec<bool>> {
        local(rec).map(nats_server::probe)
    }

    /// Stops the processes (unless the broker was bound, i.e. adopted) and, when asked,
    /// removes their data.
    async fn delete(&self, _: &Ctx, what: &str, rec: &BrokerRecord) -> Result<(), DriverError> {
        if let (Some(l), false) = (local(rec).cloned(), rec.bind) {
            block(what.to_string(), move || {
                nats_server::stop_all(&l);
                if l.remove_data_on_delete {
                    nats_server::remove_data(&l);
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    fn troubleshoot(&self, rec: &BrokerRecord) -> Option<Vec<(String, String)>> {
        local(rec).map(|l| {
            l.nodes
                .iter()
                .map(|n| (n.server_name.clone(), nats_server::log_tail(n, 40)))
                .collect()
        })
    }
}

/// Chooses ports for `replicas` nodes under the record's data dir and starts them. Blocking.
fn start_fresh(
    rec: &mut LocalRecord,
    broker: &str,
    replicas: u32,
    client_port: u16,
) -> Result<(), nats_server::LocalError> {
    rec.nodes = nats_server::plan_nodes(broker, replicas, client_port, Path::new(&rec.data_dir))?;
    nats_server::start_all(rec, broker)
}

fn data_dir(ctx: &Ctx, name: &str, d: &BrokerDesired) -> PathBuf {
    match &d.spec.local.state_dir {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.clone()),
        None => ctx
            .state
            .dir()
            .join("brokers")
            .join(nats_server::dir_name(name)),
    }
}

/// What apply returns of a local broker (the driver adds the compared view and the version).
#[derive(Serialize)]
struct LocalOutputs<'a> {
    name: &'a str,
    /// Every node's client url, comma-separated: what clients are given.
    url: String,
    urls: Vec<String>,
    /// Set for a cluster only.
    cluster_name: &'a str,
    data_dir: &'a str,
    binary: &'a str,
    nodes: Vec<NodeOutputs<'a>>,
}

#[derive(Serialize)]
struct NodeOutputs<'a> {
    server_name: &'a str,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    pid: u32,
}

impl<'a> From<&'a nats_server::NodeRecord> for NodeOutputs<'a> {
    fn from(n: &'a nats_server::NodeRecord) -> Self {
        NodeOutputs {
            server_name: &n.server_name,
            client_port: n.client_port,
            cluster_port: n.cluster_port,
            monitor_port: n.monitor_port,
            pid: n.pid,
        }
    }
}

/// The lock file that serialises local applies between plugin processes sharing a state dir.
const APPLY_LOCK: &str = "local.lock";

/// Waits for the state dir's local-apply lock. Held from reading the state until the broker is
/// recorded, so of two processes creating one broker the second finds the first's record and
/// adopts it, and no started nats-server goes unrecorded.
async fn lock_local(ctx: &Ctx, what: &str) -> Result<FileLock, DriverError> {
    let dir = ctx.state.dir().to_path_buf();
    block(what.to_string(), move || {
        let lock = dir.join(APPLY_LOCK);
        create_private_dir(&dir)
            .and_then(|_| FileLock::exclusive(&lock))
            .map_err(|source| nats_server::LocalError::Io {
                op: "lock",
                path: lock.display().to_string(),
                source,
            })
    })
    .await
}

async fn apply_local(ctx: &Ctx, name: &str, d: &BrokerDesired) -> Result<Applied, DriverError> {
    let what = label(name);
    let _lock = lock_local(ctx, &what).await?;
    let state = ctx.state.load()?;
    let existing = state
        .brokers
        .get(name)
        .filter(|r| r.target == DeployTarget::Local)
        .and_then(|r| local(r).cloned());
    if existing.is_none() && d.spec.bind {
        return Err(DriverError::refused(
            &what,
            "bind is set and this provider runs no local broker of that name; bind adopts and never starts servers",
        ));
    }
    let configured_binary = d.spec.local.binary.clone();
    let binary = block(what.clone(), move || {
        nats_server::find_binary(configured_binary.as_deref())
    })
    .await?;
    let b2 = binary.clone();
    let found = block(what.clone(), move || nats_server::binary_version(&b2)).await?;
    if !nats_server::version_matches(&d.spec.version, &found) {
        return Err(DriverError::Local {
            what,
            source: nats_server::LocalError::Version {
                binary: binary.display().to_string(),
                found,
                pinned: d.spec.version.clone(),
            },
        });
    }
    // A broker keeps the data dir it was created with while local.state_dir is unchanged.
    let dir = match &existing {
        Some(old) if old.configured_state_dir == path_text(&d.spec.local.state_dir) => {
            PathBuf::from(&old.data_dir)
        }
        _ => data_dir(ctx, name, d),
    };
    let sharer = state.brokers.iter().find(|(n, r)| {
        n.as_str() != name && local(r).is_some_and(|l| Path::new(&l.data_dir) == dir)
    });
    if let Some((other, _)) = sharer {
        return Err(DriverError::refused(
            &what,
            format!(
                "local broker {other:?} already keeps its data in {}; two brokers never share a data dir, give this one its own local.state_dir",
                dir.display()
            ),
        ));
    }
    let replicas = d.spec.replicas.max(1);
    let client_port = d.spec.local.client_port;
    let broker = name.to_string();
    let desired = LocalRecord {
        binary: binary.display().to_string(),
        configured_binary: path_text(&d.spec.local.binary),
        server_version: found,
        data_dir: dir.display().to_string(),
        configured_state_dir: path_text(&d.spec.local.state_dir),
        cluster_name: format!("eventbus-{}", nats_server::safe_name(name)),
        client_port,
        max_file_store: d.max_file_store,
        max_memory_store: d.max_memory_store,
        remove_data_on_delete: d.spec.local.remove_data_on_delete,
        nodes: Vec::new(),
    };
    let rec = match existing {
        Some(old) => {
            if old.nodes.len() as u32 != replicas || old.data_dir != desired.data_dir {
                return Err(DriverError::refused(
                    &what,
                    format!(
                        "a local broker of this name already runs {} node(s) with data in {}; replicas and local.state_dir \
                         cannot change in place (plan shows a replace; delete the broker first)",
                        old.nodes.len(),
                        old.data_dir
                    ),
                ));
            }
            block(what.clone(), move || {
                let ports_changed = old.client_port != desired.client_port;
                let config_changed = old.binary != desired.binary
                    || old.max_file_store != desired.max_file_store
                    || old.max_memory_store != desired.max_memory_store;
                let mut rec = LocalRecord {
                    nodes: old.nodes.clone(),
                    ..desired
                };
                if ports_changed {
                    nats_server::stop_all(&old);
                    start_fresh(&mut rec, &broker, replicas, client_port)?;
                } else if config_changed {
                    nats_server::heal(&mut rec, &broker)?;
                    nats_server::rolling_restart(&mut rec, &broker)?;
                } else {
                    nats_server::heal(&mut rec, &broker)?;
                }
                Ok(rec)
            })
            .await?
        }
        None => {
            block(what.clone(), move || {
                let mut rec = desired;
                start_fresh(&mut rec, &broker, replicas, client_port)?;
                Ok(rec)
            })
            .await?
        }
    };
    let urls = rec.urls();
    let outputs = serde_json::to_value(LocalOutputs {
        name,
        url: urls.join(","),
        cluster_name: if rec.nodes.len() > 1 {
            &rec.cluster_name
        } else {
            ""
        },
        data_dir: &rec.data_dir,
        binary: &rec.binary,
        nodes: rec.nodes.iter().map(NodeOutputs::from).collect(),
        urls,
    })
    .unwrap_or_default();
    let record = BrokerRecord {
        target: DeployTarget::Local,
        urls: rec.urls(),
        auth: AuthRecord::default(),
        replicas,
        connect_timeout_ms: 5000,
        request_timeout_ms: d.spec.conn.request_timeout.as_millis() as u64,
        deployed: Some(TargetRecord::Local(rec)),
        prevent_destroy: d.spec.prevent_destroy,
        bind: d.spec.bind,
        outputs: Json::Null,
        pg: None,
        kafka: None,
    };
    // Recorded before the lock is released: see `lock_local`.
    ctx.state.update(|s| {
        s.brokers.insert(name.to_string(), record.clone());
    })?;
    Ok(Applied { record, outputs })
}

/// The processes this target recorded for a broker (none on another target).
fn local(rec: &BrokerRecord) -> Option<&LocalRecord> {
    match &rec.deployed {
        Some(TargetRecord::Local(l)) => Some(l),
        _ => None,
    }
}
