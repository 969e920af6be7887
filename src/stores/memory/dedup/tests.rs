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

/// The store's answer, resolved at once (the memory store never awaits).
fn now<T>(f: BoxFuture<T>) -> T {
    futures::FutureExt::now_or_never(f).expect("the memory store never waits")
}

#[derive(Clone, Debug)]
enum Op {
    Claim(u8, u8),
    Complete(u8, bool),
    Release(u8, u8),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0u8..6, 0u8..3).prop_map(|(id, o)| Op::Claim(id, o)),
        1 => (0u8..6, any::<bool>()).prop_map(|(id, r)| Op::Complete(id, r)),
        2 => (0u8..6, 0u8..3).prop_map(|(id, o)| Op::Release(id, o)),
    ]
}

/// The reference: ids in first-insertion order (an update keeps the place), the oldest
/// evicted past `capacity`, a release forgetting the id. Nothing expires (the clock
/// stands still), so eviction alone decides.
#[derive(Default)]
struct Reference {
    ids: Vec<(u8, Slot)>,
}

impl Reference {
    fn put(&mut self, id: u8, slot: Slot, capacity: usize) {
        match self.ids.iter_mut().find(|(i, _)| *i == id) {
            Some(entry) => entry.1 = slot,
            None => self.ids.push((id, slot)),
        }
        while self.ids.len() > capacity {
            self.ids.remove(0);
        }
    }

    fn claim(&mut self, id: u8, owner: &str, capacity: usize) -> Claim {
        match self.ids.iter().find(|(i, _)| *i == id).map(|(_, s)| s) {
            Some(Slot::Done { reply }) => Claim::Done {
                reply: reply.clone(),
            },
            Some(Slot::Claimed { owner: o }) if o != owner => Claim::Busy,
            _ => {
                let owner = owner.to_owned();
                self.put(id, Slot::Claimed { owner }, capacity);
                Claim::Acquired
            }
        }
    }

    fn release(&mut self, id: u8, owner: &str) {
        self.ids
            .retain(|(i, s)| !(*i == id && matches!(s, Slot::Claimed { owner: o } if o == owner)));
    }
}

proptest::proptest! {
    /// A released id leaves nothing behind that a later eviction could take for the id's
    /// next claim: every answer matches the reference, so a live claim is only ever
    /// evicted as the oldest entry past capacity; and the eviction order stays bounded.
    #[test]
    fn claims_match_a_reference_under_eviction(
        capacity in 1usize..5,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let store = MemoryStore::with_clock(capacity, HandClock::default());
        let mut model = Reference::default();
        for op in ops {
            match op {
                Op::Claim(id, o) => {
                    let (id_s, owner) = (format!("m{id}"), format!("o{o}"));
                    let got = now(store.claim("h", &id_s, &owner, 60 * S)).unwrap();
                    proptest::prop_assert_eq!(got, model.claim(id, &owner, capacity), "{:?}", op);
                }
                Op::Complete(id, r) => {
                    let reply = r.then(|| vec![id]);
                    now(store.complete("h", &format!("m{id}"), "", reply.clone(), 60 * S)).unwrap();
                    model.put(id, Slot::Done { reply }, capacity);
                }
                Op::Release(id, o) => {
                    let owner = format!("o{o}");
                    now(store.release("h", &format!("m{id}"), &owner)).unwrap();
                    model.release(id, &owner);
                }
            }
            proptest::prop_assert_eq!(store.len(), model.ids.len());
            let order = store.inner.lock().unwrap().order.len();
            proptest::prop_assert!(order <= 2 * capacity, "order of {} entries", order);
        }
    }
}

#[test]
fn a_stale_eviction_never_takes_the_current_claim() {
    let store = MemoryStore::with_clock(2, HandClock::default());
    now(store.claim("h", "a", "A", 60 * S)).unwrap();
    now(store.claim("h", "b", "A", 60 * S)).unwrap();
    now(store.release("h", "a", "A")).unwrap();
    assert_eq!(now(store.claim("h", "a", "B", 60 * S)), Ok(Claim::Acquired));
    // Over capacity: the oldest live entry is b, not a's released first claim.
    now(store.claim("h", "c", "A", 60 * S)).unwrap();
    assert_eq!(
        now(store.claim("h", "a", "C", 60 * S)),
        Ok(Claim::Busy),
        "B still holds a"
    );
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
