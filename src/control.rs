//! Cancellation across instances: the ids cancelled recently, the jobs running here (each with
//! its cancellation token), and the broadcast that tells every instance.
//!
//! ```text
//! Client::cancel / cottontail cancel / POST /jobs/{id}/cancel
//!   ─► cottontail.control (fanout) ─► every instance's exclusive queue ─► Control::heard
//!        ─► remembered (bounded, with TTL; also in a shared checkpoint store)
//!        ─► the running job's token is cancelled: the pipeline drops the handler's future
//! ```
//! A job delivered after its cancel is skipped (acked with an `error` reply of kind
//! `cancelled`). Registering a run before looking at the remembered ids, and remembering an
//! id before cancelling the runs, leaves no gap between the two.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::client::{control, Publisher};
use crate::names::CONTROL_EXCHANGE;
use crate::stores::{CheckpointStore, MemoryCheckpoints, CANCELLED_SCOPE};

/// Cancelled ids remembered per instance (least recently cancelled forgotten first).
const REMEMBERED: u64 = 100_000;

/// How long a cancelled id is remembered (here and in a shared store): a job queued longer
/// than this after its cancel runs after all.
pub(crate) const CANCEL_TTL: Duration = Duration::from_secs(24 * 3600);

/// The runs of each message id here, each with its registration key and token.
type Runs = HashMap<String, Vec<(u64, CancellationToken)>>;

/// The app's long-job services: checkpoints and cancellation. Outlives sessions.
pub(crate) struct Control {
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) checkpoint_ttl: Duration,
    cancelled: moka::sync::Cache<String, ()>,
    running: Mutex<Runs>,
    next: AtomicU64,
    /// The current session's publisher, for cancels asked over HTTP.
    publisher: Mutex<Option<Publisher>>,
}

impl Default for Control {
    fn default() -> Self {
        Self::new(
            Arc::new(MemoryCheckpoints::default()),
            crate::stores::DEFAULT_CHECKPOINT_TTL,
        )
    }
}

impl Control {
    pub(crate) fn new(store: Arc<dyn CheckpointStore>, checkpoint_ttl: Duration) -> Self {
        Self {
            store,
            checkpoint_ttl,
            cancelled: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_live(CANCEL_TTL)
                .build(),
            running: Mutex::default(),
            next: AtomicU64::new(0),
            publisher: Mutex::default(),
        }
    }

    /// A cancel was heard (broadcast, or asked here): remember it, stop the runs.
    pub(crate) fn heard(&self, id: &str) {
        let new = !self.cancelled.contains_key(id);
        self.cancelled.insert(id.to_owned(), ());
        let tokens: Vec<CancellationToken> = self
            .running()
            .get(id)
            .map(|runs| runs.iter().map(|(_, t)| t.clone()).collect())
            .unwrap_or_default();
        if new || !tokens.is_empty() {
            tracing::info!(message_id = id, running = tokens.len(), "cancel received");
        }
        for token in tokens {
            token.cancel();
        }
        if new && self.store.shared() {
            let (store, id) = (self.store.clone(), id.to_owned());
            tokio::spawn(async move {
                let saved = store.save(CANCELLED_SCOPE, &id, b"1".to_vec(), CANCEL_TTL);
                if let Err(error) = saved.await {
                    tracing::warn!(%error, message_id = %id, "cancel not written to the store");
                }
            });
        }
    }

    /// Whether `id` was cancelled: remembered here, or (with a shared store) by another
    /// instance. A store that does not answer counts as "not cancelled" (the job runs).
    pub(crate) async fn is_cancelled(&self, id: &str) -> bool {
        if self.cancelled.contains_key(id) {
            return true;
        }
        if !self.store.shared() {
            return false;
        }
        match self.store.load(CANCELLED_SCOPE, id).await {
            Ok(Some(_)) => {
                self.cancelled.insert(id.to_owned(), ());
                true
            }
            Ok(None) => false,
            Err(error) => {
                tracing::debug!(%error, "cancelled ids not readable; the job runs");
                false
            }
        }
    }

    /// Registers a run of `id`: a cancel heard while the guard lives cancels `token` (also
    /// one heard just before).
    pub(crate) fn register(self: &Arc<Self>, id: &str, token: CancellationToken) -> Running {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.running()
            .entry(id.to_owned())
            .or_default()
            .push((key, token.clone()));
        if self.cancelled.contains_key(id) {
            token.cancel();
        }
        Running {
            control: self.clone(),
            id: id.to_owned(),
            key,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publisher(&self) -> std::sync::MutexGuard<'_, Option<Publisher>> {
        self.publisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Broadcasts a cancel of `id` to every instance (this one included), confirmed.
    pub(crate) async fn request(&self, id: &str) -> Result<(), String> {
        let publisher = self.publisher().clone();
        let Some(publisher) = publisher else {
            return Err("not connected to the broker".into());
        };
        control::send_cancel(&publisher, id)
            .await
            .map_err(|e| e.to_string())?;
        // Heard here at once, whatever the broadcast's delay.
        self.heard(id);
        Ok(())
    }

    /// Declares the control exchange and this instance's queue, and hears cancels until
    /// `stop`. Returns once consuming, so a cancel sent after the session started is heard.
    pub(crate) async fn listen(
        self: &Arc<Self>,
        connection: &Connection,
        publisher: Publisher,
        stop: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, lapin::Error> {
        let channel = connection.create_channel().await?;
        control::declare(&channel).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                CONTROL_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        *self.publisher() = Some(publisher);
        let control = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => match control::parse_cancel(&delivery.data) {
                            Some(id) => control.heard(&id),
                            None => tracing::debug!("unreadable control message ignored"),
                        },
                        // The session notices a lost connection on its own.
                        Some(Err(_)) | None => break,
                    },
                    () = stop.cancelled() => break,
                }
            }
            *control.publisher() = None;
            let _ = crate::connection::bounded(
                crate::connection::CLEANUP,
                channel.close(200, "stopped".into()),
            )
            .await;
        }))
    }
}

impl crate::ops::http::CancelRequests for Control {
    fn request_cancel(self: Arc<Self>, id: String) -> crate::BoxFuture<Result<(), String>> {
        Box::pin(async move { self.request(&id).await })
    }
}

/// A registered run; dropping it unregisters.
pub(crate) struct Running {
    control: Arc<Control>,
    id: String,
    key: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.control.running();
        if let Some(runs) = running.get_mut(&self.id) {
            runs.retain(|(k, _)| *k != self.key);
            if runs.is_empty() {
                running.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_stops_runs_registered_before_and_after_it() {
        let control = Arc::new(Control::default());
        let before = CancellationToken::new();
        let _a = control.register("m", before.clone());
        let other = CancellationToken::new();
        let _b = control.register("other", other.clone());
        control.heard("m");
        assert!(before.is_cancelled());
        assert!(!other.is_cancelled());
        let after = CancellationToken::new();
        let _c = control.register("m", after.clone());
        assert!(after.is_cancelled(), "a run that starts after the cancel");
        assert!(control.is_cancelled("m").await);
        assert!(!control.is_cancelled("other").await);
    }

    #[tokio::test]
    async fn finished_runs_are_forgotten() {
        let control = Arc::new(Control::default());
        drop(control.register("m", CancellationToken::new()));
        assert!(control.running().is_empty());
    }
}
