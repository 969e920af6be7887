//! Consume loops: each one takes deliveries from its channel(s), runs the handler futures in
//! place (no task per message) and acks from the same task.

use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use crate::connection::{bounded, CLEANUP};
use crate::ops::health::Health;
use crate::runtime::acker::{AckBatch, Settle, ACK_DELAY, STRAGGLER_WAIT};
use crate::runtime::pipeline::Worker;
use crate::Error;

/// One queue a consume loop takes deliveries from, on its own channel (so its own
/// delivery tags and acks).
pub(crate) struct Source {
    pub(crate) worker: Arc<Worker>,
    /// What [`Source::reopen`] needs.
    connection: Arc<Connection>,
    queue: String,
    prefetch: u16,
    tag: lapin::types::ShortString,
    /// Counts reopened channels: a verdict of a delivery from an earlier channel (closed by
    /// the broker, which requeued it) must not be acked on the new one, whose delivery tags
    /// start again at 1.
    pub(crate) generation: u64,
    /// Priority bands: picks in a row before a lower band with work gets one.
    pub(crate) weight: u32,
    pub(crate) channel: Channel,
    pub(crate) consumer: Consumer,
    pub(crate) acks: AckBatch,
    pub(crate) peeked: Option<Next>,
}

impl Source {
    pub(crate) async fn open(
        connection: &Arc<Connection>,
        queue: &str,
        prefetch: u16,
        tag: lapin::types::ShortString,
        worker: Worker,
    ) -> Result<Source, Error> {
        let (channel, consumer) = consume(connection, queue, prefetch, tag.clone()).await?;
        Ok(Source {
            worker: Arc::new(worker),
            connection: connection.clone(),
            queue: queue.to_owned(),
            prefetch,
            tag,
            generation: 0,
            weight: 1,
            acks: AckBatch::new(channel.clone(), prefetch),
            channel,
            consumer,
            peeked: None,
        })
    }

    /// A new channel and consumer in place of one the broker closed (the connection lives
    /// on): the broker requeued the old channel's unacked deliveries; the rest of the loop's
    /// work, and every other loop, carries on.
    async fn reopen(&mut self) -> Result<(), Error> {
        let opened = consume(
            &self.connection,
            &self.queue,
            self.prefetch,
            self.tag.clone(),
        );
        // Bounded: on a connection that is going away, the session restarts instead.
        let (channel, consumer) = bounded(CLEANUP, opened)
            .await
            .ok_or_else(|| Error::Broker("no new consumer channel within 5 s".into()))??;
        self.generation += 1;
        self.acks = AckBatch::new(channel.clone(), self.prefetch);
        self.channel = channel;
        self.consumer = consumer;
        self.peeked = None;
        Ok(())
    }
}

async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    tag: lapin::types::ShortString,
) -> Result<(Channel, Consumer), Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(Error::broker)?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)?;
    Ok((channel, consumer))
}

/// Whether the broker closed a channel because a delivery on it went unacknowledged past its
/// `consumer_timeout` (`PRECONDITION_FAILED - delivery acknowledgement on channel N timed
/// out…`).
pub(crate) fn is_ack_timeout(error: &lapin::Error) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            e.get_id() == 406 && {
                let text = e.get_message().as_str();
                text.contains("delivery acknowledgement") && text.contains("timed out")
            }
        }
        _ => false,
    }
}

/// One task that consumes, runs the handler and acks: deliveries become handler futures
/// polled right here (no task per message, no hand-off to an ack task), and their verdicts
/// go into each channel's [`AckBatch`], flushed whenever the task runs out of ready work.
/// Parallelism across cores comes from several loops per queue
/// ([`Queue::consumers`](crate::Queue::consumers)).
pub(crate) struct ConsumeLoop {
    /// Priority bands: highest first.
    pub(crate) sources: Vec<Source>,
    /// Banded handlers: wait for the entry queue's backlog to be sorted into bands before
    /// taking work, so a backlog's urgent messages are seen before its older routine ones
    /// (the entry queue, and the router's in-flight count: 0 = nothing being routed).
    pub(crate) sort_first: Option<(Arc<Connection>, String, Arc<AtomicUsize>)>,
    /// Handler runs at once in this loop.
    pub(crate) limit: usize,
    /// Handler runs in flight right now (watched by `sort_first` of a band loop).
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) stop: CancellationToken,
    pub(crate) failed: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) health: Option<(Arc<Health>, usize)>,
}

/// Runs one delivery; a panic outside the handler (which is caught inside) requeues it.
async fn run_one(
    worker: Arc<Worker>,
    source: (usize, u64),
    delivery: Delivery,
) -> ((usize, u64), u64, Settle) {
    let tag = delivery.delivery_tag;
    let settle = AssertUnwindSafe(worker.process(delivery))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(handler = %worker.queue.handler(), "pipeline panicked; message requeued");
            Settle::Requeue
        });
    (source, tag, settle)
}

/// An empty set of `run`'s futures (names their type before the first push).
fn in_flight_set<F: std::future::Future>(
    _run: fn(Arc<Worker>, (usize, u64), Delivery) -> F,
) -> FuturesUnordered<F> {
    FuturesUnordered::new()
}

impl ConsumeLoop {
    pub(crate) fn new(sources: Vec<Source>, limit: usize) -> Self {
        Self {
            sources,
            sort_first: None,
            limit: limit.max(1),
            in_flight: Arc::default(),
            stop: CancellationToken::new(),
            failed: CancellationToken::new(),
            abort: CancellationToken::new(),
            health: None,
        }
    }

    /// Takes deliveries while fewer than `limit` run. With several sources (priority bands,
    /// highest first) the highest band with a delivery ready goes first, except that after
    /// `weight` picks in a row a lower band with work gets one, so low priorities keep moving
    /// under a steady stream of urgent work.
    pub(crate) async fn run(mut self) {
        let Some(first) = self.sources.first() else {
            return;
        };
        let handler = first.worker.queue.handler().to_owned();
        if let Some((connection, entry, router)) = self.sort_first.take() {
            sort_backlog_first(&connection, &entry, &router, &self.stop).await;
        }
        let mut running = in_flight_set(run_one);
        let mut streak = 0u32;
        let (stop, failed) = (self.stop.clone(), self.failed.clone());
        let (stopped, lost) = (stop.cancelled(), failed.cancelled());
        tokio::pin!(stopped, lost);
        // Finished tags waiting behind an unfinished one are acked alone when this fires.
        let stragglers = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(stragglers);
        let mut stragglers_armed = false;
        // Verdicts not yet sent are flushed this long after the loop runs out of ready work
        // (or at once when a batch fills): small acks are what costs a quorum queue most.
        let flush_at = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(flush_at);
        let mut flush_armed = false;
        while !stop.is_cancelled() && !failed.is_cancelled() {
            tokio::select! {
                biased;
                Some(((source, generation), tag, how)) = running.next(), if !running.is_empty() => {
                    if settle(&mut self.sources, source, generation, tag, how) {
                        self.flush(&mut stragglers_armed, stragglers.as_mut());
                    }
                }
                next = next_delivery(&mut self.sources, &mut streak), if running.len() < self.limit => match next {
                    (source, Some(Ok(delivery))) => {
                        let generation = self.sources[source].generation;
                        running.push(run_one(self.sources[source].worker.clone(), (source, generation), delivery));
                    }
                    (source, Some(Err(error))) if error.is_amqp_soft_error() => {
                        // The broker closed this channel only; the connection is fine. A loop
                        // whose runs are all busy hears of it when one ends, and only then
                        // consumes again: a new channel would be handed the requeued delivery at
                        // once, and with no free run it would wait past the broker's timeout in
                        // the prefetch buffer and close the new channel too.
                        let error_text = crate::connection::redact(&error.to_string());
                        if is_ack_timeout(&error) {
                            tracing::warn!(%handler, error = %error_text,
                                "the broker closed a consumer channel: a delivery went unacknowledged past its consumer_timeout; \
                                 that channel's unacked deliveries go back to the queue; reopening the channel");
                        } else {
                            tracing::warn!(%handler, error = %error_text, "the broker closed a consumer channel; reopening it");
                        }
                        if let Err(error) = self.sources[source].reopen().await {
                            tracing::warn!(%handler, %error, "consumer channel not reopened");
                            failed.cancel();
                        }
                    }
                    (_, Some(Err(error))) => {
                        tracing::warn!(%handler, error = %crate::connection::redact(&error.to_string()), "consumer failed");
                        failed.cancel();
                    }
                    (source, None) => {
                        // E.g. RabbitMQ 4.3+ cancels a quorum queue's consumer that held a
                        // delivery past its consumer_timeout; a deleted queue fails the
                        // re-consume, and then the session.
                        tracing::warn!(%handler, "consumer cancelled by the broker; consuming again");
                        if let Err(error) = self.sources[source].reopen().await {
                            tracing::warn!(%handler, %error, "consumer not restarted");
                            failed.cancel();
                        }
                    }
                },
                () = &mut stragglers, if stragglers_armed => {
                    stragglers_armed = false;
                    for source in &mut self.sources {
                        source.acks.release_stragglers();
                    }
                }
                () = &mut stopped => {}
                () = &mut lost => {}
                () = &mut flush_at, if flush_armed => {
                    flush_armed = false;
                    self.flush(&mut stragglers_armed, stragglers.as_mut());
                }
                // Nothing else ready: send what has been settled soon.
                () = std::future::ready(()), if !flush_armed && self.unflushed() => {
                    flush_armed = true;
                    flush_at.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                }
            }
            self.in_flight.store(running.len(), AtomicOrdering::Relaxed);
        }
        if let Some((health, index)) = &self.health {
            health.set_consuming(*index, false);
        }
        if failed.is_cancelled() {
            // The connection is going away: the broker requeues everything unacked.
            return;
        }
        // Stop: no new deliveries (the ones prefetched stay unacked and go back to the queue
        // when the channel closes); let the running ones finish until the abort, then ack.
        let cancels = self
            .sources
            .iter()
            .map(|s| (s.channel.clone(), s.consumer.tag()))
            .collect::<Vec<_>>();
        let cancel = async move {
            for (channel, tag) in cancels {
                let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
                let _ = bounded(CLEANUP, cancel).await;
            }
        };
        let finish = async {
            let aborted = self.abort.cancelled();
            tokio::pin!(aborted);
            loop {
                tokio::select! {
                    biased;
                    () = &mut aborted => break,
                    done = running.next() => match done {
                        Some(((source, generation), tag, how)) => {
                            settle(&mut self.sources, source, generation, tag, how);
                        }
                        None => break,
                    },
                }
            }
            drop(running);
            for source in &mut self.sources {
                let _ = bounded(CLEANUP, source.acks.finish()).await;
            }
        };
        futures::join!(cancel, finish);
        // Closed here, not by lapin when the last handle drops: that close would race the
        // connection close that follows and could leave it unresolved (a hung stop).
        let closes = self
            .sources
            .iter()
            .map(|s| bounded(CLEANUP, s.channel.close(200, "stopped".into())));
        futures::future::join_all(closes).await;
    }

    fn unflushed(&self) -> bool {
        self.sources.iter().any(|s| s.acks.unflushed())
    }

    fn flush(&mut self, armed: &mut bool, timer: std::pin::Pin<&mut tokio::time::Sleep>) {
        let mut stragglers = false;
        for source in &mut self.sources {
            stragglers |= source.acks.flush();
        }
        if stragglers && !*armed {
            *armed = true;
            timer.reset(tokio::time::Instant::now() + STRAGGLER_WAIT);
        }
    }
}

/// Records a verdict on its source's channel, unless that channel was replaced since the
/// delivery (the broker requeued it when it closed the old one). `true` = flush now.
fn settle(sources: &mut [Source], source: usize, generation: u64, tag: u64, how: Settle) -> bool {
    let source = &mut sources[source];
    if source.generation != generation {
        tracing::debug!(
            "verdict of a delivery from a closed channel dropped (the broker requeued it)"
        );
        return false;
    }
    source.acks.settle(tag, how)
}

/// How long a banded handler waits at most for its entry backlog to be sorted.
const SORT_GRACE: Duration = Duration::from_secs(5);

async fn sort_backlog_first(
    connection: &Connection,
    entry: &str,
    router: &AtomicUsize,
    stop: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + SORT_GRACE;
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let ready = channel
            .queue_declare(
                entry.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count());
        let _ = bounded(CLEANUP, channel.close(200, "".into())).await;
        match ready {
            Ok(0) if router.load(AtomicOrdering::Relaxed) == 0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

type Next = Option<Result<lapin::message::Delivery, lapin::Error>>;

/// The next delivery by band preference (see [`ConsumeLoop::run`]), waiting if none is ready.
/// A delivery looked at but not chosen stays in its source's `peeked` slot for a later pick.
async fn next_delivery(sources: &mut [Source], streak: &mut u32) -> (usize, Next) {
    if sources.len() == 1 {
        return (0, sources[0].consumer.next().await);
    }
    for source in sources.iter_mut() {
        if source.peeked.is_none() {
            source.peeked = source.consumer.next().now_or_never();
        }
    }
    let mut ready = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| s.peeked.is_some())
        .map(|(band, _)| band);
    let chosen = match (ready.next(), ready.next()) {
        (Some(best), Some(lower)) if *streak >= sources[best].weight => {
            *streak = 0;
            Some(lower)
        }
        (Some(best), _) => {
            *streak += 1;
            Some(best)
        }
        (None, _) => None,
    };
    if let Some(band) = chosen {
        if let Some(item) = sources[band].peeked.take() {
            return (band, item);
        }
    }
    let nexts = sources.iter_mut().map(|s| Box::pin(s.consumer.next()));
    let (item, band, _) = futures::future::select_all(nexts).await;
    *streak = 0;
    (band, item)
}
