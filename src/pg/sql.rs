//! SQL helpers shared by publish, lease, ack and prune.
//!
//! Plan shapes: the hot statements spell their plans out. Measured (auto_explain on a fresh schema, as
//! `make bench` and every new deployment start): with no or stale statistics the planner
//! estimates one row everywhere and joins `NOT EXISTS (delivery row of this event)` as an
//! anti join whose inner side is the consumer's *every* delivery row (index condition on
//! stream and consumer only, `event_id = e.id` a join filter), then sorts the result: each
//! ack's position move cost O(events in the window x the consumer's delivery rows), 5-15 ms
//! once a few thousand rows existed, the fixed per-ack wait of the step. A range bound given as
//! a scalar subquery (an InitPlan) keeps the events' index scan outermost and ordered, so
//! `LIMIT` stops it; `OFFSET 0` stops the planner from pulling the NOT EXISTS up into a join,
//! so it stays a probe of the delivery row's primary key per candidate event.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::types::ToSql;

use deadpool_postgres::Object;

use super::core::ConsumerCfg;
use super::filter::filter_sql;
use super::keys::{stream_key, LOCK_CLASS};
use super::types::DEFAULT_ACK_WAIT;
use super::PgError;

/// `ts` as microseconds since the epoch (the crate has no chrono/time SQL feature).
pub(crate) const TS_MICROS: &str = "(extract(epoch from e.ts) * 1000000)::int8";

pub(crate) fn micros_to_time(us: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn headers_from_json(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Lease of the n-th delivery (1-based): `backoff[n-1]` (last entry repeated) or ack_wait.
pub(crate) fn lease_ms(count: i32, ack_wait_ms: Option<i64>, backoff_ms: &[i64]) -> i64 {
    if !backoff_ms.is_empty() {
        let i = usize::try_from(count.max(1) - 1)
            .unwrap_or(0)
            .min(backoff_ms.len() - 1);
        return backoff_ms[i].max(1);
    }
    ack_wait_ms
        .filter(|ms| *ms > 0)
        .unwrap_or(duration_ms(DEFAULT_ACK_WAIT))
}

/// Ids one position advance looks at (an id range, not a row count, so no plan can read
/// past it); a consumer further behind catches up over several advances (the background
/// advancer continues while a whole window moved).
pub(crate) const ADVANCE_WINDOW: i64 = 2_000;

/// What [`advance_position`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advance {
    /// Publishes were in flight (only when not waiting), or another advance of the consumer
    /// was under way: nothing checked.
    Busy,
    /// The position moved forward, to its first unsettled matching event or the fence.
    Moved,
    /// The position moved across a whole window of settled or filtered-out ids: there may be
    /// more to skip.
    MovedWindow,
    /// The position was already at its first unsettled matching event.
    Stayed,
}

impl Advance {
    /// Whether another advance may still move the position (left to the background advancer).
    pub(crate) fn unfinished(self) -> bool {
        matches!(self, Advance::Busy | Advance::MovedWindow)
    }
}

/// The last id drawn from the events' sequence, read while holding the stream's exclusive
/// publish lock for this one statement only (autocommit: the lock ends with the statement).
/// Publishers hold the shared lock from before they draw an id until they commit, so every id
/// at or below the fence belongs to a publish that has finished: a later statement's snapshot
/// sees all of them. The CASE makes the sequence read wait for the lock (an initplan runs when
/// first used). Without waiting (`try`), NULL when publishes were in flight.
///
/// The fence is handed to the position move that follows on the same connection, in the same
/// round trip (pipelined), through the session setting `eventbus.fence` as `<stream>/<fence>`
/// (empty after the slash: none). A value left by an earlier statement (this one failed, e.g.
/// its lock wait timed out) is still a fence of that stream, only lower: ids never go back, so
/// every id at or below it still belongs to a finished publish. The stream in the value keeps a
/// fence of one stream from ever bounding another's move (the publish lock is per stream).
const FENCE_SQL: &str = "SELECT set_config('eventbus.fence', $3::text || '/' || COALESCE(( \
       SELECT CASE WHEN __LOCK__ THEN \
         (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END \
          FROM eventbus_events_id_seq) END)::text, ''), false) __FROM__";

fn fence_sql(wait: bool) -> &'static str {
    static TRY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static WAIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if wait {
        WAIT.get_or_init(|| {
            FENCE_SQL
                .replace(
                    "__LOCK__",
                    "pg_advisory_xact_lock($1, $2)::text IS NOT NULL",
                )
                // Bounded: a publish that hangs holding its shared lock fails this advance
                // after 2 s instead of stalling every later publisher behind our wait.
                .replace(
                    "__FROM__",
                    "FROM (SELECT set_config('lock_timeout', '2s', true)) AS s",
                )
        })
    } else {
        TRY.get_or_init(|| {
            FENCE_SQL
                .replace("__LOCK__", "pg_try_advisory_xact_lock($1, $2)")
                .replace("__FROM__", "")
        })
    }
}

/// Moves the position to just below the first unsettled matching event in `(position,
/// LEAST(position + $6, fence)]`, or to the end of that range when it holds none; the fence
/// is the one the statement before left in `eventbus.fence` for this stream (no fence: the
/// consumer row is not even read, and no row comes back). The event scan is an index range
/// of at most ADVANCE_WINDOW ids. Returns (moved, whole window).
///
/// Committed without waiting for its WAL flush (`synchronous_commit` off for this statement),
/// like the settle: a move lost in a server crash is made again by the next one.
///
/// The consumer row is locked `FOR NO KEY UPDATE` (what its UPDATE takes anyway), so two moves
/// of one consumer skip each other while claims go on: a claim's delivery rows check their
/// foreign key with `FOR KEY SHARE` on the same row, which `FOR UPDATE` conflicts with. Under
/// `FOR UPDATE`, a consumer whose claims ran back to back was skipped by every move (measured
/// in `make bench`: a trigger's claims kept scanning 30,000 ids of other subjects below its
/// first message, 60-430 ms each, because its position never got past them).
///
/// The plan's shape is fixed by the text, not left to table statistics (see the module doc):
/// the range bounds are scalar subqueries, so the scan of `(stream_name, id)` is the outer
/// side, in id order, and stops at the first hit; the `OFFSET 0` keeps the NOT EXISTS a
/// per-row probe of the delivery row's primary key.
const ADVANCE: &str = "WITH fe AS (SELECT CASE WHEN left(v, length($1) + 1) = $1 || '/' \
       THEN NULLIF(substr(v, length($1) + 2), '')::int8 END AS fence \
       FROM (SELECT current_setting('eventbus.fence', true) AS v, \
         set_config('synchronous_commit', 'off', true) AS async_commit) AS s), \
     k AS (SELECT position, fence FROM eventbus_consumers, fe \
       WHERE stream_name = $1 AND name = $2 AND fence IS NOT NULL FOR NO KEY UPDATE OF eventbus_consumers SKIP LOCKED), \
     r AS (SELECT position AS lo, LEAST(position + $6, fence) AS hi, fence FROM k), \
     f AS (SELECT e.id FROM eventbus_events e WHERE e.stream_name = $1 \
       AND e.id > (SELECT lo FROM r) AND e.id <= (SELECT hi FROM r) AND __FILTER__ \
       AND NOT EXISTS (SELECT 1 FROM eventbus_event_deliveries d \
         WHERE d.stream_name = $1 AND d.consumer_name = $2 AND d.event_id = e.id \
         AND d.state IS NOT NULL OFFSET 0) \
       ORDER BY e.id LIMIT 1) \
     UPDATE eventbus_consumers c SET position = GREATEST(r.lo, COALESCE((SELECT id - 1 FROM f), r.hi)) \
     FROM r WHERE c.stream_name = $1 AND c.name = $2 \
     RETURNING c.position > r.lo, c.position = r.lo + $6 AND r.hi < r.fence";

fn advance_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| ADVANCE.replace("__FILTER__", &filter_sql(3)))
}

/// Moves the consumer's `position` (the Go cursor: everything at or below it is settled)
/// forward, never backwards, by at most [`ADVANCE_WINDOW`] ids: to just below its first
/// unsettled matching event, or across ids that are all settled or filtered out. An earlier
/// version took `min(id)` over every unsettled event above the position (O(backlog) per ack).
///
/// Two autocommit statements on `c` (which must not be in a transaction), pipelined in one
/// round trip: the fence (see [`FENCE_SQL`]), then the move, bounded by the fence, in a
/// snapshot taken after it. The stream's exclusive lock is held only for the fence read, so
/// publishers wait microseconds, not for a scan. Without `wait` the fence only tries, and the
/// result is [`Advance::Busy`] when publishes are in flight (the caller hands the consumer to
/// the background advancer). While a move crosses a whole window, up to `windows` of them in
/// all are crossed under the one fence, one statement each.
pub(crate) async fn advance_position(
    c: &Object,
    stream: &str,
    consumer: &str,
    cfg: &ConsumerCfg,
    wait: bool,
    windows: u32,
) -> Result<Advance, PgError> {
    let db = |e| PgError::db("advance position", e);
    let Ok((all, exact, like)) = &cfg.filter_params else {
        // A Go-written filter we refuse: leave its position alone.
        return Ok(Advance::Stayed);
    };
    let fence_stmt = c.prepare_cached(fence_sql(wait)).await.map_err(db)?;
    let advance = c.prepare_cached(advance_sql()).await.map_err(db)?;
    let key = stream_key(stream);
    let fence: [&(dyn ToSql + Sync); 3] = [&LOCK_CLASS, &key, &stream];
    let params: [&(dyn ToSql + Sync); 6] = [&stream, &consumer, all, exact, like, &ADVANCE_WINDOW];
    let (fenced, row) = futures::future::join(
        c.query_one(&fence_stmt, &fence),
        c.query_opt(&advance, &params),
    )
    .await;
    fenced.map_err(db)?;
    let mut a = advanced(row.map_err(db)?);
    // The next windows move under the same fence (still in the session, see [`FENCE_SQL`]):
    // no lock taken.
    for _ in 1..windows {
        if a != Advance::MovedWindow {
            break;
        }
        a = advanced(c.query_opt(&advance, &params).await.map_err(db)?);
    }
    Ok(a)
}

/// What the move's row says (see [`ADVANCE`]).
fn advanced(row: Option<tokio_postgres::Row>) -> Advance {
    match row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
        Some((true, true)) => Advance::MovedWindow,
        Some((true, false)) => Advance::Moved,
        Some((false, _)) => Advance::Stayed,
        // No fence (publishes in flight), or the consumer row is locked by another advance:
        // skipped, left to the background advancer.
        None => Advance::Busy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_follow_backoff_then_repeat_its_last_entry() {
        assert_eq!(lease_ms(1, Some(500), &[]), 500);
        assert_eq!(lease_ms(3, None, &[]), 30_000);
        let b = [100, 1000];
        assert_eq!(lease_ms(1, Some(500), &b), 100);
        assert_eq!(lease_ms(2, Some(500), &b), 1000);
        assert_eq!(lease_ms(9, Some(500), &b), 1000);
    }
}
