//! Sequence-numbered ordered delivery that still scales out.
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
//! instance continues where it left off.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::acker::{Acker, Settle};
use crate::connection::{bounded, CLEANUP};
use crate::dead_letter;
use crate::dedup::StoreError;
use crate::extract::{FromMessage, Sequence};
use crate::handler::BoxFuture;
use crate::headers;
use crate::message::Message;
use crate::pipeline::{Verdict, Worker};
use crate::resequencer::{Offer, Resequencer};
use crate::HandlerError;

/// Where each key's next expected sequence number is kept.
pub trait SequenceStore: Send + Sync + 'static {
    /// The next expected number of `key` (1 when never seen).
    fn next(&self, scope: &str, key: &str) -> BoxFuture<Result<u64, StoreError>>;
    /// Sets the next expected number from `from` to `to`; `false` when it was not `from`
    /// (someone else moved it: the caller reloads).
    fn advance(
        &self,
        scope: &str,
        key: &str,
        from: u64,
        to: u64,
    ) -> BoxFuture<Result<bool, StoreError>>;
}

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

/// What to do when a key's gap stays open past [`Ordering::gap_timeout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GapPolicy {
    /// Keep waiting for the missing message; the key shows in `cottontail_ordering_gaps`
    /// and a warning is logged. The default: nothing is applied out of order or dropped.
    #[default]
    Wait,
    /// Give up on the missing numbers and continue from the lowest held one.
    SkipAhead,
    /// Dead-letter the key's waiting messages (kind `sequence_gap`) and continue after them.
    DeadLetter,
}

/// Settings of an ordered handler (see the module docs).
///
/// ```
/// use cottontail::{Ordering, MemorySequences, GapPolicy, Queue};
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
    pub(crate) hold_limit: usize,
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
            .field("hold_limit", &self.hold_limit)
            .field("gap_timeout", &self.gap_timeout)
            .field("gap_policy", &self.gap_policy)
            .finish()
    }
}

impl Ordering {
    /// Ordered delivery with sequence state in `store`: 8 partitions, prefetch 64 per
    /// partition, at most 32 held per partition, parked messages return after 500 ms, gaps
    /// alert after 5 minutes ([`GapPolicy::Wait`]), rebalancing every 2 s.
    pub fn new(store: impl SequenceStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// The same, with a store shared with others.
    pub fn shared(store: Arc<dyn SequenceStore>) -> Self {
        Self {
            store,
            partitions: 8,
            prefetch: 64,
            hold_limit: 32,
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
    pub fn hold_limit(mut self, n: usize) -> Self {
        self.hold_limit = n;
        self
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

/// The partition of `key` among `partitions` (FNV-1a: stable across processes and versions).
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u16
}

/// The name of partition `n` of `queue`.
pub fn partition_queue(queue: &str, n: u16) -> String {
    format!("{queue}.partition.{n}")
}

/// The queue whose consumers count the live instances of an ordered handler.
pub fn members_queue(queue: &str) -> String {
    format!("{queue}.members")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Builds a partition worker (the handler's worker; the partition acks on its own channel).
pub(crate) type MakeWorker = Arc<dyn Fn() -> Worker + Send + Sync>;

/// Keeps this instance's fair share of partitions: joins `Q.members`, grabs unowned
/// partitions while below `ceil(partitions / members)`, releases extras when above.
pub(crate) async fn balance(
    queue: String,
    ordering: Ordering,
    connection: Arc<Connection>,
    make_worker: MakeWorker,
    metrics: crate::metrics::OrderingMetrics,
    stop: CancellationToken,
    failed: CancellationToken,
) {
    let members = members_queue(&queue);
    // Keep the consumer: dropping a lapin consumer cancels it, and it is what counts us.
    let (member_channel, _member) = match join_members(&connection, &members).await {
        Ok(joined) => joined,
        Err(error) => {
            tracing::warn!(%error, queue, "cannot join the members queue");
            failed.cancel();
            return;
        }
    };
    let mut owned: HashMap<u16, Owned> = HashMap::new();
    let offset = fastrand::u16(..ordering.partitions);
    let instance = make_worker().owner;
    loop {
        owned.retain(|_, o| !o.handle.is_finished());
        let live = count_consumers(&connection, &members)
            .await
            .unwrap_or(1)
            .max(1);
        let fair = usize::from(ordering.partitions).div_ceil(live as usize);
        // Standby: we subscribed at the same moment as another instance and the broker made
        // the other one active. Step back so the partition counts once. The broker cannot
        // tell us: a quorum queue's consumer count leaves out waiting single-active consumers.
        // So a partition that never delivered to us is given up when a partition has no
        // consumer at all: held as a standby it would keep that one unowned for good.
        let mut standby = Vec::new();
        let mut orphans: Option<bool> = None;
        for (p, o) in &owned {
            if o.active.load(std::sync::atomic::Ordering::Relaxed)
                || o.since.elapsed() < ordering.rebalance
            {
                continue;
            }
            let orphaned = match orphans {
                Some(known) => known,
                None => {
                    let known =
                        any_unconsumed(&connection, &queue, ordering.partitions, &owned).await;
                    orphans = Some(known);
                    known
                }
            };
            if orphaned {
                standby.push(*p);
            }
        }
        // Too many (someone joined): hand partitions over (finish in-flight, return held,
        // cancel).
        let extra = owned
            .len()
            .saturating_sub(standby.len())
            .saturating_sub(fair);
        let mut release: Vec<u16> = standby;
        release.extend(
            owned
                .keys()
                .copied()
                .filter(|p| !release.contains(p))
                .take(extra)
                .collect::<Vec<_>>(),
        );
        for p in release {
            if let Some(o) = owned.remove(&p) {
                o.release.cancel();
                let _ = bounded(CLEANUP * 2, o.handle).await;
                tracing::info!(%instance, queue, partition = p, "released partition");
            }
        }
        if owned.len() < fair {
            for i in 0..ordering.partitions {
                if owned.len() >= fair {
                    break;
                }
                let p = (i + offset) % ordering.partitions;
                if owned.contains_key(&p) {
                    continue;
                }
                let name = partition_queue(&queue, p);
                if count_consumers(&connection, &name).await != Ok(0) {
                    continue;
                }
                match own(&connection, &name, &ordering).await {
                    Ok((channel, consumer)) => {
                        let release = CancellationToken::new();
                        let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let acker = Acker::spawn(channel.clone());
                        let partition = Partition {
                            worker: make_worker(),
                            acker,
                            channel,
                            consumer,
                            ordering: ordering.clone(),
                            reseq: Resequencer::default(),
                            next: HashMap::new(),
                            metrics: metrics.clone(),
                            gap_alerted: HashSet::new(),
                            active: active.clone(),
                        };
                        let handle = tokio::spawn(partition.run(
                            release.clone(),
                            stop.clone(),
                            failed.clone(),
                        ));
                        let since = std::time::Instant::now();
                        owned.insert(
                            p,
                            Owned {
                                release,
                                handle,
                                active,
                                since,
                            },
                        );
                        tracing::info!(%instance, queue, partition = p, "consumes partition");
                    }
                    Err(error) => {
                        tracing::debug!(%error, partition = p, "cannot consume partition");
                    }
                }
            }
        }
        metrics.partitions.set(owned.len() as i64);
        tokio::select! {
            _ = tokio::time::sleep(ordering.rebalance) => {}
            _ = stop.cancelled() => break,
            _ = failed.cancelled() => break,
        }
    }
    for (_, o) in owned {
        o.release.cancel();
        let _ = bounded(CLEANUP * 2, o.handle).await;
    }
    metrics.partitions.set(0);
    let _ = bounded(CLEANUP, member_channel.close(200, "bye".into())).await;
}

/// A partition this instance consumes.
struct Owned {
    release: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    /// Set on the first delivery: the broker made us the partition's active consumer.
    active: Arc<std::sync::atomic::AtomicBool>,
    since: std::time::Instant,
}

async fn join_members(
    connection: &Connection,
    members: &str,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    let consumer = channel
        .basic_consume(
            members.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// Whether a partition we do not own has no consumer at all.
async fn any_unconsumed(
    connection: &Connection,
    queue: &str,
    partitions: u16,
    owned: &HashMap<u16, Owned>,
) -> bool {
    for p in (0..partitions).filter(|p| !owned.contains_key(p)) {
        if count_consumers(connection, &partition_queue(queue, p)).await == Ok(0) {
            return true;
        }
    }
    false
}

async fn count_consumers(connection: &Connection, queue: &str) -> Result<u32, ()> {
    bounded(CLEANUP, count_consumers_now(connection, queue))
        .await
        .unwrap_or(Err(()))
}

async fn count_consumers_now(connection: &Connection, queue: &str) -> Result<u32, ()> {
    let channel = connection.create_channel().await.map_err(|_| ())?;
    let result = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.consumer_count())
        .map_err(|_| ());
    let _ = channel.close(200, "".into()).await;
    result
}

async fn own(
    connection: &Connection,
    queue: &str,
    ordering: &Ordering,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(ordering.prefetch, BasicQosOptions { global: false })
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            // Partition queues are single-active-consumer: the broker lets one consumer
            // have deliveries at a time, on quorum queues too (which ignore `exclusive`).
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// A held delivery: the message and its tag on the partition's channel.
struct Pending {
    msg: Message,
    tag: u64,
}

/// One owned partition: messages one at a time, in sequence order per key.
struct Partition {
    worker: Worker,
    acker: Acker,
    channel: Channel,
    consumer: lapin::Consumer,
    ordering: Ordering,
    reseq: Resequencer<Pending>,
    /// Cached next numbers: valid while this instance owns the partition (exclusively).
    next: HashMap<String, u64>,
    metrics: crate::metrics::OrderingMetrics,
    gap_alerted: HashSet<String>,
    active: Arc<std::sync::atomic::AtomicBool>,
}

impl Partition {
    async fn run(
        mut self,
        release: CancellationToken,
        stop: CancellationToken,
        failed: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                biased;
                _ = release.cancelled() => break,
                _ = stop.cancelled() => break,
                _ = failed.cancelled() => return,
                _ = sweep.tick() => self.sweep_gaps().await,
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        self.active.store(true, std::sync::atomic::Ordering::Relaxed);
                        let msg = self.worker.message(delivery.data, delivery.properties, delivery.redelivered);
                        let span = self.worker.span_for(&msg);
                        self.offer(msg, delivery.delivery_tag).instrument(span).await;
                        self.metrics.held.set(self.reseq.len() as i64);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "partition consumer failed");
                        failed.cancel();
                        return;
                    }
                    None => {
                        failed.cancel();
                        return;
                    }
                },
            }
        }
        // Hand over: held messages go back to the partition queue, then stop consuming.
        for pending in self.reseq.drain() {
            self.acker.settle(pending.tag, Settle::Requeue);
        }
        self.metrics.held.set(0);
        let _ = bounded(CLEANUP, self.acker.flush()).await;
        let cancel = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        let _ = bounded(CLEANUP, cancel).await;
        let close = self.channel.close(200, "partition released".into());
        let _ = bounded(CLEANUP, close).await;
    }

    async fn next_of(&mut self, key: &str) -> Result<u64, StoreError> {
        if let Some(n) = self.next.get(key) {
            return Ok(*n);
        }
        let n = self
            .ordering
            .store
            .next(self.worker.context.handler.as_str(), key)
            .await?;
        self.next.insert(key.to_owned(), n);
        Ok(n)
    }

    async fn offer(&mut self, msg: Message, tag: u64) {
        if let Some(verdict) = self.worker.guard(&msg).await {
            self.acker.settle(tag, verdict.settle());
            return;
        }
        let seq = match Sequence::from_message(&msg, &()) {
            Ok(seq) => seq,
            Err(error) => {
                let verdict = self.worker.dead_letter(&msg, error, msg.attempt()).await;
                self.acker.settle(tag, verdict.settle());
                return;
            }
        };
        let next = match self.next_of(&seq.key).await {
            Ok(n) => n,
            Err(error) => {
                // Without the state we cannot tell duplicate from next: try later.
                tracing::warn!(%error, "sequence store unavailable; message parked");
                let verdict = self.park(&msg, None).await;
                self.acker.settle(tag, verdict.settle());
                return;
            }
        };
        let since = headers::get_u64(msg.headers(), headers::HELD_SINCE).unwrap_or_else(now_ms);
        match self
            .reseq
            .offer(&seq.key, seq.number, next, Pending { msg, tag }, since)
        {
            Offer::Duplicate(p) => {
                tracing::debug!(key = %seq.key, seq = seq.number, next, "sequence already applied");
                self.worker.metrics.duplicate.inc();
                self.acker.settle(p.tag, Settle::Ack);
            }
            Offer::Held => {
                self.metrics.holds.inc();
                for (key, number, p, since) in self.reseq.overflow(self.ordering.hold_limit) {
                    tracing::debug!(%key, seq = number, "hold limit reached; parked");
                    self.metrics.parked.inc();
                    let verdict = self.park(&p.msg, Some(since)).await;
                    self.acker.settle(p.tag, verdict.settle());
                }
            }
            Offer::Run(p) => self.run_from(&seq.key, p).await,
        }
    }

    /// Runs `first` (the key's next number) and then every held successor that is ready.
    async fn run_from(&mut self, key: &str, first: Pending) {
        let mut current = first;
        loop {
            let number = Sequence::from_message(&current.msg, &())
                .map(|s| s.number)
                .unwrap_or(0);
            // A lost connection cancels the run at once: another instance will own this
            // partition and must not race a zombie.
            let verdict = tokio::select! {
                verdict = self.worker.handle(current.msg.clone()) => verdict,
                _ = self.worker.session_failed.cancelled() => return,
            };
            let advance = matches!(
                verdict,
                Verdict::Done | Verdict::Duplicate | Verdict::DeadLettered
            );
            if advance {
                if let Err(error) = self.advance(key, number).await {
                    // The handler ran but the state did not move: give the message back
                    // (at-least-once; the handler sees it again).
                    tracing::warn!(%error, "sequence state not saved; message requeued");
                    self.acker.settle(current.tag, Settle::Requeue);
                    return;
                }
            }
            self.acker.settle(current.tag, verdict.settle());
            if !advance {
                return;
            }
            // `x-sequence` comes from a header: u64::MAX must not overflow.
            match self.reseq.take(key, number.saturating_add(1)) {
                Some(next) => current = next,
                None => return,
            }
        }
    }

    async fn advance(&mut self, key: &str, number: u64) -> Result<(), StoreError> {
        let scope = self.worker.context.handler.clone();
        let moved = self
            .ordering
            .store
            .advance(&scope, key, number, number.saturating_add(1))
            .await?;
        if moved {
            self.next.insert(key.to_owned(), number.saturating_add(1));
        } else {
            // Someone else moved it (e.g. an operator reset): reload next time.
            self.next.remove(key);
        }
        Ok(())
    }

    async fn park(&self, msg: &Message, since: Option<u64>) -> Verdict {
        match dead_letter::park(msg, self.ordering.park_delay, since).await {
            Ok(()) => Verdict::Moved,
            Err(e) => self.worker.publish_failed(e),
        }
    }

    /// Applies the gap policy to keys that waited too long.
    async fn sweep_gaps(&mut self) {
        let cutoff = now_ms().saturating_sub(self.ordering.gap_timeout.as_millis() as u64);
        let stale = self.reseq.stale_keys(cutoff);
        self.metrics.gaps.set(stale.len() as i64);
        for key in stale {
            match self.ordering.gap_policy {
                GapPolicy::Wait => {
                    if self.gap_alerted.insert(key.clone()) {
                        tracing::warn!(%key, next = ?self.next.get(&key), lowest_held = ?self.reseq.lowest(&key),
                            "sequence gap open past the timeout; still waiting");
                    }
                }
                GapPolicy::SkipAhead => {
                    let (Some(lowest), Some(next)) =
                        (self.reseq.lowest(&key), self.next.get(&key).copied())
                    else {
                        continue;
                    };
                    tracing::warn!(%key, from = next, to = lowest, "sequence gap skipped");
                    self.metrics.skipped.inc();
                    let scope = self.worker.context.handler.clone();
                    match self
                        .ordering
                        .store
                        .advance(&scope, &key, next, lowest)
                        .await
                    {
                        Ok(true) => {
                            self.next.insert(key.clone(), lowest);
                            if let Some(first) = self.reseq.take(&key, lowest) {
                                self.run_from(&key, first).await;
                            }
                        }
                        Ok(false) => {
                            self.next.remove(&key);
                        }
                        Err(error) => tracing::warn!(%error, "cannot skip the gap now"),
                    }
                }
                GapPolicy::DeadLetter => {
                    let waited = self.ordering.gap_timeout;
                    let next = self.next.get(&key).copied().unwrap_or(1);
                    for (number, p) in self.reseq.take_key(&key) {
                        let error = HandlerError::permanent(
                            "sequence_gap",
                            format!("waited {waited:?} for sequence {next} of key '{key}'; got {number}"),
                        );
                        self.metrics.skipped.inc();
                        let verdict = self
                            .worker
                            .dead_letter(&p.msg, error, p.msg.attempt())
                            .await;
                        self.acker.settle(p.tag, verdict.settle());
                    }
                }
            }
        }
        self.gap_alerted.retain(|k| self.reseq.lowest(k).is_some());
        self.metrics.held.set(self.reseq.len() as i64);
    }
}

/// Stamps consecutive sequence numbers per key on the producer side.
pub trait SequenceStamper: Send + Sync + 'static {
    /// The next number for `key` (1, 2, 3…), never handed out twice.
    fn stamp(&self, key: &str) -> BoxFuture<Result<u64, StoreError>>;
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

/// The `x-sequence-key` / `x-sequence` headers for a stamped message.
pub fn sequence_headers(key: &str, number: u64) -> FieldTable {
    let mut table = FieldTable::default();
    headers::set_string(&mut table, headers::SEQUENCE_KEY, key);
    headers::set_int(&mut table, headers::SEQUENCE, number);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        let used: HashSet<u16> = (0..200)
            .map(|i| partition_of(&format!("k{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8);
    }

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
