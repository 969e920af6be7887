//! [`MemorySequences`] and [`MemoryStamper`]: sequence state in process memory.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::stores::{SequenceStamper, SequenceStore, StoreError};
use crate::BoxFuture;

/// In-process sequence state (one instance, or tests).
#[derive(Default)]
pub struct MemorySequences {
    next: Mutex<HashMap<(String, String), u64>>,
}

impl MemorySequences {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SequenceStore for MemorySequences {
    fn next(&self, scope: &str, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let result = self
            .next
            .lock()
            .map(|m| {
                m.get(&(scope.to_owned(), key.to_owned()))
                    .copied()
                    .unwrap_or(1)
            })
            .map_err(|_| StoreError("sequence store lock poisoned".into()));
        Box::pin(async move { result })
    }

    fn advance(
        &self,
        scope: &str,
        key: &str,
        from: u64,
        to: u64,
    ) -> BoxFuture<Result<bool, StoreError>> {
        let result = self
            .next
            .lock()
            .map(|mut m| {
                let slot = m.entry((scope.to_owned(), key.to_owned())).or_insert(1);
                if *slot == from {
                    *slot = to;
                    true
                } else {
                    false
                }
            })
            .map_err(|_| StoreError("sequence store lock poisoned".into()));
        Box::pin(async move { result })
    }
}

/// In-process stamper: for a single producer instance.
#[derive(Default)]
pub struct MemoryStamper {
    counters: Mutex<HashMap<String, u64>>,
}

impl MemoryStamper {
    /// Counters start at 1.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SequenceStamper for MemoryStamper {
    fn stamp(&self, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let result = self
            .counters
            .lock()
            .map(|mut c| {
                let n = c.entry(key.to_owned()).or_insert(0);
                *n += 1;
                *n
            })
            .map_err(|_| StoreError("stamper lock poisoned".into()));
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_sequences_compare_and_set() {
        let s = MemorySequences::new();
        assert_eq!(s.next("h", "k").await, Ok(1));
        assert_eq!(s.advance("h", "k", 1, 2).await, Ok(true));
        assert_eq!(s.advance("h", "k", 1, 2).await, Ok(false));
        assert_eq!(s.next("h", "k").await, Ok(2));
        let stamper = MemoryStamper::new();
        assert_eq!(stamper.stamp("a").await, Ok(1));
        assert_eq!(stamper.stamp("a").await, Ok(2));
        assert_eq!(stamper.stamp("b").await, Ok(1));
    }
}
