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

/// Moves the consumer's `position` (the Go cursor) to just below its first unsettled
/// matching event, or to the stream's last id when everything is settled, never backwards.
/// Needs the stream's exclusive publish lock (see `publish`); without `wait` it only tries,
/// and skips when publishes are in flight (prune catches up).
pub(crate) async fn advance_position(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &str,
    consumer: &str,
    filter: Option<&str>,
    wait: bool,
) -> Result<(), PgError> {
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
            return Ok(());
        }
    }
    let filters = match parse_filters(&filter.map(|f| vec![f.to_string()]).unwrap_or_default()) {
        Ok(f) => f,
        // A Go-written filter we refuse: leave its position alone.
        Err(_) => return Ok(()),
    };
    let (all, exact, like) = sql_params(&filters);
    let sql = format!(
        "UPDATE eventbus_consumers c SET position = GREATEST(c.position, COALESCE( \
           (SELECT min(e.id) - 1 FROM eventbus_events e WHERE e.stream_name = $1 \
              AND e.id > c.position AND {} AND NOT EXISTS (SELECT 1 FROM eventbus_event_deliveries d \
              WHERE d.stream_name = $1 AND d.consumer_name = $2 AND d.event_id = e.id \
              AND d.state IS NOT NULL)), \
           (SELECT max(id) FROM eventbus_events WHERE stream_name = $1), c.position)) \
         WHERE c.stream_name = $1 AND c.name = $2",
        filter_sql(3)
    );
    let params: [&(dyn ToSql + Sync); 5] = [&stream, &consumer, &all, &exact, &like];
    tx.execute(&sql, &params).await.map_err(db)?;
    Ok(())
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
