//! The go-plugin launch contract: cookie, protocol negotiation, listener and handshake line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const COOKIE_KEY: &str = "WORKFLOW_PLUGIN";
pub const COOKIE_VALUE: &str = "workflow-external-plugin-v1";
/// The only application protocol version this plugin (and the host) speaks.
pub const APP_PROTOCOL_VERSION: u32 = 1;
const CORE_PROTOCOL_VERSION: u32 = 1;

pub fn cookie_present() -> bool {
    std::env::var(COOKIE_KEY).is_ok_and(|v| v == COOKIE_VALUE)
}

/// Answers version 1 whatever the host offers: if the host offered a list without 1 it cannot
/// speak to us anyway, and go-plugin's rule (answer the lowest when nothing matches) gives 1 too.
pub fn negotiate_app_version(offered: Option<&str>) -> u32 {
    if let Some(list) = offered {
        if !list
            .split(',')
            .any(|v| v.trim().parse::<u32>() == Ok(APP_PROTOCOL_VERSION))
        {
            tracing::warn!(
                offered = list,
                "host did not offer app protocol 1; answering 1"
            );
        }
    }
    APP_PROTOCOL_VERSION
}

pub enum Listener {
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
    },
}

impl Listener {
    /// Binds where go-plugin would: a fresh socket path in `PLUGIN_UNIX_SOCKET_DIR` (or the temp
    /// dir), falling back to TCP on 127.0.0.1 within `PLUGIN_MIN_PORT..=PLUGIN_MAX_PORT`.
    pub fn bind_from_env() -> std::io::Result<Self> {
        let dir = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        match Self::bind_unix(&dir) {
            Ok(l) => Ok(l),
            Err(err) => {
                tracing::warn!(error = %err, dir = %dir.display(), "unix socket unavailable, using tcp");
                Self::bind_tcp()
            }
        }
    }

    fn bind_unix(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        // A unique name: pid plus a counter plus the clock, retried on collision.
        for attempt in 0..16u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = dir.join(format!("plugin{}-{nanos:x}{attempt}", std::process::id()));
            match tokio::net::UnixListener::bind(&path) {
                Ok(listener) => {
                    let mode = if let Some(group) = std::env::var_os("PLUGIN_UNIX_SOCKET_GROUP") {
                        chown_group(&path, &group.to_string_lossy());
                        0o660
                    } else {
                        0o600
                    };
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                    return Ok(Listener::Unix { listener, path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free unix socket name"))
    }

    fn bind_tcp() -> std::io::Result<Self> {
        let port = |key: &str, default: u16| {
            std::env::var(key)
                .ok()
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(default)
        };
        let (min, max) = (
            port("PLUGIN_MIN_PORT", 10000),
            port("PLUGIN_MAX_PORT", 25000),
        );
        for p in min..=max {
            if let Ok(std) = std::net::TcpListener::bind(("127.0.0.1", p)) {
                std.set_nonblocking(true)?;
                let addr = std.local_addr()?;
                let listener = tokio::net::TcpListener::from_std(std)?;
                return Ok(Listener::Tcp { listener, addr });
            }
        }
        Err(std::io::Error::other(format!(
            "no free tcp port in {min}..={max}"
        )))
    }

    /// `CORE|APP|NETWORK|ADDR|PROTOCOL|SERVERCERT|` with an empty certificate field: this host
    /// runs without TLS and would crash on a certificate.
    pub fn handshake_line(&self, app_version: u32) -> String {
        let (network, addr) = match self {
            Listener::Unix { path, .. } => ("unix", path.display().to_string()),
            Listener::Tcp { addr, .. } => ("tcp", addr.to_string()),
        };
        format!("{CORE_PROTOCOL_VERSION}|{app_version}|{network}|{addr}|grpc|")
    }
}

fn chown_group(path: &Path, group: &str) {
    let gid = group.parse::<u32>().ok().or_else(|| {
        let name = std::ffi::CString::new(group).ok()?;
        // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer into static
        // storage or null; we copy the gid out immediately.
        let entry = unsafe { libc::getgrnam(name.as_ptr()) };
        (!entry.is_null()).then(|| unsafe { (*entry).gr_gid })
    });
    if let (Some(gid), Ok(cpath)) = (
        gid,
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()),
    ) {
        // SAFETY: plain syscall on a valid C string; -1 leaves the owner unchanged.
        unsafe { libc::chown(cpath.as_ptr(), u32::MAX, gid) };
    }
}

/// Writes the handshake line as the first and only stdout output, flushed.
pub fn announce(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_answers_version_one() {
        assert_eq!(negotiate_app_version(Some("1")), 1);
        assert_eq!(negotiate_app_version(Some("2,1")), 1);
        assert_eq!(negotiate_app_version(Some("3")), 1);
        assert_eq!(negotiate_app_version(None), 1);
    }

    #[tokio::test]
    async fn handshake_line_has_empty_cert_field() {
        let dir = tempfile::tempdir().unwrap();
        let l = Listener::bind_unix(dir.path()).unwrap();
        let line = l.handshake_line(1);
        let parts: Vec<&str> = line.split('|').collect();
        assert_eq!(parts.len(), 6, "{line}");
        assert_eq!(&parts[..3], &["1", "1", "unix"]);
        assert!(parts[3].starts_with(dir.path().to_str().unwrap()));
        assert_eq!(parts[4], "grpc");
        assert_eq!(parts[5], "");
    }
}
