//! Sequence state for ordered handlers (the next expected number per key) and producer-side
//! stamping (the next number to hand out per key).

use super::StoreError;
use crate::BoxFuture;

/// Where each key's next expected sequence number is kept.
pub trait SequenceStore: Send + Sync + 'static {
    /// The next expected number of `key` (1 when never seen).
    fn next(&self, scope: &str, key: &str) -> BoxFuture<Result<u64, StoreError>>;
    /// Sets the next expected number from `from` to `to`; `false` when it was not `from`
    /// (someone else moved it: the caller reloads).
    fn advance(
        &self,
        scope: &str,
        key: &str,
        from: u64,
        to: u64,
    ) -> BoxFuture<Result<bool, StoreError>>;
}

/// Stamps consecutive sequence numbers per key on the producer side.
pub trait SequenceStamper: Send + Sync + 'static {
    /// The next number for `key` (1, 2, 3…), never handed out twice.
    fn stamp(&self, key: &str) -> BoxFuture<Result<u64, StoreError>>;
}
