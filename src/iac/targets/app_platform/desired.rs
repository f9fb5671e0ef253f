//! What a broker config validated for this target is: the types the app spec (`spec`) and the
//! validation and outputs (`mod.rs`) share, in a file that uses neither.

use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum AppAuth {
    Token(Secret),
    UserPassword { user: String, password: Secret },
}

impl AppAuth {
    pub fn mode(&self) -> &'static str {
        match self {
            AppAuth::Token(_) => "token",
            AppAuth::UserPassword { .. } => "user_password",
        }
    }

    /// Changes when a credential changes, without revealing it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        match self {
            AppAuth::Token(t) => {
                h.update(b"token\0");
                h.update(t.expose().as_bytes());
            }
            AppAuth::UserPassword { user, password } => {
                h.update(b"user\0");
                h.update(user.as_bytes());
                h.update(b"\0");
                h.update(password.expose().as_bytes());
            }
        }
        hex(&h.finalize()[..8])
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A broker config validated for this target.
#[derive(Clone, Debug, PartialEq)]
pub struct AppDesired {
    pub broker: String,
    pub app_name: String,
    pub version: String,
    pub region: Option<String>,
    pub instance_size: String,
    pub http_port: u16,
    pub max_file_store: i64,
    pub max_memory_store: i64,
    pub auth: AppAuth,
    pub deploy_timeout: Duration,
}
