//! The manifest comes from the plugin.json embedded at build time, so the binary and the file
//! shipped beside it can never disagree (the Go plugin's version drift).

use crate::pb::plugin::Manifest;
use serde::Deserialize;

pub const PLUGIN_JSON: &str = include_str!("../../plugin.json");

#[derive(Deserialize)]
struct Disk {
    name: String,
    version: String,
    author: String,
    description: String,
}

pub fn manifest() -> Manifest {
    match serde_json::from_str::<Disk>(PLUGIN_JSON) {
        Ok(d) => Manifest {
            name: d.name,
            version: d.version,
            author: d.author,
            description: d.description,
            config_mutable: false,
            sample_category: String::new(),
        },
        // Unreachable for a released binary (a test parses the same file); an empty version
        // makes the host fall back to the plugin.json on disk rather than fail.
        Err(_) => Manifest::default(),
    }
}

/// The engine's rule: `X.Y.Z` with an optional leading `v`, nothing else.
pub fn is_strict_version(v: &str) -> bool {
    let v = v.strip_prefix('v').unwrap_or(v);
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

pub fn is_valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    match b {
        [] => false,
        [c] => c.is_ascii_lowercase(),
        [first, middle @ .., last] => {
            first.is_ascii_lowercase()
                && middle
                    .iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && (last.is_ascii_lowercase() || last.is_ascii_digit())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_passes_engine_validation_and_matches_cargo() {
        let m = manifest();
        assert!(is_valid_name(&m.name), "{}", m.name);
        assert!(is_strict_version(&m.version), "{}", m.version);
        assert_eq!(
            m.version,
            env!("CARGO_PKG_VERSION"),
            "plugin.json and Cargo.toml versions differ"
        );
        assert!(!m.author.is_empty() && !m.description.is_empty());
    }

    #[test]
    fn version_rules() {
        assert!(is_strict_version("1.2.3") && is_strict_version("v1.2.3"));
        assert!(
            !is_strict_version("1.2.3-rc1")
                && !is_strict_version("1.2")
                && !is_strict_version("dev")
        );
    }
}
