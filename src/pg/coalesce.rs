//! Coalescing calls from concurrent callers into one statement each (settles, publishes).
//!
//! No timer: a caller that finds no call of its coalescer in flight runs its own at once, in
//! its own task (a lone caller, such as a consume + ack loop or a publish with one in flight,
//! pays no hop to another task); one that finds one in flight queues, and the flushing task
//! runs everything queued as one batch as soon as it can, so under load a batch carries many
//! items. Each caller still awaits its own item's result, so nothing is done before its
//! caller asked.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

type Queued<I, O> = (I, oneshot::Sender<O>);
type Flush<I, O> = Arc<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<O>> + Send + Sync>;

/// Runs batches of `I` through one flush function, one result `O` per item, in order. Cheap to
/// clone; the flushing task ends when the last clone is dropped or `cancel` fires.
pub(crate) struct Coalescer<I, O> {
    tx: mpsc::UnboundedSender<Queued<I, O>>,
    flush: Flush<I, O>,
    /// Batches of this coalescer in flight (direct ones and flushes).
    active: Arc<AtomicUsize>,
}

impl<I, O> Clone for Coalescer<I, O> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
            flush: self.flush.clone(),
            active: self.active.clone(),
        }
    }
}

/// One batch in flight, counted in `active` until dropped (also when the caller gives up).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(active: &Arc<AtomicUsize>) -> InFlight {
        active.fetch_add(1, Ordering::AcqRel);
        InFlight(active.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// `flush` must return one result per item, in order; `max` items go in one batch at most.
    pub(crate) fn new<F, Fut>(cancel: CancellationToken, max: usize, flush: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let flush: Flush<I, O> = Arc::new(move |items| Box::pin(flush(items)));
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued<I, O>>();
        let active = Arc::new(AtomicUsize::new(0));
        let (flushing, run) = (active.clone(), flush.clone());
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = cancel.cancelled() => return,
                    q = rx.recv() => match q { Some(q) => q, None => return },
                };
                let _in_flight = InFlight::enter(&flushing);
                let mut queued = vec![first];
                while queued.len() < max.max(1) {
                    match rx.try_recv() {
                        Ok(q) => queued.push(q),
                        Err(_) => break,
                    }
                }
                let (items, answers): (Vec<I>, Vec<oneshot::Sender<O>>) =
                    queued.into_iter().unzip();
                for (answer, r) in answers.into_iter().zip(run(items).await) {
                    let _ = answer.send(r);
                }
            }
        });
        Coalescer { tx, flush, active }
    }

    /// Runs `item`, at once or in the next batch; its own result, or `gone` when the
    /// coalescer stopped before answering.
    pub(crate) async fn call(&self, item: I, gone: impl FnOnce() -> O) -> O {
        if self
            .active
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let _in_flight = InFlight(self.active.clone());
            return (self.flush)(vec![item]).await.pop().unwrap_or_else(gone);
        }
        let (done, rx) = oneshot::channel();
        if self.tx.send((item, done)).is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

/// Messages one coalesced publish stores at most (one statement, one transaction).
const PUBLISH_MAX: usize = 256;

/// Coalesces single-message publishes from concurrent callers (publish steps with many in
/// flight) into one [`PgBus::publish`] of them all: one statement and one commit instead of
/// one each. Each caller gets its own message's result. A batch that fails for a reason the
/// database reported (nothing was stored) is published again one message at a time, so one
/// caller's bad message (no stream for its subject) fails only that caller; a batch whose
/// connection was lost fails every caller in it, as a lone publish would (stored or not is
/// unknown). Messages with a msg_id are published alone: their de-duplication is per message.
#[derive(Clone)]
pub struct Publisher {
    bus: super::PgBus,
    batches: Coalescer<super::Outgoing, Result<super::Published, super::PgError>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    fn new(bus: &super::PgBus) -> Publisher {
        let b = bus.clone();
        let batches = Coalescer::new(
            bus.inner.cancel.clone(),
            PUBLISH_MAX,
            move |msgs: Vec<super::Outgoing>| {
                let bus = b.clone();
                async move { publish_each(&bus, msgs).await }
            },
        );
        Publisher {
            bus: bus.clone(),
            batches,
        }
    }

    /// Publishes one message, alone or with others in flight (see [`Publisher`]).
    pub async fn publish(&self, msg: super::Outgoing) -> Result<super::Published, super::PgError> {
        if msg.msg_id.is_some() {
            return publish_one(&self.bus, &msg).await;
        }
        self.batches
            .call(msg, || Err(super::PgError::Cancelled("Publish")))
            .await
    }
}

/// One message in its own transaction.
async fn publish_one(
    bus: &super::PgBus,
    msg: &super::Outgoing,
) -> Result<super::Published, super::PgError> {
    bus.publish(std::slice::from_ref(msg))
        .await?
        .pop()
        .ok_or_else(|| super::PgError::invalid("Publish: no result for the message"))
}

/// One result per message: the batch in one transaction, or each alone after a failure the
/// database reported (see [`Publisher`]).
async fn publish_each(
    bus: &super::PgBus,
    msgs: Vec<super::Outgoing>,
) -> Vec<Result<super::Published, super::PgError>> {
    let n = msgs.len();
    match bus.publish(&msgs).await {
        Ok(done) if done.len() == n => done.into_iter().map(Ok).collect(),
        Ok(done) => {
            let e = super::PgError::invalid(format!(
                "Publish: stored {} results for {n} messages",
                done.len()
            ));
            vec![Err(e); n]
        }
        Err(e) if n > 1 && !e.is_transient() => {
            let mut out = Vec::with_capacity(n);
            for m in &msgs {
                out.push(publish_one(bus, m).await);
            }
            out
        }
        Err(e) => vec![Err(e); n],
    }
}

impl super::PgBus {
    /// A publish coalescer over this bus (see [`Publisher`]).
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self)
    }
}
