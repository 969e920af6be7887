//! [`MemoryJobs`]: job statuses in process memory, bounded by count and bytes.

use std::sync::Arc;
use std::time::Duration;

use crate::stores::{JobStatus, JobStore, StoreError};
use crate::BoxFuture;

/// The default memory budget of [`MemoryJobs`]: 64 MiB.
pub const DEFAULT_JOB_BYTES: u64 = 64 * 1024 * 1024;

/// Bounded in-memory statuses (per process), dropped after `retention`, or least recently used
/// first when the store is full.
///
/// The bound is in bytes as well as in jobs: results are replies, and replies can be large
/// (a thumbnail), so a count alone could hold gigabytes. The default keeps at most 100,000
/// jobs in at most [`DEFAULT_JOB_BYTES`] (64 MiB, estimated from the ids, names, results and
/// errors, plus a fixed overhead per job). A status heavier than a sixteenth of the budget
/// is kept without its `result`, so one huge reply never empties the store nor leaves its
/// job looking unfinished.
#[derive(Clone)]
pub struct MemoryJobs {
    cache: moka::sync::Cache<String, JobStatus>,
    /// Statuses heavier than this are kept without their result.
    max_job: usize,
}

impl MemoryJobs {
    /// At most `capacity` jobs in at most [`DEFAULT_JOB_BYTES`], each kept for `retention`
    /// after its last update.
    pub fn new(capacity: u64, retention: Duration) -> Self {
        Self::bounded(capacity, DEFAULT_JOB_BYTES, retention)
    }

    /// At most `capacity` jobs in at most about `max_bytes`, each kept for `retention` after
    /// its last update.
    pub fn bounded(capacity: u64, max_bytes: u64, retention: Duration) -> Self {
        let max_bytes = max_bytes.max(1);
        // Every job weighs at least its share of the budget, so the weight bound is the count
        // bound too.
        let floor = usize::try_from(max_bytes / capacity.max(1)).unwrap_or(usize::MAX);
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(move |_, status: &JobStatus| {
                    u32::try_from(status.weight().max(floor)).unwrap_or(u32::MAX)
                })
                .time_to_live(retention)
                // Recent jobs are the ones polled: always admit a new status.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            max_job: usize::try_from(max_bytes / 16).unwrap_or(usize::MAX),
        }
    }
}

impl MemoryJobs {
    fn insert(&self, mut status: JobStatus) {
        if status.weight() > self.max_job {
            status.result = None;
        }
        self.cache.insert(status.message_id.clone(), status);
    }
}

impl Default for MemoryJobs {
    /// 100,000 jobs in 64 MiB, for one hour.
    fn default() -> Self {
        Self::new(100_000, Duration::from_secs(3600))
    }
}

impl JobStore for MemoryJobs {
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
        let found = self.cache.get(message_id);
        Box::pin(async move { Ok(found) })
    }

    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>> {
        self.insert(status);
        Box::pin(async { Ok(()) })
    }

    fn put_many(self: Arc<Self>, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        for mut status in statuses {
            if let Some(stored) = self.cache.get(&status.message_id) {
                status.created_at = stored.created_at;
            }
            self.insert(status);
        }
        Box::pin(async { Ok(()) })
    }
}

/// A status of job `id`, created and updated at `at`.
#[cfg(test)]
pub(crate) fn job(id: &str, status: &str, at: f64) -> JobStatus {
    JobStatus {
        status: status.into(),
        message_id: id.into(),
        created_at: at,
        updated_at: at,
        ..JobStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_the_latest_status_and_its_creation_time() {
        let store = Arc::new(MemoryJobs::default());
        store
            .clone()
            .put_many(vec![job("m1", "running", 1.0)])
            .await
            .unwrap();
        let mut done = job("m1", "succeeded", 2.0);
        done.result = Some(serde_json::json!({"ok": 1}));
        store
            .clone()
            .put_many(vec![done, job("m2", "running", 2.0)])
            .await
            .unwrap();
        let job = store.get("m1").await.unwrap().unwrap();
        assert_eq!(job.status, "succeeded");
        assert_eq!((job.created_at, job.updated_at), (1.0, 2.0));
        assert_eq!(job.result, Some(serde_json::json!({"ok": 1})));
        assert_eq!(store.get("m2").await.unwrap().unwrap().created_at, 2.0);
        assert!(store.get("nope").await.unwrap().is_none());
    }

    /// A store with only `get` and `put`: the default `put_many`.
    struct Plain(MemoryJobs);

    impl JobStore for Plain {
        fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
            self.0.get(message_id)
        }
        fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>> {
            self.0.put(status)
        }
    }

    #[tokio::test]
    async fn the_default_batch_write_keeps_the_creation_time_too() {
        let store = Arc::new(Plain(MemoryJobs::default()));
        store
            .clone()
            .put_many(vec![job("m1", "running", 1.0)])
            .await
            .unwrap();
        store
            .clone()
            .put_many(vec![job("m1", "succeeded", 2.0)])
            .await
            .unwrap();
        let job = store.get("m1").await.unwrap().unwrap();
        assert_eq!((job.status.as_str(), job.created_at), ("succeeded", 1.0));
    }

    #[tokio::test]
    async fn memory_store_is_bounded_by_bytes() {
        let store = MemoryJobs::default();
        let mib = "x".repeat(1024 * 1024);
        for i in 0..1000 {
            let job = JobStatus {
                status: "succeeded".into(),
                message_id: format!("m{i}"),
                result: Some(serde_json::Value::String(mib.clone())),
                ..JobStatus::default()
            };
            store.put(job).await.unwrap();
        }
        store.cache.run_pending_tasks();
        let (bytes, jobs) = (store.cache.weighted_size(), store.cache.entry_count());
        assert!(bytes <= DEFAULT_JOB_BYTES, "{bytes} bytes in {jobs} jobs");
        assert!(jobs <= 64, "{jobs} jobs of 1 MiB in 64 MiB");
        let last = store
            .get("m999")
            .await
            .unwrap()
            .expect("the latest job is kept");
        assert_eq!(
            last.result.map(|r| r.as_str().map(str::len)),
            Some(Some(1 << 20))
        );
    }

    #[tokio::test]
    async fn a_status_too_heavy_for_the_budget_is_kept_without_its_result() {
        let store = MemoryJobs::bounded(100, 1 << 20, Duration::from_secs(60));
        let job = JobStatus {
            status: "succeeded".into(),
            message_id: "big".into(),
            result: Some(serde_json::Value::String("x".repeat(1 << 20))),
            ..JobStatus::default()
        };
        store.put(job).await.unwrap();
        let kept = store.get("big").await.unwrap().expect("kept");
        assert_eq!((kept.status.as_str(), kept.result), ("succeeded", None));
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
