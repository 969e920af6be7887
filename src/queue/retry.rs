//! Retry policy: immediate in-process retries first, then broker-held delays.
//!
//! A delayed retry is a copy of the message published to a per-delay *tier* queue
//! `<queue>.retry.<ms>` whose TTL dead-letters it back to the work queue. While it waits it
//! holds no prefetch slot and survives worker restarts. The attempt count travels in the
//! `x-attempts` header (never in `x-death`, whose counting changed across RabbitMQ versions).

use std::time::Duration;

/// How a handler retries transient failures.
///
/// ```
/// use cottontail::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(1))
///     .max_attempts(5)
///     .max_delay(Duration::from_secs(60))
///     .immediate(1);
/// assert_eq!(policy.delay_after(1), Some(Duration::ZERO)); // the immediate retry
/// assert_eq!(policy.delay_after(2), Some(Duration::from_secs(1)));
/// assert_eq!(policy.delay_after(3), Some(Duration::from_secs(2)));
/// assert_eq!(policy.delay_after(5), None); // attempt 5 was the last
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    immediate: u32,
    initial: Duration,
    factor: f64,
    max_delay: Duration,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts; delays 1 s, 2 s, 4 s, 8 s with 20 % jitter.
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1))
    }
}

impl RetryPolicy {
    /// Exponential backoff starting at `initial` and doubling, 5 attempts, 20 % jitter.
    pub fn exponential(initial: Duration) -> Self {
        Self {
            max_attempts: 5,
            immediate: 0,
            initial,
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.2,
        }
    }

    /// A fixed delay between attempts.
    pub fn fixed(delay: Duration) -> Self {
        Self::exponential(delay).factor(1.0)
    }

    /// No retries: the first transient failure dead-letters the message.
    pub fn none() -> Self {
        Self::default().max_attempts(1)
    }

    /// Total attempts including the first (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Attempts retried at once, in process, before delays start.
    pub fn immediate(mut self, n: u32) -> Self {
        self.immediate = n;
        self
    }

    /// Growth factor between delays (1.0 = fixed).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        self
    }

    /// Upper bound of a single delay.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Random shortening of each delay, as a fraction in `0.0..=1.0` (spreads retry storms).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Total attempts allowed.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before the attempt following failed attempt `attempt` (1-based), or `None`
    /// when `attempt` was the last. `Some(ZERO)` means an immediate in-process retry.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        if attempt <= self.immediate {
            return Some(Duration::ZERO);
        }
        Some(self.tier(attempt - self.immediate))
    }

    /// The broker-held delay of the n-th delayed retry (1-based), before jitter.
    fn tier(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.factor.powi(exp);
        let capped = secs.min(self.max_delay.as_secs_f64());
        // Millisecond resolution: tier queues are named by their TTL in ms.
        Duration::from_millis((capped * 1000.0).round() as u64)
    }

    /// Every distinct delay tier this policy can use (one TTL queue each).
    pub fn tiers(&self) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = (1..self.max_attempts)
            .filter_map(|a| self.delay_after(a))
            .filter(|d| !d.is_zero())
            .collect();
        tiers.sort();
        tiers.dedup();
        tiers
    }

    /// The per-message TTL within a tier: the tier delay shortened by up to `jitter`.
    /// Only shortening keeps the queue FIFO-safe: no message can wait behind a longer one by
    /// more than the jitter share.
    pub(crate) fn jittered(&self, tier: Duration) -> Duration {
        if self.jitter == 0.0 {
            return tier;
        }
        let cut = tier.as_secs_f64() * self.jitter * fastrand::f64();
        tier.saturating_sub(Duration::from_secs_f64(cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_delays_are_capped_and_deduplicated() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_attempts(8)
            .max_delay(Duration::from_millis(500));
        let delays: Vec<_> = (1..8)
            .map(|a| p.delay_after(a).unwrap().as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500, 500, 500]);
        assert_eq!(p.delay_after(8), None);
        assert_eq!(
            p.tiers(),
            vec![100, 200, 400, 500]
                .into_iter()
                .map(Duration::from_millis)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let p = RetryPolicy::fixed(Duration::from_secs(10)).jitter(0.2);
        for _ in 0..1000 {
            let d = p.jittered(Duration::from_secs(10));
            assert!(
                d <= Duration::from_secs(10) && d >= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    #[test]
    fn none_never_retries() {
        assert_eq!(RetryPolicy::none().delay_after(1), None);
        assert!(RetryPolicy::none().tiers().is_empty());
    }
}
