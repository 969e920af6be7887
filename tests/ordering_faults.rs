//! Ordered delivery under faults: gaps given up on, guards that dead-letter before the
//! handler, handovers, a hold limit that could fill the window, shutdown deadlines and a
//! stale owner. Each test failed on the code before its fix (see RELIABILITY.md).
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ordering::*;
use common::*;
use cottontail::lapin::types::AMQPValue;
use cottontail::lapin::{Channel, Connection};
use cottontail::stores::{MemorySequences, SequenceStore};
use cottontail::{App, GapPolicy, HandlerError, Ordering, Queue, Running, Sequence, State};

fn outcome(metrics: &cottontail::ops::Metrics, handler: &str, outcome: &str) -> f64 {
    metric_value(
        &metrics.render(),
        "cottontail_messages_total",
        &[("handler", handler), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// Item 1: after `GapPolicy::DeadLetter` gives up on a gap, the key moves on: later events
/// apply in order, and the missing number arriving late is below the window (a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_gap_moves_the_key_on() {
    let run = WindowRun::start(
        "gap-dl-moves",
        GapPolicy::DeadLetter,
        Duration::from_millis(800),
    )
    .await;
    let dlq = collect(&run.conn, &run.queue.dlq_name()).await;
    run.publish([1, 3, 4]).await;
    let dead = dlq.wait_for(2, Duration::from_secs(20)).await;
    assert!(dead
        .iter()
        .all(|d| header_str(d, "x-error-kind").as_deref() == Some("sequence_gap")));
    run.publish([5, 6]).await;
    run.applied
        .wait_for("k", &[1, 5, 6], Duration::from_secs(20))
        .await;
    // The number the policy gave up on arrives late: below the window, acked as a duplicate.
    let before = outcome(&run.metrics, &run.name, "duplicate");
    run.publish([2]).await;
    let (m, q) = (run.metrics.clone(), run.name.clone());
    wait_until(Duration::from_secs(10), "late 2 counted", move || {
        let now = outcome(&m, &q, "duplicate");
        async move { now > before }
    })
    .await;
    assert_eq!(run.applied.of("k"), vec![1, 5, 6]);
    assert_eq!(dlq.len(), 2, "nothing else dead-lettered");
    run.finish().await;
}

/// Item 2: a sequence number dead-lettered before its handler runs (too large; a crash loop)
/// moves its key on, like a handler failure does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_dead_lettered_by_a_guard_moves_its_key_on() {
    let name = unique("guard-moves");
    let queue = small_window(
        &name,
        Arc::new(MemorySequences::new()),
        GapPolicy::Wait,
        Duration::from_secs(600),
    )
    .max_body(64)
    .delivery_limit(3);
    let applied = Applied::default();
    let app = instance(&queue, &applied, &unique("guard-app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    publish(&ch, &name, b"{}", seq_props("k", 1)).await;
    publish(&ch, &name, &[b' '; 200], seq_props("k", 2)).await;
    publish(&ch, &name, b"{}", seq_props("k", 3)).await;
    applied
        .wait_for("k", &[1, 3], Duration::from_secs(20))
        .await;
    let dead = dlq.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        header_str(&dead[0], "x-error-kind").as_deref(),
        Some("too_large")
    );

    // A delivery already past the crash-loop limit when it reaches its partition.
    let crashed = with_header(
        seq_props("k", 4),
        "x-delivery-count",
        AMQPValue::LongLongInt(50),
    );
    let partition = cottontail::names::partition_queue(&name, 0);
    publish(&ch, &partition, b"{}", crashed).await;
    publish(&ch, &name, b"{}", seq_props("k", 5)).await;
    applied
        .wait_for("k", &[1, 3, 5], Duration::from_secs(20))
        .await;
    let dead = dlq.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(
        header_str(&dead[1], "x-error-kind").as_deref(),
        Some("crash_loop")
    );
    app.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}

/// Item 3: held messages handed back at every handover do not spend their delivery budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_survive_many_handovers() {
    let name = unique("handovers");
    let queue = small_window(
        &name,
        Arc::new(MemorySequences::new()),
        GapPolicy::Wait,
        Duration::from_secs(600),
    )
    .delivery_limit(3);
    let applied = Applied::default();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let mut published = false;
    for round in 0..5 {
        let app = App::new(applied.clone()).handler(queue.clone(), apply);
        let metrics = app.metrics().clone();
        let app = start(app, &unique(&format!("handover-{round}"))).await;
        if !published {
            publish(&ch, &name, b"{}", seq_props("k", 2)).await;
            published = true;
        }
        let (m, q) = (metrics.clone(), name.clone());
        wait_until(Duration::from_secs(20), "2 held", move || {
            let held = ordering_metric(&m, "cottontail_ordering_held", &q);
            async move { held == 1.0 }
        })
        .await;
        app.stop().await.unwrap();
    }
    let app = instance(&queue, &applied, &unique("handover-last")).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    publish(&ch, &name, b"{}", seq_props("k", 1)).await;
    applied
        .wait_for("k", &[1, 2], Duration::from_secs(20))
        .await;
    assert_eq!(dlq.len(), 0, "{:?}", dlq.all());
    app.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}

/// Item 4: a hold limit that could fill the whole window is refused; with only the prefetch
/// set, the hold limit follows it and a gap wider than the window still resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_limit_that_could_fill_the_window_is_refused_or_derived() {
    let name = unique("hold-refused");
    let bad = Queue::new(&name).expires(EXPIRES).ordered(
        Ordering::new(MemorySequences::new())
            .partitions(1)
            .prefetch(10)
            .hold_limit(10),
    );
    let refused = App::new(Applied::default())
        .handler(bad, apply)
        .start(config(&unique("hold-refused-app")))
        .await;
    match refused {
        Err(cottontail::Error::Config(text)) => {
            assert!(text.contains("hold_limit"), "{text}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("hold_limit(10) with prefetch(10) was accepted");
        }
    }

    let name = unique("hold-derived");
    let queue = Queue::new(&name).expires(EXPIRES).ordered(
        Ordering::new(MemorySequences::new())
            .partitions(1)
            .prefetch(10)
            .park_delay(Duration::from_millis(100))
            .rebalance_interval(Duration::from_millis(300)),
    );
    let applied = Applied::default();
    let app = instance(&queue, &applied, &unique("hold-derived-app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let items = (2..=14)
        .map(|n| (b"{}".to_vec(), seq_props("k", n)))
        .collect();
    publish_many(&ch, &name, items).await;
    publish(&ch, &name, b"{}", seq_props("k", 1)).await;
    let want: Vec<u64> = (1..=14).collect();
    applied.wait_for("k", &want, Duration::from_secs(30)).await;
    app.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}

/// A handler whose first run of each number sleeps `slow`; counts starts and finishes.
#[derive(Clone)]
struct Slow {
    applied: Applied,
    started: Counter,
    finished: Counter,
    slow: Duration,
}

async fn slow_apply(State(s): State<Slow>, seq: Sequence) -> Result<(), HandlerError> {
    let id = format!("{}:{}", seq.key, seq.number);
    let first = s.started.get(&id) == 0;
    s.started.add(&id);
    if first {
        tokio::time::sleep(s.slow).await;
    }
    s.applied.push(seq.key, seq.number);
    s.finished.add(&id);
    Ok(())
}

fn slow_queue(name: &str) -> Queue {
    Queue::new(name).expires(EXPIRES).ordered(
        Ordering::new(MemorySequences::new())
            .partitions(1)
            .rebalance_interval(Duration::from_millis(300)),
    )
}

/// An ordered handler whose first run of each number takes `slow`, started with `shutdown`
/// as its shutdown timeout; number 1 of key `k` is published and running when this returns.
async fn slow_run(
    prefix: &str,
    slow: Duration,
    shutdown: Duration,
) -> (Slow, Queue, Running, (Connection, Channel)) {
    let name = unique(prefix);
    let queue = slow_queue(&name);
    let s = Slow {
        applied: Applied::default(),
        started: Counter::default(),
        finished: Counter::default(),
        slow,
    };
    let app = App::new(s.clone()).handler(queue.clone(), slow_apply);
    let config = config(&unique(&format!("{prefix}-app"))).shutdown_timeout(shutdown);
    let running = start_with(app, config).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, b"{}", seq_props("k", 1)).await;
    let started = s.started.clone();
    wait_until(Duration::from_secs(10), "1 started", move || {
        let n = started.get("k:1");
        async move { n == 1 }
    })
    .await;
    (s, queue, running, (conn, ch))
}

/// Item 6: a stop waits for the running ordered handler up to the shutdown timeout (not a
/// fixed 10 s), so it finishes once and is not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_stop_lets_the_running_handler_finish_within_the_shutdown_timeout() {
    let slow = Duration::from_secs(12);
    let (s, queue, running, (_conn, ch)) =
        slow_run("ordered-drain", slow, Duration::from_secs(30)).await;
    running.stop().await.unwrap();
    assert_eq!(
        s.finished.get("k:1"),
        1,
        "stop returned before the run finished"
    );
    // A new instance must not see it again.
    let app = App::new(s.clone()).handler(queue.clone(), slow_apply);
    let again = start(app, &unique("drain-next")).await;
    publish(&ch, queue.name(), b"{}", seq_props("k", 2)).await;
    s.applied
        .wait_for("k", &[1, 2], Duration::from_secs(30))
        .await;
    assert_eq!(s.started.get("k:1"), 1, "1 ran again");
    again.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}

/// Item 6: past the shutdown timeout the running handler is cut, the stop returns, and the
/// message goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_stop_cuts_a_run_at_the_shutdown_timeout() {
    let slow = Duration::from_secs(120);
    let (s, queue, running, _client) = slow_run("ordered-cut", slow, Duration::from_secs(2)).await;
    let t = Instant::now();
    running.stop().await.unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "stop took {took:?} with a 2 s shutdown timeout"
    );
    let app = App::new(s.clone()).handler(queue.clone(), slow_apply);
    let again = start(app, &unique("cut-next")).await;
    s.applied.wait_for("k", &[1], Duration::from_secs(30)).await;
    assert_eq!(
        s.started.get("k:1"),
        2,
        "returned to the queue and run again"
    );
    again.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}

/// A handler that holds number 1 of every key until the test lets it go.
#[derive(Clone)]
struct Gated {
    applied: Applied,
    started: Counter,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn gated_apply(State(g): State<Gated>, seq: Sequence) -> Result<(), HandlerError> {
    g.started.add(&format!("{}:{}", seq.key, seq.number));
    if seq.number == 1 {
        g.gate.acquire().await.expect("gate").forget();
    }
    g.applied.push(seq.key, seq.number);
    Ok(())
}

/// Item 6: an owner whose compare-and-set fails (someone else moved the key) stops; it does
/// not go on running the held successors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_stops_instead_of_running_held_successors() {
    let name = unique("stale-owner");
    let store = Arc::new(MemorySequences::new());
    let queue = small_window(
        &name,
        store.clone(),
        GapPolicy::Wait,
        Duration::from_secs(600),
    );
    let g = Gated {
        applied: Applied::default(),
        started: Counter::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let app = App::new(g.clone()).handler(queue.clone(), gated_apply);
    let metrics = app.metrics().clone();
    let app = start(app, &unique("stale-app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    // 2 and 3 first, so both are held when 1 starts (a partition offers nothing while it runs).
    for n in [2, 3, 1] {
        publish(&ch, &name, b"{}", seq_props("k", n)).await;
    }
    let (m, q, started) = (metrics.clone(), name.clone(), g.started.clone());
    wait_until(
        Duration::from_secs(10),
        "1 running, 2 and 3 held",
        move || {
            let held = ordering_metric(&m, "cottontail_ordering_held", &q);
            let running = started.get("k:1");
            async move { held == 2.0 && running == 1 }
        },
    )
    .await;
    // Another owner moved the key on while this one was running 1.
    assert_eq!(store.advance(&name, "k", 1, 10).await, Ok(true));
    g.gate.add_permits(1);
    publish(&ch, &name, b"{}", seq_props("k", 10)).await;
    g.applied
        .wait_for("k", &[1, 10], Duration::from_secs(20))
        .await;
    assert_eq!(g.started.get("k:2") + g.started.get("k:3"), 0);
    app.stop().await.unwrap();
    delete_queues(&ordered_queue_names(&queue, 1)).await;
}
