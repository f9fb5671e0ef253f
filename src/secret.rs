//! Secrets never reach a log line or an error message: they are only readable through
//! `expose`, and every formatting path prints a placeholder.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `nats://user:pass@host:4222` → `nats://***@host:4222`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = match one.split_once("://") {
                Some((s, r)) => (Some(s), r),
                None => (None, one),
            };
            let rest = match rest.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => rest.to_string(),
            };
            match scheme {
                Some(s) => format!("{s}://{rest}"),
                None => rest,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Characters of a value quoted in an error message.
pub const QUOTE_MAX: usize = 200;

/// A value for an error message: Debug-quoted, cut to [`QUOTE_MAX`] characters with the full
/// length stated, so a huge value never becomes a huge error.
pub fn quote(value: &str) -> String {
    if value.chars().count() <= QUOTE_MAX {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(QUOTE_MAX).collect();
    format!("{head:?}... ({} bytes)", value.len())
}

/// A short stable fingerprint (sha256, 16 hex digits) of some values; "" when all are empty.
pub fn fingerprint(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    if parts.iter().all(|p| p.is_empty()) {
        return String::new();
    }
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_hide_and_detect() {
        assert_eq!(fingerprint(&["", ""]), "");
        let a = fingerprint(&["hunter2", ""]);
        assert_eq!(a.len(), 16);
        assert!(!a.contains("hunter2"));
        assert_ne!(a, fingerprint(&["", "hunter2"]));
    }

    #[test]
    fn secrets_do_not_format() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        assert_eq!(
            redact_url("nats://u:hunter2@a:4222, tls://tok@b:4222,c:1"),
            "nats://***@a:4222,tls://***@b:4222,c:1"
        );
    }

    #[test]
    fn quotes_are_capped() {
        assert_eq!(quote("ab"), "\"ab\"");
        let q = quote(&"x".repeat(1 << 20));
        assert!(q.len() < 260 && q.ends_with("(1048576 bytes)"), "{q}");
    }
}
