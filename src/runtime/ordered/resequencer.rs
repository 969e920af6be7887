//! The pure reorder/hold logic of ordered handlers, kept apart from I/O so it can be checked
//! against a model (see the property test below).
//!
//! Per key, messages arrive in any order; the one whose sequence equals the key's next
//! expected number runs, lower numbers are duplicates, higher ones are held until the gap
//! fills. Holding is bounded: past the limit the highest-numbered held messages are handed
//! back to be parked in the broker, so a gap wider than the prefetch window cannot deadlock.

use std::collections::{BTreeMap, HashMap};

/// What to do with an offered message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer<T> {
    /// It is next: run it now.
    Run(T),
    /// Already applied: acknowledge without running.
    Duplicate(T),
    /// Held until the gap before it fills.
    Held,
}

/// Held messages of one partition, by key and sequence number.
#[derive(Debug)]
pub(crate) struct Resequencer<T> {
    held: HashMap<String, BTreeMap<u64, Held<T>>>,
    count: usize,
}

#[derive(Debug)]
struct Held<T> {
    item: T,
    since_ms: u64,
}

impl<T> Default for Resequencer<T> {
    fn default() -> Self {
        Self {
            held: HashMap::new(),
            count: 0,
        }
    }
}

impl<T> Resequencer<T> {
    /// Offers message `seq` of `key`, whose next expected number is `next`. `since_ms` is when
    /// it first started waiting (for gap timeouts). A second copy of a held number replaces
    /// nothing: it is reported as a duplicate.
    pub(crate) fn offer(
        &mut self,
        key: &str,
        seq: u64,
        next: u64,
        item: T,
        since_ms: u64,
    ) -> Offer<T> {
        if seq < next {
            return Offer::Duplicate(item);
        }
        if seq == next {
            return Offer::Run(item);
        }
        let slot = self.held.entry(key.to_owned()).or_default();
        if slot.contains_key(&seq) {
            return Offer::Duplicate(item);
        }
        slot.insert(seq, Held { item, since_ms });
        self.count += 1;
        Offer::Held
    }

    /// Removes and returns the held message numbered `next`, if any.
    pub(crate) fn take(&mut self, key: &str, next: u64) -> Option<T> {
        let slot = self.held.get_mut(key)?;
        let held = slot.remove(&next)?;
        self.count -= 1;
        if slot.is_empty() {
            self.held.remove(key);
        }
        Some(held.item)
    }

    /// The lowest held number of `key`.
    pub(crate) fn lowest(&self, key: &str) -> Option<u64> {
        self.held.get(key)?.keys().next().copied()
    }

    /// Everything held for `key`, lowest first.
    pub(crate) fn take_key(&mut self, key: &str) -> Vec<(u64, T)> {
        let Some(slot) = self.held.remove(key) else {
            return Vec::new();
        };
        self.count -= slot.len();
        slot.into_iter().map(|(s, h)| (s, h.item)).collect()
    }

    /// Past `limit` held messages, removes the highest-numbered ones (largest gaps first) to
    /// be parked, until `limit` remain.
    pub(crate) fn overflow(&mut self, limit: usize) -> Vec<(String, u64, T, u64)> {
        let mut out = Vec::new();
        while self.count > limit {
            // The key whose highest held number is furthest ahead gives one up.
            let Some(key) = self
                .held
                .iter()
                .filter_map(|(k, s)| s.keys().next_back().map(|seq| (k.clone(), *seq)))
                .max_by_key(|(_, seq)| *seq)
                .map(|(k, _)| k)
            else {
                break;
            };
            let Some(slot) = self.held.get_mut(&key) else {
                break;
            };
            let Some((seq, held)) = slot.pop_last() else {
                break;
            };
            if slot.is_empty() {
                self.held.remove(&key);
            }
            self.count -= 1;
            out.push((key, seq, held.item, held.since_ms));
        }
        out
    }

    /// Keys that have waited for a gap since before `cutoff_ms`.
    pub(crate) fn stale_keys(&self, cutoff_ms: u64) -> Vec<String> {
        self.held
            .iter()
            .filter(|(_, s)| s.values().any(|h| h.since_ms < cutoff_ms))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Everything held with when it started waiting, emptying the resequencer (to give it
    /// back on release).
    pub(crate) fn drain(&mut self) -> Vec<(T, u64)> {
        self.count = 0;
        self.held
            .drain()
            .flat_map(|(_, s)| s.into_values().map(|h| (h.item, h.since_ms)))
            .collect()
    }

    /// How many messages are held.
    pub(crate) fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn runs_holds_and_releases_in_order() {
        let mut r = Resequencer::default();
        assert_eq!(r.offer("k", 3, 1, "c", 0), Offer::Held);
        assert_eq!(r.offer("k", 2, 1, "b", 0), Offer::Held);
        assert_eq!(r.offer("k", 2, 1, "b2", 0), Offer::Duplicate("b2"));
        assert_eq!(r.offer("k", 1, 1, "a", 0), Offer::Run("a"));
        assert_eq!(r.take("k", 2), Some("b"));
        assert_eq!(r.take("k", 3), Some("c"));
        assert_eq!(r.take("k", 4), None);
        assert_eq!(r.offer("k", 1, 4, "old", 0), Offer::Duplicate("old"));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn overflow_parks_the_furthest_ahead() {
        let mut r = Resequencer::default();
        for seq in [5, 6, 7] {
            r.offer("a", seq, 1, seq, 0);
        }
        r.offer("b", 100, 1, 100, 0);
        let parked: Vec<_> = r
            .overflow(2)
            .into_iter()
            .map(|(k, s, _, _)| (k, s))
            .collect();
        assert_eq!(parked, vec![("b".to_string(), 100), ("a".to_string(), 7)]);
        assert_eq!(r.len(), 2);
    }

    proptest! {
        /// Model: several keys, each with events 1..=n, delivered shuffled with duplicates;
        /// a tiny hold limit forces parking (parked messages come back later, like the
        /// broker's delayed re-delivery). Every key must apply 1..=n exactly once, in order,
        /// and nothing may be lost.
        #[test]
        fn applies_every_key_in_order_exactly_once(
            lens in prop::collection::vec(1u64..20, 1..6),
            dup_every in 2usize..6,
            limit in 1usize..6,
            seed in any::<u64>(),
        ) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut input: Vec<(String, u64)> = Vec::new();
            for (k, n) in lens.iter().enumerate() {
                for s in 1..=*n {
                    input.push((format!("k{k}"), s));
                    if input.len() % dup_every == 0 {
                        input.push((format!("k{k}"), s));
                    }
                }
            }
            rng.shuffle(&mut input);
            let mut queue: VecDeque<(String, u64)> = input.into();
            let mut next: HashMap<String, u64> = HashMap::new();
            let mut applied: HashMap<String, Vec<u64>> = HashMap::new();
            let mut r: Resequencer<(String, u64)> = Resequencer::default();
            let mut steps = 0;
            while let Some((key, seq)) = queue.pop_front() {
                steps += 1;
                prop_assert!(steps < 100_000, "no progress");
                let n = *next.entry(key.clone()).or_insert(1);
                match r.offer(&key, seq, n, (key.clone(), seq), 0) {
                    Offer::Run((k, s)) => {
                        applied.entry(k.clone()).or_default().push(s);
                        let mut n = s + 1;
                        while let Some((k2, s2)) = r.take(&k, n) {
                            applied.entry(k2).or_default().push(s2);
                            n += 1;
                        }
                        next.insert(k, n);
                    }
                    Offer::Duplicate(_) | Offer::Held => {}
                }
                for (_, _, item, _) in r.overflow(limit) {
                    queue.push_back(item); // parked, delivered again later
                }
                prop_assert!(r.len() <= limit);
            }
            prop_assert_eq!(r.len(), 0, "messages left held");
            for (k, n) in lens.iter().enumerate() {
                let want: Vec<u64> = (1..=*n).collect();
                prop_assert_eq!(applied.get(&format!("k{k}")).cloned().unwrap_or_default(), want);
            }
        }
    }
}
