//! Moving consumer positions and pruning the settled delivery rows below them: the
//! background pass's work (acks never move a position or delete), also run by a subscriber
//! before its first claim and by the periodic prune.

use deadpool_postgres::Object;

use super::core::Inner;
use super::sql::advance_position;
use super::PgError;

/// Rows deleted per stream/consumer and rule in one prune run, so a run stays short.
pub const PRUNE_BATCH: i64 = 10_000;

/// Settled delivery rows removed per consumer in one pass (the advancer's or prune's).
const PRUNE_DELIVERIES: &str =
    "DELETE FROM eventbus_event_deliveries WHERE ctid IN (SELECT d.ctid \
     FROM eventbus_event_deliveries d JOIN eventbus_consumers k ON k.stream_name = d.stream_name \
     AND k.name = d.consumer_name WHERE d.stream_name = $1 AND d.consumer_name = $2 \
     AND d.event_id <= k.position LIMIT $3)";

/// Windows one background advance of a consumer moves at most before it hands the
/// consumer to the next pass (other consumers get their turn in between).
const CATCH_UP_WINDOWS: u32 = 64;

/// One waiting advance of a consumer's position, then the settled delivery rows at or below
/// it removed (bounded): the background pass, so acks never delete. Re-queues the consumer
/// while it keeps moving, since one advance looks at a bounded window only. The rows deleted.
pub(crate) async fn advance_and_prune(
    inner: &Inner,
    c: &Object,
    stream: &str,
    consumer: &str,
) -> Result<u64, PgError> {
    const OP: &str = "advance position";
    let db = |e| PgError::db(OP, e);
    let cfg = match inner.consumer_cfg(c, stream, consumer).await {
        Ok(cfg) => cfg,
        // Deleted meanwhile: nothing to advance.
        Err(PgError::ConsumerNotFound { .. }) => return Ok(0),
        Err(e) => return Err(e),
    };
    // A consumer far behind (a filtered consumer whose subject is rare on its stream starts
    // below every other subject's events) moves window after window at once: until its
    // position passes that gap, each of its claims scans the gap again (18 ms per claim in
    // `make bench` with 40,000 ids of other subjects below a trigger's first message).
    // Only the first window reads a fence (under the stream's exclusive lock, so publishers
    // wait once); the next ones move under the same fence.
    if advance_position(c, stream, consumer, &cfg, true, CATCH_UP_WINDOWS)
        .await?
        .unfinished()
    {
        inner.mark_lagging(stream, consumer);
    }
    let prune = c.prepare_cached(PRUNE_DELIVERIES).await.map_err(db)?;
    c.execute(&prune, &[&stream, &consumer, &PRUNE_BATCH])
        .await
        .map_err(db)
}

/// One background advance of a consumer (see [`advance_and_prune`]).
pub(crate) async fn advance_one(
    inner: &Inner,
    stream: &str,
    consumer: &str,
) -> Result<(), PgError> {
    let c = inner.client("advance position").await?;
    advance_and_prune(inner, &c, stream, consumer)
        .await
        .map(|_| ())
}
