//! Dedicated connections (outside the pool) for LISTEN and for session advisory locks: a
//! pooled connection would be handed to someone else (and keep our LISTEN / lock) once
//! returned. The connection's driver task counts notifications into a watch channel and marks
//! the connection dead when it ends, so waiters wake on either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::settings::Tls;
use super::PgError;

pub(crate) struct Dedicated {
    pub client: tokio_postgres::Client,
    /// Bumped on every NOTIFY and once when the connection ends.
    pub wake: watch::Receiver<u64>,
    alive: Arc<AtomicBool>,
    driver: tokio::task::JoinHandle<()>,
}

impl Dedicated {
    pub async fn connect(
        cfg: &tokio_postgres::Config,
        tls: &Tls,
        what: &'static str,
    ) -> Result<Dedicated, PgError> {
        let (tx, rx) = watch::channel(0u64);
        let alive = Arc::new(AtomicBool::new(true));
        let (client, driver) = match tls {
            Tls::Plain => {
                let (client, conn) = cfg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| PgError::db(what, e))?;
                (client, spawn_driver(conn, tx, alive.clone(), what))
            }
            Tls::Rustls(t) => {
                let (client, conn) = cfg
                    .connect(t.clone())
                    .await
                    .map_err(|e| PgError::db(what, e))?;
                (client, spawn_driver(conn, tx, alive.clone(), what))
            }
        };
        Ok(Dedicated {
            client,
            wake: rx,
            alive,
            driver,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.client.is_closed()
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        // Closing the socket ends the session, which releases its advisory locks and LISTENs.
        self.driver.abort();
    }
}

fn spawn_driver<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: watch::Sender<u64>,
    alive: Arc<AtomicBool>,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => tx.send_modify(|n| *n = n.wrapping_add(1)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(connection = what, error = %e, "pgchannel connection ended");
                    break;
                }
            }
        }
        alive.store(false, Ordering::Release);
        tx.send_modify(|n| *n = n.wrapping_add(1));
    })
}
