//! The pgchannel domain layer against a real PostgreSQL server (crates/pg-test-server).
//! Each test starts its own server so restarts and schema states never leak between tests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventbus_plugin::pg::*;
use pg_test_server::PgServer;
use tokio_util::sync::CancellationToken;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn settings(pg: &PgServer) -> PgSettings {
    let mut s = PgSettings::new("bus", pg.url());
    s.poll_interval = Duration::from_millis(100);
    s.connect_timeout = Duration::from_secs(10);
    s.max_conns = 8;
    s
}

async fn bus(pg: &PgServer) -> PgBus {
    PgBus::connect(settings(pg)).await.expect("connect")
}

fn stream(name: &str, subjects: &[&str]) -> StreamDef {
    StreamDef {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        max_age: None,
        max_msgs: None,
        max_bytes: None,
        duplicate_window: Duration::ZERO,
    }
}

fn consumer(stream: &str, name: &str) -> ConsumerDef {
    ConsumerDef {
        stream: stream.into(),
        name: name.into(),
        filter_subjects: vec![],
        deliver: DeliverFrom::All,
        ack_policy: AckPolicy::Explicit,
        max_deliver: 0,
        ack_wait: Duration::from_secs(30),
        backoff: vec![],
    }
}

fn msg(subject: &str, payload: &str) -> Outgoing {
    Outgoing {
        subject: subject.into(),
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

fn opts(batch: usize) -> FetchOpts {
    FetchOpts {
        batch,
        max_wait: Duration::ZERO,
        max_bytes: None,
        dead_letter_subject: None,
    }
}

fn ids(ds: &[Delivery]) -> Vec<i64> {
    ds.iter().map(|d| d.token.id).collect()
}

async fn setup(pg: &PgServer) -> PgBus {
    let b = bus(pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    b.ensure_consumer(&consumer("ORDERS", "worker"))
        .await
        .unwrap();
    b
}

async fn publish_n(b: &PgBus, n: usize) -> Vec<i64> {
    let msgs: Vec<Outgoing> = (0..n)
        .map(|i| msg("orders.new", &format!("m{i}")))
        .collect();
    b.publish(&msgs)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect()
}

/// Polls `f` until it returns Some, or panics after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_the_schema_once_and_reconnects_without_ddl() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    let tables = pg.psql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables \
         WHERE tablename LIKE 'eventbus_%'",
    );
    assert_eq!(
        tables,
        "eventbus_consumers,eventbus_event_deliveries,eventbus_events,eventbus_schema_version,eventbus_streams"
    );
    b.close().await;
    let b2 = bus(&pg).await;
    assert_eq!(
        pg.psql("SELECT max(version) FROM eventbus_schema_version"),
        SCHEMA_VERSION.to_string()
    );
    b2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_schema_ensure_from_four_tasks() {
    let pg = PgServer::start();
    let s = settings(&pg);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { PgBus::connect(s).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every concurrent connect succeeds");
    }
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_schema_version"),
        "2",
        "versions 1 and 2 recorded once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_reference_database_carries_over() {
    let pg = PgServer::start();
    pg.psql_file(std::path::Path::new(&format!(
        "{FIXTURES}/pgchannel-go-schema.sql"
    )));
    pg.psql_file(std::path::Path::new(&format!(
        "{FIXTURES}/pgchannel-go-rows.sql"
    )));
    let b = bus(&pg).await;
    // Upgraded in place: our columns exist, Go rows intact.
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = \
             'eventbus_event_deliveries' AND column_name IN ('state', 'due_at')"
        ),
        "2"
    );
    let s = b
        .stream("ORDERS")
        .await
        .unwrap()
        .expect("Go stream visible");
    assert_eq!(s.subjects, vec!["orders.>".to_string()]);
    let c = b
        .consumer("ORDERS", "worker")
        .await
        .unwrap()
        .expect("Go consumer");
    assert_eq!(c.filter_subjects, vec!["orders.>".to_string()]);
    assert_eq!(c.max_deliver, 5);
    // The Go position (2) holds; event 3 was handed out twice by Go: this is the third time.
    let got = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(ids(&got), vec![3, 4, 5]);
    assert_eq!(got[0].delivery_count, 3, "Go delivery count carries over");
    assert_eq!(got[1].delivery_count, 1);
    assert_eq!(got[0].correlation_id.as_deref(), Some("corr-3"));
    assert_eq!(got[0].headers.get("tenant").map(String::as_str), Some("t2"));
    assert_eq!(got[0].payload, Bytes::from_static(br#"{"n":3}"#));
    assert_eq!(got[0].token.to_string(), "ORDERS:worker:3");
    // The other Go consumer starts from its position 0 with an empty (Go) filter.
    let audit = b.fetch("ORDERS", "audit", opts(10)).await.unwrap();
    assert_eq!(ids(&audit), vec![1, 2, 3, 4, 5]);
    for d in &got {
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    // Moved by the background advancer shortly after the acks (see `settle_group`).
    eventually(
        Duration::from_secs(20),
        "position kept meaningful for the Go plugin (5)",
        || {
            let at = pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'worker'");
            async move { (at == "5").then_some(()) }
        },
    )
    .await;
    // Ours publish; the Go plugin's own statements still run against the upgraded schema.
    let p = b.publish(&[msg("orders.created", "six")]).await.unwrap();
    assert_eq!(p[0].id, 6);
    pg.psql(
        "INSERT INTO eventbus_events (stream_name, subject, headers, payload, correlation_id) \
         VALUES ('ORDERS', 'orders.created', '{}'::jsonb, '\\x00'::bytea, NULL); \
         INSERT INTO eventbus_streams (name, subjects, max_age_seconds) VALUES ('GO2', ARRAY['go2.>'], 60) \
           ON CONFLICT (name) DO UPDATE SET subjects = EXCLUDED.subjects, max_age_seconds = EXCLUDED.max_age_seconds; \
         INSERT INTO eventbus_consumers (stream_name, name, filter_subject, ack_policy, max_deliver) \
           VALUES ('ORDERS', 'worker', 'orders.>', 'explicit', 5) ON CONFLICT (stream_name, name) DO UPDATE \
           SET filter_subject = EXCLUDED.filter_subject, ack_policy = EXCLUDED.ack_policy, max_deliver = EXCLUDED.max_deliver; \
         INSERT INTO eventbus_event_deliveries (stream_name, consumer_name, event_id, delivery_count, first_delivered_at, last_delivered_at) \
           VALUES ('ORDERS', 'audit', 6, 1, NOW(), NOW()) ON CONFLICT (stream_name, consumer_name, event_id) DO UPDATE \
           SET delivery_count = eventbus_event_deliveries.delivery_count + 1, last_delivered_at = NOW();",
    );
    assert_eq!(
        pg.psql(
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM eventbus_events \
             WHERE stream_name = 'ORDERS' AND id > (SELECT position FROM eventbus_consumers \
             WHERE name = 'worker') ORDER BY 1"
        ),
        "6,7",
        "the Go poller's query sees what is left"
    );
    // The Go DDL applied again (as create-if-missing) is still accepted.
    let ddl = std::fs::read_to_string(format!("{FIXTURES}/pgchannel-go-schema.sql"))
        .unwrap()
        .replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ")
        .replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ");
    pg.psql(&ddl);
    let more = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(ids(&more), vec![6, 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fetch_ack_round_trip() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let mut m = msg("orders.eu.new", "hello");
    m.headers.insert("k".into(), "v".into());
    m.correlation_id = Some("c-1".into());
    let p = b.publish(&[m]).await.unwrap();
    assert_eq!((p[0].stream.as_str(), p[0].duplicate), ("ORDERS", false));
    let got = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.subject, "orders.eu.new");
    assert_eq!(d.payload, Bytes::from_static(b"hello"));
    assert_eq!(
        d.headers,
        BTreeMap::from([("k".to_string(), "v".to_string())])
    );
    assert_eq!(d.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(d.delivery_count, 1);
    assert_eq!(d.published_at, p[0].ts);
    let token: AckToken = d.token.to_string().parse().unwrap();
    b.ack(&token, AckOp::Ack).await.unwrap();
    assert!(b
        .fetch("ORDERS", "worker", opts(10))
        .await
        .unwrap()
        .is_empty());
    let e = b
        .publish(&[msg("nobody.home", "x")])
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "pgchannel: Publish: no stream claims subject \"nobody.home\" (publish before EnsureStream?)"
    );
    let e = b
        .ack(&"ORDERS:ghost:1".parse().unwrap(), AckOp::Ack)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "pgchannel: consumer \"ghost\" on stream \"ORDERS\" not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_id_is_deduplicated_within_the_window_only() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    let mut s = stream("ORDERS", &["orders.>"]);
    s.duplicate_window = Duration::from_millis(300);
    b.ensure_stream(&s).await.unwrap();
    let mut m = msg("orders.new", "a");
    m.msg_id = Some("id-1".into());
    let first = b.publish(&[m.clone(), m.clone()]).await.unwrap();
    assert!(!first[0].duplicate && first[1].duplicate);
    assert_eq!(first[0].id, first[1].id);
    let again = b.publish(&[m.clone()]).await.unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].id, first[0].id);
    // Outside the window the same id is a new message.
    let later = eventually(Duration::from_secs(10), "window to pass", || {
        let b = b.clone();
        let m = m.clone();
        async move {
            let p = b.publish(&[m]).await.unwrap();
            (!p[0].duplicate).then_some(p)
        }
    })
    .await;
    assert!(later[0].id > first[0].id);
    assert_eq!(pg.psql("SELECT count(*) FROM eventbus_events"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_concurrent_fetchers_never_share_a_row() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let published: BTreeSet<i64> = publish_n(&b, 200).await.into_iter().collect();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = b.fetch("ORDERS", "worker", opts(7)).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(ids(&got));
            }
        }));
    }
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for t in tasks {
        let mine = t.await.unwrap();
        total += mine.len();
        seen.extend(mine);
    }
    assert_eq!(total, 200, "no row handed out twice");
    assert_eq!(seen, published, "every row handed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_consume_dead_letters_after_max_deliver() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    b.ensure_stream(&stream("DLQ", &["dlq.orders"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "worker");
    c.max_deliver = 2;
    b.ensure_consumer(&c).await.unwrap();
    b.ensure_consumer(&consumer("DLQ", "ops")).await.unwrap();
    let mut m = msg("orders.new", "poison");
    m.correlation_id = Some("c-9".into());
    let id = b.publish(&[m]).await.unwrap()[0].id;
    let o = FetchOpts {
        dead_letter_subject: Some("dlq.orders".into()),
        ..opts(5)
    };
    for n in 1..=2 {
        let got = b.fetch("ORDERS", "worker", o.clone()).await.unwrap();
        assert_eq!(ids(&got), vec![id]);
        assert_eq!(got[0].delivery_count, n);
        b.ack(&got[0].token, AckOp::Nak(None)).await.unwrap();
    }
    assert!(
        b.fetch("ORDERS", "worker", o.clone())
            .await
            .unwrap()
            .is_empty(),
        "third delivery exceeds max_deliver 2"
    );
    let dl = b.fetch("DLQ", "ops", opts(5)).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].subject, "dlq.orders");
    assert_eq!(dl[0].payload, Bytes::from_static(b"poison"));
    assert_eq!(dl[0].correlation_id.as_deref(), Some("c-9"));
    assert_eq!(dl[0].headers["Eventbus-Original-Sequence"], id.to_string());
    assert_eq!(dl[0].headers["Eventbus-Original-Stream"], "ORDERS");
    assert_eq!(
        pg.psql(&format!(
            "SELECT state FROM eventbus_event_deliveries WHERE event_id = {id} AND consumer_name = 'worker'"
        )),
        "dead"
    );
    // Without a dead-letter subject the message is terminated all the same.
    let id2 = b.publish(&[msg("orders.new", "p2")]).await.unwrap()[0].id;
    for _ in 0..2 {
        let got = b.fetch("ORDERS", "worker", opts(5)).await.unwrap();
        assert_eq!(ids(&got), vec![id2]);
        b.ack(&got[0].token, AckOp::Nak(None)).await.unwrap();
    }
    assert!(b
        .fetch("ORDERS", "worker", opts(5))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_deliver_policy_new_skips_history() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let old = publish_n(&b, 3).await;
    let mut all = consumer("ORDERS", "all");
    all.deliver = DeliverFrom::All;
    let mut new = consumer("ORDERS", "new");
    new.deliver = DeliverFrom::New;
    let mut last = consumer("ORDERS", "last");
    last.deliver = DeliverFrom::Last;
    let mut seq = consumer("ORDERS", "seq");
    seq.deliver = DeliverFrom::BySeq(old[1]);
    for c in [&all, &new, &last, &seq] {
        assert_eq!(b.ensure_consumer(c).await.unwrap(), Ensured::Created);
        assert_eq!(b.ensure_consumer(c).await.unwrap(), Ensured::Unchanged);
    }
    let cutoff = time::OffsetDateTime::now_utc();
    let mut by_time = consumer("ORDERS", "time");
    by_time.deliver = DeliverFrom::ByTime(cutoff);
    b.ensure_consumer(&by_time).await.unwrap();
    let fresh = publish_n(&b, 1).await[0];
    let f = |n: &'static str| {
        let b = b.clone();
        async move { ids(&b.fetch("ORDERS", n, opts(10)).await.unwrap()) }
    };
    assert_eq!(f("all").await, vec![old[0], old[1], old[2], fresh]);
    assert_eq!(f("new").await, vec![fresh]);
    assert_eq!(f("last").await, vec![old[2], fresh]);
    assert_eq!(f("seq").await, vec![old[1], old[2], fresh]);
    assert_eq!(f("time").await, vec![fresh]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_ack_policy_none_settles_on_delivery() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "fire");
    c.ack_policy = AckPolicy::None;
    c.ack_wait = Duration::from_millis(50);
    b.ensure_consumer(&c).await.unwrap();
    let published = publish_n(&b, 3).await;
    assert_eq!(
        ids(&b.fetch("ORDERS", "fire", opts(10)).await.unwrap()),
        published
    );
    // Long past the lease: nothing comes back, no ack needed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b
        .fetch("ORDERS", "fire", opts(10))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'fire'"),
        published[2].to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_acks_are_per_message() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "worker");
    c.ack_wait = Duration::from_millis(300);
    b.ensure_consumer(&c).await.unwrap();
    let mut all = consumer("ORDERS", "cumulative");
    all.ack_policy = AckPolicy::All;
    all.ack_wait = Duration::from_millis(300);
    b.ensure_consumer(&all).await.unwrap();
    let p = publish_n(&b, 3).await;
    let got = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    let got_all = b.fetch("ORDERS", "cumulative", opts(10)).await.unwrap();
    // Ack only the last one.
    b.ack(&got[2].token, AckOp::Ack).await.unwrap();
    b.ack(&got_all[2].token, AckOp::Ack).await.unwrap();
    // Explicit: the first two come back after their lease; with `all` they were settled too.
    let again = eventually(Duration::from_secs(10), "lease expiry", || {
        let b = b.clone();
        async move {
            let g = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
            (!g.is_empty()).then_some(g)
        }
    })
    .await;
    assert_eq!(ids(&again), vec![p[0], p[1]]);
    assert!(again.iter().all(|d| d.delivery_count == 2));
    assert!(b
        .fetch("ORDERS", "cumulative", opts(10))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'worker'"),
        "0",
        "the position stays below the first unacked message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_failing_message_does_not_block_others() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let p = publish_n(&b, 3).await;
    let first = b.fetch("ORDERS", "worker", opts(1)).await.unwrap();
    assert_eq!(ids(&first), vec![p[0]]);
    b.ack(&first[0].token, AckOp::Nak(Some(Duration::from_secs(3600))))
        .await
        .unwrap();
    let rest = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(
        ids(&rest),
        vec![p[1], p[2]],
        "the failing message waits, the others flow"
    );
    // A nak without delay redelivers at once; term never again.
    b.ack(&rest[0].token, AckOp::Nak(None)).await.unwrap();
    b.ack(&rest[1].token, AckOp::Term).await.unwrap();
    let again = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(ids(&again), vec![p[1]]);
    assert_eq!(again[0].delivery_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_extends_the_lease() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "worker");
    c.ack_wait = Duration::from_millis(400);
    b.ensure_consumer(&c).await.unwrap();
    publish_n(&b, 1).await;
    let got = b.fetch("ORDERS", "worker", opts(1)).await.unwrap();
    let due = |pg: &PgServer| {
        pg.psql("SELECT (extract(epoch from due_at) * 1000)::int8 FROM eventbus_event_deliveries")
            .parse::<i64>()
            .unwrap()
    };
    let before = due(&pg);
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.ack(&got[0].token, AckOp::Progress).await.unwrap();
    assert!(due(&pg) > before, "the lease end moved forward");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_max_age_prunes() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    let mut s = stream("ORDERS", &["orders.>"]);
    s.max_age = Some(Duration::from_secs(60));
    b.ensure_stream(&s).await.unwrap();
    b.ensure_consumer(&consumer("ORDERS", "worker"))
        .await
        .unwrap();
    publish_n(&b, 5).await;
    b.fetch("ORDERS", "worker", opts(2)).await.unwrap();
    pg.psql("UPDATE eventbus_events SET ts = now() - interval '2 minutes' WHERE id <= 3");
    let r = b.prune_once().await.unwrap();
    assert_eq!(r.events, 3);
    assert_eq!(
        pg.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM eventbus_events"),
        "4,5"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_event_deliveries"),
        "0",
        "cascade"
    );
    assert_eq!(b.prune_once().await.unwrap().events, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_max_msgs_and_max_bytes_prune() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    let mut s = stream("ORDERS", &["orders.>"]);
    s.max_msgs = Some(4);
    b.ensure_stream(&s).await.unwrap();
    let mut s2 = stream("BLOBS", &["blobs.>"]);
    s2.max_bytes = Some(25);
    b.ensure_stream(&s2).await.unwrap();
    let p = publish_n(&b, 10).await;
    let blobs: Vec<Outgoing> = (0..5).map(|_| msg("blobs.x", "0123456789")).collect();
    let pb: Vec<i64> = b
        .publish(&blobs)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    let r = b.prune_once().await.unwrap();
    assert_eq!(r.events, 6 + 3);
    assert_eq!(
        pg.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM eventbus_events WHERE stream_name = 'ORDERS'"),
        p[6..].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    assert_eq!(
        pg.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM eventbus_events WHERE stream_name = 'BLOBS'"),
        format!("{},{}", pb[3], pb[4]),
        "20 bytes kept of a 25-byte budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_delivery_rows_cleaned_up() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    publish_n(&b, 5).await;
    let got = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    for d in &got[..4] {
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    let r = b.prune_once().await.unwrap();
    assert_eq!(
        r.deliveries, 4,
        "settled rows below the position are removed"
    );
    assert_eq!(
        pg.psql("SELECT event_id FROM eventbus_event_deliveries"),
        got[4].token.id.to_string(),
        "the unacked delivery stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_star_filter_refused() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "w");
    c.filter_subjects = vec!["orders.*".into()];
    let e = b.ensure_consumer(&c).await.unwrap_err().to_string();
    assert!(
        e.contains("orders.*") && e.contains("not supported") && e.contains("\"w\""),
        "{e}"
    );
    assert!(b.consumer("ORDERS", "w").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_like_prefix_escaped() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("S", &[">"])).await.unwrap();
    let mut c = consumer("S", "w");
    c.filter_subjects = vec!["a_b.>, x%y.>".into()];
    b.ensure_consumer(&c).await.unwrap();
    let p = b
        .publish(&[
            msg("a_b.1", "match"),
            msg("aXb.2", "underscore must not be a wildcard"),
            msg("x%y.3", "match"),
            msg("xzzy.4", "percent must not be a wildcard"),
        ])
        .await
        .unwrap();
    let got = b.fetch("S", "w", opts(10)).await.unwrap();
    assert_eq!(ids(&got), vec![p[0].id, p[2].id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_invalid_poll_interval_is_an_error() {
    let pg = PgServer::start();
    let e = PgSettings::new("bus", pg.url())
        .with_poll_interval_str("often")
        .unwrap_err()
        .to_string();
    assert!(e.contains("poll_interval") && e.contains("often"), "{e}");
    let mut s = settings(&pg);
    s.poll_interval = Duration::ZERO;
    let e = PgBus::connect(s).await.unwrap_err().to_string();
    assert!(e.contains("poll_interval"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_names_and_subjects_are_validated() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    let e = b
        .ensure_stream(&stream("BMW-Fulfillment", &["x.>"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("BMW-Fulfillment") && e.contains("letters, digits and _"),
        "{e}"
    );
    assert!(b.ensure_stream(&stream("S", &[])).await.is_err());
    assert_eq!(
        b.ensure_stream(&stream("S", &["s.>"])).await.unwrap(),
        Ensured::Created
    );
    assert_eq!(
        b.ensure_stream(&stream("S", &["s.>"])).await.unwrap(),
        Ensured::Unchanged
    );
    assert_eq!(
        b.ensure_stream(&stream("S", &["s.>", "t"])).await.unwrap(),
        Ensured::Updated
    );
    assert!(b.publish(&[msg("s.*", "x")]).await.is_err());
    let e = b
        .ensure_consumer(&consumer("NOPE", "w"))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(e, "pgchannel: stream \"NOPE\" not found");
    assert!(b.delete_stream("S").await.unwrap());
    assert!(!b.delete_stream("S").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_wait_is_woken_by_notify_not_by_polling() {
    let pg = PgServer::start();
    let mut s = settings(&pg);
    // A poll interval far longer than the test: only a NOTIFY can end the wait early.
    s.poll_interval = Duration::from_secs(60);
    let b = PgBus::connect(s).await.unwrap();
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    b.ensure_consumer(&consumer("ORDERS", "worker"))
        .await
        .unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        b2.fetch(
            "ORDERS",
            "worker",
            FetchOpts {
                max_wait: Duration::from_secs(30),
                ..opts(5)
            },
        )
        .await
    });
    // Publish once the waiter is listening (its LISTEN shows in pg_stat_activity).
    eventually(Duration::from_secs(10), "LISTEN connection", || async {
        (pg.psql("SELECT count(*) FROM pg_listening_channels()") == "0").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let id = publish_n(&b, 1).await[0];
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(ids(&got), vec![id]);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_one_holder_and_takeover() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let b2 = bus(&pg).await; // another "process"
    let mut first = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let second = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            b2.subscribe(
                "ORDERS",
                "worker",
                SubOpts {
                    cancel,
                    ..Default::default()
                },
            )
            .await
        }
    });
    let p = publish_n(&b, 2).await;
    let got = first.next_batch(10).await.unwrap();
    assert_eq!(ids(&got), p);
    for d in &got {
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    assert!(
        !second.is_finished(),
        "the second subscriber waits for the lock"
    );
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("takeover")
        .unwrap()
        .unwrap();
    let p2 = publish_n(&b, 1).await;
    assert_eq!(ids(&second.next_batch(10).await.unwrap()), p2);
    cancel.cancel();
    assert!(
        second.next_batch(10).await.unwrap().is_empty(),
        "cancel ends the wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_waiting_for_the_lock_can_be_cancelled() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let _holder = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let b2 = b.clone();
    let c2 = cancel.clone();
    let waiting = tokio::spawn(async move {
        b2.subscribe(
            "ORDERS",
            "worker",
            SubOpts {
                cancel: c2,
                ..Default::default()
            },
        )
        .await
    });
    cancel.cancel();
    let e = waiting.await.unwrap().unwrap_err();
    assert!(matches!(e, PgError::Cancelled(_)), "{e}");
    let e = b
        .subscribe("ORDERS", "ghost", SubOpts::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("ghost") && e.contains("not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived_by_publish_and_subscribe() {
    let mut pg = PgServer::start();
    let b = setup(&pg).await;
    let mut sub = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let p = publish_n(&b, 1).await;
    let got = sub.next_batch(10).await.unwrap();
    assert_eq!(ids(&got), p);
    b.ack(&got[0].token, AckOp::Ack).await.unwrap();
    pg.restart();
    // The pooled connections died with the server: publish retries on fresh ones.
    let p2 = publish_n(&b, 1).await;
    // The subscription's lock connection died: Err, then subscribing again works.
    let e = sub.next_batch(10).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    drop(sub);
    let mut sub = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    assert_eq!(ids(&sub.next_batch(10).await.unwrap()), p2);
    // And after a kill -9.
    pg.kill9();
    pg.start_again();
    let p3 = publish_n(&b, 1).await;
    assert!(sub.next_batch(10).await.is_err());
    drop(sub);
    let mut sub = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let got = sub.next_batch(10).await.unwrap();
    assert!(ids(&got).contains(&p3[0]), "{:?}", ids(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows_in_errors_or_the_redacted_dsn() {
    let pg = PgServer::builder().password("hunter2-secret").start();
    let good = PgSettings::new("bus", pg.url());
    assert!(!good.redacted_dsn().contains("hunter2"));
    assert!(good.redacted_dsn().contains("***"));
    let b = PgBus::connect(good).await.expect("scram login works");
    assert!(!b.redacted_dsn().contains("hunter2"));
    let mut bad = PgSettings::new("bus", pg.url().replace("hunter2-secret", "wrong-pass-xyz"));
    bad.connect_timeout = Duration::from_secs(2);
    let e = PgBus::connect(bad).await.unwrap_err().to_string();
    assert!(!e.contains("wrong-pass-xyz"), "{e}");
    assert!(
        e.contains("password") || e.contains("authentication"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_its_dead_fetcher_and_the_message_returns() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "worker");
    c.ack_wait = Duration::from_millis(300);
    b.ensure_consumer(&c).await.unwrap();
    let p = publish_n(&b, 2).await;
    // A "process" leases both and dies without settling anything.
    let doomed = bus(&pg).await;
    assert_eq!(
        ids(&doomed.fetch("ORDERS", "worker", opts(10)).await.unwrap()),
        p
    );
    doomed.close().await;
    drop(doomed);
    assert!(
        b.fetch("ORDERS", "worker", opts(10))
            .await
            .unwrap()
            .is_empty(),
        "still leased"
    );
    let back = eventually(Duration::from_secs(10), "lease expiry", || {
        let b = b.clone();
        async move {
            let g = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
            (!g.is_empty()).then_some(g)
        }
    })
    .await;
    assert_eq!(ids(&back), p);
    assert!(back.iter().all(|d| d.delivery_count == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_sets_the_lease_of_each_redelivery() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "worker");
    c.backoff = vec![Duration::from_millis(50), Duration::from_secs(3600)];
    b.ensure_consumer(&c).await.unwrap();
    assert_eq!(
        b.consumer("ORDERS", "worker")
            .await
            .unwrap()
            .unwrap()
            .backoff,
        c.backoff
    );
    publish_n(&b, 1).await;
    assert_eq!(b.fetch("ORDERS", "worker", opts(1)).await.unwrap().len(), 1);
    // First lease 50 ms: back soon. Second lease one hour: not back.
    let again = eventually(Duration::from_secs(10), "first lease expiry", || {
        let b = b.clone();
        async move {
            let g = b.fetch("ORDERS", "worker", opts(1)).await.unwrap();
            (!g.is_empty()).then_some(g)
        }
    })
    .await;
    assert_eq!(again[0].delivery_count, 2);
    let secs: i64 = pg
        .psql("SELECT extract(epoch from due_at - now())::int8 FROM eventbus_event_deliveries")
        .parse()
        .unwrap();
    assert!(secs > 3000, "second lease from backoff[1]: {secs}s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_lock_is_an_error_and_resubscribing_works() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let mut sub = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let key = consumer_lock_key("ORDERS", "worker");
    // The Go key: the bigint lock shows as classid = high half, objid = low half.
    let held = pg.psql(&format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
         AND classid::int8 = {} AND objid::int8 = {}",
        (key as u64) >> 32,
        (key as u64) & 0xffff_ffff
    ));
    assert_eq!(held, "1", "the subscriber holds the Go plugin's lock key");
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1",
    );
    let e = tokio::time::timeout(Duration::from_secs(20), sub.next_batch(10))
        .await
        .expect("the loss is noticed")
        .unwrap_err();
    assert!(matches!(e, PgError::Lost { .. }) || e.is_transient(), "{e}");
    drop(sub);
    let mut sub = b
        .subscribe("ORDERS", "worker", SubOpts::default())
        .await
        .unwrap();
    let p = publish_n(&b, 1).await;
    assert_eq!(ids(&sub.next_batch(10).await.unwrap()), p);
}

/// One position advance looks at a bounded window of events (so an ack costs the same however
/// long the stream is); a filtered consumer behind a long run of other subjects still gets its
/// position to the first unacked match, then to the end once that is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_crosses_long_runs_in_bounded_steps() {
    let pg = PgServer::start();
    let b = bus(&pg).await;
    b.ensure_stream(&stream("ORDERS", &["orders.>"]))
        .await
        .unwrap();
    let mut c = consumer("ORDERS", "picky");
    c.filter_subjects = vec!["orders.picky".into()];
    b.ensure_consumer(&c).await.unwrap();
    let noise: Vec<Outgoing> = (0..4_500)
        .map(|i| msg("orders.other", &format!("n{i}")))
        .collect();
    for chunk in noise.chunks(500) {
        b.publish(chunk).await.unwrap();
    }
    let p: Vec<i64> = b
        .publish(&[msg("orders.picky", "a"), msg("orders.picky", "b")])
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    let got = b.fetch("ORDERS", "picky", opts(10)).await.unwrap();
    assert_eq!(ids(&got), p);
    let position = |pg: &PgServer| {
        pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'picky'")
            .trim()
            .parse::<i64>()
            .unwrap_or(-1)
    };
    b.ack(&got[1].token, AckOp::Ack).await.unwrap();
    let below_first = p[0] - 1;
    eventually(
        Duration::from_secs(20),
        "position below the unacked",
        || {
            let at = position(&pg);
            async move { (at == below_first).then_some(()) }
        },
    )
    .await;
    b.ack(&got[0].token, AckOp::Ack).await.unwrap();
    let end = p[1];
    eventually(Duration::from_secs(20), "position at the end", || {
        let at = position(&pg);
        async move { (at == end).then_some(()) }
    })
    .await;
}

/// Issue 19 finding 2: a generated password with `/`, `?`, `#` or `:` not percent-encoded
/// connects (tokio-postgres ends the userinfo at the first `@`), and every masking missed it:
/// the INFO lines, the IaC `dsn` output and plan diffs all show `redacted_dsn`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencoded_password_with_reserved_characters_connects_and_never_shows() {
    let frags = ["Kq7", "Zx9", "Wv3", "Pm5", "Ty8"];
    let pw = "Kq7/Zx9?Wv3#Pm5:Ty8";
    let pg = PgServer::builder().password(pw).start();
    assert!(pg.url().contains(pw), "the test dsn is unencoded");
    let s = PgSettings::new("bus", pg.url());
    let shown = s.redacted_dsn();
    assert!(frags.iter().all(|f| !shown.contains(f)), "{shown}");
    assert!(shown.contains("127.0.0.1"), "{shown}");
    let b = tokio::time::timeout(Duration::from_secs(30), PgBus::connect(s))
        .await
        .expect("connect in time")
        .expect("the unencoded password logs in");
    let shown = b.redacted_dsn();
    assert!(frags.iter().all(|f| !shown.contains(f)), "{shown}");
    assert!(!format!("{b:?}").contains("Zx9"));
}

/// Issue 19, finding 4: a token of a consumer that never received the message (`S:B:<id>`
/// while only A consumed it) settles nothing and is an error, for every ack kind, single and
/// bulk; B still gets every message. A token of an id the stream does not hold is an error too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_settles_only_a_delivery_the_consumer_holds() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    b.ensure_consumer(&consumer("ORDERS", "other"))
        .await
        .unwrap();
    let p = publish_n(&b, 3).await;
    let got = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(ids(&got), p);
    let forged = |id: i64| AckToken {
        stream: "ORDERS".into(),
        consumer: "other".into(),
        id,
    };
    for op in [AckOp::Ack, AckOp::Term, AckOp::Nak(None), AckOp::Progress] {
        let e = b.ack(&forged(p[0]), op).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "pgchannel: Ack: message {} of stream \"ORDERS\" was not delivered to consumer \"other\"; nothing settled",
                p[0]
            ),
            "{op:?}"
        );
    }
    let bulk: Vec<AckToken> = p.iter().map(|id| forged(*id)).collect();
    let r = b.settle_many(&bulk, AckOp::Ack).await;
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.is_err()), "{r:?}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM eventbus_event_deliveries WHERE consumer_name = 'other'"),
        "0",
        "nothing written for the consumer that never received them"
    );
    let e = b.ack(&forged(p[2] + 1000), AckOp::Ack).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "pgchannel: Ack: stream \"ORDERS\" has no message {} (never published, or removed by retention)",
            p[2] + 1000
        )
    );
    let theirs = b.fetch("ORDERS", "other", opts(10)).await.unwrap();
    assert_eq!(
        ids(&theirs),
        p,
        "the other consumer still gets every message"
    );
    // The holder's acks work, and acking again (a retry) is not an error, also once the row
    // is pruned below the position.
    for d in &got {
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    b.ack(&got[0].token, AckOp::Ack).await.unwrap();
    b.prune_once().await.unwrap();
    b.ack(&got[0].token, AckOp::Term).await.unwrap();
}

/// A bulk settle is one statement per consumer, and each token gets its own outcome: held ones
/// settle, the others fail alone, duplicates and other consumers' groups are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_many_reports_each_token() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    b.ensure_consumer(&consumer("ORDERS", "other"))
        .await
        .unwrap();
    let p = publish_n(&b, 4).await;
    let mine = b.fetch("ORDERS", "worker", opts(3)).await.unwrap();
    let theirs = b.fetch("ORDERS", "other", opts(1)).await.unwrap();
    let tok = |c: &str, id: i64| AckToken {
        stream: "ORDERS".into(),
        consumer: c.into(),
        id,
    };
    let tokens = vec![
        mine[0].token.clone(),
        tok("worker", p[3]), // published, not handed out yet
        mine[1].token.clone(),
        theirs[0].token.clone(),
        mine[0].token.clone(),
        tok("ghost", p[0]),
        mine[2].token.clone(),
    ];
    let r = b.settle_many(&tokens, AckOp::Ack).await;
    let ok: Vec<bool> = r.iter().map(Result::is_ok).collect();
    assert_eq!(
        ok,
        vec![true, false, true, true, true, false, true],
        "{r:?}"
    );
    assert!(matches!(r[1], Err(PgError::NotDelivered { .. })), "{r:?}");
    assert!(
        matches!(r[5], Err(PgError::ConsumerNotFound { .. })),
        "{r:?}"
    );
    let next = b.fetch("ORDERS", "worker", opts(10)).await.unwrap();
    assert_eq!(ids(&next), vec![p[3]], "the unheld token settled nothing");
    // The position moves just after the ack answers (see `settle_group`).
    let want = p[2].to_string();
    eventually(
        Duration::from_secs(20),
        "position after the settles",
        || {
            let at = pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'worker'");
            let ok = at == want;
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// Issue 20: four fetchers of one consumer, each fetching and bulk-acking in a loop, share the
/// work: every message once, none twice, and more than one of them gets rows (they skip the
/// rows another is claiming instead of queueing behind it). The speed against one fetcher is a
/// bench figure (`pg_consume_bulk_ack_steps_b100_c4_rate`), not asserted on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_fetchers_share_one_consumer_without_overlap() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let mut published = BTreeSet::new();
    for _ in 0..4 {
        published.extend(publish_n(&b, 250).await);
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut batches = 0;
            loop {
                let got = tokio::time::timeout(
                    Duration::from_secs(30),
                    b.fetch("ORDERS", "worker", opts(20)),
                )
                .await
                .expect("fetch in time")
                .unwrap();
                if got.is_empty() {
                    return (mine, batches);
                }
                batches += 1;
                let tokens: Vec<AckToken> = got.iter().map(|d| d.token.clone()).collect();
                for r in b.settle_many(&tokens, AckOp::Ack).await {
                    r.unwrap();
                }
                mine.extend(ids(&got));
            }
        }));
    }
    let mut seen = BTreeSet::new();
    let mut total = 0;
    let mut busy = 0;
    for t in tasks {
        let (mine, batches) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("fetchers finish")
            .unwrap();
        total += mine.len();
        busy += usize::from(batches > 0);
        seen.extend(mine);
    }
    assert_eq!(total, 1000, "no message handed out twice");
    assert_eq!(seen, published, "every message handed out");
    assert!(
        busy >= 2,
        "the fetchers shared the work ({busy} of 4 got rows)"
    );
    assert!(b
        .fetch("ORDERS", "worker", opts(10))
        .await
        .unwrap()
        .is_empty());
}

/// Issue 20: competing subscribers (no consumer lock) on one consumer subscribe at once (an
/// exclusive one waits for the lock), work side by side, and no message reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_subscribers_share_one_consumer() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let published: BTreeSet<i64> = publish_n(&b, 300).await.into_iter().collect();
    let cancel = CancellationToken::new();
    let o = || SubOpts {
        dead_letter_subject: None,
        cancel: cancel.clone(),
    };
    let mut subs = Vec::new();
    for _ in 0..2 {
        subs.push(
            tokio::time::timeout(
                Duration::from_secs(10),
                b.subscribe_competing("ORDERS", "worker", o()),
            )
            .await
            .expect("no lock to wait for")
            .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for mut sub in subs {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got =
                    match tokio::time::timeout(Duration::from_secs(2), sub.next_batch(10)).await {
                        Ok(r) => r.unwrap(),
                        // Nothing left for a while: done.
                        Err(_) => return mine,
                    };
                let tokens: Vec<AckToken> = got.iter().map(|d| d.token.clone()).collect();
                for r in b.settle_many(&tokens, AckOp::Ack).await {
                    r.unwrap();
                }
                mine.extend(ids(&got));
            }
        }));
    }
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for t in tasks {
        let mine = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("subscribers finish")
            .unwrap();
        total += mine.len();
        seen.extend(mine);
    }
    cancel.cancel();
    assert_eq!(total, 300, "no message delivered twice");
    assert_eq!(seen, published);
}

/// The trigger's settle coalescer: many concurrent callers, each awaiting its own token's
/// result (a forged token fails alone), every held message settled once all have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_coalesces_concurrent_acks_with_exact_results() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    publish_n(&b, 200).await;
    let got = b.fetch("ORDERS", "worker", opts(200)).await.unwrap();
    assert_eq!(got.len(), 200);
    let settler = b.settler();
    let mut tasks = Vec::new();
    for d in &got {
        let s = settler.clone();
        let t = d.token.clone();
        tasks.push(tokio::spawn(async move { s.settle(&t, AckOp::Ack).await }));
    }
    let forged = AckToken {
        stream: "ORDERS".into(),
        consumer: "worker".into(),
        id: got[199].token.id + 1000,
    };
    let e = tokio::time::timeout(Duration::from_secs(30), settler.settle(&forged, AckOp::Ack))
        .await
        .expect("answered")
        .unwrap_err();
    assert!(matches!(e, PgError::NoMessage { .. }), "{e}");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
    }
    // The position moves just after the acks answer (see `settle_group`).
    let want = got[199].token.id.to_string();
    eventually(
        Duration::from_secs(20),
        "position past every settled message",
        || {
            let at = pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'worker'");
            let ok = at == want;
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert!(b
        .fetch("ORDERS", "worker", opts(10))
        .await
        .unwrap()
        .is_empty());
}

/// The publish coalescer: many concurrent single publishes share statements, each caller gets
/// its own message's id, and a message no stream owns fails alone (its batch is published
/// again one by one) without losing or duplicating the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_coalesces_concurrent_publishes_with_exact_results() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let publisher = b.publisher();
    let round = |n: usize, bad: Option<usize>| {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let p = publisher.clone();
                let subject = if Some(i) == bad {
                    "nowhere.at.all"
                } else {
                    "orders.new"
                };
                let m = msg(subject, &format!("r{n}-m{i}"));
                tokio::spawn(async move { p.publish(m).await })
            })
            .collect();
        async move {
            let mut ids = BTreeSet::new();
            for (i, t) in tasks.into_iter().enumerate() {
                let r = tokio::time::timeout(Duration::from_secs(30), t)
                    .await
                    .expect("answered")
                    .unwrap();
                if Some(i) == bad {
                    assert!(r.is_err(), "a subject no stream owns: {r:?}");
                } else {
                    assert!(ids.insert(r.unwrap().id), "each message its own id");
                }
            }
            ids.len()
        }
    };
    assert_eq!(round(200, None).await, 200);
    // Shared transactions: rows stored by one statement carry one xmin.
    let transactions: usize = pg
        .psql("SELECT count(DISTINCT xmin::text) FROM eventbus_events")
        .trim()
        .parse()
        .unwrap();
    assert!(
        transactions < 100,
        "{transactions} transactions for 200 publishes"
    );
    assert_eq!(round(50, Some(7)).await, 49);
    for q in [
        "SELECT count(*) FROM eventbus_events",
        "SELECT count(DISTINCT encode(payload, 'escape')) FROM eventbus_events",
    ] {
        assert_eq!(pg.psql(q), "249", "every other message stored once: {q}");
    }
}

/// The fixed per-ack wait: on a fresh schema (no statistics, as every new deployment and `make
/// bench` start) the position move and the claim were planned as a join over every delivery
/// row of the consumer, so each ack read O(window x delivery rows) buffers. Buffers, unlike
/// time, do not depend on the machine's load: each ack's statements must read about as many
/// pages with 2,000 delivery rows as the claim of a batch does per row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_and_claim_work_does_not_grow_with_the_delivery_rows() {
    let pg = PgServer::builder()
        .setting("shared_preload_libraries", "pg_stat_statements")
        .setting("pg_stat_statements.track", "all")
        .setting("pg_stat_statements.track_planning", "on")
        .start();
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    let b = setup(&pg).await;
    publish_n(&b, 2_100).await;
    let mut held = Vec::new();
    while held.len() < 2_000 {
        let got = b.fetch("ORDERS", "worker", opts(100)).await.unwrap();
        assert!(!got.is_empty(), "ran dry at {}", held.len());
        held.extend(got);
    }
    pg.psql("SELECT pg_stat_statements_reset()");
    for d in &held[..400] {
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    let got = b.fetch("ORDERS", "worker", opts(100)).await.unwrap();
    assert_eq!(got.len(), 100);
    let per_call = |pattern: &str| -> f64 {
        pg.psql(&format!(
            "SELECT COALESCE(max(shared_blks_hit::float8 / calls), 0) FROM pg_stat_statements \
             WHERE query LIKE '{pattern}'"
        ))
        .trim()
        .parse()
        .unwrap()
    };
    // The position moves in the background, once per interval over everything settled since:
    // its pages are counted per settled message.
    let advance: f64 = pg
        .psql(
            "SELECT COALESCE(sum(shared_blks_hit), 0)::float8 / 400 FROM pg_stat_statements \
             WHERE query LIKE '%UPDATE eventbus_consumers c SET position%'",
        )
        .trim()
        .parse()
        .unwrap();
    let settle = per_call("UPDATE eventbus_event_deliveries d SET state%");
    let claim = per_call("%INSERT INTO eventbus_event_deliveries%ON CONFLICT%");
    // Before: the position move read ~28,000 pages per ack here (17 after), growing with the
    // consumer's delivery rows. The claim walks the 1,800 leased rows above the position once.
    assert!(
        advance < 100.0,
        "position move read {advance} buffers per ack"
    );
    // The settle probes its ids (~10 pages); before, it read every delivery row of the
    // consumer twice (~60 pages here, 800 with 25,000 rows).
    assert!(settle < 30.0, "settle read {settle} buffers per ack");
    // Planned once per connection, not per call: each custom plan of the settle used to be
    // cheaper on paper than the generic one, so every call planned it again (0.16 ms).
    let plans: Vec<i64> = pg
        .psql(
            "SELECT plans || ' ' || calls FROM pg_stat_statements \
             WHERE query LIKE 'UPDATE eventbus_event_deliveries d SET state%'",
        )
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        plans.len() == 2 && plans[1] >= 400 && plans[0] * 3 < plans[1],
        "settle plans and calls: {plans:?}"
    );
    assert!(claim < 4_000.0, "claim of 100 read {claim} buffers");
    // A bulk ack of 100: one statement, about as many pages per token as a single ack.
    pg.psql("SELECT pg_stat_statements_reset()");
    let tokens: Vec<AckToken> = held[400..500].iter().map(|d| d.token.clone()).collect();
    for r in b.settle_many(&tokens, AckOp::Ack).await {
        r.unwrap();
    }
    let bulk = per_call("WITH t AS (SELECT DISTINCT%");
    assert!(bulk < 3_000.0, "bulk settle of 100 read {bulk} buffers");
    // The general settle keeps its generic plan too (its ids behind an InitPlan): each custom
    // plan used to look cheaper than the generic one, so every call planned it again.
    for chunk in held[500..1_000].chunks(5) {
        let tokens: Vec<AckToken> = chunk.iter().map(|d| d.token.clone()).collect();
        for r in b.settle_many(&tokens, AckOp::Ack).await {
            r.unwrap();
        }
    }
    let plans: Vec<i64> = pg
        .psql(
            "SELECT plans || ' ' || calls FROM pg_stat_statements \
             WHERE query LIKE 'WITH t AS (SELECT DISTINCT%'",
        )
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        plans.len() == 2 && plans[1] >= 100 && plans[0] * 3 < plans[1],
        "bulk settle plans and calls: {plans:?}"
    );
}

/// A competing subscriber leasing ahead hands out what was asked, keeps the rest in hand, and
/// gives the rest back when dropped: deliverable at once (not after ack_wait), the lease not
/// counted as a delivery; what it handed out stays leased to its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_leased_ahead_come_back_uncounted_when_the_subscriber_goes() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let published = publish_n(&b, 50).await;
    let cancel = CancellationToken::new();
    let mut sub = tokio::time::timeout(
        Duration::from_secs(10),
        b.subscribe_competing(
            "ORDERS",
            "worker",
            SubOpts {
                dead_letter_subject: None,
                cancel: cancel.clone(),
            },
        ),
    )
    .await
    .expect("no lock to wait for")
    .unwrap()
    .lease_ahead(40);
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(5))
        .await
        .expect("rows are ready")
        .unwrap();
    assert_eq!(ids(&first), published[..5]);
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(5))
        .await
        .expect("rows in hand")
        .unwrap();
    assert_eq!(ids(&second), published[5..10]);
    drop(sub);
    // The 30 s lease of the rows in hand is cut short; the 10 handed out stay leased.
    let mut all: Vec<Delivery> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while all.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "rows in hand not given back: {:?}",
            ids(&all)
        );
        let got = b.fetch("ORDERS", "worker", opts(100)).await.unwrap();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        all.extend(got);
    }
    all.sort_by_key(|d| d.token.id);
    assert_eq!(ids(&all), published[10..]);
    assert!(
        all.iter().all(|d| d.delivery_count == 1),
        "a row leased ahead and given back is not a delivery"
    );
    cancel.cancel();
}

/// An ordered subscriber claims the next row while the caller works on the one it holds; a
/// nak of the held one (redeliverable at once) still comes back before the row claimed ahead,
/// which goes back uncounted. Ids stay in order throughout.
#[tokio::test]
async fn an_ordered_subscriber_claims_ahead_but_a_nak_still_comes_first() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let p = publish_n(&b, 3).await;
    let cancel = CancellationToken::new();
    let mut sub = ordered_sub(&b, &cancel).await;
    let first = next_one(&mut sub).await;
    assert_eq!(ids(&first), vec![p[0]]);
    // Wait until the row behind it is claimed ahead, then nak the held one.
    let q = format!(
        "SELECT count(*) FROM eventbus_event_deliveries WHERE consumer_name = 'worker' AND event_id = {}",
        p[1]
    );
    eventually(
        Duration::from_secs(10),
        "the next row claimed ahead",
        || {
            let n = pg.psql(&q);
            async move { (n == "1").then_some(()) }
        },
    )
    .await;
    b.ack(&first[0].token, AckOp::Nak(None)).await.unwrap();
    let again = next_one(&mut sub).await;
    assert_eq!(ids(&again), vec![p[0]], "the nak'd message comes first");
    assert_eq!(again[0].delivery_count, 2);
    b.ack(&again[0].token, AckOp::Ack).await.unwrap();
    let second = next_one(&mut sub).await;
    assert_eq!(ids(&second), vec![p[1]]);
    assert_eq!(
        second[0].delivery_count, 1,
        "a row claimed ahead and given back is not a delivery"
    );
    b.ack(&second[0].token, AckOp::Ack).await.unwrap();
    let third = next_one(&mut sub).await;
    assert_eq!(
        ids(&third),
        vec![p[2]],
        "handed out from the claim made ahead"
    );
    assert_eq!(third[0].delivery_count, 1);
    drop(sub);
    cancel.cancel();
}

/// Once the caller's pace is known, an ordered subscriber claims several rows ahead (one
/// claim per many messages), yet ids still come in order, a nak still comes back before every
/// row claimed behind it, and those rows go back uncounted.
#[tokio::test]
async fn an_ordered_subscriber_claims_several_ahead_and_keeps_order_across_a_nak() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let p = publish_n(&b, 40).await;
    let cancel = CancellationToken::new();
    let mut sub = ordered_sub(&b, &cancel).await;
    let held = "SELECT count(*) FROM eventbus_event_deliveries \
                WHERE consumer_name = 'worker' AND state IS NULL";
    let mut seen = Vec::new();
    let mut most_held = 0;
    let mut nakked = false;
    while seen.len() < p.len() {
        let got = next_one(&mut sub).await;
        assert_eq!(got.len(), 1);
        let d = &got[0];
        if seen.len() == 12 && !nakked {
            // Rows behind this one are claimed by now (the claim began when it was handed out).
            eventually(Duration::from_secs(10), "rows claimed ahead", || {
                let n: i64 = pg.psql(held).trim().parse().unwrap();
                async move { (n > 2).then_some(()) }
            })
            .await;
            b.ack(&d.token, AckOp::Nak(None)).await.unwrap();
            nakked = true;
            continue;
        }
        let expect_count = if seen.len() == 12 { 2 } else { 1 };
        assert_eq!(
            d.delivery_count,
            expect_count,
            "message {} (a row given back is not a delivery)",
            seen.len()
        );
        most_held = most_held.max(pg.psql(held).trim().parse::<i64>().unwrap());
        seen.push(d.token.id);
        b.ack(&d.token, AckOp::Ack).await.unwrap();
    }
    assert_eq!(
        seen, p,
        "every id once, in order, the nak'd one before those behind it"
    );
    assert!(
        most_held > 2,
        "never more than {most_held} rows held: no claim ran ahead"
    );
    drop(sub);
    cancel.cancel();
}

/// A filtered consumer whose subject is rare starts below every other subject's events; until
/// its position passes them, each claim scans them again. One background pass moves it across
/// the whole gap (many windows) and takes the stream's publish lock once for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_far_behind_catches_up_in_one_pass() {
    let pg = PgServer::builder()
        .setting("shared_preload_libraries", "pg_stat_statements")
        .setting("pg_stat_statements.track", "all")
        .start();
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    let b = setup(&pg).await;
    let mut c = consumer("ORDERS", "picky");
    c.filter_subjects = vec!["orders.rare".into()];
    b.ensure_consumer(&c).await.unwrap();
    // 9,000 ids of another subject (several advance windows), then one for the consumer.
    for _ in 0..9 {
        publish_n(&b, 1_000).await;
    }
    let rare = b.publish(&[msg("orders.rare", "r")]).await.unwrap()[0].id;
    let got = b.fetch("ORDERS", "picky", opts(10)).await.unwrap();
    assert_eq!(ids(&got), vec![rare]);
    pg.psql("SELECT pg_stat_statements_reset()");
    b.ack(&got[0].token, AckOp::Ack).await.unwrap();
    let want = rare.to_string();
    eventually(Duration::from_secs(20), "position past the gap", || {
        let at = pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'picky'");
        let ok = at == want;
        async move { ok.then_some(()) }
    })
    .await;
    let fences: i64 = pg
        .psql(
            "SELECT COALESCE(sum(calls), 0) FROM pg_stat_statements \
             WHERE query LIKE '%pg_advisory_xact_lock(%' AND query LIKE '%last_value%'",
        )
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        fences, 1,
        "one fence (exclusive publish lock) for the whole gap"
    );
}

/// A claim's delivery rows check their foreign key with `FOR KEY SHARE` on the consumer row,
/// held until the claim ends; the position move must not take that as a reason to skip (with
/// claims back to back a consumer's position would never move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_moves_while_a_claim_holds_the_consumer_row() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    let p = publish_n(&b, 3).await;
    let got = b.fetch("ORDERS", "worker", opts(1)).await.unwrap();
    assert_eq!(ids(&got), vec![p[0]]);
    let (other, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // What an unfinished claim holds: a delivery row of this consumer, not committed yet.
    other.batch_execute("BEGIN").await.unwrap();
    other
        .execute(
            "INSERT INTO eventbus_event_deliveries (stream_name, consumer_name, event_id) \
             VALUES ('ORDERS', 'worker', $1)",
            &[&p[2]],
        )
        .await
        .unwrap();
    b.ack(&got[0].token, AckOp::Ack).await.unwrap();
    let want = p[0].to_string();
    eventually(
        Duration::from_secs(20),
        "the position moved past the ack",
        || {
            let at = pg.psql("SELECT position FROM eventbus_consumers WHERE name = 'worker'");
            let ok = at == want;
            async move { ok.then_some(()) }
        },
    )
    .await;
    other.batch_execute("ROLLBACK").await.unwrap();
}

/// An idle filtered consumer on a stream busy with other subjects: an empty claim hands its
/// position to the background advancer, and a subscriber moves it past them before its first
/// claim, so claims stop reading those ids again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_filtered_consumer_moves_past_other_subjects() {
    let pg = PgServer::start();
    let b = setup(&pg).await;
    for name in ["picky", "waiting"] {
        let mut c = consumer("ORDERS", name);
        c.filter_subjects = vec!["orders.rare".into()];
        b.ensure_consumer(&c).await.unwrap();
    }
    let mut last = 0;
    for _ in 0..3 {
        last = *publish_n(&b, 1_000).await.last().unwrap();
    }
    let position = |name: &str| {
        pg.psql(&format!(
            "SELECT position FROM eventbus_consumers WHERE name = '{name}'"
        ))
    };
    assert!(b
        .fetch("ORDERS", "picky", opts(10))
        .await
        .unwrap()
        .is_empty());
    let want = last.to_string();
    eventually(Duration::from_secs(20), "position past the gap", || {
        let ok = position("picky") == want;
        async move { ok.then_some(()) }
    })
    .await;
    assert_eq!(position("waiting"), "0", "nothing moved it yet");
    let cancel = CancellationToken::new();
    let sub = b
        .subscribe(
            "ORDERS",
            "waiting",
            SubOpts {
                dead_letter_subject: None,
                cancel: cancel.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(position("waiting"), want, "moved before the first claim");
    drop(sub);
    cancel.cancel();
}

/// The single-active (ordered) subscriber of ORDERS/worker, with no other holding the lock.
async fn ordered_sub(b: &PgBus, cancel: &CancellationToken) -> Subscription {
    let o = SubOpts {
        dead_letter_subject: None,
        cancel: cancel.clone(),
    };
    tokio::time::timeout(Duration::from_secs(10), b.subscribe("ORDERS", "worker", o))
        .await
        .expect("no lock to wait for")
        .unwrap()
}

async fn next_one(sub: &mut Subscription) -> Vec<Delivery> {
    tokio::time::timeout(Duration::from_secs(10), sub.next_batch(1))
        .await
        .expect("a row is ready")
        .unwrap()
}
