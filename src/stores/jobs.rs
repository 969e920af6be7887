//! Job status by `message_id`, for callers that poll instead of consuming replies
//! (`GET /jobs/{message_id}`).
//!
//! Statuses: `queued` (a retry waits in the broker), `running`, `succeeded`, `failed` (an
//! attempt failed; `retrying` says whether another follows), `dead_lettered`; a workflow's
//! (under its id) also `compensated` (see [`workflow`](crate::workflow)).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::BoxFuture;

/// The status document served at `/jobs/{message_id}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct JobStatus {
    /// `queued` | `running` | `succeeded` | `failed` | `dead_lettered` | `cancelled` |
    /// `compensated`.
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
    /// A workflow's own status (under its id): where it stands — `current_step`,
    /// `completed`, `compensating`, `compensated`, `failed_step`, `outcome` (see
    /// [`workflow`](crate::workflow)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<serde_json::Value>,
}

/// Where job statuses live. The in-memory store is the default; shared stores let any
/// instance answer for jobs another one ran.
///
/// The pipeline never waits for a store: it hands each transition to a bounded buffer, and
/// one writer per app writes what accumulated with [`put_many`](JobStore::put_many). A store
/// that is slow or down never costs an ack: its statuses wait in the buffer until it answers
/// (past the buffer's bounds they are dropped, counted in
/// `cottontail_job_status_dropped_total`).
pub trait JobStore: Send + Sync + 'static {
    /// The latest status of a job.
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>>;
    /// Replaces the status of a job.
    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>>;

    /// Writes the latest status of several jobs (each id once), each keeping the
    /// `created_at` of a status already stored. The default costs a `get` and a `put` per
    /// job; shared stores write a batch in one round trip.
    fn put_many(self: Arc<Self>, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        Box::pin(async move {
            for mut status in statuses {
                if let Some(stored) = self.get(&status.message_id).await? {
                    status.created_at = stored.created_at;
                }
                self.put(status).await?;
            }
            Ok(())
        })
    }
}

impl JobStatus {
    /// Roughly the bytes the status holds: its strings and JSON values plus a fixed overhead
    /// per status. What bounds [`MemoryJobs`].
    pub(crate) fn weight(&self) -> usize {
        const FIXED: usize = std::mem::size_of::<JobStatus>() + 64;
        FIXED
            + self.status.len()
            + self.message_id.len() * 2 // the status's copy and the cache key
            + self.handler.len()
            + self.result.as_ref().map_or(0, json_bytes)
            + self.error.as_ref().map_or(0, json_bytes)
            + self.workflow.as_ref().map_or(0, json_bytes)
    }
}

/// Roughly the heap a JSON value takes (depth is bounded: parsing stops at 128 levels).
fn json_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    std::mem::size_of::<Value>()
        + match value {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(json_bytes).sum(),
            Value::Object(fields) => fields
                .iter()
                .map(|(k, v)| std::mem::size_of::<String>() + k.len() + json_bytes(v))
                .sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
}

/// Seconds since the epoch.
pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
