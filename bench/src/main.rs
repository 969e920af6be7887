//! `cottontail-bench`: one run against a local RabbitMQ that compares cottontail with raw
//! lapin on consume throughput and CPU, publish throughput and RPC latency, and checks the
//! acceptance targets.
//!
//! ```text
//! cargo run --release -p cottontail-bench -- --help
//! ```

mod consume;
mod overhead;
mod rpc;
mod util;

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;

use consume::{Publisher, RunResult, Settings, Variant};
use rpc::{Caller, RpcRound};
use util::{median, percentile, range, Res};

/// Benchmarks cottontail against raw lapin on the local broker.
#[derive(Parser, Debug)]
#[command(name = "cottontail-bench", version)]
struct Args {
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = cottontail::connection::DEFAULT_AMQP_URL)]
    url: String,
    /// Messages per consume run (each run pre-fills the variant's emptied quorum queue with
    /// this many; prefetch values below 100 use a fifth, they are 5-10x slower).
    #[arg(long, default_value_t = 60_000)]
    messages: u64,
    /// Rounds; variants alternate a, b, c, a, b, c… and medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Prefetch values for the consume runs (cottontail concurrency = prefetch).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    prefetch: Vec<u16>,
    /// Consume variants to run: a (raw, ack each), b (raw, coalesced), c (cottontail).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    variants: Vec<String>,
    /// Publishes (raw) or `Client::publish` calls in flight during the pre-fill.
    #[arg(long, default_value_t = 1000)]
    publish_window: usize,
    /// Sequential RPC calls per caller per round (latency percentiles).
    #[arg(long, default_value_t = 700)]
    rpc_sequential: usize,
    /// RPC calls per caller per round for the throughput test.
    #[arg(long, default_value_t = 6000)]
    rpc_parallel: usize,
    /// RPC calls in flight for the throughput test.
    #[arg(long, default_value_t = 64)]
    rpc_outstanding: usize,
    /// RPC rounds (callers rotate order each round). More than the consume rounds: a round is
    /// short and calls/s at ~10k vary ±10 % between rounds.
    #[arg(long, default_value_t = 6)]
    rpc_rounds: usize,
    /// Skip the RPC benchmark.
    #[arg(long)]
    skip_rpc: bool,
    /// Skip the optional-layer section (metrics off, dedup, ordering).
    #[arg(long)]
    skip_overhead: bool,
    /// Optional-layer flavors to run: plain, off, memory, redis, ordered.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,off,memory,redis,ordered"
    )]
    layers: Vec<String>,
    /// Wall-time budget in seconds: a consume round that would not fit (judged by the
    /// slowest round so far, plus the RPC part) is not started. 0 = no limit.
    #[arg(long, default_value_t = 280)]
    time_budget: u64,
}

/// Rough wall time of the RPC part, for the time budget.
fn rpc_estimate(args: &Args) -> f64 {
    if args.skip_rpc {
        return 0.0;
    }
    // Per caller and round: warm-up + sequential calls at ~1.1 ms, the parallel part at
    // ~7k calls/s, and connecting.
    let per_round =
        (args.rpc_sequential + 100) as f64 * 0.0011 + args.rpc_parallel as f64 / 7000.0 + 0.2;
    per_round * 3.0 * args.rpc_rounds as f64 + 2.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("cottontail-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Res<()> {
    let started = Instant::now();
    let variants: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| args.variants.iter().any(|s| s.trim() == v.short()))
        .collect();
    if variants.is_empty() || args.rounds == 0 || args.messages == 0 {
        return Err("nothing to run: check --variants, --rounds and --messages".into());
    }
    if let Some(bad) = args
        .layers
        .iter()
        .find(|l| !overhead::Flavor::ALL.iter().any(|f| f.key() == l.trim()))
    {
        return Err(format!("unknown layer '{bad}': plain, off, memory, redis or ordered").into());
    }
    let broker = util::broker_version(&args.url)
        .await
        .unwrap_or_else(|| "unknown (handshake not readable)".into());
    println!("cottontail-bench");
    println!("  machine : {}", util::machine());
    println!(
        "  broker  : {broker} at {}",
        cottontail::connection::redact(&args.url)
    );
    println!(
        "  runs    : {} msgs/run, a fifth below prefetch 100 ({}-byte JSON, persistent, one \
         quorum queue per variant and prefetch declared by cottontail, emptied and pre-filled \
         before the consumer starts); {} rounds; prefetch {:?}; cottontail concurrency = \
         prefetch, RetryPolicy::none()",
        args.messages,
        util::BODY_BYTES,
        args.rounds,
        args.prefetch
    );
    println!(
        "  timing  : consumer start (connect) -> N-th ack (raw) / N-th handler run (cottontail); \
         CPU = getrusage(RUSAGE_SELF) user+sys over that window"
    );
    println!("  tracing : no subscriber installed, so cottontail's per-message span is disabled");
    println!(
        "  broker CPU: {}",
        match util::broker_pid() {
            Some(pid) => format!("beam.smp pid {pid}, from /proc/{pid}/stat over the same windows"),
            None => "broker process not visible; broker CPU columns are n/a".into(),
        }
    );
    println!();

    let admin = util::connect(&args.url, "bench-admin").await?;
    let broker_pid = util::broker_pid();
    let settings = Settings {
        url: args.url.clone(),
        messages: args.messages,
        publish_window: args.publish_window,
        broker_pid,
    };

    // ---- consume runs, variants alternating ----
    let mut results: BTreeMap<(u16, &'static str), Vec<RunResult>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut slowest_round = 0f64;
    let mut rounds_done = 0;
    for round in 1..=args.rounds {
        let elapsed = started.elapsed().as_secs_f64();
        if args.time_budget > 0
            && round > 1
            && elapsed + slowest_round * 1.05 + rpc_estimate(&args) > args.time_budget as f64
        {
            eprintln!(
                "time budget: skipping consume rounds {round}..{} (slowest round took {slowest_round:.0} s, \
                 {elapsed:.0} s used of {} s)",
                args.rounds, args.time_budget
            );
            break;
        }
        let round_started = Instant::now();
        for &prefetch in &args.prefetch {
            for &variant in &variants {
                let publisher = match variant {
                    Variant::Cottontail => Publisher::Client,
                    _ => Publisher::Raw,
                };
                match consume::run(&settings, &admin, variant, prefetch, publisher).await {
                    Ok(r) => {
                        eprintln!(
                            "[{:>5.1}s] round {round}/{} prefetch {prefetch:>4} {}: {:>7.0} msg/s, \
                             {:.2} CPU-s/100k (broker {:.2}, other procs {:.2} cores), first \
                             delivery {:.0} ms | pre-fill ({:?}) {:.0} msg/s",
                            started.elapsed().as_secs_f64(),
                            args.rounds,
                            variant.short(),
                            r.consume.rate(),
                            r.consume.cpu_per_100k(),
                            r.consume.broker_cpu_per_100k().unwrap_or(f64::NAN),
                            r.consume.other_cores().unwrap_or(f64::NAN),
                            r.first_delivery.as_secs_f64() * 1000.0,
                            publisher,
                            r.publish.rate(),
                        );
                        results
                            .entry((prefetch, variant.short()))
                            .or_default()
                            .push(r);
                    }
                    Err(e) => {
                        eprintln!(
                            "round {round} prefetch {prefetch} {}: FAILED: {e}",
                            variant.short()
                        );
                        failures.push(format!(
                            "round {round}, prefetch {prefetch}, {}: {e}",
                            variant.label()
                        ));
                    }
                }
            }
        }
        rounds_done = round;
        slowest_round = slowest_round.max(round_started.elapsed().as_secs_f64());
    }

    // ---- RPC rounds ----
    let mut rpc_results: BTreeMap<&'static str, Vec<RpcRound>> = BTreeMap::new();
    if !args.skip_rpc {
        let queue = util::unique("bench.rpc");
        rpc::declare_queue(&admin, &queue).await?;
        let responder = rpc::Responder::start(&args.url, &queue).await?;
        for round in 1..=args.rpc_rounds {
            // Each round starts one caller later, so none always runs first (or last).
            let mut order = Caller::ALL;
            order.rotate_left((round - 1) % Caller::ALL.len());
            for caller in order {
                match rpc::round(
                    &args.url,
                    &queue,
                    caller,
                    args.rpc_sequential,
                    args.rpc_parallel,
                    args.rpc_outstanding,
                )
                .await
                {
                    Ok(r) => {
                        eprintln!(
                            "[{:>5.1}s] rpc round {round}/{} {}: p50 {:.3} ms, p99 {:.3} ms, \
                             {:.0} calls/s at {} outstanding",
                            started.elapsed().as_secs_f64(),
                            args.rpc_rounds,
                            caller.label(),
                            percentile(&r.sequential, 0.5) * 1e3,
                            percentile(&r.sequential, 0.99) * 1e3,
                            r.parallel_rate,
                            args.rpc_outstanding
                        );
                        rpc_results.entry(caller.label()).or_default().push(r);
                    }
                    Err(e) => {
                        eprintln!("rpc round {round} {}: FAILED: {e}", caller.label());
                        failures.push(format!("rpc round {round}, {}: {e}", caller.label()));
                    }
                }
            }
        }
        responder.stop().await;
        util::delete_queue(&admin, &queue).await;
    }
    let _ = admin.close(200, "bench done".into()).await;

    // ---- optional layers (ratios to the plain handler, same run) ----
    let overhead_messages = (args.messages / 2).max(1000);
    let overhead = if args.skip_overhead {
        Vec::new()
    } else {
        // A subscriber that listens, so per-message spans cost what they cost in production.
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_writer(std::io::sink)
                // As a service logging to a file or a container's stdout: no colour codes.
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish(),
        );
        let flavors: Vec<overhead::Flavor> = overhead::Flavor::ALL
            .into_iter()
            .filter(|f| args.layers.iter().any(|l| l.trim() == f.key()))
            .collect();
        overhead::run(&args.url, &flavors, overhead_messages, 1000, args.rounds).await?
    };
    if let Ok(admin) = util::connect(&args.url, "bench-cleanup").await {
        consume::delete_queues(&admin, &variants, &args.prefetch).await;
        let _ = admin.close(200, "bench done".into()).await;
    }

    report(
        &args,
        rounds_done,
        &variants,
        &results,
        &rpc_results,
        &failures,
    );
    if !overhead.is_empty() {
        overhead::report(&overhead, overhead_messages, 1000);
    }
    println!(
        "\ntotal wall time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

type ConsumeResults = BTreeMap<(u16, &'static str), Vec<RunResult>>;

fn stat<F: Fn(&RunResult) -> f64>(
    results: &ConsumeResults,
    prefetch: u16,
    v: Variant,
    f: F,
) -> Option<(f64, f64, f64)> {
    let runs = results.get(&(prefetch, v.short()))?;
    let xs: Vec<f64> = runs.iter().map(f).collect();
    let (lo, hi) = range(&xs);
    Some((median(&xs), lo, hi))
}

fn cell(s: Option<(f64, f64, f64)>, digits: usize) -> String {
    match s {
        Some((m, lo, hi)) => format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]"),
        None => "n/a".into(),
    }
}

fn ratio(a: Option<(f64, f64, f64)>, b: Option<(f64, f64, f64)>) -> Option<f64> {
    Some(a?.0 / b?.0)
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x"))
        .unwrap_or_else(|| "n/a".into())
}

fn report(
    args: &Args,
    rounds_done: usize,
    variants: &[Variant],
    results: &ConsumeResults,
    rpc_results: &BTreeMap<&'static str, Vec<RpcRound>>,
    failures: &[String],
) {
    let (a, b, c) = (
        Variant::RawAckEach,
        Variant::RawCoalesced,
        Variant::Cottontail,
    );
    println!(
        "== 1. Consume throughput, msg/s: median [min-max] of {} rounds{}",
        rounds_done,
        if rounds_done < args.rounds {
            format!(
                " ({} requested; the rest did not fit the time budget)",
                args.rounds
            )
        } else {
            String::new()
        }
    );
    for v in variants {
        println!("   {} = {}", v.short(), v.label());
    }
    println!(
        "{:>8} | {:>26} | {:>26} | {:>26} | {:>7} | {:>7}",
        "prefetch", "(a) raw ack each", "(b) raw coalesced", "(c) cottontail", "c/b", "c/a"
    );
    for &p in &args.prefetch {
        let rate = |v| stat(results, p, v, |r| r.consume.rate());
        println!(
            "{:>8} | {:>26} | {:>26} | {:>26} | {:>7} | {:>7}",
            p,
            cell(rate(a), 0),
            cell(rate(b), 0),
            cell(rate(c), 0),
            ratio_cell(ratio(rate(c), rate(b))),
            ratio_cell(ratio(rate(c), rate(a))),
        );
    }
    println!();
    println!(
        "== 1b. Consumer CPU seconds per 100k messages (this process, user+sys): median [min-max]"
    );
    println!(
        "{:>8} | {:>20} | {:>20} | {:>20} | {:>7} | {:>7}",
        "prefetch", "(a) raw ack each", "(b) raw coalesced", "(c) cottontail", "c/b", "c/a"
    );
    for &p in &args.prefetch {
        let cpu = |v| stat(results, p, v, |r| r.consume.cpu_per_100k());
        println!(
            "{:>8} | {:>20} | {:>20} | {:>20} | {:>7} | {:>7}",
            p,
            cell(cpu(a), 2),
            cell(cpu(b), 2),
            cell(cpu(c), 2),
            ratio_cell(ratio(cpu(c), cpu(b))),
            ratio_cell(ratio(cpu(c), cpu(a))),
        );
    }
    println!();
    println!("== 1c. Broker (beam.smp) CPU seconds per 100k messages in the same windows: median");
    println!(
        "{:>8} | {:>10} | {:>10} | {:>10} | {:>7}",
        "prefetch", "(a)", "(b)", "(c)", "c/b"
    );
    for &p in &args.prefetch {
        let bcpu = |v| {
            stat(results, p, v, |r| {
                r.consume.broker_cpu_per_100k().unwrap_or(f64::NAN)
            })
            .filter(|s| s.0.is_finite())
        };
        let fmt = |s: Option<(f64, f64, f64)>| {
            s.map(|s| format!("{:.2}", s.0))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "{:>8} | {:>10} | {:>10} | {:>10} | {:>7}",
            p,
            fmt(bcpu(a)),
            fmt(bcpu(b)),
            fmt(bcpu(c)),
            ratio_cell(ratio(bcpu(c), bcpu(b))),
        );
    }
    println!();
    println!(
        "== 1d. Consumer start to first delivery, ms (included in the times above), and CPU \
         used by other processes during the consume windows (cores, interference): median"
    );
    println!(
        "{:>8} | {:>8} | {:>8} | {:>8} || {:>9} | {:>9} | {:>9}",
        "prefetch", "(a) ms", "(b) ms", "(c) ms", "(a) other", "(b) other", "(c) other"
    );
    for &p in &args.prefetch {
        let first = |v| {
            stat(results, p, v, |r| r.first_delivery.as_secs_f64() * 1e3)
                .map(|s| format!("{:.1}", s.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let other = |v| {
            stat(results, p, v, |r| {
                r.consume.other_cores().unwrap_or(f64::NAN)
            })
            .filter(|s| s.0.is_finite())
            .map(|s| format!("{:.2}", s.0))
            .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "{:>8} | {:>8} | {:>8} | {:>8} || {:>9} | {:>9} | {:>9}",
            p,
            first(a),
            first(b),
            first(c),
            other(a),
            other(b),
            other(c)
        );
    }
    let requeued: Vec<String> = results
        .iter()
        .flat_map(|((p, v), runs)| {
            runs.iter()
                .filter(|r| r.requeued_at_close > 0)
                .map(move |r| format!("{v}@{p}: {}", r.requeued_at_close))
        })
        .collect();
    if !requeued.is_empty() {
        println!(
            "   note: messages back in the queue after the consumer closed (acks sent but not yet \
             applied by the quorum queue at connection close; redelivered, not lost): {}",
            requeued.join(", ")
        );
    }
    println!();
    println!(
        "== 3. Metrics + tracing cost: section 5 (on vs `App::instrumented(false)`, with a \
         tracing subscriber listening); sections 1-2 run without a subscriber, so their \
         spans are created disabled, and with metrics on."
    );
    println!();

    // ---- publish (measured during the pre-fills) ----
    let mut raw_pub = Vec::new();
    let mut raw_pub_cpu = Vec::new();
    let mut raw_pub_broker = Vec::new();
    let mut client_pub = Vec::new();
    let mut client_pub_cpu = Vec::new();
    let mut client_pub_broker = Vec::new();
    let mut stop_hangs = 0;
    let mut stop_calls = 0;
    for ((_, v), runs) in results {
        for r in runs {
            stop_hangs += r.stop_hangs;
            stop_calls += if *v == c.short() { 2 } else { 1 };
            let broker = r.publish.broker_cpu_per_100k().unwrap_or(f64::NAN);
            if *v == c.short() {
                client_pub.push(r.publish.rate());
                client_pub_cpu.push(r.publish.cpu_per_100k());
                client_pub_broker.push(broker);
            } else {
                raw_pub.push(r.publish.rate());
                raw_pub_cpu.push(r.publish.cpu_per_100k());
                raw_pub_broker.push(broker);
            }
        }
    }
    println!(
        "== 4a. Publish throughput, persistent + confirmed + mandatory, {} publish futures in \
         flight on one channel, into an empty quorum queue (measured as the pre-fill of every consume run: (a)/(b) runs \
         pre-fill with raw lapin, (c) runs with cottontail Client::publish, so the two \
         alternate)",
        args.publish_window
    );
    let pub_row = |name: &str, xs: &[f64], cpu: &[f64], broker: &[f64]| {
        let (lo, hi) = range(xs);
        println!(
            "{:>36} | {:>8.0} msg/s [{:.0}-{:.0}] | {:.2} CPU-s/100k (broker {:.2}) | {} samples",
            name,
            median(xs),
            lo,
            hi,
            median(cpu),
            median(broker),
            xs.len()
        );
    };
    if !raw_pub.is_empty() {
        pub_row(
            "raw lapin, concurrent publish+confirm",
            &raw_pub,
            &raw_pub_cpu,
            &raw_pub_broker,
        );
    }
    if !client_pub.is_empty() {
        pub_row(
            "cottontail Client::publish",
            &client_pub,
            &client_pub_cpu,
            &client_pub_broker,
        );
    }
    if !raw_pub.is_empty() && !client_pub.is_empty() {
        println!(
            "{:>36} | {:>8.2}x throughput, {:.2}x CPU per message",
            "Client / raw",
            median(&client_pub) / median(&raw_pub),
            median(&client_pub_cpu) / median(&raw_pub_cpu)
        );
    }
    println!();

    // ---- RPC ----
    let mut rpc_stats: BTreeMap<&str, (f64, f64, f64, f64)> = BTreeMap::new();
    if !rpc_results.is_empty() {
        println!(
            "== 4b. RPC over direct reply-to, echo responder in raw lapin (same for all), \
             quorum request queue, caller order rotating per round; latency pooled over {} \
             rounds x {} sequential calls; throughput median of rounds with {} outstanding",
            args.rpc_rounds, args.rpc_sequential, args.rpc_outstanding
        );
        println!(
            "{:>32} | {:>9} | {:>9} | {:>16} | {:>17}",
            "caller", "seq p50", "seq p99", "calls/s @outst.", "p50/p99 @outst."
        );
        for caller in Caller::ALL {
            let Some(rounds) = rpc_results.get(caller.label()) else {
                continue;
            };
            let seq: Vec<f64> = rounds.iter().flat_map(|r| r.sequential.clone()).collect();
            let par: Vec<f64> = rounds.iter().flat_map(|r| r.parallel.clone()).collect();
            let rates: Vec<f64> = rounds.iter().map(|r| r.parallel_rate).collect();
            let row = (
                percentile(&seq, 0.5) * 1e3,
                percentile(&seq, 0.99) * 1e3,
                median(&rates),
                percentile(&par, 0.5) * 1e3,
            );
            println!(
                "{:>32} | {:>6.3} ms | {:>6.3} ms | {:>16.0} | {:>6.2}/{:>6.2} ms",
                caller.label(),
                row.0,
                row.1,
                row.2,
                row.3,
                percentile(&par, 0.99) * 1e3
            );
            rpc_stats.insert(caller.label(), row);
        }
        let client = rpc_stats.get(Caller::Client.label());
        for base in [Caller::Raw, Caller::RawConfirmed] {
            if let (Some(cl), Some(raw)) = (client, rpc_stats.get(base.label())) {
                println!(
                    "{:>32} | {:>8.2}x | {:>8.2}x | {:>15.2}x |",
                    format!("Client / {}", base.label()),
                    cl.0 / raw.0,
                    cl.1 / raw.1,
                    cl.2 / raw.2
                );
            }
        }
        println!();
    } else {
        println!("== 4b. RPC: skipped (--skip-rpc)\n");
    }

    // ---- summary ----
    let top = args.prefetch.iter().copied().max().unwrap_or(1000);
    let rate = |v| stat(results, top, v, |r| r.consume.rate());
    let cpu = |v| stat(results, top, v, |r| r.consume.cpu_per_100k());
    println!("== Summary: acceptance targets (at prefetch {top})");
    let verdict = |r: Option<f64>, ok: bool| match r {
        None => "n/a ".to_owned(),
        Some(_) if ok => "PASS".to_owned(),
        Some(_) => "FAIL".to_owned(),
    };
    let cb = ratio(rate(c), rate(b));
    let ca = ratio(rate(c), rate(a));
    let cpu_cb = ratio(cpu(c), cpu(b));
    println!(
        "  [{}] no-op handler throughput >= 0.90x (b): {}",
        verdict(cb, cb.is_some_and(|r| r >= 0.9)),
        ratio_cell(cb)
    );
    println!(
        "  [{}] no-op handler throughput >= 2.50x (a): {}",
        verdict(ca, ca.is_some_and(|r| r >= 2.5)),
        ratio_cell(ca)
    );
    println!(
        "  [{}] CPU per message <= 1.50x (b):         {}",
        verdict(cpu_cb, cpu_cb.is_some_and(|r| r <= 1.5)),
        ratio_cell(cpu_cb)
    );
    for &p in &args.prefetch {
        if p == top {
            continue;
        }
        let rate = |v| stat(results, p, v, |r| r.consume.rate());
        let cpu = |v| stat(results, p, v, |r| r.consume.cpu_per_100k());
        println!(
            "  (info, prefetch {p}: c/b {}, c/a {}, CPU c/b {})",
            ratio_cell(ratio(rate(c), rate(b))),
            ratio_cell(ratio(rate(c), rate(a))),
            ratio_cell(ratio(cpu(c), cpu(b)))
        );
    }
    let others: Vec<f64> = results
        .values()
        .flatten()
        .filter_map(|r| r.consume.other_cores())
        .collect();
    if !others.is_empty() && median(&others) > 0.25 {
        println!(
            "  WARNING: other processes used {:.2} cores (median) during the consume windows; \
             on a 2-core machine that distorts throughput and ratios: rerun on an idle machine",
            median(&others)
        );
    }
    let publish = (!raw_pub.is_empty() && !client_pub.is_empty())
        .then(|| median(&client_pub) / median(&raw_pub));
    println!(
        "  [{}] Client::publish throughput >= 0.90x raw: {}",
        verdict(publish, publish.is_some_and(|r| r >= 0.9)),
        ratio_cell(publish)
    );
    let rpc = rpc_stats
        .get(Caller::Client.label())
        .zip(rpc_stats.get(Caller::Raw.label()));
    let rpc_p50 = rpc.map(|(cl, raw)| cl.0 / raw.0);
    let rpc_rate = rpc.map(|(cl, raw)| cl.2 / raw.2);
    println!(
        "  [{}] RPC p50 <= 1.20x raw lapin:            {}",
        verdict(rpc_p50, rpc_p50.is_some_and(|r| r <= 1.2)),
        ratio_cell(rpc_p50)
    );
    println!(
        "  [{}] RPC calls/s >= 0.90x raw lapin:        {}",
        verdict(rpc_rate, rpc_rate.is_some_and(|r| r >= 0.9)),
        ratio_cell(rpc_rate)
    );
    println!(
        "  [{}] Running::stop() returned within {:?}: {} of {} calls hung",
        if stop_hangs == 0 { "PASS" } else { "FAIL" },
        consume::STOP_LIMIT,
        stop_hangs,
        stop_calls
    );
    if !failures.is_empty() {
        println!("\n== Failed runs ({}):", failures.len());
        for f in failures {
            println!("  {f}");
        }
    }
}
