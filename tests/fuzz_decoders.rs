//! A bounded fuzz of the config and ExecuteStep decoders (issue 14): random Structs built from
//! the real field names plus hostile values, and random or mutated protobuf bytes as
//! `typed_config` / `typed_input`, through CreateModule, CreateStep, CreateTrigger and
//! ExecuteStep on the runtime, in-process. Any panic fails the test. Deterministic (fixed
//! seed), so a failure reproduces; `FUZZ_CASES` per surface, sized so the whole run takes a
//! few seconds in a debug build (it prints its time) and stays well under 30 s under load.
//!
//! No broker is declared in the runtime that executes steps, so every execution ends before
//! the network, at the first refusal; the network paths are covered by tests/hostile.rs.

use eventbus_plugin::config::decode::{json_to_struct, RawConfig};
use eventbus_plugin::pb::eventbus::{
    AckRequest, AckStepConfig, ConsumeRequest, ConsumeStepConfig, PublishRequest, PublishStepConfig,
};
use eventbus_plugin::runtime::{ExecuteInput, Runtime};
use eventbus_plugin::shutdown::Lifecycle;
use prost::Message;
use serde_json::{json, Map, Value as Json};
use std::time::{Duration, Instant};

/// Cases per surface (modules, triggers, steps, executions): 4 x 5,000 = 20,000 in all.
const FUZZ_CASES: usize = 5_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const FIELDS: &[&str] = &[
    "provider",
    "deploy_target",
    "version",
    "replicas",
    "dsn",
    "servers",
    "auth",
    "tls",
    "local",
    "connect_timeout",
    "request_timeout",
    "name",
    "subjects",
    "retention_policy",
    "num_replicas",
    "max_bytes",
    "max_msgs",
    "max_age",
    "storage",
    "discard",
    "duplicate_window",
    "stream_name",
    "filter_subject",
    "filter_subjects",
    "deliver_policy",
    "ack_policy",
    "max_deliver",
    "ack_wait",
    "backoff",
    "opt_start_seq",
    "opt_start_time",
    "broker_ref",
    "subject",
    "payload",
    "headers",
    "correlation_id",
    "message_id",
    "timeout",
    "consumer",
    "batch_size",
    "max_wait",
    "ack_token",
    "action",
    "nak_delay",
    "max_in_flight",
    "ack_mode",
    "dead_letter_subject",
    "bus",
    "workflowType",
    "_config_dir",
    "token",
    "password",
    "user",
    "bogus",
];

fn scalar(rng: &mut Rng) -> Json {
    match rng.below(10) {
        0 => Json::Null,
        1 => Json::Bool(rng.next().is_multiple_of(2)),
        2 => json!(rng.next() as i64),
        3 => json!(f64::from_bits(rng.next()))
            .as_f64()
            .map_or(json!(0), |f| json!(f)),
        4 => json!((rng.next() % 2000) as i64 - 1000),
        5 => Json::String("z".repeat(rng.below(2000))),
        _ => Json::String(
            rng.pick(&[
                "",
                "x",
                "a.b",
                "orders.>",
                "orders.*",
                "1s",
                "0.5s",
                "-5s",
                "1m",
                "9223372036854775807s",
                "315576000001s",
                "1.9999999999s",
                "latest",
                "nats",
                "local",
                "self_hosted",
                "$JS.API.STREAM.DELETE.S",
                "$JS.ACK.S.c.1.1.1.1.0",
                "_INBOX.x",
                "a\r\nb",
                "é",
                "a:b",
                "a b",
                "\u{0}",
                "nats://u:p@h:1",
                "{{ .x }}",
                "ACK_POLICY_ALL",
                "ACK_ACTION_NAK",
                "NaN",
                "Infinity",
                "1e400",
                "-0",
                "💥",
            ])
            .to_string(),
        ),
    }
}

fn value(rng: &mut Rng, depth: u32) -> Json {
    match rng.below(if depth > 3 { 1 } else { 4 }) {
        0 | 1 => scalar(rng),
        2 => Json::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        _ => Json::Object(object(rng, depth + 1)),
    }
}

fn object(rng: &mut Rng, depth: u32) -> Map<String, Json> {
    let mut m = Map::new();
    for _ in 0..rng.below(6) {
        let key = if rng.below(8) == 0 {
            format!("k{}", rng.next() % 100)
        } else {
            rng.pick(FIELDS).to_string()
        };
        m.insert(key, value(rng, depth));
    }
    m
}

/// Random bytes, or a valid encoding with a few bytes flipped, cut or appended.
fn bytes(rng: &mut Rng, valid: Vec<u8>) -> Vec<u8> {
    let mut b = if rng.below(3) == 0 {
        (0..rng.below(64)).map(|_| rng.next() as u8).collect()
    } else {
        valid
    };
    for _ in 0..rng.below(4) {
        match rng.below(3) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            1 if !b.is_empty() => b.truncate(rng.below(b.len())),
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

fn any(name: &str, value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/workflow.plugin.eventbus.v1.{name}"),
        value,
    }
}

fn duration(rng: &mut Rng) -> Option<prost_types::Duration> {
    (rng.below(2) == 0).then(|| prost_types::Duration {
        seconds: *rng.pick(&[0, 1, -1, i64::MAX, i64::MIN, 315_576_000_001]),
        nanos: *rng.pick(&[0, 1, -1, 999_999_999, 1_000_000_000, i32::MAX]),
    })
}

/// A step's (config, input) as typed messages with hostile field values.
fn typed_step(rng: &mut Rng, kind: usize) -> (prost_types::Any, prost_types::Any) {
    let s = |rng: &mut Rng| match scalar(rng) {
        Json::String(s) => s,
        other => other.to_string(),
    };
    let headers = |rng: &mut Rng| (0..rng.below(3)).map(|_| (s(rng), s(rng))).collect();
    let (cfg_name, cfg, in_name, inp) = match kind {
        0 => (
            "PublishStepConfig",
            PublishStepConfig {
                subject: s(rng),
                headers: headers(rng),
                correlation_id: s(rng),
                message_id: s(rng),
                timeout: duration(rng),
                ..Default::default()
            }
            .encode_to_vec(),
            "PublishRequest",
            PublishRequest {
                subject: s(rng),
                headers: headers(rng),
                correlation_id: s(rng),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        1 => (
            "ConsumeStepConfig",
            ConsumeStepConfig {
                consumer: s(rng),
                batch_size: rng.next() as i32,
                max_wait: duration(rng),
                stream_name: s(rng),
                ..Default::default()
            }
            .encode_to_vec(),
            "ConsumeRequest",
            ConsumeRequest::default().encode_to_vec(),
        ),
        _ => (
            "AckStepConfig",
            AckStepConfig {
                ack_token: s(rng),
                action: rng.next() as i32 % 6,
                nak_delay: duration(rng),
                ..Default::default()
            }
            .encode_to_vec(),
            "AckRequest",
            AckRequest {
                ack_token: s(rng),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    };
    (
        any(cfg_name, bytes(rng, cfg)),
        any(in_name, bytes(rng, inp)),
    )
}

const STEPS: &[&str] = &[
    "step.eventbus.publish",
    "step.eventbus.consume",
    "step.eventbus.ack",
];
const MODULES: &[&str] = &[
    "eventbus.broker",
    "eventbus.stream",
    "eventbus.consumer",
    "infra.eventbus",
];

#[tokio::test]
async fn fuzz_config_and_execute_step_decoders_never_panic() {
    let started = Instant::now();
    let mut rng = Rng(0xD1B54A32D192ED03);
    let mut outcomes = [0usize; 2];

    // Module configs, in a runtime of their own: a broker created here must not give the
    // executing runtime below a connection to wait on.
    let modules = Runtime::new(Lifecycle::new());
    for i in 0..FUZZ_CASES {
        let type_name = MODULES[rng.below(MODULES.len())];
        let s = json_to_struct(&object(&mut rng, 0));
        let r = modules.create_module(
            type_name,
            &format!("m{i}"),
            RawConfig {
                typed: None,
                legacy: Some(&s),
            },
        );
        outcomes[r.is_ok() as usize] += 1;
    }
    for i in 0..FUZZ_CASES {
        let s = json_to_struct(&object(&mut rng, 0));
        let r = modules.create_trigger("trigger.eventbus.subscribe", &format!("t{i}"), Some(&s));
        outcomes[r.is_ok() as usize] += 1;
    }

    let rt = Runtime::new(Lifecycle::new());
    let mut handles = Vec::new();
    for i in 0..FUZZ_CASES {
        let kind = rng.below(STEPS.len());
        let s = json_to_struct(&object(&mut rng, 0));
        let (typed, _) = typed_step(&mut rng, kind);
        let raw = if rng.below(2) == 0 {
            RawConfig {
                typed: Some(&typed),
                legacy: None,
            }
        } else {
            RawConfig {
                typed: None,
                legacy: Some(&s),
            }
        };
        match rt.create_step(STEPS[kind], &format!("s{i}"), raw) {
            Ok(h) => {
                outcomes[1] += 1;
                handles.push((kind, h));
            }
            Err(_) => outcomes[0] += 1,
        }
    }
    // Plain steps of each kind, so executions never depend on a create having succeeded.
    for (kind, name) in STEPS.iter().enumerate() {
        let raw = RawConfig {
            typed: None,
            legacy: None,
        };
        handles.push((kind, rt.create_step(name, "plain", raw).unwrap()));
    }
    for _ in 0..FUZZ_CASES {
        let (kind, handle) = rng.pick(&handles).clone();
        let (typed_config, typed_input) = typed_step(&mut rng, kind);
        let current = json_to_struct(&object(&mut rng, 0));
        let config = json_to_struct(&object(&mut rng, 0));
        let input = match rng.below(3) {
            0 => ExecuteInput {
                typed_config: Some(&typed_config),
                config: None,
                typed_input: Some(&typed_input),
                current: Some(&current),
                trigger_data: None,
                step_outputs: None,
            },
            1 => ExecuteInput {
                typed_config: None,
                config: Some(&config),
                typed_input: None,
                current: Some(&current),
                trigger_data: None,
                step_outputs: None,
            },
            _ => ExecuteInput {
                typed_config: Some(&typed_config),
                config: Some(&config),
                typed_input: None,
                current: None,
                trigger_data: None,
                step_outputs: None,
            },
        };
        let r = tokio::time::timeout(Duration::from_secs(5), rt.execute_step(&handle, input))
            .await
            .expect("an execution without a broker ends at once");
        outcomes[r.is_ok() as usize] += 1;
    }
    let total = outcomes[0] + outcomes[1];
    assert_eq!(total, 4 * FUZZ_CASES);
    // Most inputs are refused; some must pass, or the generator tests nothing but refusals.
    assert!(outcomes[1] > 0, "{outcomes:?}");
    // Reported, not asserted: timings belong in benches (a loaded machine is slower).
    eprintln!(
        "fuzzed {total} cases in {:?} ({outcomes:?} refused/accepted)",
        started.elapsed()
    );
}
