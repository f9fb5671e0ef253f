//! Connection settings: the DSN (libpq URL or key=value form), TLS per libpq's `sslmode` /
//! `sslrootcert`, password redaction, and the Go-style duration syntax of `poll_interval`.
//!
//! tokio-postgres understands neither `verify-ca`/`verify-full` nor `sslrootcert`, `sslcert`,
//! `sslkey`, so those keys are taken out of the DSN here and turned into a rustls
//! configuration.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::Host;

use super::PgError;

/// libpq's `sslmode` values (`allow` is treated as `prefer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not valid; use disable, allow, prefer, require, \
                     verify-ca or verify-full"
                ))
            }
        })
    }
}

/// Settings of one pgchannel broker (built by the config layer).
#[derive(Clone)]
pub struct PgSettings {
    /// Module name, for messages.
    pub broker: String,
    /// Secret: libpq URL or key=value DSN. Never printed; see [`PgSettings::redacted_dsn`].
    pub dsn: String,
    /// Pool size (the Go plugin's `max_conns`); subscriptions use extra dedicated connections.
    pub max_conns: usize,
    /// How often waits re-check without a NOTIFY (nak delays, lease expiry, lost NOTIFYs),
    /// and how often a busy consumer lock is retried.
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
}

pub const DEFAULT_MAX_CONNS: usize = 16;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("broker", &self.broker)
            .field("dsn", &self.redacted_dsn())
            .field("max_conns", &self.max_conns)
            .field("poll_interval", &self.poll_interval)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl PgSettings {
    /// Defaults as the Go plugin: 16 connections, 1 s poll interval; 10 s connect timeout.
    pub fn new(broker: impl Into<String>, dsn: impl Into<String>) -> PgSettings {
        PgSettings {
            broker: broker.into(),
            dsn: dsn.into(),
            max_conns: DEFAULT_MAX_CONNS,
            poll_interval: DEFAULT_POLL_INTERVAL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets `poll_interval` from its config text (Go duration syntax: `500ms`, `1s`, `1m30s`).
    /// Unlike the Go plugin, a malformed or non-positive value is an error, not a silent 1 s.
    pub fn with_poll_interval_str(mut self, raw: &str) -> Result<PgSettings, PgError> {
        let d = parse_go_duration(raw).map_err(|e| {
            PgError::invalid(format!(
                "{}: poll_interval {raw:?}: {e} (use a positive Go duration such as \"500ms\" \
                 or \"1s\")",
                self.broker
            ))
        })?;
        if d.is_zero() {
            return Err(PgError::invalid(format!(
                "{}: poll_interval {raw:?} must be greater than zero (e.g. \"1s\")",
                self.broker
            )));
        }
        self.poll_interval = d;
        Ok(self)
    }

    /// Checks every field; `PgBus::connect` calls it.
    pub fn validate(&self) -> Result<(), PgError> {
        let b = &self.broker;
        if self.dsn.trim().is_empty() {
            return Err(PgError::invalid(format!(
                "{b}: dsn is empty; set dsn (or EVENTBUS_<NAME>_URI) to a PostgreSQL URL such as \
                 postgres://user@host:5432/db"
            )));
        }
        if self.max_conns == 0 {
            return Err(PgError::invalid(format!(
                "{b}: max_conns must be at least 1"
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(PgError::invalid(format!(
                "{b}: poll_interval must be greater than zero (e.g. \"1s\")"
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(PgError::invalid(format!(
                "{b}: connect_timeout must be greater than zero"
            )));
        }
        self.parsed().map(|_| ())
    }

    /// The DSN with the password replaced by `***`, for logs and IaC outputs.
    pub fn redacted_dsn(&self) -> String {
        crate::secret::mask(&self.dsn, crate::secret::Userinfo::User)
    }

    /// The tokio-postgres config and TLS choice.
    pub(crate) fn parsed(&self) -> Result<Parsed, PgError> {
        let b = &self.broker;
        let split = split_tls(&self.dsn).map_err(|e| PgError::invalid(format!("{b}: dsn: {e}")))?;
        let mut cfg = tokio_postgres::Config::from_str(&split.rest).map_err(|e| {
            PgError::invalid(format!(
                "{b}: dsn {} is not a valid PostgreSQL connection string: {}",
                self.redacted_dsn(),
                crate::secret::scrub_parser_error(&e.to_string())
            ))
        })?;
        if cfg.get_hosts().is_empty() {
            return Err(PgError::invalid(format!(
                "{b}: dsn {} names no host (give host=... or postgres://user@host/db)",
                self.redacted_dsn()
            )));
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(self.connect_timeout);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("workflow-plugin-eventbus");
        }
        let local = cfg.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .map(|ip| ip.is_loopback())
                        .unwrap_or(false)
            }
        });
        let mode = split.mode.unwrap_or(SslMode::Prefer);
        let client = ClientCert {
            cert: split.cert.clone(),
            key: split.key.clone(),
        };
        let tls = match mode {
            SslMode::Disable => Tls::Plain,
            // libpq's prefer tries TLS without verifying; on a socket or loopback there is
            // nothing to protect against, and test servers have no certificate.
            SslMode::Prefer if local => Tls::Plain,
            SslMode::Prefer => Tls::Rustls(tls_config(Verify::None, None, &client, b)?),
            // libpq: require with a root certificate present behaves as verify-ca.
            SslMode::Require => match &split.rootcert {
                Some(root) => Tls::Rustls(tls_config(Verify::Chain, Some(root), &client, b)?),
                None => Tls::Rustls(tls_config(Verify::None, None, &client, b)?),
            },
            SslMode::VerifyCa => Tls::Rustls(tls_config(
                Verify::Chain,
                split.rootcert.as_deref(),
                &client,
                b,
            )?),
            SslMode::VerifyFull => Tls::Rustls(tls_config(
                Verify::Full,
                split.rootcert.as_deref(),
                &client,
                b,
            )?),
        };
        cfg.ssl_mode(match (&tls, mode) {
            (Tls::Plain, _) => tokio_postgres::config::SslMode::Disable,
            (_, SslMode::Prefer) => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Parsed { cfg, tls, mode })
    }
}

pub(crate) struct Parsed {
    pub cfg: tokio_postgres::Config,
    pub tls: Tls,
    #[allow(dead_code)]
    pub mode: SslMode,
}

#[derive(Clone)]
pub(crate) enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

enum Verify {
    /// Encrypt only (libpq `prefer`/`require` without a root certificate).
    None,
    /// Chain to a trusted root, any host name (`verify-ca`).
    Chain,
    /// Chain and host name (`verify-full`).
    Full,
}

fn tls_config(
    verify: Verify,
    rootcert: Option<&str>,
    client: &ClientCert,
    broker: &str,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::invalid(format!("{broker}: TLS setup: {e}")))?;
    let builder = match verify {
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::NoVerify(provider))),
        Verify::Chain | Verify::Full => {
            let roots = Arc::new(root_store(rootcert, broker)?);
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| PgError::invalid(format!("{broker}: sslrootcert: {e}")))?;
            match verify {
                Verify::Full => builder.with_webpki_verifier(inner),
                _ => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verify::AnyName(inner))),
            }
        }
    };
    let config = match client_auth(client, broker)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| PgError::invalid(format!("{broker}: sslcert/sslkey: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[derive(Default)]
struct ClientCert {
    cert: Option<String>,
    key: Option<String>,
}

type ClientAuth = (
    Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
);

/// libpq's `sslcert`/`sslkey`: both or neither (libpq's defaults under ~/.postgresql are not
/// looked at; a service has no meaningful home).
fn client_auth(c: &ClientCert, broker: &str) -> Result<Option<ClientAuth>, PgError> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    match (&c.cert, &c.key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::invalid(format!(
                        "{broker}: sslcert {cert:?}: cannot read PEM certificates: {e}"
                    ))
                })?;
            if chain.is_empty() {
                return Err(PgError::invalid(format!(
                    "{broker}: sslcert {cert:?} holds no certificate"
                )));
            }
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                PgError::invalid(format!(
                    "{broker}: sslkey {key:?}: cannot read a PEM private key: {e}"
                ))
            })?;
            Ok(Some((chain, k)))
        }
        _ => Err(PgError::invalid(format!(
            "{broker}: sslcert and sslkey go together (a client certificate needs its key)"
        ))),
    }
}

fn root_store(
    rootcert: Option<&str>,
    broker: &str,
) -> Result<tokio_rustls::rustls::RootCertStore, PgError> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    match rootcert {
        // libpq's default is ~/.postgresql/root.crt; a service has no meaningful home, so
        // without sslrootcert (or with `system`) the operating system's roots are used.
        None | Some("system") => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
        }
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::invalid(format!(
                        "{broker}: sslrootcert {path:?}: cannot read PEM certificates: {e}"
                    ))
                })?;
            for c in certs {
                store.add(c).map_err(|e| {
                    PgError::invalid(format!("{broker}: sslrootcert {path:?}: {e}"))
                })?;
            }
        }
    }
    if store.is_empty() {
        return Err(PgError::invalid(format!(
            "{broker}: no trusted root certificates for sslmode verify-ca/verify-full (set \
             sslrootcert to a PEM file)"
        )));
    }
    Ok(store)
}

mod verify {
    use std::sync::Arc;
    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::client::WebPkiServerVerifier;
    use tokio_rustls::rustls::crypto::{
        verify_tls12_signature, verify_tls13_signature, CryptoProvider,
    };
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// libpq `require`: encrypted, certificate not checked (signatures still are).
    #[derive(Debug)]
    pub(super) struct NoVerify(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// libpq `verify-ca`: the chain must reach a trusted root; the host name is not checked.
    #[derive(Debug)]
    pub(super) struct AnyName(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

struct SplitDsn {
    rest: String,
    mode: Option<SslMode>,
    rootcert: Option<String>,
    /// Client certificate chain and key (PEM files), libpq's `sslcert` / `sslkey`.
    cert: Option<String>,
    key: Option<String>,
}

fn is_url(dsn: &str) -> bool {
    let d = dsn.trim_start();
    d.starts_with("postgres://") || d.starts_with("postgresql://")
}

/// Takes `sslmode` and `sslrootcert` out of the DSN (both forms).
fn split_tls(dsn: &str) -> Result<SplitDsn, String> {
    let mut mode = None;
    let mut rootcert = None;
    let mut cert = None;
    let mut key = None;
    let mut take = |k: &str, v: &str| -> Result<bool, String> {
        match k {
            "sslcert" => {
                cert = Some(v.to_string());
                Ok(true)
            }
            "sslkey" => {
                key = Some(v.to_string());
                Ok(true)
            }
            "sslmode" => {
                mode = Some(v.parse::<SslMode>()?);
                Ok(true)
            }
            "sslrootcert" => {
                rootcert = Some(v.to_string());
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if is_url(dsn) {
        let dsn = dsn.trim();
        match dsn.split_once('?') {
            None => dsn.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for part in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = part.split_once('=').unwrap_or((part, ""));
                    if !take(&percent_decode(k), &percent_decode(v))? {
                        kept.push(part);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in crate::secret::parse_kv(dsn)? {
            if !take(&k, &v)? {
                kept.push(format!(
                    "{k}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        kept.join(" ")
    };
    Ok(SplitDsn {
        rest,
        mode,
        rootcert,
        cert,
        key,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `time.ParseDuration` syntax: a sequence of decimal numbers with units
/// `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`; `0` alone is zero. Negative values are refused.
pub fn parse_go_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err("negative duration".into());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let num: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (ns, us, ms, s, m, h)".into()),
            u => return Err(format!("unknown unit {u:?} (ns, us, ms, s, m, h)")),
        };
        total += num * secs;
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_in_both_forms() {
        let redact = |d: &str| PgSettings::new("bus", d).redacted_dsn();
        assert_eq!(
            redact("postgres://u:s3cret@db:5432/x?sslmode=require"),
            "postgres://u:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            redact("postgres://db/x?password=s3cret&user=u"),
            "postgres://db/x?password=***&user=u"
        );
        let kv = redact("host=db user=u password='p w\\'x' dbname=x");
        assert!(!kv.contains("p w"), "{kv}");
        assert!(
            kv.contains("password=***") && kv.contains("host=db"),
            "{kv}"
        );
    }

    #[test]
    fn ssl_keys_are_taken_out_of_both_forms() {
        let s = split_tls("postgres://u:p@h/db?sslmode=verify-full&sslrootcert=%2Fa%2Fca.pem&x=1")
            .unwrap();
        assert_eq!(s.mode, Some(SslMode::VerifyFull));
        assert_eq!(s.rootcert.as_deref(), Some("/a/ca.pem"));
        assert_eq!(s.rest, "postgres://u:p@h/db?x=1");
        let s = split_tls("host=h sslmode=verify-ca sslrootcert='/a b/ca.pem' user=u").unwrap();
        assert_eq!(s.mode, Some(SslMode::VerifyCa));
        assert_eq!(s.rootcert.as_deref(), Some("/a b/ca.pem"));
        assert_eq!(s.rest, "host='h' user='u'");
        assert!(split_tls("host=h sslmode=bogus")
            .err()
            .unwrap()
            .contains("verify-full"));
    }

    #[test]
    fn go_durations_parse_like_go() {
        assert_eq!(parse_go_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_go_duration("1").is_err());
        assert!(parse_go_duration("soon").is_err());
        assert!(parse_go_duration("-1s").is_err());
    }

    #[test]
    fn invalid_poll_interval_is_an_error_naming_the_field() {
        let s = PgSettings::new("bus", "postgres://u@h/db");
        let e = s
            .clone()
            .with_poll_interval_str("fast")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bus") && e.contains("poll_interval") && e.contains("fast"),
            "{e}"
        );
        assert!(s.clone().with_poll_interval_str("0s").is_err());
        assert_eq!(
            s.with_poll_interval_str("200ms").unwrap().poll_interval,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let s = PgSettings::new("bus", "postgres://u:hunter2@h/db");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
