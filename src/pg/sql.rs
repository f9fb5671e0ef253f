//! SQL helpers shared by publish, lease, ack and prune.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::types::ToSql;

use super::filter::{filter_sql, parse_filters, sql_params};
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

/// Event rows one position advance looks at. Bounds the work done while holding the
/// stream's exclusive publish lock (publishers wait behind it); a consumer further behind
/// catches up over several advances (acks, the background advancer, prune).
pub(crate) const ADVANCE_WINDOW: i64 = 2_000;

/// What [`advance_position`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advance {
    /// Publishes were in flight (only when not waiting): nothing checked.
    Busy,
    /// The position moved forward, to its first unsettled matching event or the stream's end.
    Moved,
    /// The position moved across a whole window of settled or filtered-out events: there may
    /// be more to skip.
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

/// Moves the consumer's `position` (the Go cursor: everything at or below it is settled) to
/// just below its first unsettled matching event, or to the last event looked at when all of
/// them are settled or filtered out, never backwards. Looks at no more than
/// [`ADVANCE_WINDOW`] events above the position, in id order, and stops at the first
/// unsettled match: an earlier version took `min(id)` over every unsettled event above the
/// position, so each ack cost a scan of the whole backlog (O(backlog) per ack, quadratic
/// overall).
///
/// Needs the stream's exclusive publish lock (see `publish`); without `wait` it only tries,
/// and returns [`Advance::Busy`] when publishes are in flight (the caller hands the consumer
/// to the background advancer).
pub(crate) async fn advance_position(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &str,
    consumer: &str,
    filter: Option<&str>,
    wait: bool,
) -> Result<Advance, PgError> {
    let db = |e| PgError::db("advance position", e);
    let key = stream_key(stream);
    if wait {
        tx.batch_execute("SET LOCAL lock_timeout = '2s'")
            .await
            .map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_CLASS, &key])
            .await
            .map_err(db)?;
    } else {
        let got: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1, $2)",
                &[&LOCK_CLASS, &key],
            )
            .await
            .map_err(db)?
            .get(0);
        if !got {
            return Ok(Advance::Busy);
        }
    }
    let filters = match parse_filters(&filter.map(|f| vec![f.to_string()]).unwrap_or_default()) {
        Ok(f) => f,
        // A Go-written filter we refuse: leave its position alone.
        Err(_) => return Ok(Advance::Stayed),
    };
    let (all, exact, like) = sql_params(&filters);
    // `w` is the window: the next ADVANCE_WINDOW events of the stream above the position, in
    // id order (an index range on the primary key). The first unsettled match in it bounds
    // the position; when there is none, the whole window is settled or filtered out and the
    // position moves to its end. COALESCE evaluates the second scan only when needed.
    // `d.event_id > c.position` lets the delivery lookup use a range, not the whole history.
    let sql = format!(
        "WITH k AS (SELECT position FROM eventbus_consumers \
           WHERE stream_name = $1 AND name = $2 FOR UPDATE) \
         UPDATE eventbus_consumers c SET position = GREATEST(k.position, COALESCE( \
           (SELECT e.id - 1 FROM (SELECT ev.id, ev.subject FROM eventbus_events ev \
               WHERE ev.stream_name = $1 AND ev.id > k.position ORDER BY ev.id LIMIT $6) e \
             WHERE {} AND NOT EXISTS (SELECT 1 FROM eventbus_event_deliveries d \
               WHERE d.stream_name = $1 AND d.consumer_name = $2 AND d.event_id = e.id \
               AND d.event_id > k.position AND d.state IS NOT NULL) \
             ORDER BY e.id LIMIT 1), \
           (SELECT max(w.id) FROM (SELECT ev.id FROM eventbus_events ev \
               WHERE ev.stream_name = $1 AND ev.id > k.position ORDER BY ev.id LIMIT $6) w), \
           k.position)) \
         FROM k WHERE c.stream_name = $1 AND c.name = $2 \
         RETURNING c.position > k.position, CASE WHEN c.position > k.position THEN \
           (SELECT count(*) FROM (SELECT 1 FROM eventbus_events ev WHERE ev.stream_name = $1 \
              AND ev.id > k.position AND ev.id <= c.position LIMIT $6) z) = $6 ELSE false END",
        filter_sql(3)
    );
    let params: [&(dyn ToSql + Sync); 6] =
        [&stream, &consumer, &all, &exact, &like, &ADVANCE_WINDOW];
    let row = tx.query_opt(&sql, &params).await.map_err(db)?;
    Ok(
        match row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
            Some((true, true)) => Advance::MovedWindow,
            Some((true, false)) => Advance::Moved,
            _ => Advance::Stayed,
        },
    )
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
