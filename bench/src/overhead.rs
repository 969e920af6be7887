//! The cost of cottontail's optional layers, each as a ratio to the plain no-op handler in the
//! same run: metrics+tracing off vs on, memory dedup, Redis dedup, ordered delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cottontail::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use cottontail::{App, Config, Dedup, MemorySequences, MemoryStore, Queue, RetryPolicy, State};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Notify;

use crate::util::{self, Res};

/// One configuration of the no-op handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Metrics and per-message spans on (a tracing subscriber is installed for this section).
    Plain,
    /// `App::instrumented(false)`.
    Uninstrumented,
    /// `Queue::dedup` with the in-memory store (every message has a `message_id`).
    MemoryDedup,
    /// `Queue::dedup` with Redis (`REDIS_URL`, default the local server).
    RedisDedup,
    /// `Queue::ordered` with in-memory sequence state, 1000 keys, in-order publishes.
    Ordered,
}

impl Flavor {
    pub const ALL: [Flavor; 5] = [
        Flavor::Plain,
        Flavor::Uninstrumented,
        Flavor::MemoryDedup,
        Flavor::RedisDedup,
        Flavor::Ordered,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Flavor::Plain => "plain (metrics + spans on)",
            Flavor::Uninstrumented => "metrics + spans off",
            Flavor::MemoryDedup => "memory dedup",
            Flavor::RedisDedup => "redis dedup",
            Flavor::Ordered => "ordered (8 partitions)",
        }
    }
}

struct Count {
    handled: AtomicU64,
    target: u64,
    done: Notify,
    /// First and last handler call: the rate is taken between them, so connection and
    /// topology setup (the same for every flavor, but a large share of a short run) is left
    /// out.
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
}

async fn count(State(c): State<Arc<Count>>) {
    c.first.get_or_init(Instant::now);
    if c.handled.fetch_add(1, Ordering::Relaxed) + 1 == c.target {
        let _ = c.last.set(Instant::now());
        c.done.notify_one();
    }
}

const KEYS: u64 = 1000;

fn queue_for(
    name: &str,
    flavor: Flavor,
    prefetch: u16,
    redis: Option<&cottontail::stores::RedisStore>,
) -> Queue {
    let q = Queue::new(name)
        .prefetch(prefetch)
        .concurrency(usize::from(prefetch))
        .retry(RetryPolicy::none())
        .track_jobs(false);
    match flavor {
        Flavor::Plain | Flavor::Uninstrumented => q,
        Flavor::MemoryDedup => {
            q.dedup(Dedup::new(MemoryStore::new(1_000_000)).retention(Duration::from_secs(120)))
        }
        Flavor::RedisDedup => match redis {
            Some(r) => q.dedup(Dedup::new(r.clone()).retention(Duration::from_secs(120))),
            None => q,
        },
        Flavor::Ordered => q.ordered(
            cottontail::Ordering::new(MemorySequences::new())
                .partitions(8)
                .prefetch(prefetch.max(64))
                .rebalance_interval(Duration::from_millis(200)),
        ),
    }
}

/// Runs every flavor `rounds` times (alternating) with `n` messages; returns per flavor the
/// msg/s of each round.
pub async fn run(url: &str, n: u64, prefetch: u16, rounds: usize) -> Res<Vec<(Flavor, Vec<f64>)>> {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = cottontail::stores::RedisStore::connect(&redis_url, &util::unique("bench-dedup"))
        .await
        .ok();
    let mut results: Vec<(Flavor, Vec<f64>)> =
        Flavor::ALL.iter().map(|f| (*f, Vec::new())).collect();
    for round in 1..=rounds {
        for (flavor, rates) in results.iter_mut() {
            if *flavor == Flavor::RedisDedup && redis.is_none() {
                continue;
            }
            match one(url, *flavor, n, prefetch, redis.as_ref()).await {
                Ok(rate) => {
                    eprintln!(
                        "overhead round {round}/{rounds} {}: {rate:.0} msg/s",
                        flavor.label()
                    );
                    rates.push(rate);
                }
                Err(e) => eprintln!("overhead round {round} {}: FAILED: {e}", flavor.label()),
            }
        }
    }
    Ok(results)
}

async fn one(
    url: &str,
    flavor: Flavor,
    n: u64,
    prefetch: u16,
    redis: Option<&cottontail::stores::RedisStore>,
) -> Res<f64> {
    let name = util::unique("bench.overhead");
    let queue = queue_for(&name, flavor, prefetch, redis);
    let state = Arc::new(Count {
        handled: AtomicU64::new(0),
        target: n,
        done: Notify::new(),
        first: OnceLock::new(),
        last: OnceLock::new(),
    });
    // Declare the topology first (partitions, delay queues), then fill, then consume.
    let declare = App::new(state.clone())
        .handler(queue.clone(), count)
        .start(Config::new(url).connection_name(format!("bench-declare:{name}")))
        .await?;
    declare.wait_ready(Duration::from_secs(30)).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), declare.stop()).await;

    let conn = util::connect(url, &format!("bench-fill:{name}")).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let ch_ref = &ch;
    let target = name.clone();
    let target_ref = &target;
    futures::stream::iter(0..n)
        .map(|id| async move {
            let mut props = util::job_properties().with_message_id(format!("m-{id}").into());
            if flavor == Flavor::Ordered {
                props = props.with_headers(cottontail::sequence_headers(
                    &format!("k{}", id % KEYS),
                    id / KEYS + 1,
                ));
            }
            let confirm = ch_ref
                .basic_publish(
                    "".into(),
                    target_ref.as_str().into(),
                    BasicPublishOptions::default(),
                    &util::body(id),
                    props,
                )
                .await?;
            confirm.await?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .buffer_unordered(500)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    let _ = conn.close(200, "filled".into()).await;

    let running = App::new(state.clone())
        .instrumented(flavor != Flavor::Uninstrumented)
        .handler(queue.clone(), count)
        .start(Config::new(url).connection_name(format!("bench-overhead:{name}")))
        .await?;
    let finished = tokio::time::timeout(Duration::from_secs(180), state.done.notified()).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), running.stop()).await;
    cleanup(url, &queue).await;
    finished.map_err(|_| {
        format!(
            "{name}: {} of {n} handled in time",
            state.handled.load(Ordering::Relaxed)
        )
    })?;
    match (state.first.get(), state.last.get()) {
        (Some(first), Some(last)) if n > 1 && last > first => {
            Ok((n - 1) as f64 / last.duration_since(*first).as_secs_f64())
        }
        _ => Err(format!("{name}: no handling window measured").into()),
    }
}

async fn cleanup(url: &str, queue: &Queue) {
    let Ok(conn) = util::connect(url, "bench-cleanup").await else {
        return;
    };
    let mut names = vec![queue.name().to_owned(), queue.dlq_name()];
    names.extend(
        queue
            .delay_tiers()
            .into_iter()
            .map(|d| cottontail::tier_queue(queue.name(), d)),
    );
    names.extend((0..8).map(|p| cottontail::partition_queue(queue.name(), p)));
    names.push(cottontail::members_queue(queue.name()));
    for n in names {
        util::delete_queue(&conn, &n).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Prints the section.
pub fn report(results: &[(Flavor, Vec<f64>)], n: u64, prefetch: u16) {
    println!("\n== 5. Optional layers, no-op handler, {n} msgs, prefetch {prefetch}: msg/s median and ratio to plain");
    let plain = results
        .iter()
        .find(|(f, _)| *f == Flavor::Plain)
        .map(|(_, r)| util::median(r))
        .unwrap_or(f64::NAN);
    for (flavor, rates) in results {
        if rates.is_empty() {
            println!(
                "  {:>28} | skipped (store unavailable or failed)",
                flavor.label()
            );
            continue;
        }
        let m = util::median(rates);
        println!(
            "  {:>28} | {:>8.0} msg/s | {:.2}x plain",
            flavor.label(),
            m,
            m / plain
        );
    }
    if let (Some(on), Some(off)) = (
        results
            .iter()
            .find(|(f, _)| *f == Flavor::Plain)
            .map(|(_, r)| util::median(r)),
        results
            .iter()
            .find(|(f, _)| *f == Flavor::Uninstrumented)
            .map(|(_, r)| util::median(r)),
    ) {
        let pass = on / off >= 0.95;
        println!(
            "  [{}] metrics+tracing on >= 0.95x of off: {:.2}x",
            if pass { "PASS" } else { "FAIL" },
            on / off
        );
    }
}
