//! An ordered handler's settings (how it runs: `runtime::ordered`).

use std::sync::Arc;
use std::time::Duration;

use crate::stores::SequenceStore;

/// What to do when a key's gap stays open past [`Ordering::gap_timeout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GapPolicy {
    /// Keep waiting for the missing message; the key shows in `cottontail_ordering_gaps`
    /// and a warning is logged. The default: nothing is applied out of order or dropped.
    #[default]
    Wait,
    /// Give up on the missing numbers and continue from the lowest held one (a missing number
    /// that arrives later is below the window: treated like a duplicate).
    SkipAhead,
    /// Dead-letter the key's waiting messages (kind `sequence_gap`) and continue after them:
    /// the key's next number moves past the highest one dead-lettered. A missing number that
    /// arrives later is below the key's window and is treated like a duplicate (acked without
    /// running, counted as `duplicate`); the dead-lettered messages keep the story for an
    /// operator.
    DeadLetter,
}

/// Settings of an ordered handler (see the module docs).
///
/// ```
/// use cottontail::stores::MemorySequences;
/// use cottontail::{GapPolicy, Ordering, Queue};
/// use std::time::Duration;
///
/// let q = Queue::new("orders").ordered(
///     Ordering::new(MemorySequences::new())
///         .partitions(8)
///         .gap_timeout(Duration::from_secs(300))
///         .gap_policy(GapPolicy::Wait),
/// );
/// # let _ = q;
/// ```
#[derive(Clone)]
pub struct Ordering {
    pub(crate) store: Arc<dyn SequenceStore>,
    pub(crate) partitions: u16,
    pub(crate) prefetch: u16,
    /// `None`: half the prefetch (see [`Ordering::hold_limit`]).
    pub(crate) hold_limit: Option<usize>,
    pub(crate) park_delay: Duration,
    pub(crate) gap_timeout: Duration,
    pub(crate) gap_policy: GapPolicy,
    pub(crate) rebalance: Duration,
}

impl std::fmt::Debug for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordering")
            .field("partitions", &self.partitions)
            .field("prefetch", &self.prefetch)
            .field("hold_limit", &self.effective_hold_limit())
            .field("gap_timeout", &self.gap_timeout)
            .field("gap_policy", &self.gap_policy)
            .finish()
    }
}

impl Ordering {
    /// Ordered delivery with sequence state in `store`: 8 partitions, prefetch 64 per
    /// partition, at most half the prefetch (32) held per partition, parked messages return
    /// after 500 ms, gaps alert after 5 minutes ([`GapPolicy::Wait`]), rebalancing every 2 s.
    pub fn new(store: impl SequenceStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// The same, with a store shared with others.
    pub fn shared(store: Arc<dyn SequenceStore>) -> Self {
        Self {
            store,
            partitions: 8,
            prefetch: 64,
            hold_limit: None,
            park_delay: Duration::from_millis(500),
            gap_timeout: Duration::from_secs(300),
            gap_policy: GapPolicy::Wait,
            rebalance: Duration::from_secs(2),
        }
    }

    /// Partition queues: the unit of parallelism and of ownership by one instance.
    pub fn partitions(mut self, n: u16) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Unacked messages per owned partition.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(2);
        self
    }

    /// Held (out-of-order) messages per partition before the furthest-ahead are parked.
    /// Must be below the prefetch: a window full of held messages leaves no room for the
    /// missing number, so the partition would wait forever (refused at start). Defaults to
    /// half the prefetch.
    pub fn hold_limit(mut self, n: usize) -> Self {
        self.hold_limit = Some(n);
        self
    }

    /// The hold limit in force: the one set, or half the prefetch.
    pub(crate) fn effective_hold_limit(&self) -> usize {
        self.hold_limit
            .unwrap_or(usize::from(self.prefetch / 2).max(1))
    }

    /// Refuses settings that would deadlock a partition.
    pub(crate) fn validate(&self, handler: &str) -> Result<(), crate::Error> {
        let hold = self.effective_hold_limit();
        if hold >= usize::from(self.prefetch) {
            return Err(crate::Error::Config(format!(
                "handler '{handler}': ordering hold_limit ({hold}) must be below the ordering \
                 prefetch ({}): a window full of held messages leaves no room for the missing \
                 number, and the partition would wait forever. Lower .hold_limit(..) or raise \
                 .prefetch(..) (or leave hold_limit unset: half the prefetch)",
                self.prefetch
            )));
        }
        Ok(())
    }

    /// How long a parked message waits in the broker before it is offered again.
    pub fn park_delay(mut self, delay: Duration) -> Self {
        self.park_delay = Duration::from_millis(delay.as_millis().max(1) as u64);
        self
    }

    /// How long a key may wait for a missing number before [`GapPolicy`] applies.
    pub fn gap_timeout(mut self, timeout: Duration) -> Self {
        self.gap_timeout = timeout;
        self
    }

    /// What happens after the gap timeout.
    pub fn gap_policy(mut self, policy: GapPolicy) -> Self {
        self.gap_policy = policy;
        self
    }

    /// How often instances check partition ownership (also the failover delay).
    pub fn rebalance_interval(mut self, every: Duration) -> Self {
        self.rebalance = every.max(Duration::from_millis(100));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::MemorySequences;

    #[test]
    fn hold_limits_that_could_fill_the_window_are_refused() {
        let ordering = || Ordering::new(MemorySequences::new());
        assert!(ordering()
            .prefetch(10)
            .hold_limit(10)
            .validate("h")
            .is_err());
        assert!(ordering().prefetch(10).hold_limit(9).validate("h").is_ok());
        // Unset, the hold limit follows the prefetch.
        assert_eq!(ordering().prefetch(10).effective_hold_limit(), 5);
        assert_eq!(ordering().prefetch(2).effective_hold_limit(), 1);
        assert!(ordering().prefetch(2).validate("h").is_ok());
        assert_eq!(ordering().effective_hold_limit(), 32);
    }
}
