//! Consume benchmark: raw lapin (ack per message, awaited), raw lapin (coalesced
//! `multiple=true` acks), and a cottontail no-op handler, each draining a pre-filled quorum
//! queue declared by cottontail itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cottontail::client::{Client, PublishOptions};
use cottontail::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueuePurgeOptions,
};
use cottontail::lapin::types::FieldTable;
use cottontail::lapin::{Confirmation, Connection};
use cottontail::{App, Config, Queue, RetryPolicy, State};
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::Notify;

use crate::util::{self, Res};

/// Deliveries per coalesced ack in variant (b).
pub const COALESCE_EVERY: u64 = 50;

/// Give up on a run after this long.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// The consumer variants, in the order they alternate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// (a) raw lapin, `basic_ack` awaited in line for every delivery.
    RawAckEach,
    /// (b) raw lapin, `multiple=true` every 50 deliveries and whenever the stream is idle.
    RawCoalesced,
    /// (c) cottontail no-op handler, concurrency = prefetch.
    Cottontail,
}

impl Variant {
    pub const ALL: [Variant; 3] = [
        Variant::RawAckEach,
        Variant::RawCoalesced,
        Variant::Cottontail,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Variant::RawAckEach => "(a) raw lapin, ack each (awaited)",
            Variant::RawCoalesced => "(b) raw lapin, coalesced acks",
            Variant::Cottontail => "(c) cottontail no-op handler",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Variant::RawAckEach => "a",
            Variant::RawCoalesced => "b",
            Variant::Cottontail => "c",
        }
    }
}

/// Who publishes the pre-fill (it doubles as the publish benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publisher {
    /// Raw lapin, one channel in confirm mode, `window` publishes in flight.
    Raw,
    /// cottontail `Client::publish`, `window` calls in flight.
    Client,
}

/// One timed phase.
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    pub messages: u64,
    pub wall: Duration,
    /// This process's CPU time.
    pub cpu: Duration,
    /// The broker's CPU time, when its process is visible.
    pub broker_cpu: Option<Duration>,
    /// CPU time of every other process (interference), when `/proc/stat` is readable.
    pub other_cpu: Option<Duration>,
}

impl Phase {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.wall.as_secs_f64()
    }

    /// CPU seconds of this process per 100k messages.
    pub fn cpu_per_100k(&self) -> f64 {
        self.cpu.as_secs_f64() * 100_000.0 / self.messages as f64
    }

    /// Broker CPU seconds per 100k messages.
    pub fn broker_cpu_per_100k(&self) -> Option<f64> {
        self.broker_cpu
            .map(|c| c.as_secs_f64() * 100_000.0 / self.messages as f64)
    }

    /// Cores' worth of CPU that other processes used during the phase.
    pub fn other_cores(&self) -> Option<f64> {
        self.other_cpu
            .map(|c| c.as_secs_f64() / self.wall.as_secs_f64())
    }

    fn measure(messages: u64, t0: Instant, mark: util::CpuMark, broker: Option<u32>) -> Self {
        let wall = t0.elapsed();
        let cpu = mark.since(broker);
        Phase {
            messages,
            wall,
            cpu: cpu.own,
            broker_cpu: cpu.broker,
            other_cpu: cpu.other,
        }
    }
}

/// The measurements of one consume run.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub publish: Phase,
    pub consume: Phase,
    /// From consumer start to the first delivery (connection, declares, consume-ok).
    pub first_delivery: Duration,
    /// `Running::stop()` calls (declare + consume) that did not return within
    /// [`STOP_LIMIT`]; the run continued without them.
    pub stop_hangs: u32,
    /// Messages back in the queue after the consumer closed: acks the client had sent but
    /// the broker had not applied when the connection closed (they are redelivered).
    pub requeued_at_close: u32,
}

/// How long `Running::stop()` may take before it counts as hung (a no-op handler drains
/// in milliseconds).
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Stops `running`, or gives up after [`STOP_LIMIT`] (returns whether it hung).
async fn stop_bounded(running: cottontail::Running, what: &str) -> Res<bool> {
    match tokio::time::timeout(STOP_LIMIT, running.stop()).await {
        Ok(result) => {
            result?;
            Ok(false)
        }
        Err(_) => {
            eprintln!(
                "  !! {what}: cottontail Running::stop() did not return within {STOP_LIMIT:?}"
            );
            Ok(true)
        }
    }
}

/// Settings shared by every run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: String,
    pub messages: u64,
    pub publish_window: usize,
    /// The broker's OS process, for its CPU time.
    pub broker_pid: Option<u32>,
}

/// The queue of one variant at one prefetch: the same in every round of this process, so
/// no big quorum queue is deleted while the benchmark still writes (RabbitMQ 3.10.8's Ra
/// segment writer can crash the node when a deleted queue's log is flushed under load,
/// dropping every connection). [`delete_queues`] removes them at the end.
pub fn queue_name(variant: Variant, prefetch: u16) -> String {
    format!(
        "bench.consume.{}.p{prefetch}.{}",
        variant.short(),
        std::process::id()
    )
}

/// Runs one variant at one prefetch on its queue (declared if new, emptied first).
pub async fn run(
    s: &Settings,
    admin: &Connection,
    variant: Variant,
    prefetch: u16,
    publisher: Publisher,
) -> Res<RunResult> {
    let s = &Settings {
        messages: messages_at(s.messages, prefetch),
        ..s.clone()
    };
    run_on(
        s,
        admin,
        &queue_name(variant, prefetch),
        variant,
        prefetch,
        publisher,
    )
    .await
}

/// Messages per run at `prefetch`: small windows run 5-10x slower, so they get a fifth and
/// the default run still fits its time budget with three rounds.
pub fn messages_at(messages: u64, prefetch: u16) -> u64 {
    if prefetch < 100 {
        (messages / 5).max(1000)
    } else {
        messages
    }
}

/// Deletes every consume queue (and its DLQ) this process declared.
pub async fn delete_queues(admin: &Connection, variants: &[Variant], prefetches: &[u16]) {
    for variant in variants {
        for prefetch in prefetches {
            let queue = queue_name(*variant, *prefetch);
            util::delete_queue(admin, &queue).await;
            util::delete_queue(admin, &format!("{queue}.dlq")).await;
        }
    }
}

async fn run_on(
    s: &Settings,
    admin: &Connection,
    queue: &str,
    variant: Variant,
    prefetch: u16,
    publisher: Publisher,
) -> Res<RunResult> {
    let mut stop_hangs = u32::from(declare_with_cottontail(&s.url, queue).await?);
    // A previous round's run may have left messages requeued at its close.
    let purge = admin.create_channel().await?;
    purge
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = purge.close(200, "purged".into()).await;
    let publish = match publisher {
        Publisher::Raw => prefill_raw(s, queue).await?,
        Publisher::Client => prefill_client(s, queue).await?,
    };
    let check = admin.create_channel().await?;
    let ready = util::ready_count(&check, queue).await?;
    if u64::from(ready) != s.messages {
        return Err(format!(
            "{queue}: {ready} ready after pre-fill, expected {}",
            s.messages
        )
        .into());
    }
    let (consume, first_delivery) = match variant {
        Variant::RawAckEach => consume_raw(s, queue, prefetch, false).await?,
        Variant::RawCoalesced => consume_raw(s, queue, prefetch, true).await?,
        Variant::Cottontail => {
            let (phase, first, hung) = consume_cottontail(s, queue, prefetch).await?;
            stop_hangs += u32::from(hung);
            (phase, first)
        }
    };
    // The consumer's connection is closed by now: anything not acked would be back.
    let left = util::ready_count(&check, queue).await?;
    let _ = check.close(200, "checked".into()).await;
    if left != 0 {
        eprintln!(
            "  !! {queue}: {left} messages back in the queue after the consumer closed \
             (acks sent, not yet applied by the broker at close)"
        );
    }
    Ok(RunResult {
        publish,
        consume,
        first_delivery,
        stop_hangs,
        requeued_at_close: left,
    })
}

/// The handler-side queue settings every variant's queue is declared with.
fn cottontail_queue(queue: &str, prefetch: u16) -> Queue {
    let q = Queue::new(queue)
        // Left behind only if the benchmark dies; removed a while after.
        .expires(Duration::from_secs(900))
        .prefetch(prefetch)
        .concurrency(usize::from(prefetch))
        .retry(RetryPolicy::none());
    match std::env::var("BENCH_CONSUMERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => q.consumers(n),
        None => q,
    }
}

async fn noop() {}

/// Lets cottontail declare `queue` (and `queue.dlq`) with its own arguments, then stops
/// (returns whether the stop hung; the queues are declared either way).
async fn declare_with_cottontail(url: &str, queue: &str) -> Res<bool> {
    let running = App::new(())
        .handler(cottontail_queue(queue, 1), noop)
        .start(Config::new(url).connection_name(format!("bench-declare:{queue}")))
        .await?;
    if !running.wait_ready(Duration::from_secs(30)).await {
        let _ = running.stop().await;
        return Err(format!("cottontail did not become ready declaring {queue}").into());
    }
    stop_bounded(running, &format!("declaring {queue}")).await
}

/// Raw lapin publishes with confirms, mandatory, `window` in flight on one channel. Each
/// publish runs as its own future (like the `Client` calls): lapin's `basic_publish` future
/// resolves only once its frames are written, so awaiting publishes one after the other
/// would serialise them on the I/O thread.
async fn prefill_raw(s: &Settings, queue: &str) -> Res<Phase> {
    let (n, window) = (s.messages, s.publish_window);
    let conn = util::connect(&s.url, &format!("bench-publish-raw:{queue}")).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let mark = util::CpuMark::now(s.broker_pid);
    let t0 = Instant::now();
    let ch_ref = &ch;
    futures::stream::iter(0..n)
        .map(|id| async move {
            let confirm = ch_ref
                .basic_publish(
                    "".into(),
                    queue.to_owned().into(),
                    options,
                    &util::body(id),
                    util::job_properties(),
                )
                .await?;
            check_confirm(confirm.await?)
        })
        .buffer_unordered(window)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    let phase = Phase::measure(n, t0, mark, s.broker_pid);
    let _ = conn.close(200, "published".into()).await;
    Ok(phase)
}

fn check_confirm(c: Confirmation) -> Res<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("publish not confirmed: {other:?}").into()),
    }
}

/// cottontail `Client::publish` (confirmed, mandatory), `window` calls in flight.
async fn prefill_client(s: &Settings, queue: &str) -> Res<Phase> {
    let (n, window) = (s.messages, s.publish_window);
    let client = Client::connect(&s.url, format!("bench-publish-client:{queue}")).await?;
    let mark = util::CpuMark::now(s.broker_pid);
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|id| {
            let client = client.clone();
            async move {
                client
                    .publish(queue, &util::body(id), PublishOptions::default())
                    .await
            }
        })
        .buffer_unordered(window)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    let phase = Phase::measure(n, t0, mark, s.broker_pid);
    client.close().await;
    Ok(phase)
}

/// Raw lapin consumer, handling each delivery in line on one task.
async fn consume_raw(
    s: &Settings,
    queue: &str,
    prefetch: u16,
    coalesce: bool,
) -> Res<(Phase, Duration)> {
    let n = s.messages;
    util::mark("consume-start");
    let mark = util::CpuMark::now(s.broker_pid);
    let t0 = Instant::now();
    let conn = util::connect(&s.url, &format!("bench-consume-raw:{queue}")).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.to_owned().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut first = None;
    let mut acked = 0u64;
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    let drain = async {
        while acked < n {
            let next = if coalesce {
                match consumer.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        // Idle: ack what we have before waiting.
                        if unacked > 0 {
                            ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                                .await?;
                            acked += unacked;
                            unacked = 0;
                            if acked >= n {
                                break;
                            }
                        }
                        consumer.next().await
                    }
                }
            } else {
                consumer.next().await
            };
            let delivery = next.ok_or("consumer ended")??;
            first.get_or_insert_with(|| t0.elapsed());
            if coalesce {
                last_tag = delivery.delivery_tag;
                unacked += 1;
                if unacked >= COALESCE_EVERY || acked + unacked >= n {
                    ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                        .await?;
                    acked += unacked;
                    unacked = 0;
                }
            } else {
                ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: false })
                    .await?;
                acked += 1;
            }
        }
        Ok::<(), util::BoxError>(())
    };
    tokio::time::timeout(RUN_LIMIT, drain)
        .await
        .map_err(|_| format!("{queue}: raw consumer timed out after {RUN_LIMIT:?}"))??;
    let phase = Phase::measure(n, t0, mark, s.broker_pid);
    util::mark("consume-end");
    // Like cottontail's drain: cancel the consumer, then close.
    ch.basic_cancel("bench".into(), BasicCancelOptions::default())
        .await?;
    conn.close(200, "consumed".into()).await?;
    Ok((phase, first.unwrap_or_default()))
}

/// The no-op handler's state: counts handled messages and signals the last one.
#[derive(Clone)]
struct Counter(Arc<CounterInner>);

struct CounterInner {
    handled: AtomicU64,
    target: u64,
    started: Instant,
    first: std::sync::OnceLock<Duration>,
    done: Notify,
}

async fn count(State(counter): State<Counter>) {
    let c = &counter.0;
    let handled = c.handled.fetch_add(1, Ordering::Relaxed) + 1;
    if handled == 1 {
        let _ = c.first.set(c.started.elapsed());
    }
    if handled == c.target {
        c.done.notify_one();
    }
}

/// cottontail: `App::start` to the handler's N-th run (acks follow within microseconds; the
/// emptiness check after `stop` proves they were all sent).
async fn consume_cottontail(
    s: &Settings,
    queue: &str,
    prefetch: u16,
) -> Res<(Phase, Duration, bool)> {
    let n = s.messages;
    util::mark("consume-start");
    let mark = util::CpuMark::now(s.broker_pid);
    let t0 = Instant::now();
    let counter = Counter(Arc::new(CounterInner {
        handled: AtomicU64::new(0),
        target: n,
        started: t0,
        first: std::sync::OnceLock::new(),
        done: Notify::new(),
    }));
    let running = App::new(counter.clone())
        .handler(cottontail_queue(queue, prefetch), count)
        .start(Config::new(&s.url).connection_name(format!("bench-consume-cottontail:{queue}")))
        .await?;
    if !running.wait_ready(Duration::from_secs(30)).await {
        let _ = running.stop().await;
        return Err(format!("{queue}: cottontail did not become ready").into());
    }
    let finished = tokio::time::timeout(RUN_LIMIT, counter.0.done.notified()).await;
    let phase = Phase::measure(n, t0, mark, s.broker_pid);
    util::mark("consume-end");
    let hung = stop_bounded(running, &format!("consuming {queue}")).await?;
    if finished.is_err() {
        return Err(format!(
            "{queue}: cottontail handled {} of {n} within {RUN_LIMIT:?}",
            counter.0.handled.load(Ordering::Relaxed)
        )
        .into());
    }
    let handled = counter.0.handled.load(Ordering::Relaxed);
    if handled != n {
        return Err(format!("{queue}: handler ran {handled} times for {n} messages").into());
    }
    Ok((
        phase,
        counter.0.first.get().copied().unwrap_or_default(),
        hung,
    ))
}
