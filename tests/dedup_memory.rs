//! Dedup with the in-memory store: duplicates are acked without running and get the cached
//! reply; concurrent duplicates run once; a dead holder's lease lapses.
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::dedup::{pay, Effects};
use common::*;
use cottontail::stores::DedupStore;
use cottontail::stores::MemoryStore;
use cottontail::{App, Dedup, Queue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_three_times_runs_once_and_replies_the_same_three_times() {
    let store = Arc::new(MemoryStore::new(10_000));
    dedup::same_message_three_times("dedup3", Dedup::shared(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_on_two_instances_run_once() {
    let name = unique("dedup-conc");
    let store: Arc<dyn DedupStore> = Arc::new(MemoryStore::new(10_000));
    let dedup = Dedup::shared(store).busy_delay(Duration::from_millis(300));
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(4)
        .dedup(dedup);
    let fx = Effects {
        runs: Counter::default(),
        delay: Duration::from_millis(700),
    };
    let app_a = App::new(fx.clone()).handler(queue.clone(), pay);
    let app_b = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = [app_a.metrics().clone(), app_b.metrics().clone()];
    let a = start(app_a, &unique("a")).await;
    let b = start(app_b, &unique("b")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let items = (0..20)
        .flat_map(|i| {
            let props = json_props().with_message_id(format!("m{i}").into());
            [
                (br#"{"amount":1}"#.to_vec(), props.clone()),
                (br#"{"amount":1}"#.to_vec(), props),
            ]
        })
        .collect();
    publish_many(&ch, &name, items).await;
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(30), "20 ids handled", move || {
        let runs = runs.clone();
        async move { runs.keys() == 20 }
    })
    .await;
    // The parked duplicates come back and are recognised as duplicates.
    let handler = name.clone();
    wait_until(
        Duration::from_secs(30),
        "20 duplicates counted",
        move || {
            let total: f64 = metrics
                .iter()
                .filter_map(|m| {
                    let labels = [("handler", handler.as_str()), ("outcome", "duplicate")];
                    metric_value(&m.render(), "cottontail_messages_total", &labels)
                })
                .sum();
            async move { total == 20.0 }
        },
    )
    .await;
    assert_eq!(fx.runs.total(), 20, "{:?}", fx.runs.snapshot());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(queue_depth(&conn, &name).await, 0);
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_by_a_dead_instance_lapses_and_the_message_is_processed() {
    let name = unique("dedup-lease");
    let store = Arc::new(MemoryStore::new(100));
    // An instance claimed the id, then died without completing or releasing.
    store
        .claim(
            &name,
            "orphan",
            "dead-instance",
            Duration::from_millis(1500),
        )
        .await
        .unwrap();
    let dedup = Dedup::shared(store).busy_delay(Duration::from_millis(200));
    let queue = Queue::new(&name).expires(EXPIRES).dedup(dedup);
    let fx = Effects {
        runs: Counter::default(),
        delay: Duration::ZERO,
    };
    let app = start(
        App::new(fx.clone()).handler(queue.clone(), pay),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let started = std::time::Instant::now();
    publish(
        &ch,
        &name,
        br#"{"amount":5}"#,
        json_props().with_message_id("orphan".into()),
    )
    .await;
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(20), "orphan processed", move || {
        let runs = runs.clone();
        async move { runs.get("orphan") == 1 }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "ran before the lease lapsed"
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test]
async fn job_batches_keep_each_jobs_first_creation_time() {
    let store = Arc::new(cottontail::stores::MemoryJobs::default());
    dedup::job_batches_keep_the_first_creation_time(store, "batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_completes_once_whatever_the_duplicates() {
    dedup::join_completes_once(Arc::new(MemoryStore::new(1000))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_come_due_in_order() {
    dedup::watches_come_due_in_order(Arc::new(MemoryStore::new(1000))).await;
}
