//! Reaching a broker's pods from the operator's machine, where a ClusterIP Service (and the
//! pods' own addresses) cannot be reached: a port-forward through the Kubernetes API, as
//! `kubectl port-forward` opens one (a websocket to `pods/<pod>/portforward` speaking the
//! `v4.channel.k8s.io` subprotocol, which `kube` implements).
//!
//! A `Tunnel` listens on a loopback port and opens one port-forward per accepted connection, to
//! a Ready pod of the broker (rotating over them): a client that reconnects after a pod
//! restarted (a rolling update) lands on a pod that is up, which a forward pinned to one pod at
//! start (kubectl's behaviour) would not give.

use super::client::KubeError;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `k=v,k2=v2` for a list call.
pub fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The broker's pods that are Ready, by name (ordinal order).
pub async fn ready_pods(
    client: &Client,
    ns: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Vec<String>, KubeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&selector_text(selector)))
        .await
        .map_err(|e| KubeError::api(format!("list pods {} in {ns}", selector_text(selector)), e))?;
    let mut names: Vec<String> = list
        .items
        .iter()
        .filter(|p| pod_ready(p))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort_by_key(|n| {
        let ordinal = n.rsplit('-').next().and_then(|o| o.parse::<u32>().ok());
        (ordinal.unwrap_or(u32::MAX), n.clone())
    });
    Ok(names)
}

/// One forwarded connection to `port` of `pod`.
pub async fn pod_stream(
    client: &Client,
    ns: &str,
    pod: &str,
    port: u16,
) -> Result<impl AsyncRead + AsyncWrite + Unpin + Send + use<>, KubeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pf = pods
        .portforward(pod, &[port])
        .await
        .map_err(|e| KubeError::api(format!("port-forward to pod {ns}/{pod}:{port}"), e))?;
    let stream = pf.take_stream(port).ok_or_else(|| KubeError::Forward {
        pod: pod.to_string(),
        message: format!("no stream for port {port}"),
    })?;
    if let Some(err) = pf.take_error(port) {
        let pod = pod.to_string();
        tokio::spawn(async move {
            if let Some(e) = err.await {
                tracing::warn!(%pod, port, error = %e, "port-forward reported an error");
            }
        });
    }
    // The forwarder's task ends with the stream; nothing to keep.
    drop(pf);
    Ok(stream)
}

/// A plain HTTP GET through a port-forward (the monitoring endpoint, which no Service exposes).
pub async fn http_get(
    client: &Client,
    ns: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<(u16, String), KubeError> {
    let fail = |message: String| KubeError::Forward {
        pod: pod.to_string(),
        message,
    };
    let mut s = pod_stream(client, ns, pod, port).await?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let exchange = async {
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| fail(format!("GET {path} on port {port} timed out")))?
        .map_err(|e| fail(format!("GET {path} on port {port}: {e}")))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| fail(format!("GET {path}: not an HTTP answer")))?;
    Ok((code, body.to_string()))
}

/// A loopback listener whose connections are forwarded to a Ready pod; closed when dropped.
pub struct Tunnel {
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tunnel {
    /// Listens on 127.0.0.1 and forwards each connection to `port` of a Ready pod matching
    /// `selector`. Fails at once when no pod is Ready.
    pub async fn open(
        client: Client,
        ns: String,
        selector: BTreeMap<String, String>,
        port: u16,
    ) -> Result<Tunnel, KubeError> {
        if ready_pods(&client, &ns, &selector).await?.is_empty() {
            return Err(KubeError::Forward {
                pod: format!("{ns}/{}", selector_text(&selector)),
                message: "no pod of the broker is Ready (kubectl get pods -l ...)".into(),
            });
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| KubeError::Forward {
                pod: ns.clone(),
                message: format!("cannot listen on loopback: {e}"),
            })?;
        let local = listener.local_addr().map_err(|e| KubeError::Forward {
            pod: ns.clone(),
            message: format!("loopback listener: {e}"),
        })?;
        let next = Arc::new(AtomicUsize::new(0));
        tracing::info!(namespace = %ns, %local, port, "port-forward to the broker's pods open");
        let task = tokio::spawn(async move {
            loop {
                let mut tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "port-forward listener: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (client, ns, selector, next) =
                    (client.clone(), ns.clone(), selector.clone(), next.clone());
                tokio::spawn(async move {
                    match connect_any(&client, &ns, &selector, port, &next).await {
                        Ok((pod, mut remote)) => {
                            tracing::debug!(%pod, port, "port-forward connection open");
                            if let Err(e) =
                                tokio::io::copy_bidirectional(&mut tcp, &mut remote).await
                            {
                                tracing::debug!(%pod, port, error = %e, "port-forward connection ended");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %crate::error_chain::render(&e), "port-forward: no pod took the connection");
                        }
                    }
                });
            }
        });
        Ok(Tunnel { local, task })
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.local)
    }
}

/// Tries the Ready pods in rotation until one accepts the forward.
async fn connect_any(
    client: &Client,
    ns: &str,
    selector: &BTreeMap<String, String>,
    port: u16,
    next: &AtomicUsize,
) -> Result<(String, impl AsyncRead + AsyncWrite + Unpin + Send + use<>), KubeError> {
    let pods = ready_pods(client, ns, selector).await?;
    let start = next.fetch_add(1, Ordering::Relaxed);
    let mut last = None;
    for i in 0..pods.len() {
        let pod = &pods[(start + i) % pods.len()];
        match pod_stream(client, ns, pod, port).await {
            Ok(s) => return Ok((pod.clone(), s)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| KubeError::Forward {
        pod: format!("{ns}/{}", selector_text(selector)),
        message: "no pod of the broker is Ready".into(),
    }))
}
