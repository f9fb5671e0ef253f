//! State shared by the bus, its subscriptions and the lease (kept apart from `bus` so the
//! modules that use it do not import each other).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deadpool_postgres::{Object, Pool};
use tokio_util::sync::CancellationToken;

use super::listen::Dedicated;
use super::settings::Tls;
use super::{PgError, PgSettings};

pub(crate) struct Inner {
    pub settings: PgSettings,
    pub pool: Pool,
    pub cfg: tokio_postgres::Config,
    pub tls: Tls,
    pub listener: tokio::sync::Mutex<Option<SharedListener>>,
    pub streams: Mutex<Option<(Instant, Arc<Vec<StreamRoute>>)>>,
    pub cancel: CancellationToken,
    /// Consumers whose position could not be advanced on ack/fetch (publishes in flight);
    /// the background advancer (`PgBus::spawn_advancer`) drains it.
    pub lagging: Mutex<HashSet<(String, String)>>,
    pub lag_wake: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The LISTEN connection `fetch` waits on (subscriptions have their own).
pub(crate) struct SharedListener {
    pub conn: Dedicated,
    pub channels: HashSet<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct StreamRoute {
    pub name: String,
    pub subjects: Vec<String>,
    pub duplicate_window_ms: i64,
}

impl Inner {
    pub(crate) async fn client(&self, op: &'static str) -> Result<Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::pool(op, e))
    }

    /// Hands a consumer's position to the background advancer.
    pub(crate) fn mark_lagging(&self, stream: &str, consumer: &str) {
        if let Ok(mut set) = self.lagging.lock() {
            set.insert((stream.to_string(), consumer.to_string()));
        }
        self.lag_wake.notify_one();
    }
}
