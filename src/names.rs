//! Every broker naming rule in one place: what cottontail calls the queues and exchanges it
//! declares around a handler's queue `Q` (see `docs/contracts.md`, "Topology"). Imports
//! nothing, so every other module can depend on it.

use std::time::Duration;

/// The direct exchange every handler's dead-letters go through, routed by queue name.
pub const DEAD_LETTER_EXCHANGE: &str = "cottontail.dlx";

/// The fanout exchange control messages (cancels) are broadcast on: every running instance
/// binds an exclusive, auto-delete queue of its own to it.
pub const CONTROL_EXCHANGE: &str = "cottontail.control";

/// `Q.dlq`: where `Q`'s dead-lettered messages wait, with their reasons.
pub fn dlq(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// `Q.retry.<ms>`: the TTL queue holding retries (and deferred messages) of `queue` for
/// `delay`.
pub fn tier_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", delay.as_millis())
}

/// The delay of a tier queue named by [`tier_queue`], from its name.
pub(crate) fn tier_delay(tier: &str) -> Option<Duration> {
    let (_, ms) = tier.rsplit_once(".retry.")?;
    ms.parse().ok().map(Duration::from_millis)
}

/// `Q.band.<n>`: priority band `n` (0 = highest) of `queue`.
pub fn band_queue(queue: &str, n: usize) -> String {
    format!("{queue}.band.{n}")
}

/// `Q.partition.<n>`: partition `n` of an ordered handler's `queue`.
pub fn partition_queue(queue: &str, n: u16) -> String {
    format!("{queue}.partition.{n}")
}

/// `Q.members`: the queue whose consumers count the live instances of an ordered handler.
pub fn members_queue(queue: &str) -> String {
    format!("{queue}.members")
}

/// The partition of sequence key `key` among `partitions` (FNV-1a: stable across processes
/// and versions, so every instance routes a key to the same partition).
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u16
}

/// `cottontail.leader.<schedule>`: the single-active-consumer queue holding a schedule's
/// leadership token.
pub fn schedule_leader_queue(schedule: &str) -> String {
    format!("cottontail.leader.{schedule}")
}

/// `cottontail.schedule.<schedule>.state`: the one-message queue holding a schedule's last
/// fired tick.
pub fn schedule_state_queue(schedule: &str) -> String {
    format!("cottontail.schedule.{schedule}.state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        let used: std::collections::HashSet<u16> = (0..200)
            .map(|i| partition_of(&format!("k{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8);
    }

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(dlq("jobs"), "jobs.dlq");
        assert_eq!(
            tier_queue("jobs", Duration::from_millis(1500)),
            "jobs.retry.1500"
        );
        assert_eq!(
            tier_delay("my.jobs.retry.1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(tier_delay("jobs.dlq"), None);
        assert_eq!(band_queue("jobs", 0), "jobs.band.0");
        assert_eq!(partition_queue("jobs", 3), "jobs.partition.3");
        assert_eq!(members_queue("jobs"), "jobs.members");
        assert_eq!(
            schedule_leader_queue("nightly"),
            "cottontail.leader.nightly"
        );
        assert_eq!(
            schedule_state_queue("nightly"),
            "cottontail.schedule.nightly.state"
        );
    }
}
