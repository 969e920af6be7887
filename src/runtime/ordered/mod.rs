//! Ordered delivery at run time: sequence-numbered messages that still scale out (settings:
//! [`Ordering`](crate::Ordering)).
//!
//! Producers publish to the handler's queue `Q` with `x-sequence-key` and `x-sequence` (1, 2,
//! 3… per key). Every instance routes from `Q` to `Q.partition.<n>` by a hash of the key
//! (confirmed before the ack). Each partition is consumed by **one** instance at a time (an
//! exclusive consumer); instances share the partitions fairly, counting each other through the
//! consumers of `Q.members`, and a dead instance's partitions are picked up by the others
//! within a rebalance interval. Within an owned partition messages run one at a time in
//! sequence order per key: lower numbers are duplicates (acked, counted), higher ones are held
//! until the gap fills, and past the hold limit the furthest-ahead ones are parked in the
//! broker (a delay queue back to `Q`), so a gap wider than the prefetch window cannot deadlock.
//!
//! The next expected number per key lives in a [`SequenceStore`] (in memory, Redis or
//! PostgreSQL), written before the ack, so a restart or a partition moving to another
//! instance continues where it left off. Every verdict that settles a number moves its key on:
//! success, a permanent failure and a dead-letter by a guard (body too large, crash loop),
//! which runs at the message's turn, not on arrival. While the store does not answer, the
//! partition waits (nothing acked, no attempt spent).
//!
//! Faults: a partition handed to another instance gives its held messages back as fresh copies
//! (a handover costs no message its crash-loop budget); a stop lets the running message
//! finish until the shutdown timeout, then cuts it (it returns to the queue); an owner whose
//! compare-and-set on the store fails (another owner moved the key) stops and hands the
//! partition back instead of running what it holds.

mod balance;
mod partition;
pub(crate) mod resequencer;

pub(crate) use balance::balance;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the epoch (held messages carry when they started waiting).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
