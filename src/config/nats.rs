//! The NATS part of a broker config: the urls and credentials a client connects with, as
//! validated data. Connecting with them is the NATS provider's (`crate::nats::conn`); config
//! imports no provider.

use crate::secret::{fingerprint, redact_url, Secret};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct ConnSettings {
    /// Resolved server URLs (may carry userinfo, hence secret).
    pub urls: Vec<Secret>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub creds_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_required: bool,
    pub connection_name: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl ConnSettings {
    /// A fingerprint of everything that authenticates the connection (credentials, their
    /// files, TLS): the connection cache's key and the IaC broker's drift compare this one
    /// value, so they can never disagree on which fields matter. "" without any.
    pub fn auth_fingerprint(&self) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        fingerprint(&[
            self.token.as_ref().map(Secret::expose).unwrap_or_default(),
            self.user.as_deref().unwrap_or_default(),
            self.password
                .as_ref()
                .map(Secret::expose)
                .unwrap_or_default(),
            &path(&self.creds_file).unwrap_or_default(),
            &path(&self.nkey_seed_file).unwrap_or_default(),
            &path(&self.tls_ca_file).unwrap_or_default(),
            &path(&self.tls_cert_file).unwrap_or_default(),
            &path(&self.tls_key_file).unwrap_or_default(),
            if self.tls_required { "tls" } else { "" },
        ])
    }

    pub fn redacted_urls(&self) -> String {
        self.urls
            .iter()
            .map(|u| redact_url(u.expose()))
            .collect::<Vec<_>>()
            .join(",")
    }
}
