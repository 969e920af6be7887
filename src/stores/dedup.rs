//! Idempotency stores: claim a message id before running the handler, remember the result
//! after (see [`Dedup`](crate::Dedup) for a handler's settings).
//!
//! RabbitMQ delivers at least once, so after a crash, a lost connection or a requeue the same
//! message can arrive again. With a dedup store a handler runs at most once per `message_id`
//! *to success*: an id that already succeeded is acked without running (counted as
//! `duplicate`), and its caller gets the cached reply; an id claimed by another instance waits
//! (its lease expires if that instance dies); a failed attempt releases the claim so the retry
//! can run. While the store does not answer, messages wait in the broker the same way: an
//! outage spends no attempts and dead-letters nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use super::StoreError;
use crate::BoxFuture;

/// The state of a message id in a store, as seen by a claim attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This caller holds the claim until the lease expires: run the handler.
    Acquired,
    /// The id already succeeded; `reply` is the cached reply body, if one was stored.
    Done {
        /// The original reply body.
        reply: Option<Vec<u8>>,
    },
    /// Another holder's lease is still running: try again later.
    Busy,
}

/// Watches come due: `(id, value)`, the earliest first.
pub type DueWatches = Vec<(String, Vec<u8>)>;

/// A dedup backend. Keys are `(scope, id)`: the scope is the handler, so two handlers may see
/// the same message id independently.
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `id` for `owner` (a token unique to this attempt) for `lease`, unless it is done
    /// or validly claimed by another.
    fn claim(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>>;

    /// Marks `id` done (keeping `reply`) for `retention`.
    fn complete(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        reply: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>>;

    /// Drops `owner`'s claim on `id` so another attempt can run.
    fn release(&self, scope: &str, id: &str, owner: &str) -> BoxFuture<Result<(), StoreError>>;

    /// Fan-in: records `value` under `field` of the join `id` unless that field is recorded
    /// already (the first value stays), and returns how many fields the join now holds —
    /// atomically, so of the callers recording a join's last fields, the one whose record
    /// completed it sees the full count, and any later duplicate sees it too. The join
    /// expires `retention` after its last record.
    ///
    /// The default refuses: a store that cannot do it atomically must not pretend to.
    fn join_record(
        &self,
        scope: &str,
        id: &str,
        field: &str,
        value: Vec<u8>,
        retention: Duration,
    ) -> BoxFuture<Result<u64, StoreError>> {
        let _ = (scope, id, field, value, retention);
        Box::pin(async { Err(StoreError("this dedup store does not support joins".into())) })
    }

    /// Every field recorded for the join `id` (empty when none or expired).
    fn join_fields(
        &self,
        scope: &str,
        id: &str,
    ) -> BoxFuture<Result<BTreeMap<String, Vec<u8>>, StoreError>> {
        let _ = (scope, id);
        Box::pin(async { Err(StoreError("this dedup store does not support joins".into())) })
    }

    /// Supervision: keeps `value` under `id`, due at `due_ms` (ms since the epoch), replacing
    /// whatever `id` held. A watch never expires by itself: it is dropped with
    /// [`unwatch`](Self::unwatch) when its work moved on, so a stuck one is never forgotten.
    ///
    /// The default refuses, like the joins'.
    fn watch(
        &self,
        scope: &str,
        id: &str,
        due_ms: u64,
        value: Vec<u8>,
    ) -> BoxFuture<Result<(), StoreError>> {
        let _ = (scope, id, due_ms, value);
        Box::pin(async {
            Err(StoreError(
                "this dedup store does not support watches".into(),
            ))
        })
    }

    /// Drops the watch `id` (nothing when there is none).
    fn unwatch(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let _ = (scope, id);
        Box::pin(async {
            Err(StoreError(
                "this dedup store does not support watches".into(),
            ))
        })
    }

    /// Up to `limit` watches due at or before `now_ms`, the earliest first: `(id, value)`.
    fn due(
        &self,
        scope: &str,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<DueWatches, StoreError>> {
        let _ = (scope, now_ms, limit);
        Box::pin(async {
            Err(StoreError(
                "this dedup store does not support watches".into(),
            ))
        })
    }
}
