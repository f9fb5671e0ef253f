//! `deliver: batch` (the run itself is in batch_run.rs, for every provider): up to `batch_size`
//! messages per pipeline run (`messages: [...]`), each
//! message still settled on its own. A run that fails fails every message it did not settle;
//! a pipeline marks one message failed by naking its token with `step.eventbus.ack` (the
//! trigger then applies its nak delay and dead-letter rules to that message alone) and may ack
//! or term others itself, which the trigger then leaves alone.

use super::spec::TriggerSpec;
use crate::runtime::provider::{Delivered, Next, Subscription};
use std::collections::VecDeque;
use tokio_util::sync::CancellationToken;

// Named here as well: the batch knobs are read as `batch::…` by the worker.
pub use super::marks::{Mark, Marks};
pub use super::spec::{
    Deliver, DEFAULT_BATCH_IN_FLIGHT, DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_WAIT,
};

/// Payload bytes a collected batch holds at most (memory; a fuller batch goes out early and the
/// message that did not fit opens the next one). What a run sends is sized on its encoded call
/// in payload.rs, which splits a batch whose call exceeds the host's limit into several runs.
const MAX_BATCH_PAYLOAD: usize = 2 * 1024 * 1024;
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
