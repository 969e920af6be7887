//! The supervisor: one session per connection; reconnects with backoff when the connection
//! is lost, drains on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::connection::{bounded, Connector, CLEANUP};
use crate::runtime::session::{Plan, Session};
use crate::Error;

/// Connects, runs a [`Session`] built from `plan`, and starts over when the connection is
/// lost.
pub(crate) struct Supervisor {
    pub(crate) connector: Connector,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) plan: Plan,
}

impl Supervisor {
    pub(crate) async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let mut sessions = 0u64;
        loop {
            let Some(connection) = self.connector.connect(stop.cancelled()).await else {
                return Ok(());
            };
            let connection = Arc::new(connection);
            sessions += 1;
            if sessions > 1 {
                self.plan.metrics.recovered();
            }
            self.plan.health.set_connected(true);
            self.plan.metrics.set_connected(true);
            let result = Session::start(&connection, &self.plan).await;
            let session = match result {
                Ok(session) => session,
                Err(e) => {
                    self.plan.health.set_connected(false);
                    self.plan.metrics.set_connected(false);
                    let _ = bounded(CLEANUP, connection.close(200, "setup failed".into())).await;
                    if matches!(e, Error::QueueMismatch(_) | Error::Config(_)) {
                        tracing::error!(error = %e, "cannot start");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "session setup failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            };
            tokio::select! {
                _ = session.failed.cancelled() => {
                    tracing::warn!("connection lost; reconnecting");
                    self.plan.health.set_connected(false);
                    self.plan.metrics.set_connected(false);
                    session.abandon(&connection).await;
                }
                _ = stop.cancelled() => {
                    session.drain(&connection, self.shutdown_timeout).await;
                    self.plan.health.set_connected(false);
                    self.plan.metrics.set_connected(false);
                    return Ok(());
                }
            }
        }
    }
}
