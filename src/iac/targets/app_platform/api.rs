//! A small client for the DigitalOcean Apps API: the seven calls this target makes, their
//! error classes, rate-limit backoff and the wait for a deployment to become ACTIVE.
//!
//! HTTP/1.1 on hyper (already in the build for gRPC) with TLS from tokio-rustls and the system's
//! root certificates (already in the build for NATS TLS); one connection per call, which is
//! plenty for a handful of calls per apply.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use serde_json::{json, Value as Json};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DEFAULT_API_URL: &str = "https://api.digitalocean.com";
pub const TOKEN_ENV: &str = "DIGITALOCEAN_TOKEN";
pub const API_URL_ENV: &str = "DIGITALOCEAN_API_URL";
/// How often a deployment's phase is polled (the API has no push).
pub const POLL_ENV: &str = "EVENTBUS_DO_POLL_INTERVAL_MS";
const DEFAULT_POLL: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const RATE_LIMIT_ATTEMPTS: u32 = 6;
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no DigitalOcean API token: set digitalocean_token in the iac.provider config (e.g. \"${{DIGITALOCEAN_TOKEN}}\") or DIGITALOCEAN_TOKEN in wfctl's environment")]
    NoToken,
    #[error("DigitalOcean API url {url:?} is not usable ({detail}); set digitalocean_api_url or DIGITALOCEAN_API_URL to e.g. https://api.digitalocean.com")]
    BadUrl { url: String, detail: String },
    #[error("DigitalOcean rejected the API token while {op} (401 unauthorized: {message}); check DIGITALOCEAN_TOKEN / digitalocean_token")]
    Unauthorized { op: String, message: String },
    #[error("the DigitalOcean API token may not do this while {op} (403 forbidden: {message}); it needs the app:create, app:read, app:update and app:delete scopes")]
    Forbidden { op: String, message: String },
    #[error("not found while {op} (404: {message})")]
    NotFound { op: String, message: String },
    #[error("DigitalOcean refused the app spec while {op} (422): {message}")]
    Unprocessable { op: String, message: String },
    #[error("DigitalOcean's rate limit was still exceeded after {attempts} attempts over {waited:?} while {op} (429); retry the command later")]
    RateLimited {
        op: String,
        attempts: u32,
        waited: Duration,
    },
    #[error("DigitalOcean answered {status} while {op}: {message}")]
    Status {
        op: String,
        status: u16,
        message: String,
    },
    #[error("could not reach the DigitalOcean API at {url} while {op}")]
    Transport {
        op: String,
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("unexpected answer from the DigitalOcean API while {op}: {detail}")]
    BadResponse { op: String, detail: String },
    #[error("app {app} did not become ACTIVE within {after:?} (last phase {phase}); raise app_platform.deploy_timeout or look at the deployment in the DigitalOcean console")]
    DeployTimeout {
        app: String,
        after: Duration,
        phase: String,
    },
    #[error("the deployment of app {app} ended in phase {phase}{detail}; the app's runtime logs in the DigitalOcean console say why")]
    DeployFailed {
        app: String,
        phase: String,
        detail: String,
    },
}

impl ApiError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }
}

/// Where the API is and how to authenticate.
#[derive(Clone)]
pub struct ApiConfig {
    pub base: Uri,
    token: crate::secret::Secret,
    pub poll: Duration,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base", &self.base)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl ApiConfig {
    /// Config values first (wfctl has expanded `${…}` in them), then the environment.
    pub fn resolve(token: Option<&str>, api_url: Option<&str>) -> Result<ApiConfig, ApiError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = token
            .map(str::to_string)
            .filter(|t| !t.trim().is_empty())
            .or_else(|| env(TOKEN_ENV))
            .ok_or(ApiError::NoToken)?;
        let url = api_url
            .map(str::to_string)
            .filter(|u| !u.trim().is_empty())
            .or_else(|| env(API_URL_ENV))
            .unwrap_or_else(|| DEFAULT_API_URL.to_string());
        let base: Uri = url.trim().trim_end_matches('/').parse().map_err(
            |e: hyper::http::uri::InvalidUri| ApiError::BadUrl {
                url: url.clone(),
                detail: e.to_string(),
            },
        )?;
        if !matches!(base.scheme_str(), Some("http") | Some("https")) || base.host().is_none() {
            return Err(ApiError::BadUrl {
                url,
                detail: "needs http:// or https:// and a host".into(),
            });
        }
        let poll = env(POLL_ENV)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_POLL);
        Ok(ApiConfig {
            base,
            token: crate::secret::Secret::new(token.trim()),
            poll,
        })
    }
}

/// What this target needs from an app.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct App {
    pub id: String,
    pub name: String,
    pub live_url: String,
    pub region: String,
    /// As the API returns it: SECRET env values are encrypted (`EV[...]`).
    pub spec: Json,
    pub active_deployment: String,
    pub pending_deployment: String,
}

impl App {
    fn from_json(v: &Json) -> App {
        let s = |p: &str| {
            v.pointer(p)
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string()
        };
        App {
            id: s("/id"),
            name: s("/spec/name"),
            live_url: s("/live_url"),
            region: s("/region/slug"),
            spec: v.get("spec").cloned().unwrap_or(Json::Null),
            active_deployment: s("/active_deployment/id"),
            pending_deployment: {
                let p = s("/pending_deployment/id");
                if p.is_empty() {
                    s("/in_progress_deployment/id")
                } else {
                    p
                }
            },
        }
    }
}

pub struct AppsApi {
    cfg: ApiConfig,
}

fn tls() -> Result<tokio_rustls::TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<tokio_rustls::rustls::ClientConfig>, String>> =
        OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates found (install ca-certificates)".into());
            }
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map(tokio_rustls::TlsConnector::from)
}

struct Reply {
    status: StatusCode,
    reset: Option<u64>,
    body: Json,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppsApi {
    pub fn new(cfg: ApiConfig) -> AppsApi {
        AppsApi { cfg }
    }

    pub fn base_url(&self) -> String {
        self.cfg.base.to_string()
    }

    async fn send_once(
        &self,
        op: &str,
        method: &Method,
        path: &str,
        body: Option<&Json>,
    ) -> Result<Reply, ApiError> {
        let base = &self.cfg.base;
        let https = base.scheme_str() == Some("https");
        let host = base.host().unwrap_or_default().to_string();
        let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
        let prefix = base.path().trim_end_matches('/');
        let url = format!("{}{path}", base.to_string().trim_end_matches('/'));
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| ApiError::Transport {
            op: op.to_string(),
            url: url.clone(),
            source,
        };
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).unwrap_or_default()),
            None => Bytes::new(),
        };
        let authority = match base.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{prefix}{path}"))
            .header("host", authority)
            .header(
                "authorization",
                format!("Bearer {}", self.cfg.token.expose()),
            )
            .header("accept", "application/json")
            .header(
                "user-agent",
                concat!("workflow-plugin-eventbus/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| transport(Box::new(e)))?;
        let call = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| transport(Box::new(e)))?;
            let resp = if https {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| transport(Box::new(e)))?;
                let stream = tls()
                    .map_err(|e| transport(e.into()))?
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(Box::new(e)))?;
                send(hyper_util::rt::TokioIo::new(stream), req).await
            } else {
                send(hyper_util::rt::TokioIo::new(tcp), req).await
            }
            .map_err(transport)?;
            Ok::<_, ApiError>(resp)
        };
        let (status, reset, raw) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| transport(format!("no answer within {CALL_TIMEOUT:?}").into()))??;
        let body = if raw.is_empty() {
            Json::Null
        } else {
            serde_json::from_slice(&raw).unwrap_or_else(
                |_| json!({"message": String::from_utf8_lossy(&raw[..raw.len().min(500)])}),
            )
        };
        Ok(Reply {
            status,
            reset,
            body,
        })
    }

    /// One call with the error classes mapped, and 429 retried after the rate-limit reset.
    async fn call(
        &self,
        op: &str,
        method: Method,
        path: &str,
        body: Option<&Json>,
    ) -> Result<Json, ApiError> {
        let started = Instant::now();
        let mut backoff = Duration::from_secs(1);
        for attempt in 1..=RATE_LIMIT_ATTEMPTS {
            let r = self.send_once(op, &method, path, body).await?;
            // DigitalOcean's errors carry `message`; a problem+json body `detail`.
            let message = ["message", "detail", "title"]
                .iter()
                .find_map(|k| r.body.get(*k).and_then(Json::as_str))
                .unwrap_or_default()
                .to_string();
            let op_s = op.to_string();
            match r.status.as_u16() {
                200..=299 => return Ok(r.body),
                401 => return Err(ApiError::Unauthorized { op: op_s, message }),
                403 => return Err(ApiError::Forbidden { op: op_s, message }),
                404 => return Err(ApiError::NotFound { op: op_s, message }),
                422 => return Err(ApiError::Unprocessable { op: op_s, message }),
                429 => {
                    if attempt == RATE_LIMIT_ATTEMPTS {
                        break;
                    }
                    // Wait until the oldest request expires (the reset header), at least the
                    // backoff, at most MAX_RATE_LIMIT_WAIT in all.
                    let until_reset = r
                        .reset
                        .map(|t| Duration::from_secs(t.saturating_sub(unix_now())))
                        .unwrap_or_default();
                    let wait = until_reset.max(backoff);
                    if started.elapsed() + wait > MAX_RATE_LIMIT_WAIT {
                        break;
                    }
                    tracing::warn!(
                        op,
                        wait_ms = wait.as_millis() as u64,
                        attempt,
                        "DigitalOcean rate limit reached; waiting for its reset"
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                status => {
                    return Err(ApiError::Status {
                        op: op_s,
                        status,
                        message: if message.is_empty() {
                            r.body.to_string()
                        } else {
                            message
                        },
                    })
                }
            }
        }
        Err(ApiError::RateLimited {
            op: op.to_string(),
            attempts: RATE_LIMIT_ATTEMPTS,
            waited: started.elapsed(),
        })
    }

    fn app_of(op: &str, v: &Json) -> Result<App, ApiError> {
        let a = v.get("app").ok_or_else(|| ApiError::BadResponse {
            op: op.into(),
            detail: "no \"app\" in the answer".into(),
        })?;
        let app = App::from_json(a);
        if app.id.is_empty() {
            return Err(ApiError::BadResponse {
                op: op.into(),
                detail: "the app has no id".into(),
            });
        }
        Ok(app)
    }

    /// Server-side validation of a spec (no change is made).
    pub async fn propose(&self, spec: &Json, app_id: Option<&str>) -> Result<Json, ApiError> {
        let name = spec["name"].as_str().unwrap_or_default();
        let op = format!("validating the spec of app {name}");
        let mut body = json!({"spec": spec});
        if let Some(id) = app_id {
            body["app_id"] = json!(id);
        }
        let v = self
            .call(&op, Method::POST, "/v2/apps/propose", Some(&body))
            .await?;
        if app_id.is_none() && v.get("app_name_available") == Some(&Json::Bool(false)) {
            return Err(ApiError::Unprocessable {
                op,
                message: format!(
                    "the app name {name:?} is already taken in this account{}",
                    v.get("app_name_suggestion")
                        .and_then(Json::as_str)
                        .map(|s| format!(" (DigitalOcean suggests {s:?}); rename the broker"))
                        .unwrap_or_default()
                ),
            });
        }
        Ok(v)
    }

    pub async fn create(&self, spec: &Json) -> Result<App, ApiError> {
        let op = format!("creating app {}", spec["name"].as_str().unwrap_or_default());
        let v = self
            .call(&op, Method::POST, "/v2/apps", Some(&json!({"spec": spec})))
            .await?;
        Self::app_of(&op, &v)
    }

    pub async fn get(&self, id: &str) -> Result<App, ApiError> {
        let op = format!("reading app {id}");
        let v = self
            .call(&op, Method::GET, &format!("/v2/apps/{id}"), None)
            .await?;
        Self::app_of(&op, &v)
    }

    /// The app of that name, if any (for an apply that lost its record).
    pub async fn find_by_name(&self, name: &str) -> Result<Option<App>, ApiError> {
        let op = format!("looking for app {name}");
        let mut page = 1;
        loop {
            let v = self
                .call(
                    &op,
                    Method::GET,
                    &format!("/v2/apps?page={page}&per_page=100"),
                    None,
                )
                .await?;
            let apps = v
                .get("apps")
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default();
            if let Some(a) = apps
                .iter()
                .map(App::from_json)
                .find(|a| a.name == name && !a.id.is_empty())
            {
                return Ok(Some(a));
            }
            if apps.len() < 100 || page >= 50 {
                return Ok(None);
            }
            page += 1;
        }
    }

    /// Replaces the whole spec.
    pub async fn update(&self, id: &str, spec: &Json) -> Result<App, ApiError> {
        let op = format!("updating app {id}");
        let v = self
            .call(
                &op,
                Method::PUT,
                &format!("/v2/apps/{id}"),
                Some(&json!({"spec": spec})),
            )
            .await?;
        Self::app_of(&op, &v)
    }

    /// Ok when the app is gone, including when it already was (404).
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let op = format!("deleting app {id}");
        match self
            .call(&op, Method::DELETE, &format!("/v2/apps/{id}"), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn deployment(&self, app: &str, id: &str) -> Result<Json, ApiError> {
        let op = format!("reading deployment {id} of app {app}");
        let v = self
            .call(
                &op,
                Method::GET,
                &format!("/v2/apps/{app}/deployments/{id}"),
                None,
            )
            .await?;
        v.get("deployment")
            .cloned()
            .ok_or_else(|| ApiError::BadResponse {
                op,
                detail: "no \"deployment\" in the answer".into(),
            })
    }

    async fn newest_deployment(&self, app: &str) -> Result<Option<String>, ApiError> {
        let op = format!("listing deployments of app {app}");
        let v = self
            .call(
                &op,
                Method::GET,
                &format!("/v2/apps/{app}/deployments?page=1&per_page=1"),
                None,
            )
            .await?;
        Ok(v.pointer("/deployments/0/id")
            .and_then(Json::as_str)
            .map(str::to_string))
    }

    /// Waits for the app's newest deployment to become ACTIVE, logging each phase change;
    /// returns the app as it is then.
    pub async fn wait_active(&self, app: &App, within: Duration) -> Result<App, ApiError> {
        let started = Instant::now();
        let dep = if app.pending_deployment.is_empty() {
            self.newest_deployment(&app.id).await?
        } else {
            Some(app.pending_deployment.clone())
        };
        let Some(dep) = dep else {
            // No deployment listed yet: wait for the app itself to show a live one.
            loop {
                let a = self.get(&app.id).await?;
                if !a.active_deployment.is_empty() && !a.live_url.is_empty() {
                    return Ok(a);
                }
                if started.elapsed() >= within {
                    return Err(ApiError::DeployTimeout {
                        app: app.name.clone(),
                        after: within,
                        phase: "no deployment".into(),
                    });
                }
                tokio::time::sleep(self.cfg.poll.min(within.saturating_sub(started.elapsed())))
                    .await;
            }
        };
        let mut last = String::new();
        loop {
            let d = self.deployment(&app.id, &dep).await?;
            let phase = d
                .get("phase")
                .and_then(Json::as_str)
                .unwrap_or("UNKNOWN")
                .to_string();
            if phase != last {
                let (done, total) = (
                    d.pointer("/progress/success_steps")
                        .and_then(Json::as_i64)
                        .unwrap_or(0),
                    d.pointer("/progress/total_steps")
                        .and_then(Json::as_i64)
                        .unwrap_or(0),
                );
                tracing::info!(
                    app = %app.name,
                    deployment = %dep,
                    phase = %phase,
                    steps = %format!("{done}/{total}"),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "App Platform deployment phase"
                );
                last = phase.clone();
            }
            match phase.as_str() {
                "ACTIVE" => return self.get(&app.id).await,
                "ERROR" | "CANCELED" | "SUPERSEDED" => {
                    let detail = d
                        .pointer("/progress/error_steps")
                        .and_then(Json::as_i64)
                        .filter(|n| *n > 0)
                        .map(|n| format!(" ({n} failed step(s))"))
                        .unwrap_or_default();
                    return Err(ApiError::DeployFailed {
                        app: app.name.clone(),
                        phase,
                        detail,
                    });
                }
                _ => {}
            }
            if started.elapsed() >= within {
                return Err(ApiError::DeployTimeout {
                    app: app.name.clone(),
                    after: within,
                    phase,
                });
            }
            tokio::time::sleep(self.cfg.poll.min(within.saturating_sub(started.elapsed()))).await;
        }
    }
}

async fn send<IO>(
    io: hyper_util::rt::TokioIo<IO>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Option<u64>, Bytes), Box<dyn std::error::Error + Send + Sync>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let reset = resp
        .headers()
        .get("ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, reset, body))
}
