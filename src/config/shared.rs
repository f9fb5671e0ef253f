//! What the broker config's provider sections share (kept apart so that a section never imports
//! the broker config that calls it).

use crate::config::error::Problems;
use crate::secret::quote;
use std::time::Duration;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `tls` block both NATS and kafka read: cert and key together, every file readable.
pub fn check_tls_files(p: &mut Problems, tls: &crate::pb::eventbus::NatsTls) {
    if tls.cert_file.is_empty() != tls.key_file.is_empty() {
        p.field(
            "tls",
            "cert_file and key_file go together; set both or neither",
        );
    }
    for (field, path) in [
        ("tls.ca_file", &tls.ca_file),
        ("tls.cert_file", &tls.cert_file),
        ("tls.key_file", &tls.key_file),
    ] {
        if !path.is_empty() && !std::path::Path::new(path).is_file() {
            p.field(field, format!("{} is not a readable file", quote(path)));
        }
    }
}

/// Converts a broker module name into the env-var key part: upper case, every character outside
/// A-Z and 0-9 becomes `_` (so `orders.bus-1` reads `EVENTBUS_ORDERS_BUS_1_URI`).
pub fn env_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}
