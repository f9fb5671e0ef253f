//! State shared by the bus, its subscriptions and the lease (kept apart from `bus` so the
//! modules that use it do not import each other).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_util::sync::CancellationToken;

use super::filter::{parse_filters, sql_params};
use super::listen::Dedicated;
use super::settings::Tls;
use super::types::{AckPolicy, Published};
use super::{PgError, PgSettings};

/// How long a consumer's settings read from its row may be used by acks and leases. Changes
/// made by this process apply at once (`forget_consumer`); another process's within this.
const CONSUMER_TTL: Duration = Duration::from_secs(1);

pub(crate) struct Inner {
    pub settings: PgSettings,
    pub pool: Pool,
    pub cfg: tokio_postgres::Config,
    pub tls: Tls,
    pub listener: tokio::sync::Mutex<Option<SharedListener>>,
    pub streams: Mutex<Option<(Instant, Arc<Vec<StreamRoute>>)>>,
    pub cancel: CancellationToken,
    /// Consumers whose position may move (something settled, a claim came back empty, or a
    /// move could not finish); the background advancer (`PgBus::spawn_advancer`) drains it.
    pub lagging: Mutex<HashSet<(String, String)>>,
    pub lag_wake: Arc<tokio::sync::Notify>,
    /// Consumer settings by (stream, consumer), read at most once per [`CONSUMER_TTL`].
    pub consumers: Mutex<HashMap<ConsumerKey, (Instant, Arc<ConsumerCfg>)>>,
    /// Pooled connections publishes may hold at once (see [`publish_share`]).
    pub publishers: tokio::sync::Semaphore,
    /// NOTIFYs owed for committed publishes: the highest id per stream, sent by the notifier
    /// task (`PgBus::spawn_notifier`), many publishes to one NOTIFY (see `Inner::owe_notifies`).
    pub owed_notifies: Mutex<HashMap<String, i64>>,
    pub notify_wake: Arc<tokio::sync::Notify>,
    /// Bumped after every nak this process settled (any consumer): an ordered subscriber's
    /// row claimed ahead is handed out only if no nak came since the claim began, so a nak'd
    /// message is never overtaken by the one behind it (see `Subscription::next_batch`).
    pub naks: std::sync::atomic::AtomicU64,
}

/// Publishes may hold at most three quarters of the pool (at least one connection): the rest
/// stays free for the claims and settles of the process's triggers and consume steps. Measured
/// in `make bench` before this: 64 publishes in flight held all 16 connections, and every
/// claim and settle of the trigger on the same bus queued behind them for a connection.
pub(crate) fn publish_share(max_conns: usize) -> usize {
    (max_conns - max_conns / 4).max(1)
}

/// (stream, consumer).
pub(crate) type ConsumerKey = (String, String);

/// What acks and leases need from a consumer's row besides its position.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerCfg {
    pub policy: AckPolicy,
    pub max_deliver: i32,
    pub ack_wait_ms: Option<i64>,
    pub backoff_ms: Vec<i64>,
    /// The filter as SQL parameters (see `filter::filter_sql`), or why it is refused.
    pub filter_params: Result<(bool, Vec<String>, Vec<String>), PgError>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The LISTEN connection `fetch` waits on (subscriptions have their own).
pub(crate) struct SharedListener {
    pub conn: Dedicated,
    pub channels: HashSet<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct StreamRoute {
    pub name: String,
    pub subjects: Vec<String>,
    pub duplicate_window_ms: i64,
}

impl Inner {
    pub(crate) async fn client(&self, op: &'static str) -> Result<Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::pool(op, e))
    }

    /// A pooled connection for a publish, within the publishers' share of the pool (see
    /// [`publish_share`]); the permit goes with the connection. Waits at most as long as the
    /// pool would.
    pub(crate) async fn publish_client(
        &self,
        op: &'static str,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, Object), PgError> {
        let wait = self.settings.connect_timeout;
        let permit = match tokio::time::timeout(wait, self.publishers.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => {
                return Err(PgError::Db {
                    op,
                    msg: "the connection pool is closed".into(),
                    transient: false,
                })
            }
            Err(_) => {
                return Err(PgError::Db {
                    op,
                    msg: format!("no connection within the timeout ({wait:?})"),
                    transient: true,
                })
            }
        };
        Ok((permit, self.client(op).await?))
    }

    /// The consumer's settings, from the cache or its row; `ConsumerNotFound` when absent.
    pub(crate) async fn consumer_cfg(
        &self,
        c: &Object,
        stream: &str,
        consumer: &str,
    ) -> Result<Arc<ConsumerCfg>, PgError> {
        let key = (stream.to_string(), consumer.to_string());
        if let Ok(g) = self.consumers.lock() {
            if let Some((at, cfg)) = g.get(&key) {
                if at.elapsed() < CONSUMER_TTL {
                    return Ok(cfg.clone());
                }
            }
        }
        let stmt = c
            .prepare_cached(
                "SELECT ack_policy, max_deliver, ack_wait_ms, backoff_ms, filter_subject \
                 FROM eventbus_consumers WHERE stream_name = $1 AND name = $2",
            )
            .await
            .map_err(|e| PgError::db("consumer settings", e))?;
        let row = c
            .query_opt(&stmt, &[&stream, &consumer])
            .await
            .map_err(|e| PgError::db("consumer settings", e))?
            .ok_or_else(|| PgError::ConsumerNotFound {
                stream: stream.to_string(),
                consumer: consumer.to_string(),
            })?;
        let filter: Option<String> = row.get(4);
        let filter_params = parse_filters(&filter.iter().cloned().collect::<Vec<_>>())
            .map(|f| sql_params(&f))
            .map_err(|e| {
                PgError::invalid(format!("consumer {consumer:?} on stream {stream:?}: {e}"))
            });
        let cfg = Arc::new(ConsumerCfg {
            policy: AckPolicy::from_db(&row.get::<_, String>(0)),
            max_deliver: row.get(1),
            ack_wait_ms: row.get(2),
            backoff_ms: row.get::<_, Option<Vec<i64>>>(3).unwrap_or_default(),
            filter_params,
        });
        if let Ok(mut g) = self.consumers.lock() {
            g.insert(key, (Instant::now(), cfg.clone()));
        }
        Ok(cfg)
    }

    /// Drops cached consumer settings (all of a stream's when `consumer` is None).
    pub(crate) fn forget_consumer(&self, stream: &str, consumer: Option<&str>) {
        if let Ok(mut g) = self.consumers.lock() {
            g.retain(|(s, c), _| s != stream || consumer.is_some_and(|n| n != c));
        }
    }

    /// Records that these publishes committed and listeners are owed a NOTIFY on each of
    /// their streams, for the highest id (a de-duplicated publish stored nothing). Publishes do
    /// not NOTIFY in their own transaction: PostgreSQL serialises the commits of every
    /// transaction that notified (one database-wide lock), which made concurrent publishers
    /// queue behind each other. The notifier sends one NOTIFY per stream for everything that
    /// committed since its last one, after those commits, so a woken listener sees the rows.
    /// A NOTIFY lost with the process is covered by the listeners' poll, as any lost NOTIFY.
    pub(crate) fn owe_notifies(&self, published: &[Published]) {
        let mut stored = published.iter().filter(|p| !p.duplicate).peekable();
        if stored.peek().is_none() {
            return;
        }
        if let Ok(mut owed) = self.owed_notifies.lock() {
            for p in stored {
                let top = owed.entry(p.stream.clone()).or_insert(p.id);
                *top = (*top).max(p.id);
            }
        }
        self.notify_wake.notify_one();
    }

    /// Hands a consumer's position to the background advancer.
    pub(crate) fn mark_lagging(&self, stream: &str, consumer: &str) {
        if let Ok(mut set) = self.lagging.lock() {
            set.insert((stream.to_string(), consumer.to_string()));
        }
        self.lag_wake.notify_one();
    }
}
