//! One owned partition: its messages one at a time, in sequence order per key.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::now_ms;
use super::resequencer::{Offer, Resequencer};
use crate::connection::{bounded, CLEANUP};
use crate::extract::{FromMessage, Sequence};
use crate::headers;
use crate::message::Message;
use crate::ops::metrics::OrderingMetrics;
use crate::queue::{GapPolicy, Ordering};
use crate::runtime::acker::{Acker, Settle};
use crate::runtime::copies;
use crate::runtime::pipeline::{Verdict, Worker};
use crate::runtime::Lifecycle;
use crate::stores::StoreError;
use crate::HandlerError;

/// Next expected numbers cached per partition (keys beyond this are read from the store).
const NEXT_CACHE_KEYS: u64 = 10_000;

/// The partition's cache of next expected numbers: bounded, because a partition sees an
/// unbounded number of keys over its life. Valid while this instance owns the partition; the
/// store stays the source of truth (a miss reads it).
struct NextNumbers(moka::sync::Cache<String, u64>);

impl NextNumbers {
    fn new(capacity: u64) -> Self {
        Self(moka::sync::Cache::new(capacity))
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.0.get(key)
    }

    fn set(&self, key: &str, next: u64) {
        self.0.insert(key.to_owned(), next);
    }

    fn forget(&self, key: &str) {
        self.0.invalidate(key);
    }
}

/// A held delivery: the message and its tag on the partition's channel.
struct Pending {
    msg: Message,
    tag: u64,
}

/// Whether a partition goes on taking messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Go,
    /// Stop consuming and hand everything back: the run was cut (shutdown deadline, lost
    /// connection), or another owner moved a key on (this one is stale).
    Stop,
}

/// The end of saving a key's next number.
enum Saved {
    Moved,
    /// The compare-and-set found another number: someone else owns the key now.
    Stale,
    /// The store did not answer before the partition had to stop.
    Interrupted,
}

/// One owned partition: messages one at a time, in sequence order per key.
pub(super) struct Partition {
    worker: Worker,
    acker: Acker,
    channel: Channel,
    consumer: lapin::Consumer,
    /// The partition queue (held messages are handed back into it).
    queue: String,
    ordering: Ordering,
    reseq: Resequencer<Pending>,
    next: NextNumbers,
    metrics: OrderingMetrics,
    gap_alerted: HashSet<String>,
    active: Arc<std::sync::atomic::AtomicBool>,
    /// Messages to hand back with the held ones when the partition stops.
    give_back: Vec<(Pending, Option<u64>)>,
    /// This partition is handed to another instance (rebalance).
    release: CancellationToken,
    session: Lifecycle,
}

impl Partition {
    /// A partition this instance now consumes (`active`: set on its first delivery).
    pub(super) fn new(
        worker: Worker,
        (channel, consumer): (Channel, lapin::Consumer),
        queue: String,
        ordering: Ordering,
        metrics: OrderingMetrics,
        (active, release): (Arc<std::sync::atomic::AtomicBool>, CancellationToken),
        session: Lifecycle,
    ) -> Self {
        Self {
            worker,
            acker: Acker::spawn(channel.clone()),
            channel,
            consumer,
            queue,
            ordering,
            reseq: Resequencer::default(),
            next: NextNumbers::new(NEXT_CACHE_KEYS),
            metrics,
            gap_alerted: HashSet::new(),
            active,
            give_back: Vec::new(),
            release,
            session,
        }
    }

    pub(super) async fn run(mut self) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        let (release, stop, failed) = (
            self.release.clone(),
            self.session.stop.clone(),
            self.session.failed.clone(),
        );
        loop {
            let flow = tokio::select! {
                biased;
                _ = release.cancelled() => Flow::Stop,
                _ = stop.cancelled() => Flow::Stop,
                _ = failed.cancelled() => return,
                _ = sweep.tick() => self.sweep_gaps().await,
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        self.active.store(true, std::sync::atomic::Ordering::Relaxed);
                        let msg = self.worker.message(delivery.data, delivery.properties, delivery.redelivered);
                        let span = self.worker.span_for(&msg);
                        let flow = self.offer(msg, delivery.delivery_tag).instrument(span).await;
                        self.metrics.held.set(self.reseq.len() as i64);
                        flow
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
            };
            if failed.is_cancelled() {
                return;
            }
            if flow == Flow::Stop {
                break;
            }
        }
        self.hand_over().await;
    }

    /// Stops consuming, then gives back every message that did not run (held, or delivered
    /// and not yet looked at) as a fresh copy in the partition queue, so a handover costs no
    /// message its crash-loop budget; then acks and closes. A copy that cannot be published is
    /// requeued instead (never lost).
    async fn hand_over(&mut self) {
        let cancel = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        let cancelled = bounded(CLEANUP, cancel).await.is_some_and(|r| r.is_ok());
        let mut back = std::mem::take(&mut self.give_back);
        back.extend(
            self.reseq
                .drain()
                .into_iter()
                .map(|(p, since)| (p, Some(since))),
        );
        // Deliveries already received but not offered (after the cancel, no more arrive).
        if cancelled {
            while let Some(Some(Ok(delivery))) = self.consumer.next().now_or_never() {
                let msg =
                    self.worker
                        .message(delivery.data, delivery.properties, delivery.redelivered);
                let since = headers::get_u64(msg.headers(), headers::HELD_SINCE);
                let tag = delivery.delivery_tag;
                back.push((Pending { msg, tag }, since));
            }
        }
        self.metrics.held.set(0);
        let give_back = async {
            for (p, since) in back {
                let how = match copies::park_in(&p.msg, &self.queue, since).await {
                    Ok(()) => Settle::Ack,
                    Err(e) => self.worker.publish_failed(e).settle(),
                };
                self.acker.settle(p.tag, how);
            }
        };
        let _ = bounded(CLEANUP, give_back).await;
        let _ = bounded(CLEANUP, self.acker.flush()).await;
        let close = self.channel.close(200, "partition released".into());
        let _ = bounded(CLEANUP, close).await;
    }

    async fn next_of(&mut self, key: &str) -> Result<u64, StoreError> {
        if let Some(n) = self.next.get(key) {
            return Ok(n);
        }
        let n = self
            .ordering
            .store
            .next(self.worker.context.handler.as_str(), key)
            .await?;
        self.next.set(key, n);
        Ok(n)
    }

    async fn offer(&mut self, msg: Message, tag: u64) -> Flow {
        // Guards (size, crash loop) run at the message's turn (see `run_from`), where a
        // dead-letter moves its key on; here they would leave a gap for good.
        let seq = match Sequence::from_message(&msg, &()) {
            Ok(seq) => seq,
            Err(error) => {
                let verdict = self.worker.dead_letter(&msg, error, msg.attempt()).await;
                self.acker.settle(tag, verdict.settle());
                return Flow::Go;
            }
        };
        let next = match self.next_of(&seq.key).await {
            Ok(n) => n,
            Err(error) => {
                // Without the state we cannot tell duplicate from next: try later, without
                // spending an attempt.
                tracing::warn!(%error, "sequence store unavailable; message deferred");
                self.worker.metrics.deferred_store.inc();
                let verdict = self.park(&msg, None).await;
                self.acker.settle(tag, verdict.settle());
                return Flow::Go;
            }
        };
        let since = headers::get_u64(msg.headers(), headers::HELD_SINCE).unwrap_or_else(now_ms);
        match self
            .reseq
            .offer(&seq.key, seq.number, next, Pending { msg, tag }, since)
        {
            Offer::Duplicate(p) => {
                tracing::debug!(key = %seq.key, seq = seq.number, next, "below the key's window: already applied or given up");
                self.worker.metrics.duplicate.inc();
                self.acker.settle(p.tag, Settle::Ack);
                Flow::Go
            }
            Offer::Held => {
                self.metrics.holds.inc();
                for (key, number, p, since) in
                    self.reseq.overflow(self.ordering.effective_hold_limit())
                {
                    tracing::debug!(%key, seq = number, "hold limit reached; parked");
                    self.metrics.parked.inc();
                    let verdict = self.park(&p.msg, Some(since)).await;
                    self.acker.settle(p.tag, verdict.settle());
                }
                Flow::Go
            }
            Offer::Run(p) => self.run_from(&seq.key, p).await,
        }
    }

    /// Runs `first` (the key's next number) and then every held successor that is ready.
    async fn run_from(&mut self, key: &str, first: Pending) -> Flow {
        let mut current = first;
        loop {
            let number = Sequence::from_message(&current.msg, &())
                .map(|s| s.number)
                .unwrap_or(0);
            let verdict = match self.worker.guard(&current.msg).await {
                Some(verdict) => verdict,
                // A lost connection or the shutdown deadline cuts the run at once (unacked, it
                // goes back to the queue): another instance will own this partition and must
                // not race a zombie.
                None => tokio::select! {
                    verdict = self.worker.handle(current.msg.clone()) => verdict,
                    _ = self.session.failed.cancelled() => return Flow::Stop,
                    _ = self.session.abort.cancelled() => return Flow::Stop,
                },
            };
            let advance = matches!(
                verdict,
                Verdict::Done | Verdict::Duplicate | Verdict::DeadLettered | Verdict::Cancelled
            );
            if !advance {
                self.acker.settle(current.tag, verdict.settle());
                return Flow::Go;
            }
            // `x-sequence` comes from a header: u64::MAX must not overflow.
            let to = number.saturating_add(1);
            match self.save(key, number, to).await {
                Saved::Moved => self.acker.settle(current.tag, verdict.settle()),
                Saved::Stale | Saved::Interrupted => {
                    // It ran, but its key's state is not ours to move: give it back with
                    // the rest (the key's owner sees a duplicate, or runs it again).
                    self.give_back.push((current, None));
                    return Flow::Stop;
                }
            }
            match self.reseq.take(key, to) {
                Some(next) => current = next,
                None => return Flow::Go,
            }
        }
    }

    /// Moves `key`'s next number from `from` to `to` (compare-and-set), retrying while the
    /// store does not answer: the message that ran is acked only once this holds, and a
    /// store outage must not spend its delivery budget. Gives up when the partition is
    /// released, the connection fails or the shutdown deadline passes.
    async fn save(&mut self, key: &str, from: u64, to: u64) -> Saved {
        let scope = self.worker.context.handler.clone();
        let mut delay = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match self.ordering.store.advance(&scope, key, from, to).await {
                Ok(true) => {
                    self.next.set(key, to);
                    return Saved::Moved;
                }
                Ok(false) => {
                    self.next.forget(key);
                    tracing::warn!(%key, from, to, queue = %self.queue,
                        "the key's sequence state moved under this instance (another owner, or an operator); \
                         handing the partition back");
                    return Saved::Stale;
                }
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(%error, %key, "sequence state not saved; retrying until the store answers");
                }
                Err(error) => tracing::debug!(%error, %key, "sequence state still not saved"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.release.cancelled() => return Saved::Interrupted,
                _ = self.session.failed.cancelled() => return Saved::Interrupted,
                _ = self.session.abort.cancelled() => return Saved::Interrupted,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn park(&self, msg: &Message, since: Option<u64>) -> Verdict {
        match copies::park(msg, self.ordering.park_delay, since).await {
            Ok(()) => Verdict::Moved,
            Err(e) => self.worker.publish_failed(e),
        }
    }

    /// Applies the gap policy to keys that waited too long.
    async fn sweep_gaps(&mut self) -> Flow {
        let cutoff = now_ms().saturating_sub(self.ordering.gap_timeout.as_millis() as u64);
        let stale = self.reseq.stale_keys(cutoff);
        self.metrics.gaps.set(stale.len() as i64);
        let mut flow = Flow::Go;
        for key in stale {
            flow = match self.ordering.gap_policy {
                GapPolicy::Wait => {
                    if self.gap_alerted.insert(key.clone()) {
                        tracing::warn!(%key, next = ?self.next.get(&key), lowest_held = ?self.reseq.lowest(&key),
                            "sequence gap open past the timeout; still waiting");
                    }
                    Flow::Go
                }
                GapPolicy::SkipAhead => self.skip_ahead(&key).await,
                GapPolicy::DeadLetter => self.dead_letter_gap(&key).await,
            };
            if flow == Flow::Stop {
                break;
            }
        }
        self.gap_alerted.retain(|k| self.reseq.lowest(k).is_some());
        self.metrics.held.set(self.reseq.len() as i64);
        flow
    }

    /// [`GapPolicy::SkipAhead`]: continue from the lowest held number.
    async fn skip_ahead(&mut self, key: &str) -> Flow {
        let (Some(lowest), Ok(next)) = (self.reseq.lowest(key), self.next_of(key).await) else {
            return Flow::Go;
        };
        tracing::warn!(%key, from = next, to = lowest, "sequence gap skipped");
        self.metrics.skipped.inc();
        match self.save(key, next, lowest).await {
            Saved::Moved => match self.reseq.take(key, lowest) {
                Some(first) => self.run_from(key, first).await,
                None => Flow::Go,
            },
            Saved::Stale | Saved::Interrupted => Flow::Stop,
        }
    }

    /// [`GapPolicy::DeadLetter`]: dead-letter the key's held messages, then move the key past
    /// them, so what comes after applies (a late arrival of a missing number is then below
    /// the window, like a duplicate).
    async fn dead_letter_gap(&mut self, key: &str) -> Flow {
        let Ok(next) = self.next_of(key).await else {
            return Flow::Go;
        };
        let waited = self.ordering.gap_timeout;
        let mut past = None;
        let mut failed = false;
        for (number, p) in self.reseq.take_key(key) {
            if failed {
                // Not past a message whose dead-letter copy failed: it comes back first.
                self.acker.settle(p.tag, Settle::Requeue);
                continue;
            }
            let error = HandlerError::permanent(
                "sequence_gap",
                format!("waited {waited:?} for sequence {next} of key '{key}'; got {number}"),
            );
            self.metrics.skipped.inc();
            let verdict = self
                .worker
                .dead_letter(&p.msg, error, p.msg.attempt())
                .await;
            failed = verdict != Verdict::DeadLettered;
            if !failed {
                past = Some(number.saturating_add(1));
            }
            self.acker.settle(p.tag, verdict.settle());
        }
        match past {
            Some(to) => match self.save(key, next, to).await {
                Saved::Moved => Flow::Go,
                Saved::Stale | Saved::Interrupted => Flow::Stop,
            },
            None => Flow::Go,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_number_cache_stays_bounded_whatever_the_number_of_keys() {
        let cache = NextNumbers::new(100);
        for i in 0..20_000u64 {
            cache.set(&format!("key-{i}"), i);
        }
        cache.0.run_pending_tasks();
        assert!(cache.0.entry_count() <= 100, "{}", cache.0.entry_count());
        cache.set("k", 7);
        assert_eq!(cache.get("k"), Some(7));
        cache.forget("k");
        assert_eq!(cache.get("k"), None);
    }
}
