//! Idempotency: claim a message id before running the handler, remember the result after.
//!
//! RabbitMQ delivers at least once, so after a crash, a lost connection or a requeue the same
//! message can arrive again. With a dedup store a handler runs at most once per `message_id`
//! *to success*: an id that already succeeded is acked without running (counted as
//! `duplicate`), and its caller gets the cached reply; an id claimed by another instance waits
//! (its lease expires if that instance dies); a failed attempt releases the claim so the retry
//! can run.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::handler::BoxFuture;

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

/// A store failure (connection refused, timeout…): transient; the message is retried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dedup store: {0}")]
pub struct StoreError(pub String);

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
}

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

/// Milliseconds on some monotonic clock; replaceable in tests.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds.
    fn now_ms(&self) -> u64;
}

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
    }
}

#[derive(Clone, Debug)]
enum Slot {
    Claimed { owner: String },
    Done { reply: Option<Vec<u8>> },
}

#[derive(Clone, Debug)]
struct Entry {
    slot: Slot,
    expires_at: u64,
}

/// In-process store: bounded (oldest entries evicted first) and expiring. Good for one
/// instance; several instances need Redis or PostgreSQL.
pub struct MemoryStore<C: Clock = SystemClock> {
    inner: Mutex<MemoryInner>,
    capacity: usize,
    clock: C,
}

type Ids = HashMap<Arc<str>, Entry>;

/// Ids by scope (a handler: a few per process, found by a scan) and id (looked up by `&str`,
/// so checking an id allocates nothing; a new id allocates its key once, shared with the
/// eviction order). SipHash stays (ids come from outside), so lookups are kept few.
#[derive(Default)]
struct MemoryInner {
    scopes: Vec<(Arc<str>, Ids)>,
    /// Insertion order with the expiry at insertion, for eviction and purging.
    order: VecDeque<(usize, Arc<str>, u64)>,
    len: usize,
}

impl MemoryInner {
    fn scope(&self, scope: &str) -> Option<usize> {
        self.scopes.iter().position(|(s, _)| &**s == scope)
    }

    fn get(&self, scope: &str, id: &str) -> Option<&Entry> {
        self.scopes[self.scope(scope)?].1.get(id)
    }

    fn remove(&mut self, scope: usize, id: &str) {
        if self.scopes[scope].1.remove(id).is_some() {
            self.len -= 1;
        }
    }

    fn put(&mut self, scope: &str, id: &str, entry: Entry) {
        let scope = self.scope(scope).unwrap_or_else(|| {
            self.scopes.push((Arc::from(scope), HashMap::new()));
            self.scopes.len() - 1
        });
        let ids = &mut self.scopes[scope].1;
        if let Some(existing) = ids.get_mut(id) {
            *existing = entry;
            return;
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back((scope, id.clone(), entry.expires_at));
        ids.insert(id, entry);
        self.len += 1;
    }

    /// Drops what expired from the front of the order. An entry whose expiry moved on since
    /// it was queued (claimed, then done) is queued again with its new expiry.
    fn purge(&mut self, now: u64) {
        while self.order.front().is_some_and(|(_, _, at)| *at <= now) {
            let Some((scope, id, _)) = self.order.pop_front() else {
                break;
            };
            match self.scopes[scope].1.get(&*id).map(|e| e.expires_at) {
                Some(at) if at > now => self.order.push_back((scope, id, at)),
                Some(_) => self.remove(scope, &id),
                None => {}
            }
        }
    }
}

impl MemoryStore {
    /// A store keeping at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self::with_clock(capacity, SystemClock)
    }
}

impl<C: Clock> MemoryStore<C> {
    /// A store on a hand-controlled clock (tests).
    pub fn with_clock(capacity: usize, clock: C) -> Self {
        Self {
            inner: Mutex::new(MemoryInner::default()),
            capacity: capacity.max(1),
            clock,
        }
    }

    /// Ids currently held (claimed or done, unexpired or not yet purged).
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.len).unwrap_or(0)
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryInner, u64) -> T) -> Result<T, StoreError> {
        let now = self.clock.now_ms();
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| StoreError("memory store lock poisoned".into()))?;
        Ok(f(&mut inner, now))
    }

    fn insert(&self, inner: &mut MemoryInner, scope: &str, id: &str, entry: Entry, now: u64) {
        inner.put(scope, id, entry);
        // Evict the oldest until within capacity.
        while inner.len > self.capacity {
            let Some((scope, id, _)) = inner.order.pop_front() else {
                break;
            };
            inner.remove(scope, &id);
        }
        inner.purge(now);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<C: Clock> DedupStore for MemoryStore<C> {
    fn claim(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>> {
        let result = self.with(|inner, now| {
            match inner.get(scope, id) {
                Some(e) if e.expires_at > now => match &e.slot {
                    Slot::Done { reply } => {
                        return Claim::Done {
                            reply: reply.clone(),
                        }
                    }
                    Slot::Claimed { owner: o } if o != owner => return Claim::Busy,
                    Slot::Claimed { .. } => {}
                },
                _ => {}
            }
            let entry = Entry {
                slot: Slot::Claimed {
                    owner: owner.to_owned(),
                },
                expires_at: now.saturating_add(ms(lease)),
            };
            self.insert(inner, scope, id, entry, now);
            Claim::Acquired
        });
        Box::pin(async move { result })
    }

    fn complete(
        &self,
        scope: &str,
        id: &str,
        _owner: &str,
        reply: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let result = self.with(|inner, now| {
            let entry = Entry {
                slot: Slot::Done { reply },
                expires_at: now.saturating_add(ms(retention)),
            };
            self.insert(inner, scope, id, entry, now);
        });
        Box::pin(async move { result })
    }

    fn release(&self, scope: &str, id: &str, owner: &str) -> BoxFuture<Result<(), StoreError>> {
        let result = self.with(|inner, _| {
            if let Some(n) = inner.scope(scope) {
                if matches!(inner.scopes[n].1.get(id), Some(Entry { slot: Slot::Claimed { owner: o }, .. }) if o == owner)
                {
                    inner.remove(n, id);
                }
            }
        });
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone, Default)]
    struct HandClock(Arc<AtomicU64>);
    impl Clock for HandClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    impl HandClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn claims_are_exclusive_until_the_lease_lapses() {
        let clock = HandClock::default();
        let store = MemoryStore::with_clock(100, clock.clone());
        assert_eq!(
            store.claim("h", "m", "a", 10 * S).await,
            Ok(Claim::Acquired)
        );
        assert_eq!(store.claim("h", "m", "b", 10 * S).await, Ok(Claim::Busy));
        assert_eq!(
            store.claim("other-handler", "m", "b", 10 * S).await,
            Ok(Claim::Acquired)
        );
        clock.advance(11 * S);
        assert_eq!(
            store.claim("h", "m", "b", 10 * S).await,
            Ok(Claim::Acquired)
        );
    }

    #[tokio::test]
    async fn done_ids_return_their_reply_until_retention_ends() {
        let clock = HandClock::default();
        let store = MemoryStore::with_clock(100, clock.clone());
        store.claim("h", "m", "a", S).await.unwrap();
        store
            .complete("h", "m", "a", Some(b"r".to_vec()), 60 * S)
            .await
            .unwrap();
        clock.advance(30 * S);
        assert_eq!(
            store.claim("h", "m", "b", S).await,
            Ok(Claim::Done {
                reply: Some(b"r".to_vec())
            })
        );
        clock.advance(31 * S);
        assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Acquired));
    }

    #[tokio::test]
    async fn release_only_drops_the_owners_claim() {
        let store = MemoryStore::new(100);
        store.claim("h", "m", "a", 10 * S).await.unwrap();
        store.release("h", "m", "b").await.unwrap();
        assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Busy));
        store.release("h", "m", "a").await.unwrap();
        assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Acquired));
    }

    #[tokio::test]
    async fn capacity_bounds_the_store_evicting_the_oldest() {
        let clock = HandClock::default();
        let store = MemoryStore::with_clock(3, clock.clone());
        for i in 0..10 {
            store
                .complete("h", &format!("m{i}"), "a", None, 60 * S)
                .await
                .unwrap();
            clock.advance(Duration::from_millis(1));
        }
        assert_eq!(store.len(), 3);
        assert_eq!(
            store.claim("h", "m0", "b", S).await,
            Ok(Claim::Acquired),
            "oldest evicted"
        );
        assert_eq!(
            store.claim("h", "m9", "b", S).await,
            Ok(Claim::Done { reply: None })
        );
    }

    #[tokio::test]
    async fn a_done_id_outlives_the_lease_it_was_claimed_with() {
        let clock = HandClock::default();
        let store = MemoryStore::with_clock(1000, clock.clone());
        store.claim("h", "m", "a", S).await.unwrap();
        store.complete("h", "m", "a", None, 60 * S).await.unwrap();
        clock.advance(2 * S);
        // Purging runs on insert: the lease's expiry has passed, the retention's has not.
        store
            .complete("h", "other", "a", None, 60 * S)
            .await
            .unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.claim("h", "m", "b", S).await,
            Ok(Claim::Done { reply: None })
        );
        clock.advance(60 * S);
        store
            .complete("h", "late", "a", None, 60 * S)
            .await
            .unwrap();
        assert_eq!(store.len(), 1, "both expired and purged");
    }

    #[tokio::test]
    async fn expired_entries_are_purged() {
        let clock = HandClock::default();
        let store = MemoryStore::with_clock(1000, clock.clone());
        for i in 0..10 {
            store
                .complete("h", &format!("m{i}"), "a", None, S)
                .await
                .unwrap();
        }
        clock.advance(2 * S);
        store.complete("h", "new", "a", None, S).await.unwrap();
        assert_eq!(store.len(), 1);
    }
}
