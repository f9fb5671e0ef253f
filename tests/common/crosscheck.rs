//! The standard-client cross-check (PyPI confluent-kafka, `tests/fixtures/kafka_crosscheck.py`)
//! shared by the kafka test files.

use serde_json::Value as Json;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs the confluent-kafka script; fails loudly (never skips) when the client is missing.
pub fn crosscheck(args: &[&str], stdin: &str) -> Vec<Json> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kafka_crosscheck.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 on PATH");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python3 ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'confluent_kafka'"),
        "confluent-kafka is missing: `make deps` (pip install confluent-kafka)"
    );
    assert!(out.status.success(), "crosscheck {args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

pub fn header<'a>(rec: &'a Json, name: &str) -> Option<&'a str> {
    rec["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}
