//! Coalesced acknowledgements that never ack an unfinished message.
//!
//! Awaiting one `basic.ack` per message costs ~70 µs in lapin; `multiple=true` acks a whole
//! run at once but covers *every* tag up to it. Handlers finish out of order, so the batcher
//! tracks the settled tags and only sends `multiple` acks up to the highest tag below which
//! everything is settled. Tags finished behind a slow one are acked one by one after a short
//! wait, so a long-running message never pins the prefetch window.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::FutureExt;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

/// What to tell the broker about one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done (its products, if any, are confirmed).
    Ack,
    /// Give it back to the queue (shutdown, lost dependency without a verdict).
    Requeue,
}

enum Command {
    Settle(u64, Settle),
    Flush(oneshot::Sender<()>),
}

/// Handle to a channel's ack batcher task. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Acker {
    tx: mpsc::UnboundedSender<Command>,
}

/// How long a finished tag may wait behind an unfinished one before it is acked alone.
pub(crate) const STRAGGLER_WAIT: Duration = Duration::from_millis(5);

impl Acker {
    /// Starts the batcher for `channel` (one consumer per channel, so tags are 1, 2, 3…).
    pub(crate) fn spawn(channel: Channel) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, rx));
        Self { tx }
    }

    /// Records the verdict for `tag`; sent to the broker soon, coalesced with others.
    pub(crate) fn settle(&self, tag: u64, how: Settle) {
        let _ = self.tx.send(Command::Settle(tag, how));
    }

    /// Hands everything settled so far to lapin, and waits until that is done.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Settled-tag bookkeeping, separate from I/O so it can be tested as a model.
///
/// It keeps only the tags the broker still counts as unacked: the ones in a handler and the
/// settled ones waiting to be coalesced. Both live in the prefetch window, so the ledger never
/// outgrows it, however long one delivery hangs while the rest flow past it; tags already
/// sent are not remembered at all (every tag at or below `high` that is in neither set). Each
/// step touches only the tags it settles or sends.
#[derive(Default)]
pub(crate) struct Ledger {
    /// The highest tag seen. Tags are delivered in order, so every tag below it was delivered.
    high: u64,
    /// Delivered tags without a verdict yet, at or below `high`.
    open: BTreeSet<u64>,
    /// Settled tags whose ack is not sent yet.
    unsent: BTreeSet<u64>,
    /// Tags visited by the model tests' work measure.
    #[cfg(test)]
    visited: u64,
}

/// Frames the ledger wants sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    AckUpTo(u64),
    AckOne(u64),
    Requeue(u64),
}

impl Ledger {
    /// Records a verdict; requeues go out at once (they cannot be coalesced with acks).
    pub(crate) fn settle(&mut self, tag: u64, how: Settle, out: &mut Vec<Frame>) {
        if tag > self.high {
            // The tags skipped were delivered and are still in their handlers.
            self.open.extend(self.high + 1..tag);
            self.high = tag;
        } else if !self.open.remove(&tag) {
            // Settled before: a duplicate verdict.
            return;
        }
        match how {
            Settle::Ack => {
                self.unsent.insert(tag);
            }
            Settle::Requeue => out.push(Frame::Requeue(tag)),
        }
    }

    /// Acks, with one `multiple` frame, every waiting tag below the lowest unfinished one.
    pub(crate) fn advance(&mut self, out: &mut Vec<Frame>) {
        let floor = self
            .open
            .first()
            .map_or(self.high, |unfinished| unfinished - 1);
        let mut highest = None;
        while let Some(tag) = self.unsent.first().copied().filter(|tag| *tag <= floor) {
            self.unsent.pop_first();
            self.visit();
            highest = Some(tag);
        }
        // Not yet acked, and everything below it is settled: the broker accepts it.
        if let Some(tag) = highest {
            out.push(Frame::AckUpTo(tag));
        }
    }

    /// Acks the stragglers (finished, but behind an unfinished tag) one by one.
    pub(crate) fn release_stragglers(&mut self, out: &mut Vec<Frame>) {
        while let Some(tag) = self.unsent.pop_first() {
            self.visit();
            out.push(Frame::AckOne(tag));
        }
    }

    /// Whether finished tags are waiting behind an unfinished one (after [`Ledger::advance`]).
    pub(crate) fn has_stragglers(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Tags held: at most the prefetch window.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len() + self.unsent.len()
    }

    fn visit(&mut self) {
        #[cfg(test)]
        {
            self.visited += 1;
        }
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut ledger = Ledger::default();
    let mut frames = Vec::new();
    let mut straggler_deadline: Option<tokio::time::Instant> = None;
    loop {
        let command = match straggler_deadline {
            Some(deadline) => tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(deadline) => {
                    ledger.release_stragglers(&mut frames);
                    straggler_deadline = None;
                    send_written(&channel, &mut frames).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(command) = command else { break };
        let mut waiters = Vec::new();
        let mut apply = |command, waiters: &mut Vec<oneshot::Sender<()>>| match command {
            Command::Settle(tag, how) => ledger.settle(tag, how, &mut frames),
            Command::Flush(done) => waiters.push(done),
        };
        apply(command, &mut waiters);
        // Drain whatever else is ready: that is what makes the acks coalesce.
        while let Ok(command) = rx.try_recv() {
            apply(command, &mut waiters);
        }
        ledger.advance(&mut frames);
        if !waiters.is_empty() {
            ledger.release_stragglers(&mut frames);
        }
        send_written(&channel, &mut frames).await;
        straggler_deadline = if ledger.has_stragglers() {
            straggler_deadline.or_else(|| Some(tokio::time::Instant::now() + STRAGGLER_WAIT))
        } else {
            None
        };
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}

/// The lapin call for one frame. Its first poll queues the frame for the I/O loop; the rest
/// only waits for the socket write.
async fn frame_sent(channel: &Channel, frame: Frame) -> Result<(), lapin::Error> {
    match frame {
        Frame::AckUpTo(tag) => {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
        }
        Frame::AckOne(tag) => {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
        }
        Frame::Requeue(tag) => {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            channel.basic_nack(tag, requeue).await
        }
    }
}

fn not_sent(error: lapin::Error) {
    // The channel is gone: the broker requeues everything unacked on it, and the supervisor
    // reconnects. Nothing to do here.
    tracing::debug!(%error, "ack not sent; channel closed");
}

/// Sends the frames and waits until each is written (the ack task's `flush` promises that;
/// ordered partitions close their channel right after it).
async fn send_written(channel: &Channel, frames: &mut Vec<Frame>) {
    for frame in frames.drain(..) {
        if let Err(error) = frame_sent(channel, frame).await {
            not_sent(error);
        }
    }
}

/// Hands the frames to lapin without awaiting the write, which costs ~70 µs per call when
/// awaited in line and tells us nothing we need (a channel that dies before the write makes
/// the broker requeue those messages).
fn send(channel: &Channel, frames: &mut Vec<Frame>) {
    for frame in frames.drain(..) {
        if let Some(Err(error)) = frame_sent(channel, frame).now_or_never() {
            not_sent(error);
        }
    }
}

/// Acks for one channel, kept by the task that consumes it (no task or queue of its own).
/// Verdicts are recorded as they come; [`AckBatch::flush`] sends the coalesced frames, every
/// [`ACK_BATCH`] verdicts and whenever the consuming task runs out of ready work.
pub(crate) struct AckBatch {
    channel: Channel,
    ledger: Ledger,
    frames: Vec<Frame>,
    unflushed: usize,
    batch: usize,
}

/// Verdicts recorded before a flush is due even while work keeps arriving.
pub(crate) const ACK_BATCH: usize = 64;

/// How long settled verdicts may wait for more to share their ack frame once the consuming
/// task is idle.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(1);

impl AckBatch {
    pub(crate) fn new(channel: Channel, prefetch: u16) -> Self {
        Self {
            batch: ACK_BATCH.min(usize::from(prefetch / 2).max(1)),
            channel,
            ledger: Ledger::default(),
            frames: Vec::new(),
            unflushed: 0,
        }
    }

    /// Records a verdict; a requeue is sent at once. True when a flush is due: a batch is
    /// full (at most half the prefetch, so the broker's window never runs dry waiting).
    pub(crate) fn settle(&mut self, tag: u64, how: Settle) -> bool {
        self.ledger.settle(tag, how, &mut self.frames);
        send(&self.channel, &mut self.frames);
        self.unflushed += 1;
        self.unflushed >= self.batch
    }

    /// Whether verdicts wait for a flush.
    pub(crate) fn unflushed(&self) -> bool {
        self.unflushed > 0
    }

    /// Acks everything contiguous. True when finished tags still wait behind an unfinished
    /// one: release them after [`STRAGGLER_WAIT`] with [`AckBatch::release_stragglers`].
    pub(crate) fn flush(&mut self) -> bool {
        self.unflushed = 0;
        self.ledger.advance(&mut self.frames);
        send(&self.channel, &mut self.frames);
        self.ledger.has_stragglers()
    }

    /// Acks everything finished and waits until it is written: before the channel or the
    /// connection is closed (lapin may drop frames still queued on a closing channel).
    pub(crate) async fn finish(&mut self) {
        self.unflushed = 0;
        self.ledger.advance(&mut self.frames);
        self.ledger.release_stragglers(&mut self.frames);
        send_written(&self.channel, &mut self.frames).await;
    }

    /// Acks finished tags one by one, even behind an unfinished one.
    pub(crate) fn release_stragglers(&mut self) {
        self.flush();
        self.ledger.release_stragglers(&mut self.frames);
        send(&self.channel, &mut self.frames);
    }
}

#[cfg(test)]
mod tests;
