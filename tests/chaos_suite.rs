//! Chaos suite: faults under load, checked against a ledger. Every message id the publisher
//! got a confirm for must end handled (once, or more: duplicates are counted) or in the DLQ;
//! `lost = published − (handled ∪ dead-lettered)` must be 0. Each scenario prints
//! `chaos <scenario>: published=N handled=H duplicates=D dead_lettered=X lost=L recovery_ms=R`.
//!
//! Workers are child processes (this binary re-run as `chaos_worker`) that append each
//! handled id to a ledger file. The fault scenarios (a)–(d) and (f) run every feature column
//! beside the plain handler (retries, ordered, dedup, schedule, job status: see
//! `common::features`) and print one line per column, `chaos <scenario>/<column>: …`: the
//! rows of RELIABILITY.md's "Fault × feature" table. Scenarios (a), (b), (d), (e) disrupt
//! only their own worker processes and connections on the shared broker; (c) restarts a
//! PRIVATE node; (f) kills a PRIVATE redis-server.
//! `COTTONTAIL_CHAOS_SOAK=1` runs longer versions (more messages and faults).
use cottontail_test_support as common;

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

/// A fault scenario's publishing: the run's ids (the features' ride along with the plain
/// ones) in `faults + 1` phases. Each fault hits in the middle of a phase and releases the
/// next, so there is always work that only the recovered worker can do.
struct Phases {
    publisher: ChaosPublisher,
    phase: usize,
    total: usize,
    faults: usize,
}

impl Phases {
    fn start(chaos: &Chaos, prefix: &str, plan: &Plan, faults: usize) -> Self {
        let ids = chaos.ids(prefix, plan.messages);
        let total = ids.len();
        // The batch grows with the features' ids to keep the plain rate.
        let batch = plan.batch * total / plan.messages;
        let phase = total / (faults + 1);
        let publisher =
            ChaosPublisher::spawn_gated(&chaos.urls, &chaos.queue, ids, batch, plan.pace, phase);
        Self {
            publisher,
            phase,
            total,
            faults,
        }
    }

    /// Before fault `k` (from 1): half its phase is confirmed and the worker is handling.
    async fn before_fault(&self, chaos: &Chaos, k: usize) {
        self.publisher
            .wait_published(
                (k - 1) * self.phase + self.phase / 2,
                Duration::from_secs(120),
            )
            .await;
        let busy = chaos.ledger.len() + 1;
        chaos
            .wait_handled(busy, Duration::from_secs(60), "the worker handling")
            .await;
    }

    /// After fault `k`: the next phase may go.
    fn after_fault(&self, k: usize) {
        self.publisher
            .release(next_phase(k, self.faults, self.phase, self.total));
    }

    /// Once every id is confirmed, settles the run (see [`Chaos::settle`]) with the longest
    /// of the faults' `recoveries`; nothing may be dead-lettered in any column.
    async fn settle(
        &mut self,
        chaos: &Chaos,
        worker: &mut ChildGuard,
        recoveries: &[u128],
    ) -> ChaosTally {
        self.publisher.finish(Duration::from_secs(120)).await;
        eprintln!("chaos {}: recoveries_ms={recoveries:?}", chaos.scenario);
        let recovery = recoveries.iter().copied().max().unwrap_or(0);
        let tally = chaos
            .settle(
                &self.publisher,
                std::slice::from_mut(worker),
                recovery,
                Duration::from_secs(120),
            )
            .await;
        tally.assert_nothing_dead_lettered();
        tally
    }
}

/// At most `concurrency` (8) handlings can complete after a fault before the worker notices
/// it; more lines than that mean processing really resumed.
const RESUMED: usize = 9;

/// (a) `kill -9` of the worker process mid-stream, repeated; a fresh worker takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_kill9_worker_mid_stream() {
    let plan = Plan::steady();
    let chaos = Chaos::new("kill9", &amqp_url(), "chaos_worker").with_features(&redis_url());
    bounded(plan.limit, async {
        let name = unique("chaos-kill9-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut phases = Phases::start(&chaos, "kill9", &plan, plan.faults);
        let mut recoveries = Vec::new();
        for k in 1..=plan.faults {
            phases.before_fault(&chaos, k).await;
            chaos.mark_fault();
            worker.kill9().await;
            let fault = Instant::now();
            let from = chaos.ledger.len();
            // Work that can only be handled by the next worker (mid-phase: under load).
            phases.after_fault(k);
            worker = chaos.spawn_worker(&name, "steady", None);
            chaos.fault_over();
            recoveries.push(
                chaos
                    .recovery(fault, from, 1, Duration::from_secs(60))
                    .await,
            );
        }
        phases.settle(&chaos, &mut worker, &recoveries).await;
    })
    .await;
    chaos.cleanup().await;
}

/// (b) The broker closes the worker's connection under load, repeatedly; it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_b_connection_kills_under_load() {
    let plan = Plan::steady();
    let chaos =
        Chaos::new("connection_kill", &amqp_url(), "chaos_worker").with_features(&redis_url());
    bounded(plan.limit, async {
        let name = unique("chaos-conn-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut phases = Phases::start(&chaos, "conn", &plan, plan.faults);
        let mut recoveries = Vec::new();
        for k in 1..=plan.faults {
            phases.before_fault(&chaos, k).await;
            chaos.mark_fault();
            let closed = close_connection(&name);
            let fault = Instant::now();
            chaos.fault_over();
            let from = chaos.ledger.len();
            // Work that can only be handled after the reconnect.
            phases.after_fault(k);
            assert_eq!(closed, 1, "the worker's connection should have been open");
            recoveries.push(
                chaos
                    .recovery(fault, from, RESUMED, Duration::from_secs(60))
                    .await,
            );
        }
        phases.settle(&chaos, &mut worker, &recoveries).await;
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
    let chaos = Chaos::new("broker_restart", &node.url, "chaos_worker").with_features(&redis_url());
    bounded(plan.limit, async {
        let name = unique("chaos-restart-worker");
        let mut worker = chaos.spawn_worker(&name, "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut phases = Phases::start(&chaos, "restart", &plan, outages);
        let mut recoveries = Vec::new();
        for k in 1..=outages {
            phases.before_fault(&chaos, k).await;
            let failures = phases.publisher.failures();
            let down = Instant::now();
            chaos.mark_fault();
            node.ctl(&["stop_app"]);
            phases.after_fault(k);
            let published = phases.publisher.published.clone();
            let seen = phases.publisher.failures.clone();
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
            chaos.fault_over();
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
        phases.settle(&chaos, &mut worker, &recoveries).await;
        assert!(
            phases.publisher.failures() > 0,
            "the restart should have failed some publishes"
        );
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
    let chaos = Chaos::new("sigterm", &amqp_url(), "chaos_worker").with_features(&redis_url());
    bounded(limit, async {
        let name = unique("chaos-sigterm-worker");
        let mut worker = chaos.spawn_worker(&name, "slow", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut publisher = ChaosPublisher::spawn(
            &chaos.urls,
            &chaos.queue,
            chaos.ids("sigterm", messages),
            200,
            Duration::from_millis(5),
        );
        publisher.finish(Duration::from_secs(120)).await;
        let published = publisher.published.lock().unwrap().clone();
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
            chaos.mark_fault();
            let status = worker.terminate(Duration::from_secs(40)).await;
            assert!(status.success(), "SIGTERM: worker exited with {status:?}");
            let from = chaos.ledger.len();
            // Every publisher-fed column still has work: only the next worker can do it.
            for column in features::columns(&chaos) {
                let handled = column.handled();
                let waiting = published
                    .iter()
                    .filter(|id| features::column_of(id) == column.name)
                    .filter(|id| !handled.contains_key(*id))
                    .count();
                eprintln!(
                    "chaos sigterm/{}: {waiting} waiting at SIGTERM {k}",
                    column.name
                );
                assert!(
                    waiting > 0 || column.name == "schedule",
                    "{}: the backlog should outlast the worker",
                    column.name
                );
            }
            worker = chaos.spawn_worker(&name, "slow", None);
            chaos.fault_over();
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
        tally.assert_nothing_dead_lettered();
        for (column, t) in tally.all() {
            assert_eq!(
                t.duplicates, 0,
                "{column}: a graceful shutdown acks what it finished: nothing runs twice"
            );
        }
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
            chaos.ids("flaky", messages),
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

/// Handlings per column so far.
fn handled_per_column(chaos: &Chaos) -> Vec<(&'static str, u32)> {
    features::columns(chaos)
        .into_iter()
        .map(|c| (c.name, c.handled().values().sum()))
        .collect()
}

/// (f) The store goes away under load: the private, durable redis-server that holds the
/// feature columns' state (sequence numbers, dedup claims and completions, job statuses) is
/// killed with SIGKILL and comes back with its data 8 s later (soak: 30 s, 3×). The plain and
/// retries columns use no store and keep going; the others wait, then finish: nothing lost,
/// nothing dead-lettered, and (no fault touches the broker) no tick skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_f_store_outage_under_load() {
    let plan = Plan::steady();
    let (outages, outage) = if chaos_soak() {
        (3, Duration::from_secs(30))
    } else {
        (1, Duration::from_secs(8))
    };
    let mut redis = PrivateRedis::durable();
    let chaos = Chaos::new("store_outage", &amqp_url(), "chaos_worker").with_features(&redis.url());
    bounded(plan.limit, async {
        let mut worker = chaos.spawn_worker(&unique("chaos-store-worker"), "steady", None);
        chaos.wait_queue(Duration::from_secs(30)).await;
        let mut phases = Phases::start(&chaos, "store", &plan, outages);
        let mut recoveries = Vec::new();
        for k in 1..=outages {
            phases.before_fault(&chaos, k).await;
            redis.kill();
            phases.after_fault(k);
            let before = handled_per_column(&chaos);
            // The fault's length, not a synchronisation.
            tokio::time::sleep(outage).await;
            let during: Vec<(&str, u32)> = handled_per_column(&chaos)
                .into_iter()
                .zip(&before)
                .map(|((name, n), (_, b))| (name, n - b))
                .collect();
            eprintln!("chaos store_outage: handled during outage {k}: {during:?}");
            for (name, n) in &during {
                match *name {
                    // No store: unaffected.
                    "plain" | "retries" => assert!(*n > 50, "{name} stalled without a store"),
                    // Runs need the store's claim or sequence number: at most what was in
                    // flight when it died.
                    "ordered" | "dedup" | "schedule" => {
                        assert!(*n <= 8, "{name} ran {n} without its store")
                    }
                    _ => {}
                }
            }
            redis.restart();
            let up = Instant::now();
            let at_restart: Vec<u32> = before.iter().zip(&during).map(|(b, d)| b.1 + d.1).collect();
            wait_until(
                Duration::from_secs(60),
                "every store column handling again",
                || {
                    let now = handled_per_column(&chaos);
                    let resumed = now
                        .iter()
                        .zip(&at_restart)
                        .all(|((name, n), was)| matches!(*name, "plain" | "retries") || n > was);
                    async move { resumed }
                },
            )
            .await;
            let recovery = up.elapsed().as_millis();
            eprintln!("chaos store_outage: store columns resumed {recovery} ms after the restart");
            recoveries.push(recovery);
        }
        phases.settle(&chaos, &mut worker, &recoveries).await;
    })
    .await;
    chaos.cleanup().await;
}

/// The matrix's checkers catch what they are there for.
#[test]
fn the_feature_checkers_catch_disorder_repeated_effects_and_missing_ticks() {
    let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Order: a repeat of the number just applied is a re-application; anything else fails.
    let ok = lines(&[
        "ordered:a.1",
        "ordered:b.1",
        "ordered:a.2",
        "ordered:a.2",
        "ordered:a.3",
    ]);
    assert_eq!(features::check_order(&ok), Ok((2, 1)));
    for bad in [
        &["ordered:a.2", "ordered:a.1"][..],
        &["ordered:a.1", "ordered:a.2", "ordered:a.1"][..],
    ] {
        assert!(features::check_order(&lines(bad)).is_err(), "{bad:?}");
    }
    // Effects: a run again after a recorded completion is a dedup failure; after a run whose
    // completion was never recorded (a killed worker), it is allowed and counted.
    let fx = features::effects(&lines(&[
        "run x", "run y", "done y", "dup y", "run x", "done x", "run y",
    ]));
    assert_eq!(fx.twice, 2);
    assert_eq!(fx.suppressed, 1);
    assert_eq!(fx.after_done, vec!["y".to_owned()]);
    // Ticks: a gap is skipped when a fault falls in it, due (so lost) otherwise.
    let ticks = lines(&["run s@1000", "run s@2000", "run s@5000", "run s@6000"]);
    let (due, skipped) = features::due_ticks(&ticks, &[(2500, 2600)]);
    assert_eq!((due.len(), skipped), (4, 2));
    let (due, skipped) = features::due_ticks(&ticks, &[]);
    assert_eq!(skipped, 0);
    assert!(due.contains(&"s@3000".to_owned()) && due.contains(&"s@4000".to_owned()));
    let (_, skipped) = features::due_ticks(&ticks, &[(6000, 7000)]);
    assert_eq!(skipped, 0, "a fault after the gap does not excuse it");
    let ended = 3000 - features::LEAD_AGAIN_WITHIN - 1;
    let (_, skipped) = features::due_ticks(&ticks, &[(ended - 100, ended)]);
    assert_eq!(
        skipped, 0,
        "leadership must come back soon after a fault ends"
    );
}
