//! Process-wide cancellation and task tracking.
//!
//! Every background task (trigger workers, broker stream readers) is spawned on the tracker with
//! a child of the root token, so shutdown can cancel them all and wait for them with a deadline.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Lifecycle {
    root: CancellationToken,
    tracker: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled when the process shuts down (or earlier, by its owner).
    pub fn child_token(&self) -> CancellationToken {
        self.root.child_token()
    }

    pub fn root(&self) -> &CancellationToken {
        &self.root
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Cancels everything and waits at most `deadline` for tracked tasks. Returns true when
    /// every task finished in time. Safe to call more than once.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.root.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}
