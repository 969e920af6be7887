//! Concurrency: the limit holds across the consumers a queue is split over, and a slow
//! message never holds back the acks (so the prefetch window) of the ones after it.
use cottontail_test_support as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::{App, Json, Queue, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
    #[serde(default)]
    sleep_ms: u64,
}

#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    done: Counter,
}

async fn work(State(g): State<Gauge>, Json(job): Json<Job>) {
    let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
    g.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    g.now.fetch_sub(1, Ordering::SeqCst);
    g.done.add(&job.id);
}

fn jobs(n: usize, sleep_ms: u64) -> Vec<(Vec<u8>, cottontail::lapin::BasicProperties)> {
    (0..n)
        .map(|i| {
            let body = format!(r#"{{"id":"m{i}","sleep_ms":{sleep_ms}}}"#);
            (body.into_bytes(), json_props())
        })
        .collect()
}

/// Starts the app on `queue` with a fresh gauge, then publishes `items` to it.
async fn run_with(
    queue: Queue,
    items: Vec<(Vec<u8>, cottontail::lapin::BasicProperties)>,
) -> (cottontail::Running, Gauge, cottontail::lapin::Connection) {
    let gauge = Gauge::default();
    let name = queue.name().to_owned();
    let app = start(
        App::new(gauge.clone()).handler(queue, work),
        &unique("conn"),
    )
    .await;
    let conn = connect(&unique("publisher")).await;
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, items).await;
    (app, gauge, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_a_ceiling_across_the_consumers_of_a_queue() {
    let name = unique("concurrency");
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(5)
        .prefetch(10)
        .consumers(2);
    let (app, gauge, conn) = run_with(queue, jobs(60, 25)).await;
    assert_eq!(
        queue_counts(&conn, &name).await.1,
        2,
        "one channel per consumer"
    );

    let done = gauge.done.clone();
    wait_until(Duration::from_secs(30), "60 handled", move || {
        let done = done.clone();
        async move { done.keys() == 60 }
    })
    .await;
    app.stop().await.unwrap();
    assert_eq!(
        gauge.peak.load(Ordering::SeqCst),
        5,
        "5 runs at once at most, and the limit is reached"
    );
    assert_eq!(gauge.done.total(), 60, "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_does_not_hold_back_the_acks_of_later_ones() {
    // One consumer, a window of 2: the slow first message holds one slot. The others can
    // only flow through the other slot if each is acked on its own, behind the slow one.
    let name = unique("straggler");
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(2)
        .prefetch(2)
        .consumers(1);
    let mut items = vec![(br#"{"id":"slow","sleep_ms":8000}"#.to_vec(), json_props())];
    items.extend(jobs(30, 0));
    let (app, gauge, _conn) = run_with(queue, items).await;

    let done = gauge.done.clone();
    wait_until(
        Duration::from_secs(6),
        "the 30 quick messages handled while the slow one still runs",
        move || {
            let done = done.clone();
            async move { done.keys() == 30 }
        },
    )
    .await;
    assert!(
        !gauge.done.snapshot().contains_key("slow"),
        "the slow one is still running"
    );
    app.stop().await.unwrap();
}
