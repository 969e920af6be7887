//! Job status by `message_id`, for callers that poll instead of consuming replies
//! (`GET /jobs/{message_id}`).
//!
//! Statuses: `queued` (a retry waits in the broker), `running`, `succeeded`, `failed` (an
//! attempt failed; `retrying` says whether another follows), `dead_lettered`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::handler::BoxFuture;

/// The status document served at `/jobs/{message_id}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct JobStatus {
    /// `queued` | `running` | `succeeded` | `failed` | `dead_lettered`.
    pub status: String,
    /// The message id.
    pub message_id: String,
    /// The handler that ran it.
    pub handler: String,
    /// The attempt number of the latest run.
    pub attempts: u32,
    /// Seconds since the epoch of the first time this service saw the job.
    pub created_at: f64,
    /// Seconds since the epoch of the last change.
    pub updated_at: f64,
    /// The reply body (JSON) when succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// `{"kind", "message"}` of the last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
    /// Whether another attempt is scheduled (for `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<bool>,
}

/// Where job statuses live. The in-memory store is the default; shared stores let any
/// instance answer for jobs another one ran.
pub trait JobStore: Send + Sync + 'static {
    /// The latest status of a job.
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, String>>;
    /// Replaces the status of a job.
    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), String>>;
}

/// Bounded in-memory statuses (per process), dropped after `retention` or when `capacity` is
/// exceeded (least recently used first).
#[derive(Clone)]
pub struct MemoryJobs {
    cache: moka::sync::Cache<String, JobStatus>,
}

impl MemoryJobs {
    /// At most `capacity` jobs, each kept for `retention` after its last update.
    pub fn new(capacity: u64, retention: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(retention)
                .build(),
        }
    }
}

impl Default for MemoryJobs {
    /// 100,000 jobs for one hour.
    fn default() -> Self {
        Self::new(100_000, Duration::from_secs(3600))
    }
}

impl JobStore for MemoryJobs {
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, String>> {
        let found = self.cache.get(message_id);
        Box::pin(async move { Ok(found) })
    }

    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), String>> {
        self.cache.insert(status.message_id.clone(), status);
        Box::pin(async { Ok(()) })
    }
}

/// Records transitions for one handler; failures to record are logged, never fatal (the
/// status is an observation, not part of the delivery guarantee).
#[derive(Clone)]
pub(crate) struct JobRecorder {
    store: Arc<dyn JobStore>,
    handler: String,
}

impl JobRecorder {
    pub(crate) fn new(store: Arc<dyn JobStore>, handler: &str) -> Self {
        Self {
            store,
            handler: handler.to_owned(),
        }
    }

    pub(crate) async fn record(
        &self,
        message_id: &str,
        status: &str,
        attempts: u32,
        detail: impl FnOnce(&mut JobStatus),
    ) {
        let now = now();
        let previous = self.store.get(message_id).await.ok().flatten();
        let mut job = JobStatus {
            status: status.to_owned(),
            message_id: message_id.to_owned(),
            handler: self.handler.clone(),
            attempts,
            created_at: previous.as_ref().map_or(now, |p| p.created_at),
            updated_at: now,
            ..JobStatus::default()
        };
        detail(&mut job);
        if let Err(error) = self.store.put(job).await {
            tracing::warn!(%error, message_id, "job status not recorded");
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_the_latest_status_and_its_creation_time() {
        let store = Arc::new(MemoryJobs::default());
        let rec = JobRecorder::new(store.clone(), "h");
        rec.record("m1", "running", 1, |_| {}).await;
        let created = store.get("m1").await.unwrap().unwrap().created_at;
        rec.record("m1", "succeeded", 1, |j| {
            j.result = Some(serde_json::json!({"ok": 1}))
        })
        .await;
        let job = store.get("m1").await.unwrap().unwrap();
        assert_eq!(job.status, "succeeded");
        assert_eq!(job.created_at, created);
        assert_eq!(job.result, Some(serde_json::json!({"ok": 1})));
        assert!(store.get("nope").await.unwrap().is_none());
    }

    #[test]
    fn memory_store_is_bounded() {
        let store = MemoryJobs::new(10, Duration::from_secs(60));
        for i in 0..100 {
            store.cache.insert(format!("m{i}"), JobStatus::default());
        }
        store.cache.run_pending_tasks();
        assert!(
            store.cache.entry_count() <= 10,
            "{}",
            store.cache.entry_count()
        );
    }
}
