//! One NATS connection per broker module, shared by everything that references it.
//!
//! The client reconnects forever (with capped exponential backoff and jitter) and starts even
//! when the server is down at first, so module start order and broker restarts never strand a
//! pipeline. A watch channel mirrors the connection state so steps can wait for it with a bound
//! and fail fast with a clear error instead of hanging (Go defects B8, B21).

use super::NatsError;
use crate::secret::{redact_url, Secret};
use async_nats::{ConnectOptions, Event, ServerAddr};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;

/// The settings are the broker config's (`crate::config::nats`); connecting with them is ours.
pub use crate::config::nats::ConnSettings;

impl ConnSettings {
    /// Server addresses with any `user:password@` or `token@` removed from the urls (the
    /// client library logs addresses at debug level), plus those credentials.
    pub fn server_addrs(&self) -> Result<(Vec<ServerAddr>, UrlAuth), NatsError> {
        let mut auth = UrlAuth::default();
        let mut addrs = Vec::with_capacity(self.urls.len());
        for u in &self.urls {
            let bad = |e: &dyn std::fmt::Display| {
                NatsError::Settings(format!("server url {}: {e}", redact_url(u.expose())))
            };
            let addr = ServerAddr::from_str(u.expose().trim()).map_err(|e| bad(&e))?;
            let mut url = addr.into_inner();
            if !url.username().is_empty() {
                match url.password() {
                    Some(p) => {
                        auth.user = Some(url.username().to_string());
                        auth.password = Some(Secret::new(p));
                    }
                    None => auth.token = Some(Secret::new(url.username())),
                }
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            addrs.push(ServerAddr::from_url(url).map_err(|e| bad(&e))?);
        }
        Ok((addrs, auth))
    }

    async fn options(
        &self,
        broker: &str,
        state: watch::Sender<ConnState>,
        url_auth: UrlAuth,
    ) -> Result<ConnectOptions, NatsError> {
        let mut o = match &self.creds_file {
            Some(path) => ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| NatsError::Settings(format!("creds_file {}: {e}", path.display())))?,
            None => ConnectOptions::new(),
        };
        if let Some(path) = &self.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                NatsError::Settings(format!("nkey_seed_file {}: {e}", path.display()))
            })?;
            o = o.nkey(seed.trim().to_string());
        }
        // Explicit auth settings win over credentials embedded in a url.
        let token = self.token.clone().or(url_auth.token);
        let (user, password) = match (&self.user, &self.password) {
            (Some(u), Some(p)) => (Some(u.clone()), Some(p.clone())),
            _ => (url_auth.user, url_auth.password),
        };
        if let Some(t) = &token {
            o = o.token(t.expose().to_string());
        }
        if let (Some(u), Some(p)) = (&user, &password) {
            o = o.user_and_password(u.clone(), p.expose().to_string());
        }
        if let Some(ca) = &self.tls_ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls_cert_file, &self.tls_key_file) {
            o = o.add_client_certificate(c.clone(), k.clone());
        }
        if self.tls_required {
            o = o.require_tls(true);
        }
        if !self.connection_name.is_empty() {
            o = o.name(self.connection_name.clone());
        }
        let name = self.connection_name.clone();
        let broker = broker.to_string();
        Ok(o.retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.request_timeout))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let state = state.clone();
                let name = name.clone();
                let broker = broker.clone();
                async move { on_event(&name, &broker, &state, event) }
            }))
    }
}

/// 0, then 100 ms doubling to 8 s, plus up to 25 % jitter so many plugins do not reconnect in step.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 1).min(7) as u32;
    let base = Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(8));
    let jitter = base.as_millis() as u64 / 4;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    base + Duration::from_millis(if jitter == 0 { 0 } else { nanos % jitter })
}

/// Credentials found in server urls.
#[derive(Clone, Debug, Default)]
pub struct UrlAuth {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    Disconnected,
    Closed,
}

fn on_event(name: &str, broker: &str, state: &watch::Sender<ConnState>, event: Event) {
    match event {
        Event::Connected => {
            tracing::info!(broker = name, "nats connected");
            let before = state.send_replace(ConnState::Connected);
            crate::telemetry::nats_connection(broker, true, before == ConnState::Disconnected);
        }
        Event::Disconnected => {
            tracing::warn!(broker = name, "nats disconnected; reconnecting");
            state.send_replace(ConnState::Disconnected);
            crate::telemetry::nats_connection(broker, false, false);
        }
        Event::Closed => {
            state.send_replace(ConnState::Closed);
            crate::telemetry::nats_connection(broker, false, false);
        }
        Event::LameDuckMode => tracing::warn!(broker = name, "nats server entered lame duck mode"),
        other => tracing::debug!(broker = name, event = %other, "nats event"),
    }
}

#[derive(Clone)]
pub struct NatsConn {
    pub broker: String,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    state: watch::Receiver<ConnState>,
    pub request_timeout: Duration,
}

impl NatsConn {
    /// Returns at once; the connection is established (and re-established) in the background.
    pub async fn open(broker: &str, settings: &ConnSettings) -> Result<NatsConn, NatsError> {
        let (addrs, url_auth) = settings.server_addrs()?;
        if addrs.is_empty() {
            return Err(NatsError::Settings("no server url".into()));
        }
        let (tx, rx) = watch::channel(ConnState::Connecting);
        let opts = settings.options(broker, tx, url_auth).await?;
        let client = opts
            .connect(addrs)
            .await
            .map_err(|e| NatsError::other("connect", e))?;
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(settings.request_timeout);
        Ok(NatsConn {
            broker: broker.to_string(),
            client,
            js,
            state: rx,
            request_timeout: settings.request_timeout,
        })
    }

    /// The connection state as a watch, current value marked seen: `changed()` fires on the
    /// next transition (a reconnect, say).
    pub fn state_changes(&self) -> watch::Receiver<ConnState> {
        let mut rx = self.state.clone();
        rx.mark_unchanged();
        rx
    }

    pub fn is_connected(&self) -> bool {
        *self.state.borrow() == ConnState::Connected
    }

    /// Waits (bounded) until connected; the error says the broker is down instead of hanging.
    pub async fn wait_connected(&self, bound: Duration) -> Result<(), NatsError> {
        if *self.state.borrow() == ConnState::Connected {
            return Ok(()); // the common case, without a timer
        }
        let mut rx = self.state.clone();
        let res = tokio::time::timeout(bound, rx.wait_for(|s| *s == ConnState::Connected)).await;
        match res {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let state = *self.state.borrow();
                let detail = if state == ConnState::Closed {
                    "the connection is closed (the broker module was stopped); StartModule connects it again".to_string()
                } else {
                    format!(
                        "state {state:?} after waiting {bound:?}; the client keeps reconnecting"
                    )
                };
                Err(NatsError::Unavailable {
                    broker: self.broker.clone(),
                    detail,
                })
            }
        }
    }

    pub async fn close(&self) {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(1), self.client.drain()).await {
            tracing::debug!(broker = %self.broker, error = %e, "drain timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_credential_and_tls_file_changes_the_auth_fingerprint() {
        let base = ConnSettings::default();
        assert_eq!(base.auth_fingerprint(), "");
        let variants = [
            ConnSettings {
                token: Some(Secret::new("t")),
                ..Default::default()
            },
            ConnSettings {
                user: Some("u".into()),
                password: Some(Secret::new("p")),
                ..Default::default()
            },
            ConnSettings {
                creds_file: Some("/c".into()),
                ..Default::default()
            },
            ConnSettings {
                nkey_seed_file: Some("/n".into()),
                ..Default::default()
            },
            ConnSettings {
                tls_ca_file: Some("/ca".into()),
                ..Default::default()
            },
            ConnSettings {
                tls_cert_file: Some("/cert".into()),
                ..Default::default()
            },
            ConnSettings {
                tls_key_file: Some("/key".into()),
                ..Default::default()
            },
            ConnSettings {
                tls_required: true,
                ..Default::default()
            },
        ];
        let prints: std::collections::HashSet<String> = variants
            .iter()
            .map(ConnSettings::auth_fingerprint)
            .collect();
        assert_eq!(prints.len(), variants.len(), "two credential sets collide");
        assert!(!prints.contains(""));
    }

    #[test]
    fn url_credentials_are_lifted_out_of_the_addresses() {
        let s = ConnSettings {
            urls: vec![
                Secret::new("nats://al:pw@h:4222"),
                Secret::new("tls://tok@k:4443"),
            ],
            ..Default::default()
        };
        let (addrs, auth) = s.server_addrs().unwrap();
        let shown = format!("{addrs:?}");
        assert!(!shown.contains("pw") && !shown.contains("tok"), "{shown}");
        assert_eq!(auth.user.as_deref(), Some("al"));
        assert_eq!(auth.password.unwrap().expose(), "pw");
        assert_eq!(auth.token.unwrap().expose(), "tok");
    }

    #[test]
    fn reconnect_backoff_is_capped_with_jitter() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert!(reconnect_delay(2) >= Duration::from_millis(200));
        for n in 3..200 {
            assert!(reconnect_delay(n) <= Duration::from_secs(10), "{n}");
        }
    }
}
