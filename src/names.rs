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

/// `W.<step>`: the queue of step `step` of workflow `workflow` (the workflow's own name is its
/// entry queue).
pub fn workflow_step(workflow: &str, step: &str) -> String {
    format!("{workflow}.{step}")
}

/// `W.<step>.compensate`: the queue of the compensation of step `step` of `workflow`.
pub fn workflow_compensation(workflow: &str, step: &str) -> String {
    format!("{workflow}.{step}.compensate")
}

/// `<id>:<step>`: the `message_id` of workflow `id`'s step message, so each step is
/// deduplicated (and has a job status) by workflow id and step. `:` rather than `/`, so the
/// id stays one path segment of `/jobs/{message_id}`.
pub fn workflow_step_id(id: &str, step: &str) -> String {
    format!("{id}:{step}")
}

/// `<id>:<step>:compensate`: the `message_id` of the compensation of workflow `id`'s step.
pub fn workflow_compensation_id(id: &str, step: &str) -> String {
    format!("{id}:{step}:compensate")
}

/// `W.<step>.join`: where the child jobs of fan-out step `step` reply; its consumer joins
/// them.
pub fn workflow_join(workflow: &str, step: &str) -> String {
    format!("{workflow}.{step}.join")
}

/// `<id>:<step>:<i>`: the `message_id` of child `i` of workflow `id`'s fan-out step.
pub fn workflow_child_id(id: &str, step: &str, i: usize) -> String {
    format!("{id}:{step}:{i}")
}

/// `<id>:<step>:<i>/<n>`: the `correlation_id` of child `i` of `n`, which its reply carries
/// back to the join (everything the join needs to place it; parsed by
/// `workflow::plan::parse_child`).
pub fn workflow_child_correlation(id: &str, step: &str, i: usize, n: usize) -> String {
    format!("{id}:{step}:{i}/{n}")
}

/// `<id>:<step>#joined`: the dedup key recording that a fan-out step's join continued the
/// workflow (whichever child reply completed it, on whichever instance).
pub fn workflow_joined(join_id: &str) -> String {
    format!("{join_id}#joined")
}

/// `<id>#final`: the `message_id` of workflow `id`'s final reply, the same on every copy a
/// redelivery can send, so a caller can drop repeats.
pub fn workflow_final(id: &str) -> String {
    format!("{id}#final")
}

/// `<message_id>#continued`: the dedup key recording that a workflow message's continuation
/// (the next step, the compensations or the final reply) was published.
pub fn workflow_continued(message_id: &str) -> String {
    format!("{message_id}#continued")
}

/// `W.supervise`: the queue of workflow `workflow`'s supervisor ticks; also the name of the
/// schedule that fires them (whose leader queue makes the supervisor a singleton).
pub fn workflow_supervisor(workflow: &str) -> String {
    format!("{workflow}.supervise")
}

/// Step names that would collide with the queues cottontail declares around the entry queue.
pub const RESERVED_STEP_NAMES: &[&str] =
    &["dlq", "retry", "band", "partition", "members", "supervise"];

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
        assert_eq!(workflow_step("bookings", "hotel"), "bookings.hotel");
        assert_eq!(
            workflow_compensation("bookings", "hotel"),
            "bookings.hotel.compensate"
        );
        assert_eq!(workflow_step_id("b-1", "hotel"), "b-1:hotel");
        assert_eq!(
            workflow_compensation_id("b-1", "hotel"),
            "b-1:hotel:compensate"
        );
        assert_eq!(workflow_continued("b-1:hotel"), "b-1:hotel#continued");
    }
}
