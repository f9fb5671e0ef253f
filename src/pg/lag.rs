//! Consumer lag for the metrics refresher: read-only, two statements per consumer, each bounded.

use super::filter::{filter_sql, parse_filters, sql_params};
use super::{PgBus, PgError};

/// A consumer's backlog as the metrics report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lag {
    /// Events past the consumer's position that match its filter and are neither settled nor
    /// leased, counted up to the cap.
    pub pending: u64,
    /// Delivered rows not settled whose lease (or nak delay) has not run out, up to the cap.
    pub leased: u64,
}

impl PgBus {
    /// The lag of `consumer` on `stream`, each count stopping at `cap` rows so a deep backlog
    /// costs an index range scan of at most `cap` entries; `None` when the consumer is gone.
    pub async fn lag(
        &self,
        stream: &str,
        consumer: &str,
        cap: i64,
    ) -> Result<Option<Lag>, PgError> {
        const OP: &str = "consumer lag";
        let Some(def) = self.consumer(stream, consumer).await? else {
            return Ok(None);
        };
        let (all, exact, like) = sql_params(&parse_filters(&def.filter_subjects)?);
        let sql = format!(
            "WITH c AS (SELECT position FROM eventbus_consumers WHERE stream_name = $1 AND name = $2), \
             past AS (SELECT e.id FROM eventbus_events e, c \
                      WHERE e.stream_name = $1 AND e.id > c.position AND {} \
                      AND NOT EXISTS (SELECT 1 FROM eventbus_event_deliveries d \
                          WHERE d.stream_name = $1 AND d.consumer_name = $2 AND d.event_id = e.id \
                          AND (d.state IS NOT NULL OR d.due_at > now())) \
                      ORDER BY e.id LIMIT $6), \
             leased AS (SELECT 1 FROM eventbus_event_deliveries d \
                        WHERE d.stream_name = $1 AND d.consumer_name = $2 \
                        AND d.state IS NULL AND d.due_at > now() LIMIT $6) \
             SELECT (SELECT count(*) FROM past), (SELECT count(*) FROM leased)",
            filter_sql(3)
        );
        let c = self.client(OP).await?;
        let row = c
            .query_one(&sql, &[&stream, &consumer, &all, &exact, &like, &cap])
            .await
            .map_err(|e| PgError::db(OP, e))?;
        let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(Some(Lag {
            pending: n(0),
            leased: n(1),
        }))
    }
}
