//! Settling deliveries: ack, nak, term and progress, for one token or thousands.
//!
//! A token settles only a delivery its consumer holds: a delivery row of that consumer that is
//! not settled yet (leased, or its lease ran out and nobody took it again). Every token of one
//! consumer is settled by one statement over `unnest($ids)`, which also reports each id's
//! outcome, so a bulk ack costs one round trip and its per-token result stays exact (a lone
//! token tries a primary-key update first and needs that statement only when it finds no held
//! row):
//!
//! * applied: the row was held and is now settled (or its lease moved, for nak/progress);
//! * already settled: acked, terminated or dead-lettered before (a retried ack is a no-op),
//!   or at or below the consumer's position (settled, and its row pruned);
//! * not delivered: the stream holds the message but this consumer was never handed it (an
//!   ack token naming another consumer, or a forged id): an error, nothing written;
//! * no message: the stream has no such id: an error.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::coalesce::Coalescer;

use super::core::Inner;
use tokio_postgres::types::ToSql;

use super::sql::duration_ms;
use super::types::{AckOp, AckPolicy, AckToken, DEFAULT_ACK_WAIT};
use super::{PgBus, PgError};

/// The outcome of each id of one consumer's settle, or why the statement failed.
type Settled = Result<HashMap<i64, Outcome>, PgError>;

/// What one id of a settle came to (the statement's codes 0-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    AlreadySettled,
    NotDelivered,
    NoMessage,
}

/// The `due_at` a settle sets: none for ack/term (`$5` 0), now + the nak delay (`$5` 1, `$6`
/// ms), or now + the row's backoff step or ack_wait for progress (`$5` 2, `$8` / `$7` ms).
macro_rules! settle_due_at {
    () => {
        "due_at = CASE $5::int4 \
         WHEN 1 THEN now() + $6::int8 * interval '1 millisecond' \
         WHEN 2 THEN now() + (CASE WHEN cardinality($8::int8[]) > 0 \
           THEN GREATEST(($8::int8[])[LEAST(GREATEST(d.delivery_count, 1), cardinality($8::int8[]))], 1) \
           ELSE $7::int8 END) * interval '1 millisecond' \
         ELSE NULL END"
    };
}

/// `$4` the new state (NULL for nak/progress), `$5` 0 settle / 1 nak / 2 progress, `$6` the
/// nak delay, `$7` ack_wait and `$8` backoff (ms) for progress. The outcome columns read the
/// snapshot from before the UPDATE, so a row this statement settled shows in `u` only.
///
/// Plan shape (see the `sql` module doc): with the delivery rows joined to the ids, a fresh
/// schema's one-row estimates made both the UPDATE and the outcome join read *every* delivery
/// row of the consumer (index condition on stream and consumer, the id a join filter): 6 ms
/// per settle in `make bench` once 25,000 rows had piled up, the trigger's bottleneck. Now the
/// UPDATE finds its rows through the `event_id` index only (`= ANY($3)`; the stream and
/// consumer compared as expressions, `|| ''`, so no plan can prefer the wider prefix scan of
/// the primary key), and each outcome is a per-id probe (`OFFSET 0` keeps every EXISTS a
/// subplan, never a hashed scan of the table).
///
/// The ids reach the planner only through a scalar subquery (`(SELECT $3::int8[])`, an
/// InitPlan), never as a value it could estimate from: with the array visible, each custom
/// plan was cheaper on paper than the generic one (one id against the default of ten), so
/// PostgreSQL planned the statement again on every call, 0.16 ms of the 0.2 ms each settle
/// cost in `make bench` (`pg_stat_statements`: 5,014 plans for 5,001 calls). Now every plan
/// costs the same, and the prepared statement keeps its generic plan after the fifth call.
///
/// The settle commits with `synchronous_commit` off (transaction-local, this statement only): it
/// does not wait for its WAL flush. A server crash may lose the last few hundred milliseconds
/// of settles; their messages are then delivered again, which at-least-once delivery allows
/// (a publish stays synchronous: losing one would lose the message).
const SETTLE: &str = concat!(
    "WITH t AS (SELECT DISTINCT x AS id FROM unnest((SELECT $3::int8[])) AS x, \
       (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit), \
     u AS (UPDATE eventbus_event_deliveries d SET state = $4::text, ",
    settle_due_at!(),
    " WHERE d.event_id = ANY((SELECT $3::int8[])::int8[]) AND d.stream_name || '' = $1 \
         AND d.consumer_name || '' = $2 AND d.state IS NULL \
       RETURNING d.event_id) \
     SELECT t.id, (CASE WHEN t.id IN (SELECT event_id FROM u) THEN 0 \
       WHEN EXISTS (SELECT 1 FROM eventbus_event_deliveries d WHERE d.stream_name = $1 \
         AND d.consumer_name = $2 AND d.event_id = t.id OFFSET 0) THEN 1 \
       WHEN NOT EXISTS (SELECT 1 FROM eventbus_events e WHERE e.id = t.id \
         AND e.stream_name = $1 OFFSET 0) THEN 3 \
       WHEN t.id <= (SELECT position FROM eventbus_consumers k \
         WHERE k.stream_name = $1 AND k.name = $2) THEN 1 \
       ELSE 2 END)::int4 FROM t"
);

/// One token's settle, the common case (an ack step, a lone trigger ack): the same update as
/// [`SETTLE`] as one primary-key probe, 10 us of server time where the general statement takes
/// 40-50 (`make bench`, consume + ack each). A row returned is the id applied; none sends the
/// id through [`SETTLE`] to learn which other outcome it has.
const SETTLE_ONE: &str = concat!(
    "UPDATE eventbus_event_deliveries d SET state = $4::text, ",
    settle_due_at!(),
    " WHERE d.stream_name = $1 AND d.consumer_name = $2 AND d.event_id = $3::int8 \
       AND d.state IS NULL \
       AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL \
     RETURNING d.event_id"
);

/// With ack_policy `all`, an ack also settles every held delivery below it (NATS's AckAll).
const ACK_ALL_BELOW: &str = "UPDATE eventbus_event_deliveries SET state = 'acked', due_at = NULL \
     WHERE stream_name = $1 AND consumer_name = $2 AND event_id <= $3 AND state IS NULL";

/// The settle statement's outcome per id.
fn outcomes(rows: &[tokio_postgres::Row]) -> HashMap<i64, Outcome> {
    rows.iter()
        .map(|r| {
            let code: i32 = r.get(1);
            let o = match code {
                0 => Outcome::Applied,
                1 => Outcome::AlreadySettled,
                3 => Outcome::NoMessage,
                _ => Outcome::NotDelivered,
            };
            (r.get::<_, i64>(0), o)
        })
        .collect()
}

/// Settles `ids` of one consumer; the outcome of each distinct id. Idempotent, so the caller
/// may retry it after a lost connection.
async fn settle_group(
    inner: &Arc<Inner>,
    stream: &str,
    consumer: &str,
    ids: &[i64],
    op: AckOp,
) -> Result<HashMap<i64, Outcome>, PgError> {
    const OP: &str = "Ack";
    let db = |e| PgError::db(OP, e);
    let c = inner.client(OP).await?;
    let cfg = inner.consumer_cfg(&c, stream, consumer).await?;
    if cfg.policy == AckPolicy::None {
        // Settled when delivered: acks change nothing.
        return Ok(ids
            .iter()
            .map(|id| (*id, Outcome::AlreadySettled))
            .collect());
    }
    let (state, kind, nak_ms): (Option<&str>, i32, i64) = match op {
        AckOp::Ack => (Some("acked"), 0, 0),
        AckOp::Term => (Some("term"), 0, 0),
        AckOp::Nak(delay) => (None, 1, delay.map(duration_ms).unwrap_or(0)),
        AckOp::Progress => (None, 2, 0),
    };
    let ack_wait = cfg
        .ack_wait_ms
        .filter(|ms| *ms > 0)
        .unwrap_or(duration_ms(DEFAULT_ACK_WAIT));
    // A lone token: one primary-key update; the general statement only when it found no
    // held row, for the token's outcome.
    let lone = match ids {
        [id] => {
            let stmt = c.prepare_cached(SETTLE_ONE).await.map_err(db)?;
            let params: [&(dyn ToSql + Sync); 8] = [
                &stream,
                &consumer,
                id,
                &state,
                &kind,
                &nak_ms,
                &ack_wait,
                &cfg.backoff_ms,
            ];
            let applied = c.query_opt(&stmt, &params).await.map_err(db)?.is_some();
            applied.then_some(*id)
        }
        _ => None,
    };
    let out = match lone {
        Some(id) => HashMap::from([(id, Outcome::Applied)]),
        None => {
            let stmt = c.prepare_cached(SETTLE).await.map_err(db)?;
            let params: [&(dyn ToSql + Sync); 8] = [
                &stream,
                &consumer,
                &ids,
                &state,
                &kind,
                &nak_ms,
                &ack_wait,
                &cfg.backoff_ms,
            ];
            outcomes(&c.query(&stmt, &params).await.map_err(db)?)
        }
    };
    // An ack or term may let the position move. The settle answers without moving it: the
    // background advancer moves each consumer at most once per interval, however many acks
    // asked (a move per ack cost its fence and move statements, 0.15 ms of server time, on
    // every message). With ack_policy `all` an ack first settles everything held below the
    // highest id it settled, as NATS's AckAll does, before it answers.
    let settled_max = out
        .iter()
        .filter(|(_, o)| **o == Outcome::Applied)
        .map(|(id, _)| *id)
        .max();
    let (Some(top), Some(_)) = (settled_max, state) else {
        return Ok(out);
    };
    if cfg.policy == AckPolicy::All && op == AckOp::Ack {
        let stmt = c.prepare_cached(ACK_ALL_BELOW).await.map_err(db)?;
        c.execute(&stmt, &[&stream, &consumer, &top])
            .await
            .map_err(db)?;
    }
    if cfg.filter_params.is_ok() {
        inner.mark_lagging(stream, consumer);
    }
    Ok(out)
}

impl PgBus {
    /// Settles every token (see the module doc) with one statement per consumer; one result
    /// per token, in order. A failure of the statement (after retries of transient ones) is
    /// the result of each of its tokens.
    pub async fn settle_many(&self, tokens: &[AckToken], op: AckOp) -> Vec<Result<(), PgError>> {
        // Tokens by consumer, in first-seen order.
        let mut groups: Vec<((&str, &str), Vec<i64>)> = Vec::new();
        for t in tokens {
            let key = (t.stream.as_str(), t.consumer.as_str());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, ids)) => ids.push(t.id),
                None => groups.push((key, vec![t.id])),
            }
        }
        let mut done: HashMap<(&str, &str), Settled> = HashMap::new();
        for ((stream, consumer), ids) in &groups {
            let r = self
                .retrying(|| settle_group(&self.inner, stream, consumer, ids, op))
                .await;
            if matches!(op, AckOp::Nak(_)) {
                // After the statement ended (committed or not): see `Inner::naks`.
                self.inner.naks.fetch_add(1, Ordering::AcqRel);
            }
            done.insert((stream, consumer), r);
        }
        tokens
            .iter()
            .map(|t| {
                let outcomes = match done.get(&(t.stream.as_str(), t.consumer.as_str())) {
                    Some(Ok(o)) => o,
                    Some(Err(e)) => return Err(e.clone()),
                    None => return Err(PgError::invalid("Ack: token was not settled")),
                };
                match outcomes.get(&t.id) {
                    Some(Outcome::Applied | Outcome::AlreadySettled) => Ok(()),
                    Some(Outcome::NoMessage) => Err(PgError::NoMessage {
                        stream: t.stream.clone(),
                        id: t.id,
                    }),
                    Some(Outcome::NotDelivered) | None => Err(PgError::NotDelivered {
                        stream: t.stream.clone(),
                        consumer: t.consumer.clone(),
                        id: t.id,
                    }),
                }
            })
            .collect()
    }
}

/// Tokens one coalesced flush settles at most.
const COALESCE_MAX: usize = 512;

/// Coalesces settles from many concurrent callers (a trigger's pipelines) into
/// [`PgBus::settle_many`] calls (see the `coalesce` module): each caller still awaits its own
/// token's result, so nothing is settled before its caller asked.
#[derive(Clone)]
pub struct Settler(Coalescer<(AckToken, AckOp), Result<(), PgError>>);

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler").finish_non_exhaustive()
    }
}

impl Settler {
    /// Settles one token, at once or in the next flush; its own outcome, as [`PgBus::ack`]
    /// gives it.
    pub async fn settle(&self, token: &AckToken, op: AckOp) -> Result<(), PgError> {
        self.0
            .call((token.clone(), op), || Err(PgError::Cancelled("Ack")))
            .await
    }
}

impl PgBus {
    /// A settle coalescer over this bus (see [`Settler`]).
    pub fn settler(&self) -> Settler {
        let bus = self.clone();
        Settler(Coalescer::new(
            self.inner.cancel.clone(),
            COALESCE_MAX,
            move |queued: Vec<(AckToken, AckOp)>| {
                let bus = bus.clone();
                async move {
                    // One settle_many per kind of settle, in the order the kinds first came;
                    // the results in the order of the queue.
                    let mut out: Vec<Option<Result<(), PgError>>> = vec![None; queued.len()];
                    let mut left: Vec<usize> = (0..queued.len()).collect();
                    while let Some(&first) = left.first() {
                        let op = queued[first].1;
                        let (same, rest): (Vec<usize>, Vec<usize>) =
                            left.into_iter().partition(|i| queued[*i].1 == op);
                        left = rest;
                        let tokens: Vec<AckToken> =
                            same.iter().map(|i| queued[*i].0.clone()).collect();
                        for (i, r) in same.into_iter().zip(bus.settle_many(&tokens, op).await) {
                            out[i] = Some(r);
                        }
                    }
                    out.into_iter()
                        .map(|r| r.unwrap_or(Err(PgError::Cancelled("Ack"))))
                        .collect()
                }
            },
        ))
    }
}
