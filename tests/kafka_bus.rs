//! The kafka domain layer against a real Kafka-protocol broker (tansu 0.6.0, started per test
//! by kafka-test-server), and a standard client (PyPI confluent-kafka, run as a script) agreeing
//! with it on keys, headers and offsets. Producers send one record per request
//! (`ONE_RECORD_PER_BATCH`): tansu 0.6.0 miscounts batches of more than one record.

use eventbus_plugin::kafka::admin::{group_lag, RdAdmin, RdOffsets};
use eventbus_plugin::kafka::group::position_new_group;
use eventbus_plugin::kafka::topic::{self, TopicAdmin, TopicDefaults};
use eventbus_plugin::kafka::{
    AckOp, ConsumerOpts, DeadLetter, Delivery, Ensured, GroupSpec, KafkaGroupConsumer,
    KafkaProducer, KafkaSettings, OffsetLookup, Outgoing, StartPolicy, TopicSpec,
};
use eventbus_plugin::pb::eventbus::StreamConfig;
use kafka_test_server::{KafkaServer, ONE_RECORD_PER_BATCH};
#[path = "common/crosscheck.rs"]
mod crosscheck;
use crosscheck::{crosscheck, header};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(40);
const OP: Duration = Duration::from_secs(10);

struct Bus {
    server: KafkaServer,
    settings: KafkaSettings,
    producer: KafkaProducer,
    admin: RdAdmin,
}

fn bus() -> Bus {
    let server = KafkaServer::start();
    let settings = KafkaSettings::plaintext(&server.bootstrap()).with_extra(ONE_RECORD_PER_BATCH);
    let producer = KafkaProducer::new(&settings, OP).expect("producer");
    let admin = RdAdmin::new(&settings, OP).expect("admin");
    Bus {
        server,
        settings,
        producer,
        admin,
    }
}

fn stream(name: &str, partitions: i32) -> TopicSpec {
    TopicSpec::validate(
        "eventbus.stream",
        name,
        &StreamConfig {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            partitions,
            ..Default::default()
        },
        TopicDefaults::default(),
    )
    .expect("stream spec")
}

fn group(name: &str, topic: &str) -> GroupSpec {
    GroupSpec::new(name, topic)
}

fn msg(subject: &str, payload: &str) -> Outgoing {
    Outgoing::new(subject, payload.to_string())
}

impl Bus {
    async fn topic(&self, name: &str, partitions: i32) {
        let r = tokio::time::timeout(OP, topic::ensure(&self.admin, &stream(name, partitions)))
            .await
            .expect("ensure within 10 s")
            .expect("ensure topic");
        assert_eq!(r, Ensured::Created);
    }
    fn consumer(&self, spec: GroupSpec, opts: ConsumerOpts) -> KafkaGroupConsumer {
        KafkaGroupConsumer::new(&self.settings, spec, opts, self.producer.clone())
            .expect("consumer")
    }
    fn offsets(&self, group: &str) -> RdOffsets {
        RdOffsets::new(&self.settings, group, OP).expect("offsets")
    }
}

async fn fetch_n(c: &KafkaGroupConsumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        out.extend(
            c.fetch(n - out.len(), left.min(Duration::from_secs(2)))
                .await
                .expect("fetch"),
        );
    }
    out
}

#[tokio::test]
async fn confluent_kafka_reads_what_the_plugin_published_keys_headers_offsets() {
    let b = bus();
    b.topic("orders", 2).await;
    let mut published = Vec::new();
    for (i, s) in ["orders.created", "orders.paid", "orders.created"]
        .iter()
        .enumerate()
    {
        let mut m = msg(s, &format!("{{\"n\":{i}}}"));
        m.correlation_id = Some(format!("corr-{i}"));
        m.msg_id = Some(format!("id-{i}"));
        m.headers.insert(
            "traceparent".into(),
            "00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01".into(),
        );
        let p = tokio::time::timeout(OP, b.producer.publish("orders", &m))
            .await
            .expect("bounded")
            .expect("publish");
        published.push((m, p));
    }
    let recs = crosscheck(&["read", &b.server.bootstrap(), "orders", "3"], "");
    assert_eq!(recs.len(), 3);
    for (m, p) in &published {
        let r = recs
            .iter()
            .find(|r| r["partition"] == p.partition && r["offset"] == p.offset)
            .unwrap_or_else(|| panic!("no record at {}:{} in {recs:?}", p.partition, p.offset));
        assert_eq!(r["key"], m.subject.as_str(), "the subject is the key");
        assert_eq!(r["value"], std::str::from_utf8(&m.payload).unwrap());
        assert_eq!(header(r, "eventbus.subject"), Some(m.subject.as_str()));
        assert_eq!(
            header(r, "eventbus.correlation_id"),
            m.correlation_id.as_deref()
        );
        assert_eq!(header(r, "eventbus.msg_id"), m.msg_id.as_deref());
        assert_eq!(
            header(r, "traceparent"),
            Some("00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01")
        );
    }
    // One subject, one partition, in publish order.
    assert_eq!(published[0].1.partition, published[2].1.partition);
    assert!(published[0].1.offset < published[2].1.offset);
}

#[tokio::test]
async fn the_plugin_consumes_what_confluent_kafka_produced_and_commits_it() {
    let b = bus();
    b.topic("inbound", 1).await;
    let lines = [
        r#"{"key": "inbound.a", "value": "one", "headers": [["traceparent", "00-aa-bb-01"]]}"#,
        r#"{"key": "k-2", "value": "two", "headers": [["eventbus.subject", "inbound.b"], ["eventbus.correlation_id", "c-2"]]}"#,
        r#"{"key": "inbound.c", "value": "three", "headers": []}"#,
    ];
    let produced = crosscheck(
        &["produce", &b.server.bootstrap(), "inbound"],
        &lines.join("\n"),
    );
    let offsets: Vec<i64> = produced
        .iter()
        .map(|r| r["offset"].as_i64().expect("offset"))
        .collect();
    assert_eq!(
        offsets,
        vec![0, 1, 2],
        "one record per request: consecutive offsets"
    );
    let c = b.consumer(group("readers", "inbound"), ConsumerOpts::default());
    let got = fetch_n(&c, 3, T).await;
    let seen: Vec<(&str, &str, i64)> = got
        .iter()
        .map(|d| {
            (
                d.subject.as_str(),
                std::str::from_utf8(&d.payload).unwrap(),
                d.token.offset,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("inbound.a", "one", 0),
            ("inbound.b", "two", 1),
            ("inbound.c", "three", 2)
        ],
        "subject from the header, else the key"
    );
    assert_eq!(
        got[0].headers.get("traceparent").map(String::as_str),
        Some("00-aa-bb-01")
    );
    assert_eq!(got[1].correlation_id.as_deref(), Some("c-2"));
    for d in &got {
        c.settle(&d.token, AckOp::Ack).await.expect("ack");
    }
    c.commit_now().expect("commit");
    let committed = b
        .offsets("readers")
        .committed("inbound", &[0])
        .expect("committed");
    assert_eq!(committed, vec![Some(3)]);
}

#[tokio::test]
async fn nak_retry_and_dead_letter_on_a_real_broker() {
    let b = bus();
    b.topic("jobs", 1).await;
    b.topic("jobs-dlq", 1).await;
    tokio::time::timeout(OP, b.producer.publish("jobs", &msg("jobs.run", "job-1")))
        .await
        .unwrap()
        .unwrap();
    let mut spec = group("workers", "jobs");
    spec.max_deliver = Some(3);
    spec.backoff = vec![Duration::from_millis(200)];
    let dl = DeadLetter {
        topic: "jobs-dlq".into(),
        subject: "dlq.jobs".into(),
    };
    let c = b.consumer(
        spec,
        ConsumerOpts {
            dead_letter: Some(dl),
        },
    );
    let mut counts = Vec::new();
    for _ in 0..3 {
        let d = fetch_n(&c, 1, T).await.pop().expect("a delivery");
        counts.push(d.delivery_count);
        c.settle(&d.token, AckOp::Nak(None)).await.expect("nak");
    }
    assert_eq!(counts, vec![1, 2, 3]);
    let dlq = b.consumer(group("dlq-reader", "jobs-dlq"), ConsumerOpts::default());
    let dead = fetch_n(&dlq, 1, T).await.pop().expect("dead letter");
    assert_eq!(
        (dead.subject.as_str(), dead.payload.as_ref()),
        ("dlq.jobs", &b"job-1"[..])
    );
    // What a standard client sees in the dead-letter topic: where it came from and why.
    let recs = crosscheck(&["read", &b.server.bootstrap(), "jobs-dlq", "1"], "");
    assert_eq!(header(&recs[0], "eventbus.dlq.topic"), Some("jobs"));
    assert_eq!(header(&recs[0], "eventbus.dlq.group"), Some("workers"));
    assert_eq!(
        header(&recs[0], "eventbus.delivery_count"),
        Some("2"),
        "the copy's count before its last delivery"
    );
    assert_eq!(
        header(&recs[0], "eventbus.dlq.reason"),
        Some("max_deliver reached")
    );
    assert!(
        c.fetch(1, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty(),
        "nothing left"
    );
}

#[tokio::test]
async fn a_consumer_that_goes_away_mid_delivery_leaves_its_unsettled_messages_for_the_next() {
    let b = bus();
    b.topic("work", 1).await;
    for i in 0..4 {
        tokio::time::timeout(
            OP,
            b.producer.publish("work", &msg("work.x", &i.to_string())),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let c = b.consumer(group("g", "work"), ConsumerOpts::default());
    let got = fetch_n(&c, 4, T).await;
    assert_eq!(got.len(), 4);
    // Offsets 0 and 2 acked, 1 and 3 in flight when the consumer goes away.
    c.settle(&got[0].token, AckOp::Ack).await.unwrap();
    c.settle(&got[2].token, AckOp::Ack).await.unwrap();
    drop(c);
    let c2 = b.consumer(group("g", "work"), ConsumerOpts::default());
    let again = fetch_n(&c2, 3, T).await;
    let offsets: Vec<i64> = again.iter().map(|d| d.token.offset).collect();
    assert_eq!(
        offsets,
        vec![1, 2, 3],
        "redelivered from the lowest unsettled offset (2 again: at least once)"
    );
    for d in &again {
        c2.settle(&d.token, AckOp::Ack).await.unwrap();
    }
    c2.commit_now().unwrap();
    assert_eq!(
        b.offsets("g").committed("work", &[0]).unwrap(),
        vec![Some(4)]
    );
    let lag = group_lag(&b.offsets("g"), "work").unwrap();
    assert_eq!(
        (lag[0].committed, lag[0].high_watermark, lag[0].lag),
        (Some(4), 4, 0)
    );
    // Deleted once its member left (tansu 0.6.0 also deletes a group with a live member,
    // where Kafka answers NonEmptyGroup: not asserted here), and again is fine.
    drop(c2);
    tokio::time::timeout(OP, async {
        while b.admin.delete_group("g").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("group deleted once empty");
    b.admin.delete_group("g").await.expect("missing group: ok");
    assert_eq!(b.offsets("g").committed("work", &[0]).unwrap(), vec![None]);
}

/// Every await is bounded. It hung once under load: the revoke callback committed synchronously
/// inside the member's poll, on the test's only thread; the commit is asynchronous now.
#[tokio::test]
async fn rebalance_between_two_members_loses_nothing_and_stale_acks_fail_cleanly() {
    let b = bus();
    b.topic("split", 2).await;
    let total = 20;
    for i in 0..total {
        // Subjects spread over both partitions.
        let s = format!("split.k{}", i % 5);
        tokio::time::timeout(OP, b.producer.publish("split", &msg(&s, &i.to_string())))
            .await
            .unwrap()
            .unwrap();
    }
    let a = b.consumer(group("pair", "split"), ConsumerOpts::default());
    let first = fetch_n(&a, 6, T).await;
    assert!(!first.is_empty());
    let mut done: BTreeSet<String> = BTreeSet::new();
    // Ack half of what A holds; the rest is in flight when B joins.
    for d in first.iter().step_by(2) {
        tokio::time::timeout(OP, a.settle(&d.token, AckOp::Ack))
            .await
            .expect("ack within 10 s")
            .unwrap();
        done.insert(String::from_utf8_lossy(&d.payload).into_owned());
    }
    let bm = b.consumer(group("pair", "split"), ConsumerOpts::default());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stale_refused = 0;
    while done.len() < total && Instant::now() < deadline {
        for c in [&a, &bm] {
            let got = tokio::time::timeout(OP, c.fetch(8, Duration::from_millis(300)))
                .await
                .expect("fetch within 10 s")
                .expect("fetch");
            for d in got {
                tokio::time::timeout(OP, c.settle(&d.token, AckOp::Ack))
                    .await
                    .expect("ack within 10 s")
                    .expect("ack of a fresh delivery");
                done.insert(String::from_utf8_lossy(&d.payload).into_owned());
            }
        }
        // A's unacked messages from before the rebalance: either still valid (A kept the
        // partition) or refused with a line saying they come again; never an error of another kind.
        for d in first.iter().skip(1).step_by(2) {
            match tokio::time::timeout(OP, a.settle(&d.token, AckOp::Ack))
                .await
                .expect("ack within 10 s")
            {
                Ok(()) => {
                    done.insert(String::from_utf8_lossy(&d.payload).into_owned());
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("delivered again") || e.contains("already settled"),
                        "{e}"
                    );
                    stale_refused += 1;
                }
            }
        }
    }
    let want: BTreeSet<String> = (0..total).map(|i| i.to_string()).collect();
    assert_eq!(done, want, "every message handled at least once");
    let _ = stale_refused;
}

#[tokio::test]
async fn a_new_group_starts_where_its_deliver_policy_says() {
    let b = bus();
    b.topic("feed", 1).await;
    for i in 0..2 {
        tokio::time::timeout(
            OP,
            b.producer
                .publish("feed", &msg("feed.x", &format!("old-{i}"))),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let mut spec = group("latecomer", "feed");
    spec.start = StartPolicy::New;
    let lookup = b.offsets("latecomer");
    let placed = tokio::task::spawn_blocking({
        let spec = spec.clone();
        move || position_new_group(&lookup, &spec)
    })
    .await
    .unwrap()
    .expect("position");
    assert_eq!(placed, Some(vec![(0, 2)]));
    tokio::time::timeout(OP, b.producer.publish("feed", &msg("feed.x", "new-0")))
        .await
        .unwrap()
        .unwrap();
    let c = b.consumer(spec.clone(), ConsumerOpts::default());
    let got = fetch_n(&c, 1, T).await;
    assert_eq!(got[0].payload.as_ref(), b"new-0");
    assert!(c
        .fetch(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    // Positioning again leaves an existing group alone.
    let lookup = b.offsets("latecomer");
    let again = tokio::task::spawn_blocking(move || position_new_group(&lookup, &spec))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, None);
    // deliver_policy all: from the start.
    let all = group("everything", "feed");
    let c = b.consumer(all, ConsumerOpts::default());
    assert_eq!(fetch_n(&c, 3, T).await.len(), 3);
}

#[tokio::test]
async fn topics_are_created_adopted_and_deleted_on_a_real_broker() {
    let b = bus();
    let spec = stream("catalog", 3);
    assert_eq!(
        topic::ensure(&b.admin, &spec).await.unwrap(),
        Ensured::Created
    );
    let seen = b
        .admin
        .describe("catalog")
        .await
        .unwrap()
        .expect("topic exists");
    assert_eq!(seen.partitions, 3);
    assert_eq!(
        topic::ensure(&b.admin, &spec).await.unwrap(),
        Ensured::Unchanged,
        "adopted, no change"
    );
    let e = topic::ensure(&b.admin, &stream("catalog", 2))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot reduce them to 2"), "{e}");
    b.admin.delete("catalog").await.unwrap();
    assert_eq!(b.admin.describe("catalog").await.unwrap(), None);
    b.admin
        .delete("catalog")
        .await
        .expect("deleting a missing topic succeeds");
}

#[tokio::test]
async fn a_paused_broker_delays_a_publish_burst_without_losing_any_and_a_dead_one_fails_it_within_the_timeout(
) {
    let b = bus();
    b.topic("burst", 1).await;
    let msgs: Vec<Outgoing> = (0..30).map(|i| msg("burst.x", &i.to_string())).collect();
    // Paused (SIGSTOP) for 2 s in the middle of the burst: all stored, in order, exactly once.
    let burst = b.producer.publish_list(&msgs, 4, |_| Some("burst".into()));
    let pause = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.server.pause();
        tokio::time::sleep(Duration::from_secs(2)).await;
        b.server.resume();
    };
    let (results, ()) = tokio::time::timeout(T, async { tokio::join!(burst, pause) })
        .await
        .expect("bounded");
    let offsets: Vec<i64> = results
        .iter()
        .map(|r| r.as_ref().expect("stored").offset)
        .collect();
    assert_eq!(
        offsets,
        (0..30).collect::<Vec<i64>>(),
        "idempotent retries: no gap, no duplicate"
    );
    // Killed: every publish ends within the timeout (OP) plus slack, as an error.
    let mut b = b;
    b.server.kill9();
    let started = Instant::now();
    let results = tokio::time::timeout(
        OP * 3,
        // All five in flight at once: each is bounded by the timeout from its own send.
        b.producer
            .publish_list(&msgs[..5], 5, |_| Some("burst".into())),
    )
    .await
    .expect("bounded by the publish timeout");
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert!(
        started.elapsed() < OP + Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
