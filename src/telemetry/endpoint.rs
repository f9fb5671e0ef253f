//! The Prometheus endpoint: one HTTP/1 listener per plugin process, `GET /metrics` (any other
//! path is 404), off until `EVENTBUS_METRICS_ADDR` or a broker module's `metrics_address` names
//! an address.
//!
//! A scrape encodes the registry on the runtime thread that accepted it; the hot paths only do
//! atomic adds on resolved handles, so a scrape never waits behind message handling and message
//! handling never waits behind a scrape (the families' maps are locked only while a new series
//! is created or while they are encoded, not per message).

use super::metrics;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

pub const ENV: &str = "EVENTBUS_METRICS_ADDR";
/// Scrapes served at once; more connections wait for a slot (a scraper is one client).
const MAX_CONNECTIONS: usize = 16;

/// Where the listener is and who asked for it.
struct Serving {
    addr: SocketAddr,
    by: String,
}

static SERVING: Mutex<Option<Serving>> = Mutex::new(None);

/// Why the endpoint cannot start: one line naming the setting, the address and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EndpointError(String);

/// Parses an address: `host:port`, or `:port` for every interface.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse::<SocketAddr>().map_err(|_| {
        format!(
            "{s:?} is not an address; use host:port such as 127.0.0.1:9464 or :9464 (all interfaces)"
        )
    })
}

/// Starts the endpoint from `EVENTBUS_METRICS_ADDR` when it is set (at process start).
pub fn start_from_env() -> Result<Option<SocketAddr>, EndpointError> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => {
            let addr = parse_addr(&v).map_err(|e| EndpointError(format!("{ENV}: {e}")))?;
            serve(addr, ENV).map(Some)
        }
        _ => Ok(None),
    }
}

/// Starts the endpoint for a broker module's `metrics_address`; a second module asking for the
/// same address shares it, one asking for another is refused (one listener per process).
pub fn serve(addr: SocketAddr, by: &str) -> Result<SocketAddr, EndpointError> {
    let mut serving = SERVING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = serving.as_ref() {
        if s.addr == addr || (addr.port() == 0 && s.addr.ip() == addr.ip()) {
            return Ok(s.addr);
        }
        return Err(EndpointError(format!(
            "{by}: metrics address {addr} refused: this plugin process already serves metrics on {} (set by {}); one listener per process, so use the same address or remove one",
            s.addr, s.by
        )));
    }
    let std_listener = std::net::TcpListener::bind(addr).map_err(|e| {
        EndpointError(format!(
            "{by}: cannot listen for metrics on {addr}: {e}; choose a free address"
        ))
    })?;
    std_listener
        .set_nonblocking(true)
        .and_then(|()| std_listener.local_addr())
        .map_err(|e| EndpointError(format!("{by}: metrics listener on {addr}: {e}")))?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| EndpointError(format!("{by}: metrics listener on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| EndpointError(format!("{by}: metrics listener on {addr}: {e}")))?;
    let m = metrics::enable();
    tokio::spawn(accept_loop(listener, m));
    super::lag::spawn_refresher();
    tracing::info!(address = %bound, by, "serving Prometheus metrics on /metrics");
    *serving = Some(Serving {
        addr: bound,
        by: by.to_string(),
    });
    Ok(bound)
}

/// The address metrics are served on, if any.
pub fn serving() -> Option<SocketAddr> {
    SERVING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|s| s.addr)
}

async fn accept_loop(listener: tokio::net::TcpListener, m: &'static metrics::Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, std::convert::Infallible>(respond(m, &req))
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            // A scraper that stalls mid-request is cut off instead of holding a slot forever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

fn respond<B>(m: &metrics::Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let plain = |status, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are on /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(m.encode())));
    if let Ok(v) = hyper::header::HeaderValue::from_str(
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
    ) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_valid() {
        assert_eq!(
            parse_addr("127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr(":9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        let e = parse_addr("localhost").unwrap_err();
        assert!(e.contains("host:port"), "{e}");
    }
}
