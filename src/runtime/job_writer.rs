//! Job statuses off the ack path.
//!
//! ```text
//! pipeline ─record─► buffer (newest status per job, bounded) ─► one writer task ─put_many─► store
//! ```
//! Recording is a lock and a map insert, never a store round trip: a store that is slow or
//! down never holds up an ack. What it does not take waits in the buffer and is written once
//! it answers again (tried with a backoff up to 5 s); past the buffer's bounds, or at the
//! shutdown deadline, statuses are dropped and counted in
//! `cottontail_job_status_dropped_total{reason}` (logged at most every 10 s). The writer takes everything buffered at once, so transitions
//! of one job that arrive together are written once (the newest status, with the first
//! `created_at`), and batches go out one after another, so an older status never overwrites a
//! newer one. Reads (`/jobs/{id}`) see the newest status, written or not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::Metrics;
use crate::stores::StoreError;
use crate::stores::{now, JobStatus, JobStore};
use crate::BoxFuture;

/// Jobs whose newest status may wait for the writer; past it, statuses of other jobs are
/// dropped (and counted) until the writer catches up.
pub(crate) const PENDING_JOBS: usize = 10_000;

/// Bytes (as [`JobStatus::weight`] estimates them) that may wait for the writer.
pub(crate) const PENDING_BYTES: usize = 64 * 1024 * 1024;

/// Statuses per store write: one round trip each on the Redis and PostgreSQL stores.
pub(crate) const WRITE_BATCH: usize = 500;

/// The least time between two warnings about statuses not recorded.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The longest a [`JobRecorder::write_now`] waits for the store.
pub(crate) const WRITE_NOW: Duration = Duration::from_secs(1);

/// The longest wait before a failed store is tried again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Waits before trying a failed store again: 100 ms growing to [`MAX_RETRY_DELAY`].
fn retry_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The app's job statuses: the buffer in front of its store, and the store behind it.
pub(crate) struct Jobs {
    store: Arc<dyn JobStore>,
    buffer: Mutex<Buffer>,
    /// Signalled when the buffer stops being empty.
    wake: Notify,
    buffer_full: IntCounter,
    store_error: IntCounter,
    warned: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Buffer {
    /// The newest status of each job not yet taken by the writer.
    pending: HashMap<String, Weighed>,
    bytes: usize,
    /// The batch being written (reads still see it).
    writing: Arc<HashMap<String, Weighed>>,
}

struct Weighed {
    status: JobStatus,
    weight: usize,
}

impl Jobs {
    pub(crate) fn new(store: Arc<dyn JobStore>, metrics: &Metrics) -> Self {
        Self {
            store,
            buffer: Mutex::default(),
            wake: Notify::new(),
            buffer_full: metrics.job_status_dropped("buffer_full"),
            store_error: metrics.job_status_dropped("store_error"),
            warned: Mutex::default(),
        }
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Buffers `status` as its job's newest (keeping the buffered `created_at`); never waits.
    pub(crate) fn record(&self, mut status: JobStatus) {
        let weight = status.weight();
        let mut buffer = self.buffer();
        let Buffer { pending, bytes, .. } = &mut *buffer;
        let (was_empty, room) = (pending.is_empty(), pending.len() < PENDING_JOBS);
        let kept = match pending.get_mut(&status.message_id) {
            Some(queued) if *bytes - queued.weight + weight <= PENDING_BYTES => {
                *bytes = *bytes - queued.weight + weight;
                status.created_at = queued.status.created_at;
                *queued = Weighed { status, weight };
                true
            }
            None if room && *bytes + weight <= PENDING_BYTES => {
                *bytes += weight;
                pending.insert(status.message_id.clone(), Weighed { status, weight });
                true
            }
            _ => false,
        };
        drop(buffer);
        if !kept {
            self.not_recorded(
                &self.buffer_full,
                1,
                "the buffer in front of the store is full",
            );
        } else if was_empty {
            self.wake.notify_one();
        }
    }

    /// Writes what gets buffered until `done`, then what is left. Writes end (and what they
    /// held is counted) `limit` after `stop` or `done`, whichever comes first: the shutdown
    /// timeout bounds them, even one already waiting on a hung store.
    pub(crate) async fn write_until(
        self: Arc<Self>,
        stop: CancellationToken,
        done: CancellationToken,
        limit: Duration,
    ) {
        let expired = CancellationToken::new();
        let timer = tokio::spawn({
            let (done, expired) = (done.clone(), expired.clone());
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = done.cancelled() => {}
                }
                tokio::time::sleep(limit).await;
                expired.cancel();
            }
        });
        // While the store fails, what it did not take waits in the buffer and is tried again
        // after a backoff; new statuses join it (within the buffer's bounds).
        let mut delays = retry_delays();
        let mut retry_at = None;
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                () = self.wake.notified(), if retry_at.is_none() => {}
                () = sleep_until_some(retry_at) => {}
            }
            if self.write(&expired, false).await {
                if retry_at.take().is_some() {
                    tracing::info!("job store answers again; statuses kept meanwhile are written");
                }
                delays = retry_delays();
            } else {
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                retry_at = Some(Instant::now() + delay);
            }
        }
        self.write(&expired, true).await;
        timer.abort();
    }

    /// Takes everything buffered and writes it, [`WRITE_BATCH`] statuses per store call; true
    /// when all of it was written. When the store fails, what it did not take goes back to
    /// the buffer (behind any newer status of the same job) to be tried again, unless this is
    /// the last write or the shutdown deadline passed: then it is counted as not recorded.
    async fn write(&self, expired: &CancellationToken, last: bool) -> bool {
        let batch = {
            let mut buffer = self.buffer();
            buffer.bytes = 0;
            let batch = Arc::new(std::mem::take(&mut buffer.pending));
            buffer.writing = batch.clone();
            batch
        };
        // One order for every batch (SQL stores lock rows in it), written from the end.
        let mut order: Vec<&String> = batch.keys().collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let mut end = order.len();
        let mut written = true;
        while end > 0 {
            let start = end.saturating_sub(WRITE_BATCH);
            let chunk = order[start..end]
                .iter()
                .map(|id| batch[*id].status.clone())
                .collect();
            let result = tokio::select! {
                result = self.store.clone().put_many(chunk) => result,
                () = expired.cancelled() => Err(StoreError("shutdown timeout".into())),
            };
            if let Err(error) = result {
                let unwritten = order[..end].iter().map(|id| &batch[*id]);
                let lost = if last || expired.is_cancelled() {
                    end as u64
                } else {
                    self.put_back(unwritten)
                };
                if lost > 0 {
                    self.not_recorded(&self.store_error, lost, &error.0);
                } else {
                    self.retrying(end, &error.0);
                }
                written = false;
                break;
            }
            end = start;
        }
        self.buffer().writing = Arc::default();
        written
    }

    /// Returns statuses a failed write held to the buffer, behind a newer status of the same
    /// job (which keeps the older `created_at`); counts those that no longer fit.
    fn put_back<'a>(&self, statuses: impl Iterator<Item = &'a Weighed>) -> u64 {
        let mut buffer = self.buffer();
        let Buffer { pending, bytes, .. } = &mut *buffer;
        let mut lost = 0;
        for held in statuses {
            if let Some(newer) = pending.get_mut(&held.status.message_id) {
                newer.status.created_at = held.status.created_at;
            } else if pending.len() < PENDING_JOBS && *bytes + held.weight <= PENDING_BYTES {
                *bytes += held.weight;
                let (status, weight) = (held.status.clone(), held.weight);
                pending.insert(status.message_id.clone(), Weighed { status, weight });
            } else {
                lost += 1;
            }
        }
        lost
    }

    /// Logs (at most every [`WARN_EVERY`]) that statuses wait for a store that failed.
    fn retrying(&self, n: usize, why: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                statuses = n,
                error = why,
                "job store failed; its statuses are kept and written once it answers"
            );
        }
    }

    fn not_recorded(&self, counter: &IntCounter, n: u64, why: &str) {
        counter.inc_by(n);
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                statuses = n,
                error = why,
                "job statuses not recorded (counted in cottontail_job_status_dropped_total; \
                 warnings at most every {WARN_EVERY:?})"
            );
        }
    }

    /// The newest status buffered for `message_id`, if any.
    fn buffered(&self, message_id: &str) -> Option<JobStatus> {
        let buffer = self.buffer();
        buffer
            .pending
            .get(message_id)
            .or_else(|| buffer.writing.get(message_id))
            .map(|w| w.status.clone())
    }
}

impl JobStore for Jobs {
    /// The newest status: buffered (with the stored `created_at`, when the store has one) or
    /// stored.
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
        let buffered = self.buffered(message_id);
        let stored = self.store.get(message_id);
        Box::pin(async move {
            let stored = stored.await;
            match (buffered, stored) {
                (Some(mut newest), Ok(Some(first))) => {
                    newest.created_at = first.created_at;
                    Ok(Some(newest))
                }
                (Some(newest), _) => Ok(Some(newest)),
                (None, stored) => stored,
            }
        })
    }

    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>> {
        self.record(status);
        Box::pin(async { Ok(()) })
    }
}

/// Records transitions for one handler into the app's [`Jobs`].
#[derive(Clone)]
pub(crate) struct JobRecorder {
    jobs: Arc<Jobs>,
    handler: Arc<str>,
}

impl JobRecorder {
    pub(crate) fn new(jobs: Arc<Jobs>, handler: &str) -> Self {
        Self {
            jobs,
            handler: handler.into(),
        }
    }

    /// Hands the transition over; never waits for the store.
    pub(crate) fn record(
        &self,
        message_id: &str,
        status: &str,
        attempts: u32,
        detail: impl FnOnce(&mut JobStatus),
    ) {
        self.jobs
            .record(self.status(message_id, status, attempts, detail));
    }

    /// Writes the transition at once, waiting at most [`WRITE_NOW`], and hands it to the
    /// buffer only when that fails. For a workflow's statuses: its end must outlive this
    /// process being killed right after (no redelivery records it again), and its `running`
    /// must be stored before its first step is sent, never left in a buffer that could write
    /// it after another instance stored the end.
    pub(crate) async fn write_now(
        &self,
        message_id: &str,
        status: &str,
        attempts: u32,
        detail: impl FnOnce(&mut JobStatus),
    ) {
        let job = self.status(message_id, status, attempts, detail);
        let write = self.jobs.store.clone().put_many(vec![job.clone()]);
        if !matches!(tokio::time::timeout(WRITE_NOW, write).await, Ok(Ok(()))) {
            tracing::debug!(
                message_id,
                "status not written at once; it waits in the buffer"
            );
            self.jobs.record(job);
        }
    }

    fn status(
        &self,
        message_id: &str,
        status: &str,
        attempts: u32,
        detail: impl FnOnce(&mut JobStatus),
    ) -> JobStatus {
        let now = now();
        let mut job = JobStatus {
            status: status.to_owned(),
            message_id: message_id.to_owned(),
            handler: self.handler.to_string(),
            attempts,
            created_at: now,
            updated_at: now,
            ..JobStatus::default()
        };
        detail(&mut job);
        job
    }
}

#[cfg(test)]
mod tests;
