//! Client-path tests against librdkafka's in-process mock cluster (no broker binary): the
//! producer, the group consumer's settle/nak/dead-letter paths and the offsets they commit.
//! The same paths against a real Kafka-protocol broker are in `tests/kafka_bus.rs`.

use super::admin::RdOffsets;
use super::consumer::{AckOp, ConsumerOpts, DeadLetter, Delivery, KafkaGroupConsumer};
use super::group::{GroupSpec, OffsetLookup};
use super::producer::{KafkaProducer, Outgoing};
use super::KafkaSettings;
use rdkafka::mocking::MockCluster;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn group(name: &str, topic: &str) -> GroupSpec {
    GroupSpec::new(name, topic)
}

fn msg(subject: &str, payload: &str) -> Outgoing {
    Outgoing::new(subject, payload.to_string())
}

/// Fetches until `n` messages came or `within` passed.
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

struct Bus {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    settings: KafkaSettings,
    producer: KafkaProducer,
}

fn bus(topics: &[(&str, i32)]) -> Bus {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (t, p) in topics {
        cluster.create_topic(t, *p, 1).expect("mock topic");
    }
    let settings = KafkaSettings::plaintext(&cluster.bootstrap_servers());
    let producer = KafkaProducer::new(&settings, Duration::from_secs(10)).expect("producer");
    Bus {
        _cluster: cluster,
        settings,
        producer,
    }
}

impl Bus {
    fn consumer(&self, spec: GroupSpec, opts: ConsumerOpts) -> KafkaGroupConsumer {
        KafkaGroupConsumer::new(&self.settings, spec, opts, self.producer.clone())
            .expect("consumer")
    }
    fn committed(&self, group: &str, topic: &str, parts: &[i32]) -> Vec<Option<i64>> {
        RdOffsets::new(&self.settings, group, Duration::from_secs(10))
            .expect("offsets")
            .committed(topic, parts)
            .expect("committed")
    }
}

#[tokio::test]
async fn mock_publish_and_consume_round_trip_subject_key_headers_and_commit() {
    let b = bus(&[("orders", 2)]);
    let mut m = msg("orders.created", "{\"id\":1}");
    m.headers.insert(
        "traceparent".into(),
        "00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01".into(),
    );
    m.correlation_id = Some("corr-7".into());
    m.msg_id = Some("order-1".into());
    let p = b.producer.publish("orders", &m).await.unwrap();
    assert_eq!(p.topic, "orders");
    b.producer
        .publish("orders", &msg("orders.created", "2"))
        .await
        .unwrap();
    let c = b.consumer(group("g1", "orders"), ConsumerOpts::default());
    let got = fetch_n(&c, 2, T).await;
    assert_eq!(got.len(), 2);
    let first = got
        .iter()
        .find(|d| d.payload.as_ref() == b"{\"id\":1}")
        .unwrap();
    assert_eq!(first.subject, "orders.created");
    assert_eq!(
        first.key.as_deref(),
        Some(&b"orders.created"[..]),
        "subject is the default key"
    );
    assert_eq!(first.correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(first.msg_id.as_deref(), Some("order-1"));
    assert_eq!(
        first.headers.get("traceparent").map(String::as_str),
        Some("00-23c897c462a4cff9e965eec71ad7b501-549f7769e4797b1f-01")
    );
    assert_eq!(
        first.headers.len(),
        1,
        "plugin headers are not user headers: {:?}",
        first.headers
    );
    assert_eq!(first.delivery_count, 1);
    // Same subject, same key: same partition, in order.
    assert_eq!(got[0].token.partition, got[1].token.partition);
    assert!(got[0].token.offset < got[1].token.offset);
    for d in &got {
        c.settle(&d.token, AckOp::Ack).await.unwrap();
    }
    c.commit_now().unwrap();
    let part = got[0].token.partition;
    assert_eq!(
        b.committed("g1", "orders", &[part]),
        vec![Some(got[1].token.offset + 1)]
    );
    // Settling twice is refused, clearly.
    let e = c
        .settle(&got[0].token, AckOp::Ack)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already settled"), "{e}");
}

#[tokio::test]
async fn mock_out_of_order_acks_commit_only_up_to_the_lowest_unsettled() {
    let b = bus(&[("ooo", 1)]);
    for i in 0..3 {
        b.producer
            .publish("ooo", &msg("ooo.x", &i.to_string()))
            .await
            .unwrap();
    }
    let c = b.consumer(group("g", "ooo"), ConsumerOpts::default());
    let got = fetch_n(&c, 3, T).await;
    assert_eq!(got.len(), 3);
    c.settle(&got[2].token, AckOp::Ack).await.unwrap();
    c.settle(&got[1].token, AckOp::Ack).await.unwrap();
    c.commit_now().unwrap();
    assert_eq!(
        b.committed("g", "ooo", &[0]),
        vec![Some(0)],
        "offset 0 unsettled: the commit stays at 0 although 1 and 2 are acked"
    );
    c.settle(&got[0].token, AckOp::Ack).await.unwrap();
    c.commit_now().unwrap();
    assert_eq!(b.committed("g", "ooo", &[0]), vec![Some(3)]);
}

#[tokio::test]
async fn mock_filter_subject_passes_over_and_commits_other_records() {
    let b = bus(&[("mixed", 1)]);
    for s in ["a.one", "b.two", "a.three", "b.four"] {
        b.producer.publish("mixed", &msg(s, s)).await.unwrap();
    }
    let mut spec = group("only-a", "mixed");
    spec.filters = vec!["a.*".into()];
    let c = b.consumer(spec, ConsumerOpts::default());
    let got = fetch_n(&c, 2, T).await;
    let subjects: Vec<&str> = got.iter().map(|d| d.subject.as_str()).collect();
    assert_eq!(subjects, vec!["a.one", "a.three"]);
    // Let the consumer read past b.four, then settle: the commit covers the passed-over ones.
    assert!(c
        .fetch(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    for d in &got {
        c.settle(&d.token, AckOp::Ack).await.unwrap();
    }
    c.commit_now().unwrap();
    assert_eq!(b.committed("only-a", "mixed", &[0]), vec![Some(4)]);
}

#[tokio::test]
async fn mock_nak_redelivers_with_a_count_then_max_deliver_dead_letters() {
    let b = bus(&[("jobs", 1), ("jobs-dlq", 1)]);
    b.producer
        .publish("jobs", &msg("jobs.run", "payload-1"))
        .await
        .unwrap();
    let mut spec = group("workers", "jobs");
    spec.max_deliver = Some(2);
    let opts = ConsumerOpts {
        dead_letter: Some(DeadLetter {
            topic: "jobs-dlq".into(),
            subject: "dlq.jobs".into(),
        }),
    };
    let c = b.consumer(spec, opts);
    let d1 = fetch_n(&c, 1, T).await.pop().expect("first delivery");
    assert_eq!(d1.delivery_count, 1);
    c.settle(&d1.token, AckOp::Nak(Some(Duration::ZERO)))
        .await
        .unwrap();
    let d2 = fetch_n(&c, 1, T).await.pop().expect("redelivery");
    assert_eq!(
        (d2.delivery_count, d2.payload.as_ref()),
        (2, &b"payload-1"[..])
    );
    assert!(
        d2.token.offset > d1.token.offset,
        "a retry copy is appended"
    );
    assert_eq!(d2.subject, "jobs.run");
    c.settle(&d2.token, AckOp::Nak(None)).await.unwrap();
    // Out of deliveries: in the dead-letter topic, with where it came from.
    let dlq = b.consumer(group("dlq-reader", "jobs-dlq"), ConsumerOpts::default());
    let dead = fetch_n(&dlq, 1, T).await.pop().expect("dead letter");
    assert_eq!(dead.subject, "dlq.jobs");
    assert_eq!(dead.payload.as_ref(), b"payload-1");
    // The consumer of jobs has nothing left, and its offsets cover the original and the copy.
    assert!(c
        .fetch(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    c.commit_now().unwrap();
    assert_eq!(
        b.committed("workers", "jobs", &[0]),
        vec![Some(d2.token.offset + 1)]
    );
}

#[tokio::test]
async fn mock_nak_delay_holds_the_copy_until_due_and_the_count_survives_a_restart() {
    let b = bus(&[("later", 1)]);
    b.producer
        .publish("later", &msg("later.x", "p"))
        .await
        .unwrap();
    let c = b.consumer(group("g", "later"), ConsumerOpts::default());
    let d1 = fetch_n(&c, 1, T).await.pop().expect("delivery");
    let naked = Instant::now();
    c.settle(&d1.token, AckOp::Nak(Some(Duration::from_millis(1500))))
        .await
        .unwrap();
    let d2 = fetch_n(&c, 1, T).await.pop().expect("redelivery");
    assert!(
        naked.elapsed() >= Duration::from_millis(1400),
        "held until due: {:?}",
        naked.elapsed()
    );
    assert_eq!(d2.delivery_count, 2);
    // Nak again with a delay, then "restart": a new member of the group gets the copy, with
    // the count and the delay it carries.
    c.settle(&d2.token, AckOp::Nak(Some(Duration::from_millis(500))))
        .await
        .unwrap();
    c.commit_now().unwrap();
    drop(c);
    let c2 = b.consumer(group("g", "later"), ConsumerOpts::default());
    let d3 = fetch_n(&c2, 1, T).await.pop().expect("after restart");
    assert_eq!(d3.delivery_count, 3);
}

#[tokio::test]
async fn mock_ack_wait_expiry_redelivers_and_progress_extends_it() {
    let b = bus(&[("slow", 1)]);
    b.producer
        .publish("slow", &msg("slow.x", "a"))
        .await
        .unwrap();
    b.producer
        .publish("slow", &msg("slow.x", "b"))
        .await
        .unwrap();
    let mut spec = group("g", "slow");
    spec.ack_wait = Duration::from_millis(700);
    let c = b.consumer(spec, ConsumerOpts::default());
    let got = fetch_n(&c, 2, T).await;
    assert_eq!(got.len(), 2);
    // Keep "b" alive with progress; let "a" expire.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        c.settle(&got[1].token, AckOp::Progress).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = fetch_n(&c, 1, T).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].payload.as_ref(), again[0].delivery_count),
        (&b"a"[..], 2)
    );
    c.settle(&got[1].token, AckOp::Ack).await.unwrap();
    let e = c
        .settle(&got[0].token, AckOp::Ack)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already settled"),
        "the expired delivery was replaced: {e}"
    );
    c.settle(&again[0].token, AckOp::Term).await.unwrap();
}

#[tokio::test]
async fn mock_a_group_with_another_name_passes_over_retry_copies() {
    let b = bus(&[("shared", 1)]);
    b.producer
        .publish("shared", &msg("shared.x", "one"))
        .await
        .unwrap();
    let a = b.consumer(group("a", "shared"), ConsumerOpts::default());
    let d = fetch_n(&a, 1, T).await.pop().expect("delivery");
    a.settle(&d.token, AckOp::Nak(Some(Duration::ZERO)))
        .await
        .unwrap();
    // Group b sees the original once, not a's retry copy.
    let other = b.consumer(group("b", "shared"), ConsumerOpts::default());
    let seen = fetch_n(&other, 2, Duration::from_secs(8)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].delivery_count, 1);
}

/// The lag gauges for a kafka group: records past its committed offsets over every partition
/// (nothing committed: from the low watermark), and what the process holds unsettled.
#[tokio::test]
async fn mock_lag_gauges_count_records_past_the_committed_offsets() {
    let b = bus(&[("lagged", 2)]);
    for i in 0..5 {
        b.producer
            .publish("lagged", &msg(&format!("lagged.k{i}"), "x"))
            .await
            .unwrap();
    }
    let m = crate::telemetry::metrics::enable();
    crate::telemetry::lag::watch_kafka("lagbus", &b.settings, "lagged", "g-lag", || 2);
    crate::telemetry::lag::refresh_once().await;
    let text = m.encode();
    let value = |family: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(family)
                    && l.contains("broker=\"lagbus\"")
                    && l.contains("provider=\"kafka\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<i64>().ok())
    };
    assert_eq!(value("eventbus_consumer_pending{"), Some(5), "{text}");
    assert_eq!(value("eventbus_consumer_ack_pending{"), Some(2), "{text}");
    crate::telemetry::lag::forget_broker("lagbus");
}
