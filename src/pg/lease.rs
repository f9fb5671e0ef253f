//! Claiming deliverable rows for a consumer: shared by `fetch` and `Subscription`.
//!
//! A row is deliverable when its event is above the consumer's position, matches the filter,
//! and has no delivery row that is settled (`state` set) or still leased (`due_at` in the
//! future). The claim is an `INSERT ... ON CONFLICT DO UPDATE ... WHERE <still deliverable>`
//! on the delivery rows inside one transaction: the conflicting row is locked and re-checked
//! at its latest committed version, so two fetchers racing for one event (whatever their
//! snapshots) cannot both claim it; the loser simply gets fewer rows. The candidate events
//! are not locked with `FOR UPDATE SKIP LOCKED` on purpose: event rows are shared by every
//! consumer of the stream, and skipping rows another *consumer* is leasing would make this
//! one miss them until its next poll.
//!
//! Past max_deliver a row is dead-lettered in the same transaction: copied to the stream that
//! owns the dead-letter subject (when one is given) and marked `dead`; it is never handed to
//! the caller again. When no stream owns the dead-letter subject the row stays unsettled (no
//! message is dropped) and the problem is logged.

use std::collections::BTreeMap;

use super::core::Inner;
use super::filter::{filter_sql, parse_filters, sql_params};
use super::keys::{stream_key, LOCK_CLASS};
use super::sql::{advance_position, headers_from_json, lease_ms, micros_to_time, TS_MICROS};
use super::types::{notify_channel, AckPolicy, AckToken, Delivery};
use super::PgError;

struct Candidate {
    id: i64,
    subject: String,
    headers: serde_json::Value,
    payload: Vec<u8>,
    correlation_id: Option<String>,
    ts_us: i64,
}

pub(crate) async fn lease(
    bus: &Inner,
    stream: &str,
    consumer: &str,
    max: usize,
    max_bytes: Option<usize>,
    dead_letter: Option<&str>,
) -> Result<Vec<Delivery>, PgError> {
    const OP: &str = "Fetch";
    let db = |e| PgError::db(OP, e);
    let mut c = bus.client(OP).await?;
    let tx = c.transaction().await.map_err(db)?;
    let k = tx
        .query_opt(
            "SELECT position, filter_subject, ack_policy, max_deliver, ack_wait_ms, backoff_ms \
             FROM eventbus_consumers WHERE stream_name = $1 AND name = $2",
            &[&stream, &consumer],
        )
        .await
        .map_err(db)?
        .ok_or_else(|| PgError::ConsumerNotFound {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
        })?;
    let position: i64 = k.get(0);
    let filter: Option<String> = k.get(1);
    let policy = AckPolicy::from_db(&k.get::<_, String>(2));
    let max_deliver: i32 = k.get(3);
    let ack_wait: Option<i64> = k.get(4);
    let backoff: Vec<i64> = k.get::<_, Option<Vec<i64>>>(5).unwrap_or_default();
    let filters = parse_filters(&filter.iter().cloned().collect::<Vec<_>>()).map_err(|e| {
        PgError::invalid(format!("consumer {consumer:?} on stream {stream:?}: {e}"))
    })?;
    let (all, exact, like) = sql_params(&filters);
    let limit = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
    let select = tx
        .prepare_cached(&format!(
            "SELECT e.id, e.subject, e.headers, e.payload, e.correlation_id, {TS_MICROS} \
             FROM eventbus_events e WHERE e.stream_name = $1 AND e.id > $2 AND {} \
             AND NOT EXISTS (SELECT 1 FROM eventbus_event_deliveries d \
               WHERE d.stream_name = $1 AND d.consumer_name = $3 AND d.event_id = e.id \
               AND d.event_id > $2 AND (d.state IS NOT NULL OR d.due_at > now())) \
             ORDER BY e.id LIMIT $7",
            filter_sql(4)
        ))
        .await
        .map_err(db)?;
    let rows = tx
        .query(
            &select,
            &[&stream, &position, &consumer, &all, &exact, &like, &limit],
        )
        .await
        .map_err(db)?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut cands: Vec<Candidate> = Vec::with_capacity(rows.len());
    let mut bytes = 0usize;
    for r in &rows {
        let payload: Vec<u8> = r.get(3);
        if let Some(limit) = max_bytes {
            if !cands.is_empty() && bytes + payload.len() > limit {
                break;
            }
        }
        bytes += payload.len();
        cands.push(Candidate {
            id: r.get(0),
            subject: r.get(1),
            headers: r.get(2),
            payload,
            correlation_id: r.get(4),
            ts_us: r.get(5),
        });
    }
    let ids: Vec<i64> = cands.iter().map(|c| c.id).collect();
    // The lease (and, with ack_policy none, the settlement) is written by the claim itself:
    // the n-th delivery is leased for backoff[n-1] (last entry repeated) or ack_wait.
    let settle_now: Option<&str> = (policy == AckPolicy::None).then_some("acked");
    let first_lease = lease_ms(1, ack_wait, &backoff);
    let claim = tx
        .prepare_cached(
            "INSERT INTO eventbus_event_deliveries AS d (stream_name, consumer_name, event_id, \
             delivery_count, first_delivered_at, last_delivered_at, state, due_at) \
             SELECT $1, $2, x, 1, now(), now(), $4::text, \
               now() + $5::int8 * interval '1 millisecond' FROM unnest($3::int8[]) AS x \
             ON CONFLICT (stream_name, consumer_name, event_id) DO UPDATE \
             SET delivery_count = d.delivery_count + 1, last_delivered_at = now(), state = $4::text, \
               due_at = now() + (CASE WHEN cardinality($6::int8[]) > 0 \
                 THEN ($6::int8[])[LEAST(d.delivery_count + 1, cardinality($6::int8[]))] \
                 ELSE $5::int8 END) * interval '1 millisecond' \
             WHERE d.state IS NULL AND (d.due_at IS NULL OR d.due_at <= now()) \
             RETURNING d.event_id, d.delivery_count",
        )
        .await
        .map_err(db)?;
    let claimed: BTreeMap<i64, i32> = tx
        .query(
            &claim,
            &[
                &stream,
                &consumer,
                &ids,
                &settle_now,
                &first_lease,
                &backoff,
            ],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut dead_ids = Vec::new();
    let mut out = Vec::with_capacity(claimed.len());
    let mut settled_any = policy == AckPolicy::None && !claimed.is_empty();
    for cand in cands {
        let Some(&count) = claimed.get(&cand.id) else {
            continue;
        };
        if count > max_deliver.max(1) {
            // Past max_deliver: never handed out again. Without a stream for the dead-letter
            // subject it stays unsettled under its new lease, so nothing is dropped.
            let dead = match dead_letter {
                None => true,
                Some(subject) => {
                    copy_to_dead_letter(&tx, stream, consumer, &cand, count, subject).await?
                }
            };
            if dead {
                tracing::warn!(
                    stream,
                    consumer,
                    id = cand.id,
                    deliveries = count - 1,
                    "pgchannel: message exceeded max_deliver; dead-lettered"
                );
                dead_ids.push(cand.id);
            }
            continue;
        }
        out.push(Delivery {
            token: AckToken {
                stream: stream.to_string(),
                consumer: consumer.to_string(),
                id: cand.id,
            },
            subject: cand.subject,
            payload: bytes::Bytes::from(cand.payload),
            headers: headers_from_json(cand.headers),
            correlation_id: cand.correlation_id,
            published_at: micros_to_time(cand.ts_us),
            delivery_count: count,
        });
    }
    if !dead_ids.is_empty() {
        tx.execute(
            "UPDATE eventbus_event_deliveries SET state = 'dead', due_at = NULL \
             WHERE stream_name = $1 AND consumer_name = $2 AND event_id = ANY($3::int8[])",
            &[&stream, &consumer, &dead_ids],
        )
        .await
        .map_err(db)?;
        settled_any = true;
    }
    let busy = settled_any
        && advance_position(&tx, stream, consumer, filter.as_deref(), false)
            .await?
            .unfinished();
    tx.commit().await.map_err(db)?;
    if busy {
        bus.mark_lagging(stream, consumer);
    }
    Ok(out)
}

/// Publishes a copy of the event to the dead-letter subject's stream inside the lease
/// transaction. False when no stream owns the subject (the row is then left unsettled).
async fn copy_to_dead_letter(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &str,
    consumer: &str,
    cand: &Candidate,
    count: i32,
    subject: &str,
) -> Result<bool, PgError> {
    let db = |e| PgError::db("dead-letter", e);
    let rows = tx
        .query(
            "SELECT name, subjects FROM eventbus_streams ORDER BY name",
            &[],
        )
        .await
        .map_err(db)?;
    let owner = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<String>>(1)))
        .find(|(_, subs)| subs.iter().any(|s| s == subject))
        .or_else(|| {
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<String>>(1)))
                .find(|(_, subs)| {
                    subs.iter()
                        .any(|p| super::filter::stream_subject_matches(p, subject))
                })
        });
    let Some((dl_stream, _)) = owner else {
        tracing::error!(
            stream,
            consumer,
            id = cand.id,
            subject,
            "pgchannel: no stream claims the dead-letter subject; the message stays unsettled"
        );
        return Ok(false);
    };
    let mut headers = headers_from_json(cand.headers.clone());
    headers.insert("Eventbus-Original-Subject".into(), cand.subject.clone());
    headers.insert("Eventbus-Original-Stream".into(), stream.to_string());
    headers.insert("Eventbus-Original-Sequence".into(), cand.id.to_string());
    headers.insert("Eventbus-Delivery-Count".into(), (count - 1).to_string());
    headers.insert("Eventbus-Error".into(), "max_deliver exceeded".into());
    let headers = serde_json::to_value(&headers).unwrap_or_default();
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared($1, $2)",
        &[&LOCK_CLASS, &stream_key(&dl_stream)],
    )
    .await
    .map_err(db)?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO eventbus_events (stream_name, subject, headers, payload, correlation_id) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &dl_stream,
                &subject,
                &headers,
                &cand.payload,
                &cand.correlation_id,
            ],
        )
        .await
        .map_err(db)?
        .get(0);
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&notify_channel(&dl_stream), &id.to_string()],
    )
    .await
    .map_err(db)?;
    Ok(true)
}
