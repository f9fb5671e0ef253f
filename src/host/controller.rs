//! go-plugin's GRPCController and GRPCStdio.

use crate::pb::go_plugin::{
    grpc_controller_server::GrpcController, grpc_stdio_server::GrpcStdio, Empty, StdioData,
};
use futures::{Stream, StreamExt};
use std::pin::Pin;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// `Shutdown` only flips the process's stop signal; `main` runs the shutdown sequence.
pub struct Controller {
    pub stop: CancellationToken,
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("host requested shutdown");
        self.stop.cancel();
        Ok(Response::new(Empty {}))
    }
}

/// We log straight to our stderr, which the host already reads, so the stdio stream carries
/// nothing; it stays open (instead of UNIMPLEMENTED) so the host logs no warning.
pub struct Stdio {
    pub stop: CancellationToken,
}

type StdioStream = Pin<Box<dyn Stream<Item = Result<StdioData, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = StdioStream;

    async fn stream_stdio(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::StreamStdioStream>, Status> {
        let stop = self.stop.clone();
        let s = futures::stream::once(async move { stop.cancelled_owned().await })
            .filter_map(|_| async { None });
        Ok(Response::new(Box::pin(s)))
    }
}
