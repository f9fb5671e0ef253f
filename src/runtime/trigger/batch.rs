//! `deliver: batch` (the run itself is in batch_run.rs, for every provider): up to `batch_size`
//! messages per pipeline run (`messages: [...]`), each
//! message still settled on its own. A run that fails fails every message it did not settle;
//! a pipeline marks one message failed by naking its token with `step.eventbus.ack` (the
//! trigger then applies its nak delay and dead-letter rules to that message alone) and may ack
//! or term others itself, which the trigger then leaves alone.

use super::TriggerSpec;
use crate::runtime::provider::{Delivered, Next, Subscription};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_BATCH_SIZE: usize = 100;
pub const DEFAULT_MAX_BATCH_WAIT: Duration = Duration::from_millis(500);
/// Concurrent batch runs when max_in_flight is unset: a few runs overlap the next batch's
/// fetch with the current pipeline without holding thousands of messages.
pub const DEFAULT_BATCH_IN_FLIGHT: usize = 4;
/// Payload bytes a collected batch holds at most (memory; a fuller batch goes out early and the
/// message that did not fit opens the next one). What a run sends is sized on its encoded call
/// in payload.rs, which splits a batch whose call exceeds the host's limit into several runs.
const MAX_BATCH_PAYLOAD: usize = 2 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deliver {
    Message,
    Batch,
}

/// What a pipeline did with one message of its batch through `step.eventbus.ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Untouched: the run's outcome decides.
    Held,
    /// Naked by the pipeline: the trigger's failure rules apply.
    Failed,
    /// Acked or terminated by the pipeline: the trigger sends nothing more.
    Settled,
}

/// Tokens of messages held by running batches, shared by the trigger and the ack step.
#[derive(Default)]
pub struct Marks {
    /// Tokens held, so acks outside batch runs skip the lock.
    held: AtomicUsize,
    map: Mutex<HashMap<String, Mark>>,
}

impl Marks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn hold<'a>(&self, tokens: impl Iterator<Item = &'a str>) {
        let mut map = self.lock();
        for t in tokens {
            if map.insert(t.to_string(), Mark::Held).is_none() {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a nak of a held message; false when the token is not held (the nak is sent).
    pub fn mark_failed(&self, token: &str) -> bool {
        if self.held.load(Ordering::Relaxed) == 0 {
            return false;
        }
        match self.lock().get_mut(token) {
            Some(m @ (Mark::Held | Mark::Failed)) => {
                *m = Mark::Failed;
                true
            }
            _ => false,
        }
    }

    pub fn mark_settled(&self, token: &str) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(m) = self.lock().get_mut(token) {
            *m = Mark::Settled;
        }
    }

    /// Stops holding the tokens; their marks in the same order.
    pub fn release(&self, tokens: &[String]) -> Vec<Mark> {
        let mut map = self.lock();
        tokens
            .iter()
            .map(|t| match map.remove(t) {
                Some(m) => {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    m
                }
                None => Mark::Held,
            })
            .collect()
    }

    /// Tokens still ours to settle when the run ends (held or marked failed).
    pub(super) fn unsettled(&self, tokens: &[String]) -> Vec<String> {
        let map = self.lock();
        tokens
            .iter()
            .filter(|t| matches!(map.get(*t), Some(Mark::Held | Mark::Failed)))
            .cloned()
            .collect()
    }
}

/// Why collecting stopped short of the subscription's normal flow.
pub(super) enum Interrupt {
    /// Worth a log line; the subscription goes on.
    Failed(String),
    /// The subscription is gone: bind again.
    Rebind(String),
}

/// Collects a batch: what `pending` holds first, then from the subscription, up to
/// `batch_size` deliveries, waiting at most `max_batch_wait` once the batch has its first one,
/// closing early at the payload cap or when stopped. Deliveries past the cap stay in `pending`
/// and open the next batch. Empty only when stopped or interrupted before the first delivery.
pub(super) async fn collect<S: Subscription>(
    pending: &mut VecDeque<S::Delivery>,
    sub: &mut S,
    spec: &TriggerSpec,
    stop: &CancellationToken,
) -> (Vec<S::Delivery>, Option<Interrupt>) {
    let mut batch = Vec::with_capacity(spec.batch_size);
    let mut bytes = 0;
    let mut deadline = None;
    loop {
        while batch.len() < spec.batch_size {
            let Some(len) = pending.front().map(Delivered::payload_len) else {
                break;
            };
            if !batch.is_empty() && bytes + len > MAX_BATCH_PAYLOAD {
                return (batch, None);
            }
            if let Some(d) = pending.pop_front() {
                bytes += len;
                batch.push(d);
            }
        }
        if batch.len() >= spec.batch_size {
            return (batch, None);
        }
        let want = spec.batch_size - batch.len();
        let next = if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return (batch, None),
                n = sub.next(want) => n,
            }
        } else {
            let until =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.max_batch_wait);
            tokio::select! {
                _ = stop.cancelled() => return (batch, None),
                n = tokio::time::timeout_at(until, sub.next(want)) => match n {
                    Err(_) => return (batch, None),
                    Ok(n) => n,
                },
            }
        };
        match next {
            Next::Items(v) => pending.extend(v),
            Next::Failed(e) => return (batch, Some(Interrupt::Failed(e))),
            Next::Rebind(e) => return (batch, Some(Interrupt::Rebind(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_the_pipeline() {
        let m = Marks::default();
        let tokens: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(!m.mark_failed("a"), "nothing held: the nak is sent");
        m.hold(tokens.iter().map(String::as_str));
        assert!(m.mark_failed("a"));
        m.mark_settled("b");
        assert!(!m.mark_failed("b"), "settled stays settled");
        assert!(!m.mark_failed("zzz"));
        assert_eq!(m.unsettled(&tokens), vec!["a".to_string(), "c".to_string()]);
        assert_eq!(
            m.release(&tokens),
            vec![Mark::Failed, Mark::Settled, Mark::Held]
        );
        assert_eq!(m.held.load(Ordering::Relaxed), 0);
        assert!(!m.mark_failed("a"));
    }
}
