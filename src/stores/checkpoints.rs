//! Checkpoints of long jobs: the last state a handler saved for a message, so that a
//! redelivery after a crash resumes where the last attempt left off (see
//! [`Checkpoint`](crate::Checkpoint)).
//!
//! Keys are `(scope, id)`: the scope is the handler, the id the `message_id`. The framework
//! removes a message's checkpoint when its job ends (succeeded, dead-lettered or cancelled);
//! the TTL only bounds what a job abandoned some other way leaves behind.
//!
//! The same store remembers cancelled message ids under the scope [`CANCELLED_SCOPE`], so an
//! instance that was not connected when a cancel was broadcast still skips the job.

use std::time::Duration;

use super::StoreError;
use crate::BoxFuture;

/// The scope under which cancelled message ids are kept (reserved: do not name a handler so).
pub const CANCELLED_SCOPE: &str = "cottontail.cancelled";

/// How long a checkpoint outlives its last save when its job never ends (default for
/// [`App::checkpoint_store`](crate::App::checkpoint_store)).
pub const DEFAULT_CHECKPOINT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where checkpoints are kept. Each operation is one round trip on the shared backends, cheap
/// enough for a save every second per running job.
pub trait CheckpointStore: Send + Sync + 'static {
    /// The state last saved for `id` in `scope`, if any (and not expired).
    fn load(&self, scope: &str, id: &str) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>>;

    /// Replaces the state of `id` in `scope`; it expires `ttl` after this save.
    fn save(
        &self,
        scope: &str,
        id: &str,
        state: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>>;

    /// Forgets `id` in `scope` (nothing to forget is fine).
    fn remove(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>>;

    /// `true` when several instances see the same entries (Redis, PostgreSQL): cancelled ids
    /// are then also written here, and looked up before a job starts.
    fn shared(&self) -> bool {
        true
    }
}
