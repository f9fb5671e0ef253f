//! Shared by the demo and the bench (not an example itself: Cargo only discovers
//! `examples/*.rs` and `examples/*/main.rs`).

#![allow(dead_code)]

use std::process::Command;

pub const PLUGIN: &str = "workflow-plugin-eventbus";

/// Set by `cargo run` for the program it runs (besides `CARGO_PKG_*`).
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// `cargo run --example` builds the library and the example but not the package's binaries, so
/// on a fresh checkout the plugin would be missing (or stale after an edit). Build it, in the
/// example's own profile, unless `EVENTBUS_PLUGIN_BIN` names one; a no-op when it is current.
pub fn ensure_plugin_binary() {
    if std::env::var_os("EVENTBUS_PLUGIN_BIN").is_some_and(|p| !p.is_empty()) {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo run` gives its child the variables it sets for crates; a build script that
    // watches one (ring's watches CARGO_MANIFEST_DIR) would otherwise rebuild half the tree,
    // and again on the next `cargo run`. The nested build sees the outer build's environment.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_") || CARGO_RUN_VARS.contains(&k.as_ref()) {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--locked", "--bin", PLUGIN]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: building the plugin binary failed ({s}); using what exists"),
        Err(e) => {
            eprintln!("warning: cannot run cargo to build the plugin ({e}); using what exists")
        }
    }
}

/// Resident set size (kB) of a process from `/proc/<pid>/status`: `VmRSS` or `VmHWM` (peak).
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3: utime is 14,
    // stime 15.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(std::time::Duration::from_nanos(ticks * 1_000_000_000 / hz))
}
