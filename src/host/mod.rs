//! The host-protocol face: go-plugin handshake and infrastructure services plus PluginService,
//! all on one tonic server.

pub mod broker;
pub mod callback;
pub mod codec;
pub mod controller;
pub mod handshake;
pub mod manifest;
pub mod plugin_service;

use crate::pb::go_plugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};
use crate::pb::plugin::plugin_service_server::PluginServiceServer;
use crate::runtime::Runtime;
use crate::shutdown::Lifecycle;
use handshake::Listener;
use std::time::Duration;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;

/// Largest request we accept: ExecuteStepRequest carries every prior step's output.
pub const MAX_MESSAGE: usize = i32::MAX as usize;
/// The host SIGKILLs 2 s after Shutdown; finish well before. In-flight pipelines get this long
/// to finish and be acked; what is cut short is redelivered. With the server's own stop
/// (SERVER_STOP) and process exit, a busy shutdown measured 1.81 s at 1.5 s here, too close.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(1000);
/// The end of the shutdown budget kept for closing the broker connections once the triggers
/// have drained (or were abandoned).
const BROKER_CLOSE: Duration = Duration::from_millis(100);
/// How long the gRPC server gets to close its connections after the runtime has stopped.
const SERVER_STOP: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("bind listener")]
    Bind(#[source] std::io::Error),
    #[error("write handshake line")]
    Handshake(#[source] std::io::Error),
    #[error("grpc server")]
    Serve(#[source] tonic::transport::Error),
}

/// The longest `grpc-message` we send. It travels as an HTTP/2 header, and Go's gRPC client
/// refuses headers over 16 KiB, so one oversized error (a huge value quoted by a refusal) would
/// turn into an unreadable transport error.
pub const MAX_STATUS_MESSAGE: usize = 4 * 1024;

fn cap_status_message<B>(mut resp: http::Response<B>) -> http::Response<B> {
    if let Some(v) = resp.headers().get("grpc-message") {
        let bytes = v.as_bytes();
        if bytes.len() > MAX_STATUS_MESSAGE {
            const MARK: &[u8] = b"%20...%20(truncated)";
            // Percent-encoded ASCII: cut before any escape the limit would split.
            let mut end = MAX_STATUS_MESSAGE - MARK.len();
            if let Some(pct) = bytes[end.saturating_sub(2)..end]
                .iter()
                .position(|b| *b == b'%')
            {
                end = end - 2 + pct;
            }
            let mut cut = bytes[..end].to_vec();
            cut.extend_from_slice(MARK);
            if let Ok(v) = http::HeaderValue::from_bytes(&cut) {
                resp.headers_mut().insert("grpc-message", v);
            }
        }
    }
    resp
}

/// The IaC services with PluginService's message limits: a Plan or Apply carrying many
/// resources is as large as an ExecuteStep, and tonic's 4 MiB default refused it.
fn add_iac<L>(
    router: tonic::transport::server::Router<L>,
    iac: crate::iac::IacService,
) -> tonic::transport::server::Router<L> {
    use crate::pb::iac::{
        ia_c_provider_drift_detector_server::IaCProviderDriftDetectorServer,
        ia_c_provider_enumerator_server::IaCProviderEnumeratorServer,
        ia_c_provider_required_server::IaCProviderRequiredServer,
        ia_c_provider_validator_server::IaCProviderValidatorServer,
        resource_driver_server::ResourceDriverServer,
    };
    macro_rules! limited {
        ($server:ident) => {
            $server::new(iac.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        };
    }
    router
        .add_service(limited!(IaCProviderRequiredServer))
        .add_service(limited!(ResourceDriverServer))
        .add_service(limited!(IaCProviderDriftDetectorServer))
        .add_service(limited!(IaCProviderValidatorServer))
        .add_service(limited!(IaCProviderEnumeratorServer))
}

/// Binds, serves, prints the handshake, and runs until `stop` fires; then shuts down in order:
/// health NOT_SERVING, triggers and tasks cancelled (bounded), NATS drained, server stopped,
/// socket removed.
pub async fn serve(stop: CancellationToken) -> Result<(), HostError> {
    let lifecycle = Lifecycle::new();
    let runtime = Runtime::new(lifecycle.clone());
    let broker_state = broker::BrokerState::default();
    let (reporter, health) = tonic_health::server::health_reporter();

    let plugin = PluginServiceServer::new(plugin_service::PluginSvc {
        runtime: runtime.clone(),
        broker: broker_state.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let router = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(cap_status_message))
        .add_service(health)
        .add_service(GrpcBrokerServer::new(broker::BrokerService::new(
            broker_state,
            lifecycle.clone(),
        )))
        .add_service(GrpcControllerServer::new(controller::Controller {
            stop: stop.clone(),
        }))
        .add_service(GrpcStdioServer::new(controller::Stdio {
            stop: lifecycle.child_token(),
        }))
        .add_service(plugin);
    let router = add_iac(router, crate::iac::IacService::default());
    reporter
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let listener = Listener::bind_from_env().map_err(HostError::Bind)?;
    let version =
        handshake::negotiate_app_version(std::env::var("PLUGIN_PROTOCOL_VERSIONS").ok().as_deref());
    let line = listener.handshake_line(version);
    let server_stop = CancellationToken::new();
    let (socket_path, server) = match listener {
        Listener::Unix { listener, path } => {
            let incoming = UnixListenerStream::new(listener);
            let s = server_stop.clone();
            (
                Some(path),
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, s.cancelled_owned())),
            )
        }
        Listener::Tcp { listener, .. } => {
            let incoming = TcpListenerStream::new(listener);
            let s = server_stop.clone();
            (
                None,
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, s.cancelled_owned())),
            )
        }
    };
    // The listener is bound and the server task is running: connections are accepted.
    if let Err(e) = handshake::announce(&line) {
        if let Some(p) = &socket_path {
            let _ = std::fs::remove_file(p);
        }
        return Err(HostError::Handshake(e));
    }
    tracing::debug!(handshake = %line, "serving");

    stop.cancelled().await;
    reporter
        .set_service_status("plugin", tonic_health::ServingStatus::NotServing)
        .await;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
    let _ = tokio::time::timeout_at(deadline, runtime.stop_all(deadline - BROKER_CLOSE)).await;
    if !lifecycle
        .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        tracing::warn!("some background tasks did not stop in time; abandoning them (unacked messages are redelivered)");
    }
    server_stop.cancel();
    // Streams held open by the host (broker, stdio) end with the lifecycle token; do not wait
    // on a client that keeps its connection.
    let _ = tokio::time::timeout(SERVER_STOP, server).await;
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
