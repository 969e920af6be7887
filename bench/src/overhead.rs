//! The cost of cottontail's optional layers, each as a ratio to the plain no-op handler in the
//! same run: metrics+tracing off vs on, memory dedup, Redis dedup, ordered delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cottontail::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use cottontail::stores::{MemorySequences, MemoryStore};
use cottontail::{App, Config, Dedup, Queue, RetryPolicy, State};
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

    /// The name `--layers` takes.
    pub fn key(self) -> &'static str {
        match self {
            Flavor::Plain => "plain",
            Flavor::Uninstrumented => "off",
            Flavor::MemoryDedup => "memory",
            Flavor::RedisDedup => "redis",
            Flavor::Ordered => "ordered",
        }
    }

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
    /// Time and process CPU at the first and the last handler call: rates are taken between
    /// them, so connection and topology setup (the same for every flavor, but a large share
    /// of a short run) is left out.
    first: OnceLock<(Instant, Duration)>,
    last: OnceLock<(Instant, Duration)>,
}

async fn count(State(c): State<Arc<Count>>) {
    c.first.get_or_init(|| (Instant::now(), util::cpu_time()));
    if c.handled.fetch_add(1, Ordering::Relaxed) + 1 == c.target {
        let _ = c.last.set((Instant::now(), util::cpu_time()));
        c.done.notify_one();
    }
}

/// One run of one flavor.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rate: f64,
    /// Process CPU seconds per 100k messages (handling window).
    pub cpu: f64,
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

/// Runs every flavor `rounds` times (alternating, each round starting one flavor later so no
/// flavor always follows the same one) with `n` messages; returns the samples per flavor.
pub async fn run(
    url: &str,
    flavors: &[Flavor],
    n: u64,
    prefetch: u16,
    rounds: usize,
) -> Res<Vec<(Flavor, Vec<Sample>)>> {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = cottontail::stores::RedisStore::connect(&redis_url, &util::unique("bench-dedup"))
        .await
        .ok();
    let mut results: Vec<(Flavor, Vec<Sample>)> =
        flavors.iter().map(|f| (*f, Vec::new())).collect();
    // Deleted at the end, not between runs (see `consume::queue_name`).
    let mut used = Vec::new();
    for round in 1..=rounds {
        let mut order: Vec<_> = results.iter_mut().collect();
        order.rotate_left((round - 1) % flavors.len().max(1));
        for (flavor, samples) in order {
            if *flavor == Flavor::RedisDedup && redis.is_none() {
                continue;
            }
            let name = util::unique("bench.overhead");
            let queue = queue_for(&name, *flavor, prefetch, redis.as_ref());
            let sample = one(url, &queue, *flavor, n).await;
            used.push(queue);
            match sample {
                Ok(sample) => {
                    eprintln!(
                        "overhead round {round}/{rounds} {}: {:.0} msg/s, {:.2} CPU-s/100k",
                        flavor.label(),
                        sample.rate,
                        sample.cpu
                    );
                    samples.push(sample);
                }
                Err(e) => eprintln!("overhead round {round} {}: FAILED: {e}", flavor.label()),
            }
        }
    }
    for queue in &used {
        cleanup(url, queue).await;
    }
    Ok(results)
}

async fn one(url: &str, queue: &Queue, flavor: Flavor, n: u64) -> Res<Sample> {
    let name = queue.name().to_owned();
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
                props = props.with_headers(cottontail::client::sequence_headers(
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
    finished.map_err(|_| {
        format!(
            "{name}: {} of {n} handled in time",
            state.handled.load(Ordering::Relaxed)
        )
    })?;
    match (state.first.get(), state.last.get()) {
        (Some((t0, cpu0)), Some((t1, cpu1))) if n > 1 && t1 > t0 => Ok(Sample {
            rate: (n - 1) as f64 / t1.duration_since(*t0).as_secs_f64(),
            cpu: cpu1.saturating_sub(*cpu0).as_secs_f64() * 100_000.0 / (n - 1) as f64,
        }),
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
            .map(|d| cottontail::names::tier_queue(queue.name(), d)),
    );
    names.extend((0..8).map(|p| cottontail::names::partition_queue(queue.name(), p)));
    names.push(cottontail::names::members_queue(queue.name()));
    for n in names {
        util::delete_queue(&conn, &n).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Prints the section.
pub fn report(results: &[(Flavor, Vec<Sample>)], n: u64, prefetch: u16) {
    println!(
        "\n== 5. Optional layers, no-op handler, {n} msgs, prefetch {prefetch}, timed from the \
         first to the last handler call: medians, and ratios to plain"
    );
    let medians = |flavor: Flavor| {
        let samples = &results.iter().find(|(f, _)| *f == flavor)?.1;
        if samples.is_empty() {
            return None;
        }
        let rates: Vec<f64> = samples.iter().map(|s| s.rate).collect();
        let cpus: Vec<f64> = samples.iter().map(|s| s.cpu).collect();
        Some((util::median(&rates), util::median(&cpus)))
    };
    let plain = medians(Flavor::Plain).unwrap_or((f64::NAN, f64::NAN));
    for (flavor, _) in results {
        let Some((rate, cpu)) = medians(*flavor) else {
            println!(
                "  {:>28} | skipped (store unavailable or failed)",
                flavor.label()
            );
            continue;
        };
        println!(
            "  {:>28} | {:>8.0} msg/s | {:.2}x plain | {:.2} CPU-s/100k | {:.2}x plain CPU",
            flavor.label(),
            rate,
            rate / plain.0,
            cpu,
            cpu / plain.1
        );
    }
    if let (Some(on), Some(off)) = (medians(Flavor::Plain), medians(Flavor::Uninstrumented)) {
        let pass = on.0 / off.0 >= 0.95;
        println!(
            "  [{}] metrics+tracing on >= 0.95x of off: {:.2}x throughput ({:.2}x CPU per message)",
            if pass { "PASS" } else { "FAIL" },
            on.0 / off.0,
            on.1 / off.1
        );
    }
    if let Some(dedup) = medians(Flavor::MemoryDedup) {
        let pass = dedup.0 / plain.0 >= 0.9;
        println!(
            "  [{}] memory dedup >= 0.90x of plain: {:.2}x throughput ({:.2}x CPU per message)",
            if pass { "PASS" } else { "FAIL" },
            dedup.0 / plain.0,
            dedup.1 / plain.1
        );
    }
}
