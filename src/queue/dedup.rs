//! A handler's dedup settings (the stores are in [`stores`](crate::stores)).

use std::sync::Arc;
use std::time::Duration;

use crate::stores::DedupStore;

/// A handler's dedup settings.
#[derive(Clone)]
pub struct Dedup {
    pub(crate) store: Arc<dyn DedupStore>,
    pub(crate) lease: Duration,
    pub(crate) retention: Duration,
    pub(crate) busy_delay: Duration,
}

impl Dedup {
    /// Dedup through `store` with a 60 s lease and 24 h retention.
    pub fn new(store: impl DedupStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// Dedup through a store shared with other handlers.
    pub fn shared(store: Arc<dyn DedupStore>) -> Self {
        Self {
            store,
            lease: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 3600),
            busy_delay: Duration::from_secs(1),
        }
    }

    /// How long a claim holds before another instance may take over (longer than the
    /// handler's slowest run; a crashed holder's messages wait this long).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a succeeded id (and its reply) is remembered.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a message whose id is busy elsewhere waits in the broker before it is tried
    /// again.
    pub fn busy_delay(mut self, delay: Duration) -> Self {
        self.busy_delay = Duration::from_millis(delay.as_millis().max(1) as u64);
        self
    }
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .finish()
    }
}
