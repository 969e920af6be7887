//! Shared dedup, job-status and sequence stores, for handlers that run on more than one
//! instance.
//!
//! [`MemoryStore`](crate::MemoryStore), [`MemoryJobs`](crate::MemoryJobs),
//! [`MemorySequences`](crate::MemorySequences) and [`MemoryStamper`](crate::MemoryStamper)
//! only see their own process: two instances of a service would each run the same message id
//! once, and an ordered handler's state would not survive a restart or follow a partition to
//! another instance. These stores keep the claims, the cached replies, the job statuses and
//! the sequence numbers where every instance sees them.
//!
//! | store | feature | claim | exactly-once with your own writes | sequence advance ([`SequenceStore`](crate::SequenceStore)) | stamp ([`SequenceStamper`](crate::SequenceStamper)) |
//! |---|---|---|---|---|---|
//! | [`RedisStore`] | `redis` | one Lua script (atomic) | no | one Lua compare-and-set | `INCR` |
//! | [`PostgresStore`] | `postgres` | one `INSERT … ON CONFLICT` | yes, with [`PostgresStore::begin_once`] | one `UPDATE … WHERE next = from` (or upsert from 1) | one `INSERT … ON CONFLICT … RETURNING` |
//!
//! Sequence numbers and stamps never expire (losing them would re-apply or re-stamp a key
//! from 1).
//!
//! Every operation is time-limited (2 s by default): a slow or unreachable store becomes a
//! [`StoreError`], which the pipeline treats as a transient failure
//! (the message is retried through the broker, never run without the check).

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "postgres")]
pub use self::postgres::{Once, OnceTx, PostgresStore};
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

#[cfg(any(feature = "redis", feature = "postgres"))]
use std::time::Duration;

#[cfg(any(feature = "redis", feature = "postgres"))]
use crate::dedup::StoreError;

/// The default limit on one store operation.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `op` for at most `limit`; a late answer and a failure are both a [`StoreError`] that
/// names the backend and the operation.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) async fn bounded<T>(
    backend: &str,
    what: &str,
    limit: Duration,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(StoreError(e))) => Err(StoreError(format!("{backend} {what}: {e}"))),
        Err(_) => Err(StoreError(format!(
            "{backend} {what}: no answer within {limit:?}"
        ))),
    }
}

/// Milliseconds of a duration, at least 1 (Redis rejects `PX 0`) and at most 100 years (both
/// backends reject expiry times past their range).
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn millis(d: Duration) -> u64 {
    const MAX: u64 = 100 * 365 * 24 * 3600 * 1000;
    u64::try_from(d.as_millis()).unwrap_or(MAX).clamp(1, MAX)
}
