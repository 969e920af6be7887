//! [`MemoryCheckpoints`]: checkpoints in process memory, bounded, each expiring on its TTL.

use std::time::{Duration, Instant};

use crate::stores::{CheckpointStore, StoreError};
use crate::BoxFuture;

/// Checkpoints of this process only: a redelivery on the same instance (a panic, a timeout, a
/// lost connection) resumes, one on another instance or after a restart starts over. Use
/// [`RedisStore`](crate::stores::RedisStore) or [`PostgresStore`](crate::stores::PostgresStore)
/// to resume anywhere.
///
/// Bounded by bytes (64 MiB by default), least recently used first.
#[derive(Clone)]
pub struct MemoryCheckpoints {
    cache: moka::sync::Cache<(String, String), Saved>,
}

#[derive(Clone)]
struct Saved {
    state: std::sync::Arc<[u8]>,
    ttl: Duration,
}

struct PerEntry;

impl moka::Expiry<(String, String), Saved> for PerEntry {
    fn expire_after_create(&self, _: &(String, String), v: &Saved, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &(String, String),
        v: &Saved,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

impl MemoryCheckpoints {
    /// At most about `max_bytes` of checkpoints.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes.max(1))
                .weigher(|k: &(String, String), v: &Saved| {
                    let bytes = k.0.len() + k.1.len() + v.state.len() + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(PerEntry)
                .build(),
        }
    }
}

impl Default for MemoryCheckpoints {
    /// 64 MiB.
    fn default() -> Self {
        Self::new(64 * 1024 * 1024)
    }
}

impl CheckpointStore for MemoryCheckpoints {
    fn load(&self, scope: &str, id: &str) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>> {
        let found = self
            .cache
            .get(&(scope.to_owned(), id.to_owned()))
            .map(|s| s.state.to_vec());
        Box::pin(async move { Ok(found) })
    }

    fn save(
        &self,
        scope: &str,
        id: &str,
        state: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let saved = Saved {
            state: state.into(),
            ttl,
        };
        self.cache.insert((scope.to_owned(), id.to_owned()), saved);
        Box::pin(async { Ok(()) })
    }

    fn remove(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        self.cache.invalidate(&(scope.to_owned(), id.to_owned()));
        Box::pin(async { Ok(()) })
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_replace_loads_see_the_last_and_remove_forgets() {
        let store = MemoryCheckpoints::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(store.load("h", "m").await, Ok(None));
        store.save("h", "m", b"1".to_vec(), ttl).await.unwrap();
        store.save("h", "m", b"2".to_vec(), ttl).await.unwrap();
        assert_eq!(store.load("h", "m").await, Ok(Some(b"2".to_vec())));
        assert_eq!(
            store.load("other", "m").await,
            Ok(None),
            "scoped by handler"
        );
        store.remove("h", "m").await.unwrap();
        assert_eq!(store.load("h", "m").await, Ok(None));
    }

    #[tokio::test]
    async fn a_checkpoint_expires_on_its_ttl() {
        let store = MemoryCheckpoints::default();
        store
            .save("h", "m", b"1".to_vec(), Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(store.load("h", "m").await, Ok(None));
    }
}
