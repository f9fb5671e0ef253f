//! PgBus: the pool, schema ensure, stream/consumer rows, publish, fetch, ack and retention.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_util::sync::CancellationToken;

use super::advance::{advance_and_prune, advance_one, PRUNE_BATCH};
use super::core::{publish_share, Inner, SharedListener, StreamRoute};
use super::filter::{filter_sql, parse_filters, sql_params, stream_subject_matches};
use super::keys::{msg_id_key, stream_key, LOCK_CLASS};
use super::listen::Dedicated;
use super::settings::Tls;
use super::sql::{duration_ms, micros_to_time, TS_MICROS};
use super::subscribe::Subscription;
use super::types::*;
use super::{schema, PgError, PgSettings};

/// How often the background task prunes retention and delivery rows.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How often the background advancer moves lagging consumer positions.
const ADVANCE_EVERY: Duration = Duration::from_millis(50);
/// How long a cached list of streams may be used to route publishes.
const STREAMS_TTL: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct PgBus {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for PgBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBus")
            .field("broker", &self.inner.settings.broker)
            .field("dsn", &self.redacted_dsn())
            .finish()
    }
}

impl PgBus {
    /// Validates the settings, builds the pool, creates/upgrades the schema, and starts the
    /// background prune.
    pub async fn connect(s: PgSettings) -> Result<PgBus, PgError> {
        s.validate()?;
        let parsed = s.parsed()?;
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &parsed.tls {
            Tls::Plain => Manager::from_config(parsed.cfg.clone(), tokio_postgres::NoTls, mc),
            Tls::Rustls(t) => Manager::from_config(parsed.cfg.clone(), t.clone(), mc),
        };
        let pool = Pool::builder(mgr)
            .max_size(s.max_conns)
            .wait_timeout(Some(s.connect_timeout))
            .create_timeout(Some(s.connect_timeout))
            .recycle_timeout(Some(s.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::invalid(format!("{}: connection pool: {e}", s.broker)))?;
        let bus = PgBus {
            inner: Arc::new(Inner {
                cfg: parsed.cfg,
                tls: parsed.tls,
                pool,
                listener: tokio::sync::Mutex::new(None),
                streams: std::sync::Mutex::new(None),
                cancel: CancellationToken::new(),
                lagging: std::sync::Mutex::new(HashSet::new()),
                consumers: std::sync::Mutex::new(HashMap::new()),
                lag_wake: Arc::new(tokio::sync::Notify::new()),
                publishers: tokio::sync::Semaphore::new(publish_share(s.max_conns)),
                naks: std::sync::atomic::AtomicU64::new(0),
                owed_notifies: std::sync::Mutex::new(HashMap::new()),
                notify_wake: Arc::new(tokio::sync::Notify::new()),
                settings: s,
            }),
        };
        let mut c = bus.client("connect").await.map_err(|e| match e {
            PgError::Db { msg, transient, .. } => PgError::Db {
                op: "connect",
                msg: format!("{}: {msg}", bus.redacted_dsn()),
                transient,
            },
            other => other,
        })?;
        schema::ensure(&mut c).await?;
        drop(c);
        bus.spawn_prune();
        bus.spawn_advancer();
        bus.spawn_notifier();
        tracing::info!(broker = %bus.inner.settings.broker, dsn = %bus.redacted_dsn(), "pgchannel connected");
        Ok(bus)
    }

    fn spawn_prune(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(PRUNE_EVERY) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let bus = PgBus { inner };
                match bus.prune_once().await {
                    Ok(r) if r.events > 0 || r.deliveries > 0 => {
                        tracing::debug!(
                            events = r.events,
                            deliveries = r.deliveries,
                            "pgchannel pruned"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "pgchannel prune failed; retrying next interval")
                    }
                }
            }
        });
    }

    /// Sends the NOTIFYs publishes owe (see `Inner::owe_notifies`): one statement for all that
    /// are owed, then whatever was owed meanwhile, so a burst of publishes costs a few
    /// NOTIFYs, each outside every publish's transaction.
    fn spawn_notifier(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let wake = self.inner.notify_wake.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = wake.notified() => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let owed: Vec<(String, i64)> = match inner.owed_notifies.lock() {
                    Ok(mut m) => m.drain().collect(),
                    Err(_) => return,
                };
                if owed.is_empty() {
                    continue;
                }
                if let Err(e) = send_notifies(&inner, &owed).await {
                    tracing::debug!(error = %e, "pgchannel: NOTIFY after publish failed; listeners find the rows on their next poll");
                }
            }
        });
    }

    /// Moves consumer positions: the only place they move after settles (acks never move
    /// them themselves), at most once per consumer per [`ADVANCE_EVERY`] however many acks
    /// asked. Waits for the stream's publish lock, so positions trail a publish burst by
    /// about that interval, not by a prune interval. A lagging position makes every claim
    /// read the settled rows above it; a position the advancer never moved made a consumer
    /// kept busy by concurrent publishers slow down as its settled rows piled up.
    fn spawn_advancer(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let wake = self.inner.lag_wake.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = wake.notified() => {}
                }
                // Coalesce: one advance per consumer per interval, however many acks asked.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(ADVANCE_EVERY) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let due: Vec<(String, String)> = match inner.lagging.lock() {
                    Ok(mut set) => set.drain().collect(),
                    Err(_) => return,
                };
                for (stream, consumer) in due {
                    if let Err(e) = advance_one(&inner, &stream, &consumer).await {
                        tracing::debug!(error = %e, stream, consumer, "pgchannel: position not advanced; the next ack or prune retries");
                    }
                }
            }
        });
    }

    /// Stops the background prune, drops the LISTEN connection and closes the pool.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        *self.inner.listener.lock().await = None;
        self.inner.publishers.close();
        self.inner.pool.close();
    }

    pub fn redacted_dsn(&self) -> String {
        self.inner.settings.redacted_dsn()
    }

    pub fn settings(&self) -> &PgSettings {
        &self.inner.settings
    }

    pub(crate) async fn client(&self, op: &'static str) -> Result<Object, PgError> {
        self.inner.client(op).await
    }

    /// Retries an idempotent operation on transient failures until the connect timeout.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, PgError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let deadline = Instant::now() + self.inner.settings.connect_timeout;
        let mut nap = Duration::from_millis(50);
        loop {
            match f().await {
                Err(e) if e.is_transient() && Instant::now() + nap < deadline => {
                    tracing::debug!(error = %e, "pgchannel: transient failure, retrying");
                    tokio::time::sleep(nap).await;
                    nap = (nap * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    // ---------------------------------------------------------------- streams

    pub async fn ensure_stream(&self, s: &StreamDef) -> Result<Ensured, PgError> {
        validate_stream_name(&s.name)?;
        if s.subjects.is_empty() {
            return Err(PgError::invalid(format!(
                "stream {:?} has no subjects; at least one subject is required",
                s.name
            )));
        }
        for subj in &s.subjects {
            if subj.is_empty() || subj.split('.').any(str::is_empty) || subj.contains(' ') {
                return Err(PgError::invalid(format!(
                    "stream {:?}: subject {subj:?} is invalid (dot-separated words, `*` and a \
                     final `>` allowed)",
                    s.name
                )));
            }
        }
        let r = self.retrying(|| self.ensure_stream_once(s)).await;
        self.forget_streams();
        r
    }

    async fn ensure_stream_once(&self, s: &StreamDef) -> Result<Ensured, PgError> {
        let age: Option<i64> = s.max_age.map(|d| {
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() > 0 {
                secs.saturating_add(1)
            } else {
                secs
            }
        });
        let age = age.filter(|a| *a > 0);
        let msgs = s.max_msgs.filter(|n| *n > 0);
        let bytes = s.max_bytes.filter(|n| *n > 0);
        let window: Option<i64> =
            (!s.duplicate_window.is_zero()).then(|| duration_ms(s.duplicate_window));
        let c = self.client("EnsureStream").await?;
        let existing = c
            .query_opt(
                "SELECT subjects, max_age_seconds, max_msgs, max_bytes, duplicate_window_ms \
                 FROM eventbus_streams WHERE name = $1",
                &[&s.name],
            )
            .await
            .map_err(|e| PgError::db("EnsureStream", e))?;
        let Some(row) = existing else {
            let n = c
                .execute(
                    "INSERT INTO eventbus_streams (name, subjects, max_age_seconds, max_msgs, \
                     max_bytes, duplicate_window_ms) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (name) DO NOTHING",
                    &[&s.name, &s.subjects, &age, &msgs, &bytes, &window],
                )
                .await
                .map_err(|e| PgError::db("EnsureStream", e))?;
            if n == 1 {
                return Ok(Ensured::Created);
            }
            // Created by another process a moment ago: fall through to compare next time.
            return Box::pin(self.ensure_stream_once(s)).await;
        };
        let same = row.get::<_, Vec<String>>(0) == s.subjects
            && row.get::<_, Option<i64>>(1) == age
            && row.get::<_, Option<i64>>(2) == msgs
            && row.get::<_, Option<i64>>(3) == bytes
            && row.get::<_, Option<i64>>(4) == window;
        if same {
            return Ok(Ensured::Unchanged);
        }
        c.execute(
            "UPDATE eventbus_streams SET subjects = $2, max_age_seconds = $3, max_msgs = $4, \
             max_bytes = $5, duplicate_window_ms = $6 WHERE name = $1",
            &[&s.name, &s.subjects, &age, &msgs, &bytes, &window],
        )
        .await
        .map_err(|e| PgError::db("EnsureStream", e))?;
        Ok(Ensured::Updated)
    }

    pub async fn stream(&self, name: &str) -> Result<Option<StreamDef>, PgError> {
        self.retrying(|| async {
            let c = self.client("stream info").await?;
            let row = c
                .query_opt(
                    "SELECT subjects, max_age_seconds, max_msgs, max_bytes, duplicate_window_ms \
                     FROM eventbus_streams WHERE name = $1",
                    &[&name],
                )
                .await
                .map_err(|e| PgError::db("stream info", e))?;
            Ok(row.map(|r| StreamDef {
                name: name.to_string(),
                subjects: r.get(0),
                max_age: r
                    .get::<_, Option<i64>>(1)
                    .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0))),
                max_msgs: r.get(2),
                max_bytes: r.get(3),
                duplicate_window: r
                    .get::<_, Option<i64>>(4)
                    .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
                    .unwrap_or(DEFAULT_DUPLICATE_WINDOW),
            }))
        })
        .await
    }

    /// Deletes the stream with its events, consumers and delivery rows; false when absent.
    pub async fn delete_stream(&self, name: &str) -> Result<bool, PgError> {
        let r = self
            .retrying(|| async {
                let mut c = self.client("DeleteStream").await?;
                let tx = c
                    .transaction()
                    .await
                    .map_err(|e| PgError::db("DeleteStream", e))?;
                for sql in [
                    "DELETE FROM eventbus_event_deliveries WHERE stream_name = $1",
                    "DELETE FROM eventbus_consumers WHERE stream_name = $1",
                    "DELETE FROM eventbus_events WHERE stream_name = $1",
                ] {
                    tx.execute(sql, &[&name])
                        .await
                        .map_err(|e| PgError::db("DeleteStream", e))?;
                }
                let n = tx
                    .execute("DELETE FROM eventbus_streams WHERE name = $1", &[&name])
                    .await
                    .map_err(|e| PgError::db("DeleteStream", e))?;
                tx.commit()
                    .await
                    .map_err(|e| PgError::db("DeleteStream", e))?;
                Ok(n > 0)
            })
            .await;
        self.forget_streams();
        self.inner.forget_consumer(name, None);
        r
    }

    fn forget_streams(&self) {
        if let Ok(mut g) = self.inner.streams.lock() {
            *g = None;
        }
    }

    /// Stream routes, cached briefly; `fresh` forces a reload.
    pub(crate) async fn routes(
        &self,
        c: &Object,
        fresh: bool,
    ) -> Result<Arc<Vec<StreamRoute>>, PgError> {
        if !fresh {
            if let Ok(g) = self.inner.streams.lock() {
                if let Some((at, r)) = g.as_ref() {
                    if at.elapsed() < STREAMS_TTL {
                        return Ok(r.clone());
                    }
                }
            }
        }
        let rows = c
            .query(
                "SELECT name, subjects, duplicate_window_ms FROM eventbus_streams ORDER BY name",
                &[],
            )
            .await
            .map_err(|e| PgError::db("Publish: load streams", e))?;
        let routes: Arc<Vec<StreamRoute>> = Arc::new(
            rows.iter()
                .map(|r| StreamRoute {
                    name: r.get(0),
                    subjects: r.get(1),
                    duplicate_window_ms: r
                        .get::<_, Option<i64>>(2)
                        .unwrap_or(duration_ms(DEFAULT_DUPLICATE_WINDOW)),
                })
                .collect(),
        );
        if let Ok(mut g) = self.inner.streams.lock() {
            *g = Some((Instant::now(), routes.clone()));
        }
        Ok(routes)
    }

    /// The stream owning `subject`: an exact subject first (as Go), then patterns.
    pub(crate) async fn route(&self, c: &Object, subject: &str) -> Result<StreamRoute, PgError> {
        for fresh in [false, true] {
            let routes = self.routes(c, fresh).await?;
            if let Some(r) = routes
                .iter()
                .find(|r| r.subjects.iter().any(|s| s == subject))
                .or_else(|| {
                    routes.iter().find(|r| {
                        r.subjects
                            .iter()
                            .any(|p| stream_subject_matches(p, subject))
                    })
                })
            {
                return Ok(r.clone());
            }
        }
        Err(PgError::NoStream(subject.to_string()))
    }

    // -------------------------------------------------------------- consumers

    pub async fn ensure_consumer(&self, c: &ConsumerDef) -> Result<Ensured, PgError> {
        validate_stream_name(&c.stream)?;
        if c.name.trim().is_empty() {
            return Err(PgError::invalid(format!(
                "consumer on stream {:?}: name is required",
                c.stream
            )));
        }
        parse_filters(&c.filter_subjects).map_err(|e| match e {
            PgError::Invalid(m) => PgError::Invalid(format!(
                "consumer {:?} on stream {:?}: {m}",
                c.name, c.stream
            )),
            other => other,
        })?;
        if let DeliverFrom::BySeq(n) = c.deliver {
            if n <= 0 {
                return Err(PgError::invalid(format!(
                    "consumer {:?}: opt_start_seq must be at least 1 for deliver_policy \
                     by_start_sequence",
                    c.name
                )));
            }
        }
        let r = self.retrying(|| self.ensure_consumer_once(c)).await;
        self.inner.forget_consumer(&c.stream, Some(&c.name));
        r
    }

    async fn ensure_consumer_once(&self, d: &ConsumerDef) -> Result<Ensured, PgError> {
        const OP: &str = "EnsureConsumer";
        let filter: Option<String> = {
            let parts: Vec<&str> = d
                .filter_subjects
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .collect();
            (!parts.is_empty()).then(|| parts.join(","))
        };
        let max_deliver = if d.max_deliver <= 0 {
            DEFAULT_MAX_DELIVER
        } else {
            d.max_deliver
        };
        let ack_wait: Option<i64> = (!d.ack_wait.is_zero()).then(|| duration_ms(d.ack_wait));
        let backoff: Option<Vec<i64>> =
            (!d.backoff.is_empty()).then(|| d.backoff.iter().map(|b| duration_ms(*b)).collect());
        let (policy, seq, start_us): (&str, Option<i64>, Option<i64>) = match d.deliver {
            DeliverFrom::All => ("all", None, None),
            DeliverFrom::New => ("new", None, None),
            DeliverFrom::Last => ("last", None, None),
            DeliverFrom::BySeq(n) => ("by_start_sequence", Some(n), None),
            DeliverFrom::ByTime(t) => (
                "by_start_time",
                None,
                Some(i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(0)),
            ),
        };
        let ack = d.ack_policy.as_str();
        let mut c = self.client(OP).await?;
        let tx = c.transaction().await.map_err(|e| PgError::db(OP, e))?;
        let exists = tx
            .query_opt(
                "SELECT 1 FROM eventbus_streams WHERE name = $1",
                &[&d.stream],
            )
            .await
            .map_err(|e| PgError::db(OP, e))?;
        if exists.is_none() {
            return Err(PgError::StreamNotFound(d.stream.clone()));
        }
        let row = tx
            .query_opt(
                "SELECT filter_subject, ack_policy, max_deliver, ack_wait_ms, backoff_ms, \
                 COALESCE(deliver_policy, 'all'), opt_start_seq, \
                 (extract(epoch from opt_start_time) * 1000000)::int8 \
                 FROM eventbus_consumers WHERE stream_name = $1 AND name = $2 FOR UPDATE",
                &[&d.stream, &d.name],
            )
            .await
            .map_err(|e| PgError::db(OP, e))?;
        let outcome = match row {
            None => {
                // Wait for in-flight publishes so "new"/"last" see every committed id below
                // the ones yet to come.
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    &[&LOCK_CLASS, &stream_key(&d.stream)],
                )
                .await
                .map_err(|e| PgError::db(OP, e))?;
                let (all, exact, like) = sql_params(&parse_filters(&d.filter_subjects)?);
                let start: i64 = tx
                    .query_one(
                        &format!(
                            "SELECT CASE $2::text \
                               WHEN 'all' THEN 0::int8 \
                               WHEN 'new' THEN (SELECT COALESCE(max(id), 0) FROM eventbus_events WHERE stream_name = $1) \
                               WHEN 'last' THEN COALESCE( \
                                   (SELECT max(e.id) - 1 FROM eventbus_events e WHERE e.stream_name = $1 AND {}), \
                                   (SELECT max(id) FROM eventbus_events WHERE stream_name = $1), 0) \
                               WHEN 'by_start_sequence' THEN GREATEST($3::int8 - 1, 0) \
                               ELSE COALESCE( \
                                   (SELECT min(id) - 1 FROM eventbus_events WHERE stream_name = $1 \
                                      AND ts >= 'epoch'::timestamptz + $4::int8 * interval '1 microsecond'), \
                                   (SELECT max(id) FROM eventbus_events WHERE stream_name = $1), 0) \
                             END",
                            filter_sql(5)
                        ),
                        &[&d.stream, &policy, &seq, &start_us, &all, &exact, &like],
                    )
                    .await
                    .map_err(|e| PgError::db(OP, e))?
                    .get(0);
                let n = tx
                    .execute(
                        "INSERT INTO eventbus_consumers (stream_name, name, position, \
                         filter_subject, ack_policy, max_deliver, deliver_policy, opt_start_seq, \
                         opt_start_time, ack_wait_ms, backoff_ms) VALUES ($1, $2, $3, $4, $5, $6, \
                         $7, $8, 'epoch'::timestamptz + $9::int8 * interval '1 microsecond', $10, $11) \
                         ON CONFLICT (stream_name, name) DO NOTHING",
                        &[
                            &d.stream, &d.name, &start, &filter, &ack, &max_deliver, &policy,
                            &seq, &start_us, &ack_wait, &backoff,
                        ],
                    )
                    .await
                    .map_err(|e| PgError::db(OP, e))?;
                if n == 1 {
                    Ensured::Created
                } else {
                    Ensured::Unchanged
                }
            }
            Some(r) => {
                let same = r.get::<_, Option<String>>(0).filter(|s| !s.is_empty()) == filter
                    && r.get::<_, String>(1) == ack
                    && r.get::<_, i32>(2) == max_deliver
                    && r.get::<_, Option<i64>>(3) == ack_wait
                    && r.get::<_, Option<Vec<i64>>>(4) == backoff
                    && r.get::<_, String>(5) == policy
                    && r.get::<_, Option<i64>>(6) == seq
                    && r.get::<_, Option<i64>>(7) == start_us;
                if same {
                    Ensured::Unchanged
                } else {
                    // The position is kept: changing where a consumer starts does not rewind
                    // (or skip) what it has already been through.
                    tx.execute(
                        "UPDATE eventbus_consumers SET filter_subject = $3, ack_policy = $4, \
                         max_deliver = $5, deliver_policy = $6, opt_start_seq = $7, \
                         opt_start_time = 'epoch'::timestamptz + $8::int8 * interval '1 microsecond', \
                         ack_wait_ms = $9, backoff_ms = $10 WHERE stream_name = $1 AND name = $2",
                        &[
                            &d.stream, &d.name, &filter, &ack, &max_deliver, &policy, &seq,
                            &start_us, &ack_wait, &backoff,
                        ],
                    )
                    .await
                    .map_err(|e| PgError::db(OP, e))?;
                    Ensured::Updated
                }
            }
        };
        tx.commit().await.map_err(|e| PgError::db(OP, e))?;
        Ok(outcome)
    }

    pub async fn consumer(&self, stream: &str, name: &str) -> Result<Option<ConsumerDef>, PgError> {
        self.retrying(|| async {
            let c = self.client("consumer info").await?;
            let row = c
                .query_opt(
                    "SELECT filter_subject, ack_policy, max_deliver, ack_wait_ms, backoff_ms, \
                     COALESCE(deliver_policy, 'all'), opt_start_seq, \
                     (extract(epoch from opt_start_time) * 1000000)::int8 \
                     FROM eventbus_consumers WHERE stream_name = $1 AND name = $2",
                    &[&stream, &name],
                )
                .await
                .map_err(|e| PgError::db("consumer info", e))?;
            Ok(row.map(|r| {
                let filter: Option<String> = r.get(0);
                let deliver = match r.get::<_, String>(5).as_str() {
                    "new" => DeliverFrom::New,
                    "last" => DeliverFrom::Last,
                    "by_start_sequence" => {
                        DeliverFrom::BySeq(r.get::<_, Option<i64>>(6).unwrap_or(1))
                    }
                    "by_start_time" => {
                        DeliverFrom::ByTime(micros_to_time(r.get::<_, Option<i64>>(7).unwrap_or(0)))
                    }
                    _ => DeliverFrom::All,
                };
                ConsumerDef {
                    stream: stream.to_string(),
                    name: name.to_string(),
                    filter_subjects: filter
                        .map(|f| {
                            f.split(',')
                                .map(|s| s.trim().to_string())
                                .filter(|s| !s.is_empty())
                                .collect()
                        })
                        .unwrap_or_default(),
                    deliver,
                    ack_policy: AckPolicy::from_db(&r.get::<_, String>(1)),
                    max_deliver: r.get(2),
                    ack_wait: r
                        .get::<_, Option<i64>>(3)
                        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
                        .unwrap_or(Duration::ZERO),
                    backoff: r
                        .get::<_, Option<Vec<i64>>>(4)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
                        .collect(),
                }
            }))
        })
        .await
    }

    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<bool, PgError> {
        self.inner.forget_consumer(stream, Some(name));
        self.retrying(|| async {
            let mut c = self.client("DeleteConsumer").await?;
            let tx = c
                .transaction()
                .await
                .map_err(|e| PgError::db("DeleteConsumer", e))?;
            tx.execute(
                "DELETE FROM eventbus_event_deliveries WHERE stream_name = $1 AND consumer_name = $2",
                &[&stream, &name],
            )
            .await
            .map_err(|e| PgError::db("DeleteConsumer", e))?;
            let n = tx
                .execute(
                    "DELETE FROM eventbus_consumers WHERE stream_name = $1 AND name = $2",
                    &[&stream, &name],
                )
                .await
                .map_err(|e| PgError::db("DeleteConsumer", e))?;
            tx.commit()
                .await
                .map_err(|e| PgError::db("DeleteConsumer", e))?;
            Ok(n > 0)
        })
        .await
    }

    // ---------------------------------------------------------------- publish

    /// One transaction: the inserts, msg_id de-duplicated within the stream's window; the
    /// NOTIFY follows the commit (see `Inner::owe_notifies`).
    ///
    /// Publishers take a shared per-stream advisory lock, so an exclusive holder (advancing a
    /// consumer's position) sees every id below the ones still to come: ids are allocated
    /// before commit, and without it a position could move past a row not yet visible.
    ///
    /// Retried on a fresh connection after a connection failure before COMMIT was sent, and
    /// after a failed COMMIT too when every message has a msg_id (the retry then de-dups).
    pub async fn publish(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, PgError> {
        for m in msgs {
            if m.subject.is_empty()
                || m.subject
                    .split('.')
                    .any(|t| t.is_empty() || t == "*" || t == ">")
                || m.subject.contains(char::is_whitespace)
            {
                return Err(PgError::invalid(format!(
                    "Publish: subject {:?} is invalid (dot-separated words, no wildcards)",
                    m.subject
                )));
            }
        }
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let all_have_ids = msgs.iter().all(|m| m.msg_id.is_some());
        let deadline = Instant::now() + self.inner.settings.connect_timeout;
        let mut nap = Duration::from_millis(50);
        loop {
            match self.publish_once(msgs).await {
                Ok(p) => return Ok(p),
                Err((e, maybe_committed))
                    if e.is_transient()
                        && (!maybe_committed || all_have_ids)
                        && Instant::now() + nap < deadline =>
                {
                    tracing::debug!(error = %e, "pgchannel publish: retrying on a fresh connection");
                    tokio::time::sleep(nap).await;
                    nap = (nap * 2).min(Duration::from_secs(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    async fn publish_once(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, (PgError, bool)> {
        const OP: &str = "Publish";
        let early = |e| (e, false);
        let (_share, mut c) = self.inner.publish_client(OP).await.map_err(early)?;
        let mut routes = Vec::with_capacity(msgs.len());
        for m in msgs {
            routes.push(self.route(&c, &m.subject).await.map_err(early)?);
        }
        let mut stream_keys: Vec<i32> = routes.iter().map(|r| stream_key(&r.name)).collect();
        stream_keys.sort_unstable();
        stream_keys.dedup();
        if msgs.iter().all(|m| m.msg_id.is_none()) {
            return self.publish_plain(&c, msgs, &routes, &stream_keys).await;
        }
        let mut id_keys: Vec<i32> = msgs
            .iter()
            .zip(&routes)
            .filter_map(|(m, r)| m.msg_id.as_deref().map(|id| msg_id_key(&r.name, id)))
            .collect();
        id_keys.sort_unstable();
        id_keys.dedup();
        let tx = c
            .transaction()
            .await
            .map_err(|e| early(PgError::db(OP, e)))?;
        let db = |e| (PgError::db(OP, e), false);
        let lock = tx
            .prepare_cached(
                "SELECT pg_advisory_xact_lock_shared($1, k) FROM unnest($2::int4[]) AS k",
            )
            .await
            .map_err(db)?;
        tx.execute(&lock, &[&LOCK_CLASS, &stream_keys])
            .await
            .map_err(db)?;
        if !id_keys.is_empty() {
            let lock = tx
                .prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k")
                .await
                .map_err(db)?;
            tx.execute(&lock, &[&LOCK_CLASS, &id_keys])
                .await
                .map_err(db)?;
        }
        let insert = tx
            .prepare_cached(&format!(
                "INSERT INTO eventbus_events AS e (stream_name, subject, headers, payload, \
                 correlation_id, msg_id) VALUES ($1, $2, $3, $4, $5, $6) RETURNING e.id, {TS_MICROS}"
            ))
            .await
            .map_err(db)?;
        let dup = tx
            .prepare_cached(&format!(
                "SELECT e.id, {TS_MICROS} FROM eventbus_events e WHERE e.stream_name = $1 \
                 AND e.msg_id = $2 AND e.ts > now() - $3::int8 * interval '1 millisecond' \
                 ORDER BY e.id DESC LIMIT 1"
            ))
            .await
            .map_err(db)?;
        let mut out = Vec::with_capacity(msgs.len());
        let mut in_batch: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        for (m, r) in msgs.iter().zip(&routes) {
            if let Some(id) = m.msg_id.as_deref() {
                let seen = match in_batch.get(&(r.name.as_str(), id)) {
                    Some(v) => Some(*v),
                    None => tx
                        .query_opt(&dup, &[&r.name, &id, &r.duplicate_window_ms])
                        .await
                        .map_err(db)?
                        .map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1))),
                };
                if let Some((eid, us)) = seen {
                    out.push(Published {
                        stream: r.name.clone(),
                        id: eid,
                        ts: micros_to_time(us),
                        duplicate: true,
                    });
                    continue;
                }
            }
            let headers = serde_json::to_value(&m.headers).unwrap_or_default();
            let corr = m.correlation_id.as_deref().filter(|s| !s.is_empty());
            let row = tx
                .query_one(
                    &insert,
                    &[
                        &r.name,
                        &m.subject,
                        &headers,
                        &m.payload.as_ref(),
                        &corr,
                        &m.msg_id,
                    ],
                )
                .await
                .map_err(db)?;
            let (id, us): (i64, i64) = (row.get(0), row.get(1));
            if let Some(mid) = m.msg_id.as_deref() {
                in_batch.insert((r.name.as_str(), mid), (id, us));
            }
            out.push(Published {
                stream: r.name.clone(),
                id,
                ts: micros_to_time(us),
                duplicate: false,
            });
        }
        tx.commit()
            .await
            .map_err(|e| (PgError::db("Publish: commit", e), true))?;
        self.inner.owe_notifies(&out);
        Ok(out)
    }

    /// Publish without de-duplication in one statement (one round trip, its own implicit
    /// transaction): take the streams' shared publish locks, insert in input order; each
    /// stream is notified once after the commit. `lk` is joined into the INSERT so the locks are held before any id
    /// is drawn from the sequence.
    async fn publish_plain(
        &self,
        c: &Object,
        msgs: &[Outgoing],
        routes: &[StreamRoute],
        stream_keys: &[i32],
    ) -> Result<Vec<Published>, (PgError, bool)> {
        let stmt = c
            .prepare_cached(&format!(
                "WITH lk AS (SELECT count(pg_advisory_xact_lock_shared($1, k)) AS n \
                   FROM unnest($2::int4[]) AS k), \
                 ins AS (INSERT INTO eventbus_events AS e (stream_name, subject, headers, payload, \
                   correlation_id) SELECT m.s, m.subj, m.h, m.p, m.c FROM lk, \
                   unnest($3::text[], $4::text[], $5::jsonb[], $6::bytea[], $7::text[]) \
                   WITH ORDINALITY AS m(s, subj, h, p, c, ord) ORDER BY m.ord \
                   RETURNING e.id, e.stream_name, {TS_MICROS}) \
                 SELECT ins.* FROM ins ORDER BY 1"
            ))
            .await
            .map_err(|e| (PgError::db("Publish", e), false))?;
        let streams: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
        let headers: Vec<serde_json::Value> = msgs
            .iter()
            .map(|m| serde_json::to_value(&m.headers).unwrap_or_default())
            .collect();
        let payloads: Vec<&[u8]> = msgs.iter().map(|m| m.payload.as_ref()).collect();
        let corr: Vec<Option<&str>> = msgs
            .iter()
            .map(|m| m.correlation_id.as_deref().filter(|s| !s.is_empty()))
            .collect();
        let rows = c
            .query(
                &stmt,
                &[
                    &LOCK_CLASS,
                    &stream_keys,
                    &streams,
                    &subjects,
                    &headers,
                    &payloads,
                    &corr,
                ],
            )
            .await
            .map_err(|e| {
                // A server-reported error rolled the statement back; a lost connection may
                // have lost the reply to a commit.
                let maybe = e.as_db_error().is_none();
                (PgError::db("Publish", e), maybe)
            })?;
        if rows.len() != msgs.len() {
            return Err((
                PgError::invalid(format!(
                    "Publish: stored {} of {} messages",
                    rows.len(),
                    msgs.len()
                )),
                true,
            ));
        }
        // Ids were drawn in input order, so ascending ids line up with the input.
        let out: Vec<Published> = rows
            .iter()
            .map(|r| Published {
                stream: r.get(1),
                id: r.get(0),
                ts: micros_to_time(r.get(2)),
                duplicate: false,
            })
            .collect();
        self.inner.owe_notifies(&out);
        Ok(out)
    }

    // ------------------------------------------------------------ fetch / ack

    /// One bounded batch for step.eventbus.consume: leases up to `batch` deliverable rows
    /// for the consumer's ack_wait (see `lease`), waiting up to `max_wait` for a NOTIFY (or
    /// the poll interval, for nak delays and lease expiry) when none are ready.
    pub async fn fetch(
        &self,
        stream: &str,
        consumer: &str,
        o: FetchOpts,
    ) -> Result<Vec<Delivery>, PgError> {
        let batch = o.batch.max(1);
        let deadline = Instant::now() + o.max_wait;
        let mut wake = if o.max_wait.is_zero() {
            None
        } else {
            match self.listen(stream).await {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::debug!(error = %e, "pgchannel fetch: LISTEN unavailable, polling");
                    None
                }
            }
        };
        loop {
            if let Some(w) = wake.as_mut() {
                w.borrow_and_update();
            }
            let got = self
                .retrying(|| {
                    super::lease::lease(
                        &self.inner,
                        stream,
                        consumer,
                        batch,
                        o.max_bytes,
                        o.dead_letter_subject.as_deref(),
                    )
                })
                .await?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = self.inner.settings.poll_interval.min(deadline - now);
            match wake.as_mut() {
                Some(w) => {
                    tokio::select! {
                        r = w.changed() => if r.is_err() { wake = None },
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
                None => tokio::time::sleep(nap).await,
            }
        }
    }

    /// A wake-up receiver for NOTIFYs on the stream's channel, on the shared LISTEN
    /// connection (reconnected when it died).
    async fn listen(&self, stream: &str) -> Result<tokio::sync::watch::Receiver<u64>, PgError> {
        let mut g = self.inner.listener.lock().await;
        if g.as_ref().is_none_or(|l| !l.conn.is_alive()) {
            let conn = Dedicated::connect(&self.inner.cfg, &self.inner.tls, "fetch LISTEN").await?;
            *g = Some(SharedListener {
                conn,
                channels: HashSet::new(),
            });
        }
        let Some(l) = g.as_mut() else {
            return Err(PgError::invalid("LISTEN connection missing"));
        };
        let ch = notify_channel(stream);
        if !l.channels.contains(&ch) {
            l.conn
                .client
                .batch_execute(&format!("LISTEN \"{ch}\""))
                .await
                .map_err(|e| PgError::db("LISTEN", e))?;
            l.channels.insert(ch);
        }
        Ok(l.conn.wake.clone())
    }

    /// Settles one delivery the consumer holds (see `settle`). Acks are per message, except
    /// with ack_policy `all`, where an ack settles every delivered message up to the id (as
    /// NATS's AckAll). With ack_policy `none` messages are settled when delivered, and this is
    /// a no-op.
    pub async fn ack(&self, token: &AckToken, op: AckOp) -> Result<(), PgError> {
        self.settle_many(std::slice::from_ref(token), op)
            .await
            .pop()
            .unwrap_or_else(|| Err(PgError::invalid("Ack: no result for the token")))
    }

    // -------------------------------------------------------------- subscribe

    /// For trigger.eventbus.subscribe: waits (cancellable) for the consumer's session advisory
    /// lock on a dedicated connection: one active subscriber per consumer across processes.
    pub async fn subscribe(
        &self,
        stream: &str,
        consumer: &str,
        o: SubOpts,
    ) -> Result<Subscription, PgError> {
        super::subscribe::subscribe(&self.inner, stream, consumer, o, true).await
    }

    /// A competing subscriber: no consumer lock, so subscribers in any number of processes
    /// share the consumer's work (as NATS pull consumers do), each claim skipping the rows
    /// another subscriber or fetcher is claiming. Delivery order across them is not promised;
    /// where order matters (`max_in_flight: 1`) use [`PgBus::subscribe`].
    pub async fn subscribe_competing(
        &self,
        stream: &str,
        consumer: &str,
        o: SubOpts,
    ) -> Result<Subscription, PgError> {
        super::subscribe::subscribe(&self.inner, stream, consumer, o, false).await
    }

    // ------------------------------------------------------------------ prune

    /// Retention (max_age, max_msgs, max_bytes), consumer positions and delivery-row clean-up,
    /// at most [`PRUNE_BATCH`] rows per stream/consumer and rule per call.
    pub async fn prune_once(&self) -> Result<PruneReport, PgError> {
        const OP: &str = "prune";
        let db = |e| PgError::db(OP, e);
        let mut report = PruneReport::default();
        let c = self.client(OP).await?;
        let streams = c
            .query(
                "SELECT name, max_age_seconds, max_msgs, max_bytes FROM eventbus_streams",
                &[],
            )
            .await
            .map_err(db)?;
        for s in &streams {
            let name: String = s.get(0);
            if let Some(age) = s.get::<_, Option<i64>>(1).filter(|a| *a > 0) {
                report.events += c
                    .execute(
                        "DELETE FROM eventbus_events WHERE id IN (SELECT id FROM eventbus_events \
                         WHERE stream_name = $1 AND ts < now() - $2::int8 * interval '1 second' \
                         ORDER BY id LIMIT $3)",
                        &[&name, &age, &PRUNE_BATCH],
                    )
                    .await
                    .map_err(db)?;
            }
            if let Some(n) = s.get::<_, Option<i64>>(2).filter(|n| *n > 0) {
                report.events += c
                    .execute(
                        "DELETE FROM eventbus_events WHERE id IN (SELECT id FROM eventbus_events \
                         WHERE stream_name = $1 AND id <= (SELECT id FROM eventbus_events \
                         WHERE stream_name = $1 ORDER BY id DESC OFFSET $2 LIMIT 1) \
                         ORDER BY id LIMIT $3)",
                        &[&name, &n, &PRUNE_BATCH],
                    )
                    .await
                    .map_err(db)?;
            }
            if let Some(b) = s.get::<_, Option<i64>>(3).filter(|b| *b > 0) {
                report.events += c
                    .execute(
                        "DELETE FROM eventbus_events WHERE id IN (SELECT id FROM \
                         (SELECT id, sum(octet_length(payload)) OVER (ORDER BY id DESC) AS acc \
                         FROM eventbus_events WHERE stream_name = $1) t WHERE acc > $2 \
                         ORDER BY id LIMIT $3)",
                        &[&name, &b, &PRUNE_BATCH],
                    )
                    .await
                    .map_err(db)?;
            }
        }
        let consumers = c
            .query("SELECT stream_name, name FROM eventbus_consumers", &[])
            .await
            .map_err(db)?;
        for k in &consumers {
            let (stream, name): (String, String) = (k.get(0), k.get(1));
            match advance_and_prune(&self.inner, &c, &stream, &name).await {
                Ok(n) => report.deliveries += n,
                Err(e) => {
                    tracing::debug!(error = %e, stream, consumer = name, "pgchannel prune: position not advanced")
                }
            }
        }
        Ok(report)
    }
}

/// One NOTIFY per owed stream, on the stream's channel, with the highest id committed (what a
/// Go publisher sends for its own row), in one statement.
async fn send_notifies(inner: &Inner, owed: &[(String, i64)]) -> Result<(), PgError> {
    const OP: &str = "NOTIFY";
    let db = |e| PgError::db(OP, e);
    let channels: Vec<String> = owed.iter().map(|(s, _)| notify_channel(s)).collect();
    let ids: Vec<String> = owed.iter().map(|(_, id)| id.to_string()).collect();
    let c = inner.client(OP).await?;
    let stmt = c
        .prepare_cached(
            "SELECT count(pg_notify(ch, id)) FROM unnest($1::text[], $2::text[]) AS t(ch, id)",
        )
        .await
        .map_err(db)?;
    c.execute(&stmt, &[&channels, &ids]).await.map_err(db)?;
    Ok(())
}
