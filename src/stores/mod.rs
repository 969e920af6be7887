//! Where handlers keep state across messages, instances and restarts: dedup claims and cached
//! replies ([`DedupStore`]), job statuses ([`JobStore`]), long jobs' checkpoints
//! ([`CheckpointStore`]), the next expected sequence number of
//! ordered handlers ([`SequenceStore`]) and producer-side stamps ([`SequenceStamper`]). One
//! error type, [`StoreError`], for all of them.
//!
//! The in-process stores ([`MemoryStore`], [`MemoryJobs`], [`MemorySequences`],
//! [`MemoryStamper`]) only see their own process: two instances of a service would each run
//! the same message id once, and an ordered handler's state would not survive a restart or
//! follow a partition to another instance. [`RedisStore`] and [`PostgresStore`] keep the
//! claims, the cached replies, the job statuses and the sequence numbers where every instance
//! sees them.
//!
//! | store | feature | claim | exactly-once with your own writes | sequence advance | stamp |
//! |---|---|---|---|---|---|
//! | [`RedisStore`] | `redis` | one Lua script (atomic) | no | one Lua compare-and-set | `INCR` |
//! | [`PostgresStore`] | `postgres` | one `INSERT … ON CONFLICT` | yes, with [`PostgresStore::begin_once`] | one `UPDATE … WHERE next = from` (or upsert from 1) | one `INSERT … ON CONFLICT … RETURNING` |
//!
//! Sequence numbers and stamps never expire (losing them would re-apply or re-stamp a key
//! from 1).
//!
//! Every operation is time-limited (2 s by default): a slow or unreachable store becomes a
//! [`StoreError`]. A failed claim defers the message: it waits in the broker without spending
//! an attempt and is never run without the check.

mod checkpoints;
mod dedup;
mod jobs;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
mod sequences;

pub use checkpoints::{CheckpointStore, CANCELLED_SCOPE, DEFAULT_CHECKPOINT_TTL};
pub use dedup::{Claim, DedupStore, DueWatches};
pub(crate) use jobs::now;
pub use jobs::{JobStatus, JobStore};
pub use memory::{
    MemoryCheckpoints, MemoryJobs, MemorySequences, MemoryStamper, MemoryStore, DEFAULT_JOB_BYTES,
};
pub use sequences::{SequenceStamper, SequenceStore};

/// A store did not answer, or answered with something unusable (the backend and the operation
/// are named in the text). The pipeline never runs a message without the check it needed: a
/// failed claim defers the message (it waits in the broker without spending an attempt).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

#[cfg(feature = "postgres")]
pub use self::postgres::{Once, OnceTx, PostgresStore};
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

#[cfg(any(feature = "redis", feature = "postgres"))]
use std::time::Duration;

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
