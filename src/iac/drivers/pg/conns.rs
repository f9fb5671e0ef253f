//! One `PgBus` (a connection pool) per broker database per plugin process: wfctl sends many
//! calls to one process (a Diff per resource, then the applies), and a pool per call would
//! open and close connections for each.

use crate::iac::error::DriverError;
use crate::iac::state::PgRecord;
use crate::pg::{PgBus, PgSettings};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The settings a recorded broker connects with (zero values are the domain's defaults).
pub fn settings(broker: &str, r: &PgRecord) -> PgSettings {
    let ms = |v: u64, d: Duration| {
        if v == 0 {
            d
        } else {
            Duration::from_millis(v)
        }
    };
    PgSettings {
        broker: broker.to_string(),
        dsn: r.dsn.clone(),
        max_conns: if r.max_conns == 0 {
            crate::config::pg::DEFAULT_MAX_CONNS
        } else {
            r.max_conns
        },
        poll_interval: ms(r.poll_interval_ms, crate::config::pg::DEFAULT_POLL_INTERVAL),
        connect_timeout: ms(r.connect_timeout_ms, Duration::from_secs(5)),
    }
}

impl crate::iac::ctx::Ctx {
    /// The pgchannel pools of this process.
    pub fn pg(&self) -> std::sync::Arc<PgCache> {
        self.slot()
    }
}

#[derive(Default)]
pub struct PgCache {
    buses: Mutex<HashMap<String, PgBus>>,
}

impl PgCache {
    /// Keyed by broker and a fingerprint of the dsn, so a changed password or database never
    /// reuses the old pool.
    fn key(broker: &str, r: &PgRecord) -> String {
        format!("{broker}|{}", crate::secret::fingerprint(&[&r.dsn]))
    }

    /// A pool on the broker's database; the first connect of a process creates the schema if
    /// it is missing (idempotent, `crate::pg`).
    pub async fn connect(
        &self,
        what: &str,
        broker: &str,
        r: &PgRecord,
    ) -> Result<PgBus, DriverError> {
        let key = Self::key(broker, r);
        let cached = self
            .buses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(bus) = cached {
            return Ok(bus);
        }
        let bus = PgBus::connect(settings(broker, r))
            .await
            .map_err(|e| DriverError::pg(what, e))?;
        Ok(self
            .buses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(bus)
            .clone())
    }

    /// Closes and forgets the pools of a broker (deleted or re-pointed).
    pub async fn evict(&self, broker: &str) {
        let prefix = format!("{broker}|");
        let gone: Vec<PgBus> = {
            let mut m = self.buses.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<String> = m
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| m.remove(&k)).collect()
        };
        for b in gone {
            b.close().await;
        }
    }
}
