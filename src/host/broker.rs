//! go-plugin's GRPCBroker, plugin side: the host streams `ConnInfo` for the services it serves
//! (here: EngineCallbackService). We keep the stream open for the process lifetime, buffer every
//! ConnInfo by id without expiry, and let `dial` wait for one that arrives late.

use crate::pb::go_plugin::{grpc_broker_server::GrpcBroker, ConnInfo};
use crate::shutdown::Lifecycle;
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker id 0 is not a valid callback id (the host has no callback server)")]
    ZeroId,
    #[error("the host did not send connection info for broker id {id} within {waited:?}")]
    NoConnInfo { id: u32, waited: Duration },
    #[error("unsupported broker network {0:?} (expected unix or tcp)")]
    Network(String),
    #[error("dial broker id {id} at {address}")]
    Dial {
        id: u32,
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

#[derive(Clone, Default)]
pub struct BrokerState {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    conns: Mutex<HashMap<u32, ConnInfo>>,
    arrived: Notify,
}

impl BrokerState {
    pub fn record(&self, info: ConnInfo) {
        if let Ok(mut conns) = self.inner.conns.lock() {
            tracing::debug!(service_id = info.service_id, network = %info.network, "broker conn info");
            conns.insert(info.service_id, info);
        }
        self.inner.arrived.notify_waiters();
    }

    fn lookup(&self, id: u32) -> Option<ConnInfo> {
        self.inner.conns.lock().ok()?.get(&id).cloned()
    }

    /// Waits up to `wait` for the host's ConnInfo of `id`.
    pub async fn conn_info(&self, id: u32, wait: Duration) -> Result<ConnInfo, BrokerError> {
        if id == 0 {
            return Err(BrokerError::ZeroId);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before checking, so a record() in between is not missed.
            let notified = self.inner.arrived.notified();
            if let Some(info) = self.lookup(id) {
                return Ok(info);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(BrokerError::NoConnInfo { id, waited: wait });
            }
        }
    }

    /// Dials the brokered service `id` as a plaintext h2c client.
    pub async fn dial(&self, id: u32, wait: Duration) -> Result<Channel, BrokerError> {
        let info = self.conn_info(id, wait).await?;
        dial_conn_info(&info).await
    }
}

pub async fn dial_conn_info(info: &ConnInfo) -> Result<Channel, BrokerError> {
    let id = info.service_id;
    let address = info.address.clone();
    let dial_err = |source| BrokerError::Dial {
        id,
        address: info.address.clone(),
        source,
    };
    match info.network.as_str() {
        "unix" => {
            let path = address.clone();
            Endpoint::from_static("http://unused")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(dial_err)
        }
        "tcp" => Endpoint::from_shared(format!("http://{address}"))
            .map_err(dial_err)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(dial_err),
        other => Err(BrokerError::Network(other.to_string())),
    }
}

pub struct BrokerService {
    state: BrokerState,
    lifecycle: Lifecycle,
}

impl BrokerService {
    pub fn new(state: BrokerState, lifecycle: Lifecycle) -> Self {
        Self { state, lifecycle }
    }
}

type ConnInfoStream = Pin<Box<dyn Stream<Item = Result<ConnInfo, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcBroker for BrokerService {
    type StartStreamStream = ConnInfoStream;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let stop = self.lifecycle.child_token();
        // Reading must outlive this handler: the host keeps sending on this stream.
        self.lifecycle.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    msg = incoming.message() => match msg {
                        Ok(Some(info)) if info.knock.is_none() => state.record(info),
                        Ok(Some(_)) => {} // multiplexing knocks: never sent by this host
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "broker stream closed by host");
                            break;
                        }
                    }
                }
            }
        });
        // We never send anything back; the stream stays open until shutdown.
        let stop = self.lifecycle.child_token();
        let out = futures::stream::once(async move {
            stop.cancelled().await;
        })
        .filter_map(|_| async { None::<Result<ConnInfo, Status>> });
        Ok(Response::new(Box::pin(out)))
    }
}

use futures::StreamExt;

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u32) -> ConnInfo {
        ConnInfo {
            service_id: id,
            network: "unix".into(),
            address: "/tmp/x".into(),
            knock: None,
        }
    }

    #[tokio::test]
    async fn late_conn_info_is_awaited() {
        let state = BrokerState::default();
        let waiter = {
            let s = state.clone();
            tokio::spawn(async move { s.conn_info(7, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        state.record(info(7));
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.service_id, 7);
    }

    #[tokio::test]
    async fn early_conn_info_never_expires() {
        let state = BrokerState::default();
        state.record(info(3));
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(state.conn_info(3, Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn zero_and_missing_ids_are_clear_errors() {
        let state = BrokerState::default();
        let zero = state
            .conn_info(0, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(zero.to_string().contains("broker id 0"));
        let missing = state
            .conn_info(9, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("broker id 9"), "{missing}");
    }
}
