//! [`MemoryStore`]: in-process claims and cached replies.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::stores::{Claim, DedupStore, StoreError};
use crate::BoxFuture;

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
    /// Which insertion of the id this is: an order entry left by an earlier, released one
    /// must not evict or purge it.
    generation: u64,
}

/// In-process store: bounded (oldest entries evicted first) and expiring. Good for one
/// instance; several instances need Redis or PostgreSQL.
pub struct MemoryStore<C: Clock = SystemClock> {
    inner: Mutex<MemoryInner>,
    capacity: usize,
    clock: C,
    /// Fan-in joins by (scope, id): their fields and expiry. Not counted in the capacity (a
    /// join lives as long as its workflow step and is small in number); expired ones are
    /// dropped when joins outnumber the capacity.
    joins: Mutex<HashMap<(String, String), Join>>,
    /// Supervision watches by (scope, id): when each is due and its value. Few (one per
    /// workflow in flight) and removed when their work moves on: a scan is cheap enough.
    watches: Mutex<Watches>,
}

/// One fan-in join: its recorded fields and when it expires.
struct Join {
    fields: BTreeMap<String, Vec<u8>>,
    expires_at: u64,
}

type Ids = HashMap<Arc<str>, Entry>;

/// Watches by (scope, id): when each is due, and its value.
type Watches = HashMap<(String, String), (u64, Vec<u8>)>;

/// Ids by scope (a handler: a few per process, found by a scan) and id (looked up by `&str`,
/// so checking an id allocates nothing; a new id allocates its key once, shared with the
/// eviction order). SipHash stays (ids come from outside), so lookups are kept few.
#[derive(Default)]
struct MemoryInner {
    scopes: Vec<(Arc<str>, Ids)>,
    /// Insertion order, for eviction and purging. Entries of removed ids stay until they reach
    /// the front (or a compaction); their generation tells them from the id's current entry.
    order: VecDeque<Queued>,
    len: usize,
    generations: u64,
}

/// One insertion in the eviction order.
struct Queued {
    scope: usize,
    id: Arc<str>,
    /// The expiry at insertion.
    expires_at: u64,
    generation: u64,
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

    /// The current entry `queued` stands for, if it still is the id's current entry.
    fn current(&self, queued: &Queued) -> Option<&Entry> {
        self.scopes[queued.scope]
            .1
            .get(&*queued.id)
            .filter(|e| e.generation == queued.generation)
    }

    /// Removes the entry `queued` stands for (nothing when it is stale).
    fn evict(&mut self, queued: &Queued) {
        if self.current(queued).is_some() {
            self.remove(queued.scope, &queued.id);
        }
    }

    /// Drops stale order entries once they outnumber the live ones by `slack`: keeps the
    /// order bounded by the capacity when ids are released faster than they reach the front.
    fn compact(&mut self, slack: usize) {
        if self.order.len() > self.len.saturating_add(slack) {
            let order = std::mem::take(&mut self.order);
            self.order = order
                .into_iter()
                .filter(|q| self.current(q).is_some())
                .collect();
        }
    }

    fn put(&mut self, scope: &str, id: &str, mut entry: Entry) {
        let scope = self.scope(scope).unwrap_or_else(|| {
            self.scopes.push((Arc::from(scope), HashMap::new()));
            self.scopes.len() - 1
        });
        let ids = &mut self.scopes[scope].1;
        if let Some(existing) = ids.get_mut(id) {
            entry.generation = existing.generation;
            *existing = entry;
            return;
        }
        self.generations += 1;
        entry.generation = self.generations;
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(Queued {
            scope,
            id: id.clone(),
            expires_at: entry.expires_at,
            generation: entry.generation,
        });
        ids.insert(id, entry);
        self.len += 1;
    }

    /// Drops what expired from the front of the order. An entry whose expiry moved on since
    /// it was queued (claimed, then done) is queued again with its new expiry.
    fn purge(&mut self, now: u64) {
        while self.order.front().is_some_and(|q| q.expires_at <= now) {
            let Some(mut queued) = self.order.pop_front() else {
                break;
            };
            match self.current(&queued).map(|e| e.expires_at) {
                Some(at) if at > now => {
                    queued.expires_at = at;
                    self.order.push_back(queued);
                }
                Some(_) => self.remove(queued.scope, &queued.id),
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
            joins: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
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
            let Some(queued) = inner.order.pop_front() else {
                break;
            };
            inner.evict(&queued);
        }
        inner.purge(now);
        inner.compact(self.capacity);
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
                generation: 0,
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
                generation: 0,
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

    fn join_record(
        &self,
        scope: &str,
        id: &str,
        field: &str,
        value: Vec<u8>,
        retention: Duration,
    ) -> BoxFuture<Result<u64, StoreError>> {
        let now = self.clock.now_ms();
        let result = self
            .joins
            .lock()
            .map_err(|_| StoreError("memory store lock poisoned".into()))
            .map(|mut joins| {
                if joins.len() > self.capacity {
                    joins.retain(|_, join| join.expires_at > now);
                }
                let join = joins
                    .entry((scope.to_owned(), id.to_owned()))
                    .or_insert_with(|| Join {
                        fields: BTreeMap::new(),
                        expires_at: 0,
                    });
                if join.expires_at <= now {
                    join.fields.clear();
                }
                join.expires_at = now.saturating_add(ms(retention));
                join.fields.entry(field.to_owned()).or_insert(value);
                join.fields.len() as u64
            });
        Box::pin(async move { result })
    }

    fn join_fields(
        &self,
        scope: &str,
        id: &str,
    ) -> BoxFuture<Result<BTreeMap<String, Vec<u8>>, StoreError>> {
        let now = self.clock.now_ms();
        let result = self
            .joins
            .lock()
            .map_err(|_| StoreError("memory store lock poisoned".into()))
            .map(|joins| {
                joins
                    .get(&(scope.to_owned(), id.to_owned()))
                    .filter(|join| join.expires_at > now)
                    .map(|join| join.fields.clone())
                    .unwrap_or_default()
            });
        Box::pin(async move { result })
    }

    fn watch(
        &self,
        scope: &str,
        id: &str,
        due_ms: u64,
        value: Vec<u8>,
    ) -> BoxFuture<Result<(), StoreError>> {
        let result = self.with_watches(|watches| {
            watches.insert((scope.to_owned(), id.to_owned()), (due_ms, value));
        });
        Box::pin(async move { result })
    }

    fn unwatch(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let result = self.with_watches(|watches| {
            watches.remove(&(scope.to_owned(), id.to_owned()));
        });
        Box::pin(async move { result })
    }

    fn due(
        &self,
        scope: &str,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<crate::stores::DueWatches, StoreError>> {
        let result = self.with_watches(|watches| {
            let mut due: Vec<_> = watches
                .iter()
                .filter(|((s, _), (at, _))| s == scope && *at <= now_ms)
                .map(|((_, id), (at, value))| (*at, id.clone(), value.clone()))
                .collect();
            due.sort();
            due.into_iter()
                .take(limit)
                .map(|(_, id, value)| (id, value))
                .collect()
        });
        Box::pin(async move { result })
    }
}

impl<C: Clock> MemoryStore<C> {
    fn with_watches<T>(&self, f: impl FnOnce(&mut Watches) -> T) -> Result<T, StoreError> {
        self.watches
            .lock()
            .map(|mut watches| f(&mut watches))
            .map_err(|_| StoreError("memory store lock poisoned".into()))
    }
}

#[cfg(test)]
mod tests;
