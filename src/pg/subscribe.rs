//! One active subscriber per consumer across processes, or competing subscribers.
//!
//! The subscriber holds the consumer's session advisory lock (the Go plugin's key, so Go and
//! Rust subscribers exclude each other) on a dedicated connection that also LISTENs on the
//! stream's channel. If that connection dies the lock is gone, so `next_batch` returns an
//! error and the caller subscribes again (with backoff); another process may take over in
//! between, which is the point. Rows are claimed through the same lease as `fetch`, so even a
//! Go subscriber or a consume step running beside us cannot receive the same row at once.
//! A competing subscriber (`PgBus::subscribe_competing`) skips the lock: any number share the
//! consumer's work, for triggers that promise no order.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use super::core::Inner;
use super::keys::consumer_lock_key;
use super::listen::Dedicated;
use super::types::{notify_channel, AckPolicy, Delivery, SubOpts};
use super::PgError;

pub struct Subscription {
    bus: Arc<Inner>,
    stream: String,
    consumer: String,
    dead_letter: Option<String>,
    cancel: CancellationToken,
    conn: Dedicated,
    /// Lease-ahead (competing subscribers only, see [`Subscription::lease_ahead`]): rows
    /// leased but not yet handed out, in id order, and the refill under way.
    ahead: VecDeque<Delivery>,
    refill: Option<JoinHandle<Result<Vec<Delivery>, PgError>>>,
    target: usize,
    /// Ordered subscribers (see [`Subscription::next_ordered`]): the claim of the next rows
    /// under way, the rows it brought that are not handed out yet (in id order), and how
    /// long the caller has been taking per row.
    claimed_ahead: Option<ClaimAhead>,
    hand: VecDeque<Held>,
    pace: Pace,
}

struct ClaimAhead {
    began: Instant,
    naks: u64,
    /// The rows and the length of their lease.
    task: JoinHandle<Result<(Vec<Delivery>, Duration), PgError>>,
}

/// A row an ordered subscriber claimed ahead: when its claim began, `Inner::naks` then, and
/// the length of its lease.
struct Held {
    row: Delivery,
    began: Instant,
    naks: u64,
    lease: Duration,
}

/// Rows an ordered subscriber claims ahead at most.
const ORDERED_AHEAD_MAX: usize = 16;

/// How fast the caller of an ordered subscriber settles: the claim-ahead depth follows it, so
/// a row in hand waits at most about a quarter of its lease before it is handed out.
#[derive(Default)]
struct Pace {
    /// When rows were last handed out, and how many.
    handed: Option<(Instant, usize)>,
    /// Smoothed time per row between a hand-out and the next call (the caller's pipeline and
    /// settle); None until measured.
    per_row: Option<Duration>,
    /// The lease of the last claim.
    lease: Duration,
}

impl Pace {
    fn called(&mut self) {
        if let Some((at, n)) = self.handed.take() {
            let sample = at.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
            self.per_row = Some(match self.per_row {
                Some(avg) => (avg * 7 + sample) / 8,
                None => sample,
            });
        }
    }

    fn depth(&self) -> usize {
        match self.per_row {
            Some(per_row) if !self.lease.is_zero() => {
                let fit = (self.lease / 4).as_nanos() / per_row.as_nanos().max(1);
                usize::try_from(fit)
                    .unwrap_or(ORDERED_AHEAD_MAX)
                    .clamp(1, ORDERED_AHEAD_MAX)
            }
            _ => 1,
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// `exclusive`: hold the consumer's advisory lock (one active subscriber across processes,
/// id order with one in flight); otherwise a competing subscriber: any number share the
/// consumer's work, each claim skipping the rows another is claiming (see `lease`).
pub(crate) async fn subscribe(
    bus: &Arc<Inner>,
    stream: &str,
    consumer: &str,
    o: SubOpts,
    exclusive: bool,
) -> Result<Subscription, PgError> {
    let exists = bus
        .client("Subscribe")
        .await?
        .query_opt(
            "SELECT 1 FROM eventbus_consumers WHERE stream_name = $1 AND name = $2",
            &[&stream, &consumer],
        )
        .await
        .map_err(|e| PgError::db("Subscribe", e))?;
    if exists.is_none() {
        return Err(PgError::ConsumerNotFound {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
        });
    }
    let key = consumer_lock_key(stream, consumer);
    let inner = bus;
    let conn = Dedicated::connect(&inner.cfg, &inner.tls, "Subscribe").await?;
    let poll = inner.settings.poll_interval;
    let mut held = !exclusive;
    while !held {
        held = conn
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(|e| PgError::db("Subscribe: lock", e))?
            .get(0);
        if held {
            break;
        }
        tokio::select! {
            _ = o.cancel.cancelled() => return Err(PgError::Cancelled("Subscribe")),
            _ = tokio::time::sleep(poll) => {}
        }
    }
    conn.client
        .batch_execute(&format!("LISTEN \"{}\"", notify_channel(stream)))
        .await
        .map_err(|e| PgError::db("Subscribe: LISTEN", e))?;
    // A consumer idle while its stream took other subjects' events starts below all of them;
    // its position is moved past them now, once, rather than each claim scanning them until
    // an ack asks the background advancer to (one claim of a trigger on a rare subject read
    // 36,000 ids in `make bench`, 0.4 s under a publish burst).
    if let Err(e) = super::advance::advance_one(bus, stream, consumer).await {
        tracing::debug!(error = %e, stream, consumer, "pgchannel: position not advanced at subscribe; the background advancer retries");
    }
    tracing::debug!(stream, consumer, exclusive, "pgchannel subscriber ready");
    Ok(Subscription {
        bus: bus.clone(),
        stream: stream.to_string(),
        consumer: consumer.to_string(),
        dead_letter: o.dead_letter_subject,
        cancel: o.cancel,
        conn,
        ahead: VecDeque::new(),
        refill: None,
        target: 0,
        claimed_ahead: None,
        hand: VecDeque::new(),
        pace: Pace::default(),
    })
}

impl Subscription {
    fn lost(&self, msg: impl Into<String>) -> PgError {
        PgError::Lost {
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            msg: msg.into(),
        }
    }

    /// Leases `target` rows at a time and starts the next lease, on a pooled connection of
    /// its own, when fewer than half are left in hand: the caller's pipelines never wait for
    /// a claim round trip while the stream has rows. Rows in hand run their lease (ack_wait)
    /// like rows in a pipeline; dropping the subscription gives them back at once. Only for
    /// subscribers that promise no order: a row given back (nak) is redelivered after rows
    /// leased ahead of it.
    pub fn lease_ahead(mut self, target: usize) -> Self {
        self.target = target;
        self
    }

    /// Up to `max` deliverable events (new, or redeliveries whose lease/nak delay expired), in
    /// id order; waits for NOTIFY or the poll tick; Err when the lock/connection is lost (the
    /// caller re-subscribes with backoff). Never returns an empty Vec except on cancel.
    /// Cancel-safe: what it has not returned stays with the subscription.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, PgError> {
        let max = max.max(1);
        if self.target <= 1 {
            return self.next_ordered(max).await;
        }
        loop {
            if self.cancel.is_cancelled() {
                return Ok(Vec::new());
            }
            if !self.ahead.is_empty() {
                let n = max.min(self.ahead.len());
                let out: Vec<Delivery> = self.ahead.drain(..n).collect();
                if self.ahead.len() * 2 < self.target && self.refill.is_none() {
                    let (bus, stream, consumer) =
                        (self.bus.clone(), self.stream.clone(), self.consumer.clone());
                    // A whole target's worth, not just the rows missing: half as many claims
                    // (each reads the consumer's rows above its position once), at most 1.5x
                    // the target in hand.
                    let (want, dead) = (self.target, self.dead_letter.clone());
                    self.refill = Some(tokio::spawn(async move {
                        super::lease::lease(&bus, &stream, &consumer, want, None, dead.as_deref())
                            .await
                    }));
                }
                return Ok(out);
            }
            if let Some(h) = self.refill.as_mut() {
                let r = h.await;
                self.refill = None;
                match r {
                    Ok(Ok(rows)) if !rows.is_empty() => {
                        self.ahead.extend(rows);
                        continue;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(self.lost(format!("lease-ahead task failed: {e}"))),
                }
            }
            // Nothing in hand: wait for rows, then keep what the caller cannot take yet.
            let mut rows = self.wait_batch(self.target.max(max)).await?;
            if rows.len() > max {
                self.ahead.extend(rows.drain(max..));
            }
            return Ok(rows);
        }
    }

    /// An ordered subscriber claims the rows after the ones it hands out while the caller
    /// works on those, so the next call finds them claimed (no claim round trip per message
    /// with one in flight). It claims up to [`ORDERED_AHEAD_MAX`] rows at a time, as many as
    /// the caller's pace lets it hand out within a quarter of their lease, and the next ones
    /// when fewer than half are left. The caller asks again only after settling what it
    /// holds. A row claimed ahead is handed out only if no nak of this process came after its
    /// claim began (a nak'd message comes before the ones behind it) and less than half its
    /// lease has passed (nobody else may take it yet); otherwise every row in hand goes back
    /// uncounted and the claim is made again, so the lowest deliverable ids come first. With
    /// ack_policy none nothing is claimed ahead: such a claim settles the row, which a stop
    /// would then lose.
    async fn next_ordered(&mut self, max: usize) -> Result<Vec<Delivery>, PgError> {
        self.pace.called();
        loop {
            if let Some(front) = self.hand.front() {
                if self.current(front) {
                    let mut out = Vec::new();
                    while out.len() < max && self.hand.front().is_some_and(|h| self.current(h)) {
                        if let Some(h) = self.hand.pop_front() {
                            out.push(h.row);
                        }
                    }
                    self.claim_more();
                    self.pace.handed = Some((Instant::now(), out.len()));
                    return Ok(out);
                }
                self.give_back_ordered().await?;
                break;
            }
            let Some(ahead) = self.claimed_ahead.as_mut() else {
                break;
            };
            // Awaited in place: a call cancelled here leaves the claim with the subscription
            // (given back when it drops).
            let done = (&mut ahead.task).await;
            let Some(ahead) = self.claimed_ahead.take() else {
                return Ok(Vec::new());
            };
            let (rows, lease) = match done {
                Ok(r) => r?,
                Err(e) => return Err(self.lost(format!("claim-ahead task failed: {e}"))),
            };
            self.pace.lease = lease;
            if rows.is_empty() {
                break;
            }
            self.hand.extend(rows.into_iter().map(|row| Held {
                row,
                began: ahead.began,
                naks: ahead.naks,
                lease,
            }));
        }
        let rows = self.wait_batch(max).await?;
        if !rows.is_empty() {
            self.claim_more();
            self.pace.handed = Some((Instant::now(), rows.len()));
        }
        Ok(rows)
    }

    /// Whether a row in hand may still be handed out (see [`Subscription::next_ordered`]).
    fn current(&self, h: &Held) -> bool {
        self.bus.naks.load(Ordering::Acquire) == h.naks && h.began.elapsed() < h.lease / 2
    }

    /// Gives back, uncounted, every row in hand and the rows of the claim under way.
    async fn give_back_ordered(&mut self) -> Result<(), PgError> {
        let mut ids: Vec<i64> = self.hand.drain(..).map(|h| h.row.token.id).collect();
        if let Some(ahead) = self.claimed_ahead.take() {
            match ahead.task.await {
                Ok(Ok((rows, _))) => ids.extend(rows.iter().map(|d| d.token.id)),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(self.lost(format!("claim-ahead task failed: {e}"))),
            }
        }
        super::lease::release(&self.bus, &self.stream, &self.consumer, &ids).await
    }

    /// Starts claiming the rows behind those in hand when fewer than half the depth are left
    /// and no claim is under way (see [`Subscription::next_ordered`]).
    fn claim_more(&mut self) {
        let depth = self.pace.depth();
        if self.claimed_ahead.is_some() || self.hand.len() * 2 >= depth {
            return;
        }
        // `depth` is at least 1, so fewer than half of it in hand leaves room for one more.
        let n = depth - self.hand.len();
        // Read before the claim's snapshot: a nak that commits after it bumps the count.
        let naks = self.bus.naks.load(Ordering::Acquire);
        let (bus, stream, consumer) =
            (self.bus.clone(), self.stream.clone(), self.consumer.clone());
        let dead = self.dead_letter.clone();
        let task = tokio::spawn(async move {
            let cfg = {
                let c = bus.client("Fetch").await?;
                bus.consumer_cfg(&c, &stream, &consumer).await?
            };
            if cfg.policy == AckPolicy::None {
                return Ok((Vec::new(), Duration::ZERO));
            }
            let lease = Duration::from_millis(
                u64::try_from(super::sql::lease_ms(1, cfg.ack_wait_ms, &cfg.backoff_ms))
                    .unwrap_or(0),
            );
            let rows =
                super::lease::lease(&bus, &stream, &consumer, n, None, dead.as_deref()).await?;
            Ok((rows, lease))
        });
        self.claimed_ahead = Some(ClaimAhead {
            began: Instant::now(),
            naks,
            task,
        });
    }

    async fn wait_batch(&mut self, max: usize) -> Result<Vec<Delivery>, PgError> {
        let poll: Duration = self.bus.settings.poll_interval;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(Vec::new());
            }
            if !self.conn.is_alive() {
                return Err(self.lost("the connection holding the consumer lock closed"));
            }
            self.conn.wake.borrow_and_update();
            let got = super::lease::lease(
                &self.bus,
                &self.stream,
                &self.consumer,
                max.max(1),
                None,
                self.dead_letter.as_deref(),
            )
            .await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let cancel = self.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(Vec::new()),
                r = self.conn.wake.changed() => {
                    if r.is_err() || !self.conn.is_alive() {
                        return Err(self.lost("the connection holding the consumer lock closed"));
                    }
                }
                _ = tokio::time::sleep(poll) => {
                    // Idle: prove the lock's connection is still there (a silent network
                    // drop gives no EOF).
                    let beat = tokio::time::timeout(
                        self.bus.settings.connect_timeout,
                        self.conn.client.simple_query("SELECT 1"),
                    )
                    .await;
                    match beat {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(self.lost(e.to_string())),
                        Err(_) => return Err(self.lost("heartbeat timed out")),
                    }
                }
            }
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

impl Drop for Subscription {
    /// Rows leased ahead and never handed out go back at once (not after their lease), with
    /// their delivery not counted.
    fn drop(&mut self) {
        let mut ahead: Vec<i64> = self.ahead.drain(..).map(|d| d.token.id).collect();
        ahead.extend(self.hand.drain(..).map(|h| h.row.token.id));
        let refill = self.refill.take();
        let claimed_ahead = self.claimed_ahead.take();
        if ahead.is_empty() && refill.is_none() && claimed_ahead.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (bus, stream, consumer) =
            (self.bus.clone(), self.stream.clone(), self.consumer.clone());
        rt.spawn(async move {
            let mut ids = ahead;
            if let Some(h) = refill {
                if let Ok(Ok(rows)) = h.await {
                    ids.extend(rows.iter().map(|d| d.token.id));
                }
            }
            if let Some(a) = claimed_ahead {
                if let Ok(Ok((rows, _))) = a.task.await {
                    ids.extend(rows.iter().map(|d| d.token.id));
                }
            }
            if let Err(e) = super::lease::release(&bus, &stream, &consumer, &ids).await {
                tracing::debug!(error = %e, stream, consumer, "pgchannel: rows leased ahead not given back; they return when their lease ends");
            }
        });
    }
}
