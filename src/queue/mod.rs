//! Per-handler settings: which queue, how much in flight, retries, priority, timeout.

mod bands;
mod dedup;
mod ordering;
mod retry;

pub use bands::Bands;
pub use dedup::Dedup;
pub use ordering::{GapPolicy, Ordering};
pub use retry::RetryPolicy;

use std::time::Duration;

/// The broker queue type of a handler's work queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, durable, with delivery limits (the default).
    Quorum,
    /// Classic queue: needed for `x-max-priority` on RabbitMQ 3.10.
    Classic,
}

/// A handler's queue and its settings, built fluently.
///
/// ```
/// use cottontail::{Queue, RetryPolicy};
/// use std::time::Duration;
///
/// let q = Queue::new("thumbnails")
///     .priority(9)            // classic queue with x-max-priority 9
///     .concurrency(2)         // at most 2 handler runs at once
///     .timeout(Duration::from_secs(30))
///     .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(4));
/// assert_eq!(q.name(), "thumbnails");
/// assert_eq!(q.prefetch_count(), 2); // priority handlers default to prefetch = concurrency
/// ```
#[derive(Clone, Debug)]
pub struct Queue {
    pub(crate) name: String,
    pub(crate) handler_name: Option<String>,
    pub(crate) prefetch: Option<u16>,
    pub(crate) concurrency: usize,
    pub(crate) consumers: Option<usize>,
    pub(crate) priority: Option<u8>,
    pub(crate) queue_type: Option<QueueType>,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) delivery_limit: u32,
    pub(crate) expires: Option<Duration>,
    pub(crate) max_body: usize,
    pub(crate) track_jobs: bool,
    pub(crate) dedup: Option<Dedup>,
    pub(crate) singleton: bool,
    pub(crate) ordering: Option<Ordering>,
    pub(crate) bands: Option<Bands>,
}

/// The default limit on one handler run: 25 minutes.
///
/// RabbitMQ closes the channel of a consumer that holds a delivery longer than its
/// `consumer_timeout` (30 minutes by default, checked once a minute), which requeues
/// *everything* outstanding on that channel (4.3+ cancels the consumer of a quorum queue
/// instead); either way the consume loop opens a new channel (logging why), and the hung
/// message comes back and hangs again, for `delivery_limit` rounds before it is dead-lettered
/// as a crash loop. Cancelling the run a few minutes earlier (queueing in the prefetch buffer
/// counts towards the broker's clock too) fails only that message, as a transient `timeout`
/// that follows the retry policy. [`App::start`](crate::App::start) refuses a handler whose
/// timeout is not below the broker's (as given by
/// [`Config::consumer_timeout`](crate::Config#structfield.consumer_timeout)). Jobs that run
/// longer: split them with [`Continue`](crate::Continue), or raise the broker's timeout and
/// the handler's together.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// The smallest prefetch share a default split gives a consumer.
const MIN_DEFAULT_SHARE: u16 = 32;

impl Queue {
    /// Settings for the queue `name` with defaults: quorum queue, concurrency 16, prefetch
    /// 64, [`RetryPolicy::default`], a 25-minute timeout ([`DEFAULT_HANDLER_TIMEOUT`]),
    /// crash-loop limit 10 deliveries, 16 MiB bodies.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            handler_name: None,
            prefetch: None,
            concurrency: 16,
            consumers: None,
            priority: None,
            queue_type: None,
            retry: RetryPolicy::default(),
            timeout: Some(DEFAULT_HANDLER_TIMEOUT),
            delivery_limit: 10,
            expires: None,
            max_body: 16 * 1024 * 1024,
            track_jobs: true,
            dedup: None,
            singleton: false,
            ordering: None,
            bands: None,
        }
    }

    /// The name used in metrics, logs and the `x-handler` header (defaults to the queue name).
    pub fn handler_name(mut self, name: impl Into<String>) -> Self {
        self.handler_name = Some(name.into());
        self
    }

    /// Unacked messages the broker may push ahead of the handler. Priority handlers default
    /// to their concurrency (a larger window lets low priorities through ahead of high ones);
    /// others to 4× concurrency, at least 64.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Handler runs at once in this process (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Consumers (each a channel and a task running its share of the handler runs) this
    /// process opens on the queue; the concurrency and the prefetch are split between them.
    /// Handler futures of one consumer share its task, so CPU work in async handler code
    /// spreads over cores only across consumers (blocking work belongs in
    /// `tokio::task::spawn_blocking` either way). Defaults to one per CPU core as long as each
    /// keeps a prefetch of 32 or more (a small window drains between ack round trips), never
    /// more than the concurrency; singleton, ordered and banded handlers use one.
    ///
    /// ```
    /// use cottontail::Queue;
    /// let q = Queue::new("emails").concurrency(10).prefetch(40).consumers(3);
    /// assert_eq!(q.consumer_shares(), vec![(14, 4), (13, 3), (13, 3)]);
    /// ```
    pub fn consumers(mut self, n: usize) -> Self {
        self.consumers = Some(n.max(1));
        self
    }

    /// `(prefetch, concurrency)` of each consumer this process opens on the queue.
    pub fn consumer_shares(&self) -> Vec<(u16, usize)> {
        let prefetch = self.prefetch_count();
        let concurrency = self.effective_concurrency();
        let n = if self.singleton || self.ordering.is_some() || self.bands.is_some() {
            1
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            // A window much smaller than this drains between ack round trips.
            let windows = usize::from(prefetch / MIN_DEFAULT_SHARE).max(1);
            self.consumers
                .unwrap_or(cores.min(windows))
                .min(concurrency)
                .min(usize::from(prefetch))
                .max(1)
        };
        let share = |total: usize, i: usize| total / n + usize::from(i < total % n);
        (0..n)
            .map(|i| {
                let p = u16::try_from(share(usize::from(prefetch), i)).unwrap_or(u16::MAX);
                (p, share(concurrency, i))
            })
            .collect()
    }

    /// Priority levels `0..=max` (a classic queue with `x-max-priority`; RabbitMQ 3.10 quorum
    /// queues ignore priorities).
    pub fn priority(mut self, max: u8) -> Self {
        self.priority = Some(max);
        self
    }

    /// Forces the queue type. Quorum is the default; priority handlers need classic.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = Some(queue_type);
        self
    }

    /// How transient failures are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A handler run longer than this is cancelled and retried (kind `timeout`); default
    /// [`DEFAULT_HANDLER_TIMEOUT`] (25 minutes, below RabbitMQ's default `consumer_timeout`).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// No limit on a handler run. Only with a broker `consumer_timeout` raised to match (or
    /// off): otherwise the broker closes the channel of a run that outlives it.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Deliveries of one message that end without a verdict (worker crash, lost connection)
    /// before it is dead-lettered as a crash loop.
    pub fn delivery_limit(mut self, n: u32) -> Self {
        self.delivery_limit = n.max(1);
        self
    }

    /// Lets the broker delete the queues after this long unused (`x-expires`); for tests
    /// and ephemeral handlers.
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }

    /// Bodies larger than this are dead-lettered unread (kind `too_large`).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Whether messages with a `message_id` get a job status (`/jobs/{id}`); on by default.
    pub fn track_jobs(mut self, on: bool) -> Self {
        self.track_jobs = on;
        self
    }

    /// One message at a time across the whole fleet: the queue gets
    /// `x-single-active-consumer`, so the broker feeds one instance (and fails over to another
    /// when it dies), and that instance runs one message at a time (concurrency and prefetch 1).
    pub fn singleton(mut self) -> Self {
        self.singleton = true;
        self
    }

    /// Priority for quorum queues: producers publish to this queue with a `priority` as usual;
    /// cottontail moves each message to its band's queue and consumes the bands by weight
    /// (see [`Bands`]). Costs one extra confirmed publish per message; gains replicated,
    /// durable priority work.
    pub fn bands(mut self, bands: Bands) -> Self {
        self.bands = Some(bands);
        self
    }

    /// Runs messages in `x-sequence` order per `x-sequence-key` (see [`Ordering`](crate::Ordering)).
    pub fn ordered(mut self, ordering: Ordering) -> Self {
        self.ordering = Some(ordering);
        self
    }

    /// Handler runs at once in this process, after the singleton rule.
    pub fn effective_concurrency(&self) -> usize {
        if self.singleton {
            1
        } else {
            self.concurrency
        }
    }

    /// Runs each `message_id` at most once to success, through `dedup`'s store (messages
    /// without a `message_id` run unchecked).
    pub fn dedup(mut self, dedup: Dedup) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// Every broker-held delay this handler uses: the retry tiers, and the wait of messages
    /// whose id is busy on another instance.
    pub fn delay_tiers(&self) -> Vec<Duration> {
        let mut tiers = self.retry.tiers();
        if let Some(d) = &self.dedup {
            tiers.push(d.busy_delay);
        }
        if let Some(o) = &self.ordering {
            tiers.push(o.park_delay);
        }
        tiers.sort();
        tiers.dedup();
        tiers
    }

    /// The work queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dead-letter queue's name: `<queue>.dlq`.
    pub fn dlq_name(&self) -> String {
        crate::names::dlq(&self.name)
    }

    /// The handler's name.
    pub fn handler(&self) -> &str {
        self.handler_name.as_deref().unwrap_or(&self.name)
    }

    /// The effective prefetch count.
    pub fn prefetch_count(&self) -> u16 {
        if self.singleton {
            return 1;
        }
        self.prefetch.unwrap_or_else(|| {
            let c = u16::try_from(self.concurrency).unwrap_or(u16::MAX);
            if self.priority.is_some() {
                c
            } else {
                c.saturating_mul(4).max(64)
            }
        })
    }

    /// The effective queue type.
    pub fn effective_type(&self) -> QueueType {
        self.queue_type.unwrap_or(if self.priority.is_some() {
            QueueType::Classic
        } else {
            QueueType::Quorum
        })
    }

    /// Refuses a handler whose run may outlast the broker's `consumer_timeout`: the broker
    /// would close the channel under it, requeue the delivery (and every other unacked one on
    /// that channel), and the job would start again, possibly forever.
    pub(crate) fn check_consumer_timeout(
        &self,
        consumer_timeout: Option<Duration>,
    ) -> Result<(), crate::Error> {
        let Some(broker) = consumer_timeout else {
            return Ok(());
        };
        let fits = self.timeout.is_some_and(|run| run < broker);
        if fits {
            return Ok(());
        }
        let run = match self.timeout {
            Some(run) => format!("may run for {run:?}"),
            None => "has no timeout (.no_timeout())".to_owned(),
        };
        Err(crate::Error::Config(format!(
            "handler '{}' {run}, but the broker closes a consumer's channel when it holds a \
             delivery for {broker:?} (its consumer_timeout) and the job would start over. \
             Either give it a shorter .timeout(..), split the job into slices that each end \
             with a Continue (state in the message), or raise the broker's consumer_timeout \
             and tell cottontail (COTTONTAIL_CONSUMER_TIMEOUT / Config::consumer_timeout; \
             0 = none)",
            self.handler()
        )))
    }

    /// Checks combinations the broker would reject or silently ignore.
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        if self.name.is_empty() || self.name.len() > 200 || self.name.starts_with("amq.") {
            return Err(crate::Error::Config(format!(
                "queue name '{}' must be 1-200 bytes and must not start with 'amq.'",
                self.name
            )));
        }
        if self.bands.is_some()
            && (self.priority.is_some() || self.singleton || self.ordering.is_some())
        {
            return Err(crate::Error::Config(format!(
                "handler '{}': priority bands cannot be combined with .priority(..), \
                 .singleton() or .ordered(..)",
                self.handler()
            )));
        }
        if let Some(ordering) = &self.ordering {
            ordering.validate(self.handler())?;
        }
        if self.ordering.is_some() && (self.priority.is_some() || self.singleton) {
            return Err(crate::Error::Config(format!(
                "handler '{}': ordered handlers cannot also be priority or singleton handlers",
                self.handler()
            )));
        }
        if self.priority.is_some() && self.queue_type == Some(QueueType::Quorum) {
            return Err(crate::Error::Config(format!(
                "handler '{}': priority levels need a classic queue (RabbitMQ 3.10 quorum queues \
                 ignore priorities); drop .queue_type(QueueType::Quorum) or drop .priority(..)",
                self.handler()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(q: &Queue) -> (usize, usize) {
        let shares = q.consumer_shares();
        (
            shares.iter().map(|(p, _)| usize::from(*p)).sum(),
            shares.iter().map(|(_, c)| c).sum(),
        )
    }

    #[test]
    fn runs_are_limited_below_the_brokers_consumer_timeout_unless_told_otherwise() {
        const BROKER_DEFAULT: Duration = Duration::from_secs(30 * 60);
        assert!(Queue::new("q").timeout.is_some_and(|t| t < BROKER_DEFAULT));
        assert_eq!(Queue::new("q").no_timeout().timeout, None);
        let minute = Duration::from_secs(60);
        assert_eq!(Queue::new("q").timeout(minute).timeout, Some(minute));
    }

    #[test]
    fn a_run_that_may_outlast_the_brokers_consumer_timeout_is_refused() {
        let broker = Some(Duration::from_secs(30 * 60));
        assert!(Queue::new("q").check_consumer_timeout(broker).is_ok());
        let long = Queue::new("q").timeout(Duration::from_secs(31 * 60));
        let refused = long.check_consumer_timeout(broker).unwrap_err().to_string();
        assert!(refused.contains("consumer_timeout"), "{refused}");
        assert!(refused.contains("Continue"), "{refused}");
        assert!(Queue::new("q")
            .no_timeout()
            .check_consumer_timeout(broker)
            .is_err());
        // A broker without a consumer timeout takes anything.
        assert!(long.check_consumer_timeout(None).is_ok());
        assert!(Queue::new("q")
            .no_timeout()
            .check_consumer_timeout(None)
            .is_ok());
    }

    #[test]
    fn shares_add_up_to_the_prefetch_and_the_concurrency() {
        for q in [
            Queue::new("q"),
            Queue::new("q").concurrency(1000).prefetch(1000),
            Queue::new("q").concurrency(7).prefetch(100).consumers(3),
            Queue::new("q").concurrency(3).prefetch(64).consumers(8),
        ] {
            let expected = (usize::from(q.prefetch_count()), q.effective_concurrency());
            assert_eq!(totals(&q), expected, "{q:?}");
            assert!(q.consumer_shares().iter().all(|(p, c)| *p >= 1 && *c >= 1));
        }
        // Never more consumers than runs at once.
        assert_eq!(
            Queue::new("q")
                .concurrency(3)
                .consumers(8)
                .consumer_shares()
                .len(),
            3
        );
    }

    #[test]
    fn small_windows_singletons_and_routers_keep_one_consumer() {
        assert_eq!(Queue::new("q").prefetch(10).consumer_shares().len(), 1);
        assert_eq!(Queue::new("q").priority(9).consumer_shares().len(), 1);
        let singleton = Queue::new("q").singleton().consumers(4);
        assert_eq!(singleton.consumer_shares(), vec![(1, 1)]);
    }
}
