//! Chaos suite: faults under load, checked against a ledger. Every message id the publisher
//! got a confirm for must end handled (once, or more: duplicates are counted) or in the DLQ;
//! `lost = published − (handled ∪ dead-lettered)` must be 0. Each scenario prints
//! `chaos <scenario>: published=N handled=H duplicates=D dead_lettered=X lost=L recovery_ms=R`.
//!
//! Workers are child processes (this binary re-run as `chaos_worker`) that append each
//! handled id to a ledger file. Scenarios (a), (b), (d), (e) disrupt only their own worker
//! processes and connections on the shared broker; (c) restarts a PRIVATE node.
//! `COTTONTAIL_CHAOS_SOAK=1` runs longer versions (more messages and faults).
mod common;

use std::time::{Duration, Instant};

use common::*;

/// The child-process side: a no-op unless the parent set the `COTTONTAIL_CHAOS_*` variables.
#[tokio::test]
async fn chaos_worker() {
    chaos_worker_main().await;
}

/// How much of everything: messages, publish batch and pace, number of faults.
struct Plan {
    messages: usize,
    batch: usize,
    pace: Duration,
    faults: usize,
    limit: Duration,
}

impl Plan {
    fn steady() -> Self {
        if chaos_soak() {
            Plan {
                messages: 20_000,
                batch: 20,
                pace: Duration::from_millis(100),
                faults: 10,
                limit: Duration::from_secs(900),
            }
        } else {
            Plan {
                messages: 2_000,
                batch: 20,
                pace: Duration::from_millis(100),
                faults: 3,
                limit: Duration::from_secs(170),
            }
        }
    }
}

/// How many ids the publisher may send after fault `k` of `faults` (phases of `phase` ids).
fn next_phase(k: usize, faults: usize, phase: usize, messages: usize) -> usize {
    if k >= faults {
        messages
    } else {
        (k + 1) * phase
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// At most `concurrency` (8) handlings can complete after a fault before the worker notices
/// it; more lines than that mean processing really resumed.
const RESUMED: usize = 9;

/// (a) `kill -9` of the worker process mid-stream, repeated; a fresh worker takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_kill9_worker_mid_stream() {
    let plan = Plan::steady();
    let chaos = Chaos::new("kill9", &amqp_url(), "chaos_worker");
    bounded(plan.limit, async {
        let name = unique("chaos-kill9-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let phase = plan.messages / (plan.faults + 1);
        let mut publisher = ChaosPublisher::spawn_gated(
            &chaos.urls,
            &chaos.queue,
            ids("kill9", plan.messages),
            plan.batch,
            plan.pace,
            phase,
        );
        let mut recoveries = Vec::new();
        for k in 1..=plan.faults {
            publisher
                .wait_published((k - 1) * phase + phase / 2, Duration::from_secs(120))
                .await;
            let busy = chaos.ledger.len() + 1;
            chaos
                .wait_handled(busy, Duration::from_secs(60), "the worker handling")
                .await;
            worker.kill9().await;
            let fault = Instant::now();
            let from = chaos.ledger.len();
            // Work that can only be handled by the next worker (mid-phase: under load).
            publisher.release(next_phase(k, plan.faults, phase, plan.messages));
            worker = chaos.spawn_worker(&name, "steady", None);
            recoveries.push(
                chaos
                    .recovery(fault, from, 1, Duration::from_secs(60))
                    .await,
            );
        }
        publisher.finish(Duration::from_secs(120)).await;
        let recovery = recoveries.iter().copied().max().unwrap_or(0);
        eprintln!("chaos kill9: recoveries_ms={recoveries:?}");
        let tally = chaos
            .settle(
                &publisher,
                std::slice::from_mut(&mut worker),
                recovery,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(
            tally.dead_lettered, 0,
            "nothing here should be dead-lettered"
        );
    })
    .await;
    chaos.cleanup().await;
}

/// (b) The broker closes the worker's connection under load, repeatedly; it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_b_connection_kills_under_load() {
    let plan = Plan::steady();
    let chaos = Chaos::new("connection_kill", &amqp_url(), "chaos_worker");
    bounded(plan.limit, async {
        let name = unique("chaos-conn-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let phase = plan.messages / (plan.faults + 1);
        let mut publisher = ChaosPublisher::spawn_gated(
            &chaos.urls,
            &chaos.queue,
            ids("conn", plan.messages),
            plan.batch,
            plan.pace,
            phase,
        );
        let mut recoveries = Vec::new();
        for k in 1..=plan.faults {
            publisher
                .wait_published((k - 1) * phase + phase / 2, Duration::from_secs(120))
                .await;
            let busy = chaos.ledger.len() + 1;
            chaos
                .wait_handled(busy, Duration::from_secs(60), "the worker handling")
                .await;
            let closed = close_connection(&name);
            let fault = Instant::now();
            let from = chaos.ledger.len();
            // Work that can only be handled after the reconnect.
            publisher.release(next_phase(k, plan.faults, phase, plan.messages));
            assert_eq!(closed, 1, "the worker's connection should have been open");
            recoveries.push(
                chaos
                    .recovery(fault, from, RESUMED, Duration::from_secs(60))
                    .await,
            );
        }
        publisher.finish(Duration::from_secs(120)).await;
        let recovery = recoveries.iter().copied().max().unwrap_or(0);
        eprintln!("chaos connection_kill: recoveries_ms={recoveries:?}");
        let tally = chaos
            .settle(
                &publisher,
                std::slice::from_mut(&mut worker),
                recovery,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(
            tally.dead_lettered, 0,
            "nothing here should be dead-lettered"
        );
    })
    .await;
    chaos.cleanup().await;
}

/// (c) A full broker restart (stop_app/start_app on a PRIVATE node) under load: the
/// publisher retries what was not confirmed, the worker reconnects, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_c_broker_restart_under_load() {
    let plan = Plan::steady();
    let outages = if chaos_soak() { 3 } else { 1 };
    let node = PrivateNode::start("restart", None);
    let chaos = Chaos::new("broker_restart", &node.url, "chaos_worker");
    bounded(plan.limit, async {
        let name = unique("chaos-restart-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let phase = plan.messages / (outages + 1);
        let mut publisher = ChaosPublisher::spawn_gated(
            &chaos.urls,
            &chaos.queue,
            ids("restart", plan.messages),
            plan.batch,
            plan.pace,
            phase,
        );
        let mut recoveries = Vec::new();
        for k in 1..=outages {
            publisher
                .wait_published((k - 1) * phase + phase / 2, Duration::from_secs(120))
                .await;
            let busy = chaos.ledger.len() + 1;
            chaos
                .wait_handled(busy, Duration::from_secs(60), "the worker handling")
                .await;
            let failures = publisher.failures();
            let down = Instant::now();
            node.ctl(&["stop_app"]);
            publisher.release(next_phase(k, outages, phase, plan.messages));
            let published = publisher.published.clone();
            let seen = publisher.failures.clone();
            wait_until(
                Duration::from_secs(30),
                "the publisher to notice the outage",
                move || {
                    let seen = seen.clone();
                    async move { seen.load(std::sync::atomic::Ordering::Relaxed) > failures }
                },
            )
            .await;
            let confirmed_while_down = published.lock().unwrap().len();
            node.ctl(&["start_app"]);
            let up = Instant::now();
            let from = chaos.ledger.len();
            let recovery = chaos
                .recovery(up, from, RESUMED, Duration::from_secs(90))
                .await;
            eprintln!(
                "chaos broker_restart: outage {} ms (stop_app → start_app done), \
                 {confirmed_while_down} confirmed before/while down, resumed {recovery} ms after start_app",
                (up - down).as_millis()
            );
            recoveries.push(recovery);
        }
        publisher.finish(Duration::from_secs(120)).await;
        assert!(
            publisher.failures() > 0,
            "the restart should have failed some publishes"
        );
        let recovery = recoveries.iter().copied().max().unwrap_or(0);
        let tally = chaos
            .settle(
                &publisher,
                std::slice::from_mut(&mut worker),
                recovery,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(tally.dead_lettered, 0, "nothing here should be dead-lettered");
    })
    .await;
    drop(chaos);
    drop(node);
}

/// (d) SIGTERM while a backlog waits, then a restart: the drain finishes in-flight work,
/// returns the rest, exits 0; the next worker finishes the backlog with no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_d_sigterm_during_backlog_then_restart() {
    let soak = chaos_soak();
    let (messages, cycles) = if soak { (20_000, 3) } else { (3_000, 1) };
    let limit = if soak {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(170)
    };
    let chaos = Chaos::new("sigterm", &amqp_url(), "chaos_worker");
    bounded(limit, async {
        let name = unique("chaos-sigterm-worker");
        let mut worker = chaos.spawn_worker(&name, "slow", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut publisher = ChaosPublisher::spawn(
            &chaos.urls,
            &chaos.queue,
            ids("sigterm", messages),
            200,
            Duration::from_millis(5),
        );
        publisher.finish(Duration::from_secs(120)).await;
        let mut recoveries = Vec::new();
        for k in 1..=cycles {
            chaos
                .wait_handled(
                    k * messages / (cycles + 2),
                    Duration::from_secs(120),
                    "part of the backlog handled",
                )
                .await;
            let fault = Instant::now();
            let status = worker.terminate(Duration::from_secs(40)).await;
            assert!(status.success(), "SIGTERM: worker exited with {status:?}");
            let from = chaos.ledger.len();
            assert!(
                from < messages,
                "the backlog should outlast the worker ({from} of {messages} handled)"
            );
            worker = chaos.spawn_worker(&name, "slow", None);
            recoveries.push(
                chaos
                    .recovery(fault, from, 1, Duration::from_secs(60))
                    .await,
            );
        }
        let recovery = recoveries.iter().copied().max().unwrap_or(0);
        let tally = chaos
            .settle(
                &publisher,
                std::slice::from_mut(&mut worker),
                recovery,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(
            tally.dead_lettered, 0,
            "nothing here should be dead-lettered"
        );
        assert_eq!(
            tally.duplicates, 0,
            "a graceful shutdown acks what it finished: nothing runs twice"
        );
    })
    .await;
    chaos.cleanup().await;
}

/// (e) The handler panics or overruns its timeout at random; with a 3-attempt retry policy
/// every message ends handled or dead-lettered (kind `panic` or `timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_e_random_panics_and_timeouts() {
    let soak = chaos_soak();
    let messages = if soak { 10_000 } else { 1_000 };
    let limit = if soak {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(170)
    };
    let chaos = Chaos::new("panics_timeouts", &amqp_url(), "chaos_worker");
    bounded(limit, async {
        let mut worker = chaos.spawn_worker(&unique("chaos-flaky-worker"), "flaky", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut publisher = ChaosPublisher::spawn(
            &chaos.urls,
            &chaos.queue,
            ids("flaky", messages),
            20,
            Duration::from_millis(50),
        );
        publisher.finish(Duration::from_secs(120)).await;
        let tally = chaos
            .settle(
                &publisher,
                std::slice::from_mut(&mut worker),
                0,
                Duration::from_secs(150),
            )
            .await;
        // 22 % of attempts fail, 3 attempts: about 1 % of the messages exhaust their retries.
        assert!(
            tally.dead_lettered > 0,
            "some messages should have exhausted their attempts"
        );
        for (id, kind) in &tally.dead_kinds {
            assert!(
                kind == "panic" || kind == "timeout",
                "{id} dead-lettered with kind {kind:?}"
            );
        }
    })
    .await;
    chaos.cleanup().await;
}
