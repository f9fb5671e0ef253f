//! Unit tests of the kafka IaC face. The update paths the test broker (tansu 0.6.0) does not
//! serve run here on fake admin and offsets layers, named as such: `topic::FakeAdmin` for
//! CreatePartitions and AlterConfigs, `FakeOffsets` below for offsets-for-time.

use super::broker;
use super::consumer::{self, position};
use super::stream::{self, converge, observe, topic_outputs};
use crate::iac::drivers::consumer::decode_desired as decode_consumer;
use crate::iac::drivers::stream::{decode_desired as decode_stream, Flags};
use crate::iac::state::KafkaRecord;
use crate::iac::targets::BrokerDesired;
use crate::kafka::admin::TopicEntries;
use crate::kafka::group::OffsetLookup;
use crate::kafka::topic::{FakeAdmin, ObservedTopic, TopicAdmin};
use crate::kafka::{Ensured, KafkaError};
use serde_json::{json, Value as Json};
use std::cell::RefCell;
use std::collections::BTreeMap;

fn topic(cfg: Json) -> crate::kafka::TopicSpec {
    let d = decode_stream("orders-stream", cfg.to_string().as_bytes()).unwrap();
    stream::topic_spec("orders-stream", &d, &KafkaRecord::default()).unwrap()
}

fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// On the fake admin layer: tansu 0.6.0 routes neither CreatePartitions nor AlterConfigs. A
/// real broker adds partitions in place (records stay where they are; keys may hash to the new
/// partitions from then on) and AlterConfigs replaces the topic's whole set of dynamic
/// overrides, which is why `converge` sends the set it keeps, not only what changed.
#[tokio::test]
async fn converge_on_the_fake_admin_raises_partitions_and_rewrites_the_override_set() {
    let admin = FakeAdmin::default();
    admin.topics.lock().unwrap().insert(
        "orders".into(),
        ObservedTopic {
            partitions: 2,
            replication_factor: 1,
            configs: map(&[
                ("cleanup.policy", "delete"),
                ("retention.ms", "60000"),
                ("max.message.bytes", "2048"),
            ]),
        },
    );
    let want = topic(json!({
        "name": "orders", "subjects": ["orders.>"], "partitions": 4, "max_age": "120s"
    }));
    let seen = admin.describe("orders").await.unwrap();
    let got = converge(&admin, &want, seen.as_ref()).await.unwrap();
    assert_eq!(got, Ensured::Updated);
    let calls = admin.calls.lock().unwrap().clone();
    assert_eq!(calls[0], "create_partitions orders 4");
    // The override the user does not manage stays; the managed one no longer set goes.
    let kept = map(&[("cleanup.policy", "delete"), ("retention.ms", "120000")]);
    assert_eq!(calls[1], format!("alter_configs orders {kept:?}"));
    assert_eq!(calls.len(), 2, "{calls:?}");
    let now = admin.describe("orders").await.unwrap();
    assert_eq!(
        converge(&admin, &want, now.as_ref()).await.unwrap(),
        Ensured::Unchanged
    );
    assert_eq!(admin.calls.lock().unwrap().len(), 2, "no call when in sync");

    // Fewer partitions or another replication factor: refused (the plan made it a replace).
    let fewer = topic(json!({"name": "orders", "subjects": ["orders.>"], "partitions": 1}));
    let e = converge(&admin, &fewer, now.as_ref()).await.unwrap_err();
    assert!(e.to_string().contains("cannot reduce them to 1"), "{e}");
    let rf = topic(json!({
        "name": "orders", "subjects": ["orders.>"], "partitions": 4, "num_replicas": 3,
        "max_age": "120s"
    }));
    let e = converge(&admin, &rf, now.as_ref()).await.unwrap_err();
    assert!(e.to_string().contains("replication factor 1"), "{e}");
    assert_eq!(admin.calls.lock().unwrap().len(), 2, "refused: no call");

    // A missing topic is created with its entries.
    let fresh = topic(json!({"name": "audit", "subjects": ["audit.>"], "max_msg_size": 4096}));
    assert_eq!(
        converge(&admin, &fresh, None).await.unwrap(),
        Ensured::Created
    );
    let t = admin.describe("audit").await.unwrap().unwrap();
    assert_eq!(t.configs, map(&[("max.message.bytes", "4096")]));
}

#[test]
fn observed_entries_count_when_set_on_the_topic_or_managed_by_the_spec() {
    let e = TopicEntries {
        partitions: 3,
        replication_factor: 1,
        entries: [
            ("retention.ms", ("60000", false)),
            ("retention.bytes", ("-1", false)),
            ("segment.ms", ("1000", true)),
        ]
        .iter()
        .map(|(k, (v, set))| (k.to_string(), (v.to_string(), *set)))
        .collect(),
    };
    // tansu reports the entries given at create as defaults: the spec's own still compare.
    let o = observe(&e, ["retention.ms"]);
    assert_eq!(
        o.configs,
        map(&[("retention.ms", "60000"), ("segment.ms", "1000")])
    );
    let out = topic_outputs("orders", &o, &["orders.>".into()], &Flags::default());
    assert_eq!(
        (&out["max_age"], &out["max_bytes"], &out["partitions"]),
        (&json!("60s"), &json!(-1), &json!(3))
    );
    assert_eq!(out["provider"], "kafka");
}

#[test]
fn fewer_partitions_and_another_replication_factor_plan_a_replace() {
    let current = json!({
        "name": "orders", "provider": "kafka", "broker": "bus", "broker_ref": "bus",
        "subjects": ["orders.>"], "partitions": 4, "num_replicas": 1, "max_age": "0s",
        "max_bytes": -1, "max_msg_size": -1, "prevent_destroy": false, "bind": false
    });
    let plan = |cfg: Json| {
        let mut c = json!({"name": "orders", "subjects": ["orders.>"], "broker_ref": "bus"});
        c.as_object_mut()
            .unwrap()
            .extend(cfg.as_object().unwrap().clone());
        let d = decode_stream("orders-stream", c.to_string().as_bytes()).unwrap();
        stream::diff(
            "orders-stream",
            &d,
            &Default::default(),
            Some("bus"),
            &current,
        )
        .unwrap()
    };
    assert!(plan(json!({"partitions": 4})).is_empty(), "in sync");
    // num_replicas unset: the broker's default, never a change.
    let up = plan(json!({"partitions": 6, "max_age": "3600s"}));
    let paths: Vec<(&str, bool)> = up.iter().map(|c| (c.path.as_str(), c.force_new)).collect();
    assert_eq!(paths, [("partitions", false), ("max_age", false)]);
    let down = plan(json!({"partitions": 2, "num_replicas": 3}));
    let paths: Vec<(&str, bool)> = down
        .iter()
        .map(|c| (c.path.as_str(), c.force_new))
        .collect();
    assert_eq!(paths, [("partitions", true), ("num_replicas", true)]);
}

#[test]
fn settings_kafka_has_not_are_refused_one_line_each() {
    let d = decode_stream(
        "orders-stream",
        json!({
            "name": "orders", "subjects": ["orders.>"], "storage": "STORAGE_TYPE_MEMORY",
            "max_msgs": 5, "deny_delete": true, "allow_direct": true
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let e = stream::topic_spec("orders-stream", &d, &KafkaRecord::default())
        .unwrap_err()
        .to_string();
    for field in ["storage", "max_msgs", "deny_delete", "allow_direct"] {
        assert!(
            e.lines().any(|l| l.starts_with(&format!(
                "infra.eventbus.stream \"orders-stream\": config.{field}: "
            ))),
            "{field}: {e}"
        );
    }
    assert_eq!(e.lines().count(), 4, "{e}");
    let c = decode_consumer(
        "billing",
        json!({
            "name": "billing", "stream_name": "orders", "deliver_policy": "DELIVER_POLICY_LAST",
            "ack_policy": "ACK_POLICY_NONE", "headers_only": true
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let e = consumer::group_spec("billing", &c).unwrap_err().to_string();
    for field in ["deliver_policy", "ack_policy", "headers_only"] {
        assert!(e.contains(&format!("config.{field}: ")), "{field}: {e}");
    }
    assert_eq!(e.lines().count(), 3, "{e}");
}

/// (partition, low, high, [(timestamp ms, offset)])
type FakePartition = (i32, i64, i64, Vec<(i64, i64)>);

/// A fake offsets layer: the test broker answers offset 0 to every lookup by time, so both a
/// correct broker and tansu's answer are played here.
#[derive(Default)]
struct FakeOffsets {
    parts: Vec<FakePartition>,
    committed: RefCell<BTreeMap<i32, i64>>,
    /// tansu 0.6.0: every lookup by time answers 0.
    wrong_time_lookup: bool,
}

impl OffsetLookup for FakeOffsets {
    fn partitions(&self, _: &str) -> Result<Vec<i32>, KafkaError> {
        Ok(self.parts.iter().map(|p| p.0).collect())
    }
    fn committed(&self, _: &str, ps: &[i32]) -> Result<Vec<Option<i64>>, KafkaError> {
        Ok(ps
            .iter()
            .map(|p| self.committed.borrow().get(p).copied())
            .collect())
    }
    fn watermarks(&self, _: &str, p: i32) -> Result<(i64, i64), KafkaError> {
        let x = self.parts.iter().find(|x| x.0 == p).expect("partition");
        Ok((x.1, x.2))
    }
    fn offset_for_time(&self, _: &str, p: i32, ms: i64) -> Result<Option<i64>, KafkaError> {
        if self.wrong_time_lookup {
            return Ok(Some(0));
        }
        let x = self.parts.iter().find(|x| x.0 == p).expect("partition");
        Ok(x.3.iter().find(|(ts, _)| *ts >= ms).map(|(_, o)| *o))
    }
    fn commit(&self, _: &str, offsets: &[(i32, i64)]) -> Result<(), KafkaError> {
        self.committed.borrow_mut().extend(offsets.iter().copied());
        Ok(())
    }
}

#[test]
fn by_start_time_positions_where_the_broker_answers_and_refuses_where_it_does_not() {
    let c = decode_consumer(
        "replay",
        json!({
            "name": "replay", "stream_name": "orders",
            "deliver_policy": "DELIVER_POLICY_BY_START_TIME",
            "opt_start_time": "1970-01-01T00:00:02Z"
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let g = consumer::group_spec("replay", &c).unwrap();
    let parts = vec![
        (0, 0, 10, vec![(1000, 0), (2000, 4), (3000, 9)]),
        (1, 2, 5, vec![(500, 2), (900, 4)]),
    ];
    // A real broker: the first offset at or after the time; a partition with nothing that
    // late starts at its end.
    let good = FakeOffsets {
        parts: parts.clone(),
        ..Default::default()
    };
    assert!(position(&good, &g).unwrap(), "a new group");
    assert_eq!(
        *good.committed.borrow(),
        [(0, 4), (1, 5)].into_iter().collect()
    );
    assert!(!position(&good, &g).unwrap(), "positioned once");
    // tansu: offset 0 for the year 3000: a clear error, nothing committed.
    let wrong = FakeOffsets {
        parts,
        wrong_time_lookup: true,
        ..Default::default()
    };
    let e = position(&wrong, &g).unwrap_err().to_string();
    assert!(
        e.contains("config.deliver_policy: DELIVER_POLICY_BY_START_TIME")
            && e.contains("answers it wrongly")
            && !e.contains('\n'),
        "{e}"
    );
    assert!(wrong.committed.borrow().is_empty());
}

#[test]
fn broker_outputs_and_records_never_show_the_sasl_password() {
    const PW: &str = "pw-Unit-9Qx";
    let cfg = json!({
        "provider": "kafka", "deploy_target": "self_hosted",
        "kafka": {"brokers": ["k1:9092", "k2:9092"], "sasl_mechanism": "KAFKA_SASL_MECHANISM_SCRAM_SHA_512"},
        "auth": {"user": "app", "password": PW}
    });
    let d = BrokerDesired::decode("bus", cfg.to_string().as_bytes()).unwrap();
    let rec = broker::record_of("bus", &d).unwrap();
    assert_eq!(
        rec.sasl_password, PW,
        "kept for later processes (0600 state)"
    );
    assert_eq!(rec.security_protocol, "sasl_plaintext");
    let view = broker::view_of(&rec, false, false);
    let out = broker::outputs("bus", &view, 2);
    assert!(!out.to_string().contains(PW), "{out}");
    assert!(!format!("{rec:?}").contains(PW));
    assert_eq!(out["sasl_mechanism"], "SCRAM-SHA-512");
    assert_eq!(out["brokers"], json!(["k1:9092", "k2:9092"]));
    // A new password is a change (its fingerprint), never shown.
    let mut other = cfg.clone();
    other["auth"]["password"] = json!("pw-Other-1");
    let d2 = BrokerDesired::decode("bus", other.to_string().as_bytes()).unwrap();
    let changes = broker::diff("bus", &d2, &out).unwrap();
    let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["auth_fingerprint"]);
    assert!(!format!("{changes:?}").contains("pw-Other-1"));
    // The client settings carry it to librdkafka only.
    let s = super::conns::settings(&rec);
    assert_eq!(s.client_config().get("sasl.password"), Some(PW));
    assert!(!format!("{s:?}").contains(PW));
}
