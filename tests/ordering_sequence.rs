//! Ordered delivery: shuffled, duplicated events of many keys are applied in sequence order,
//! once each, by several instances; gaps wider than the prefetch resolve; open gaps follow
//! the policy.
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::ordering::*;
use common::*;
use cottontail::stores::{MemorySequences, SequenceStore};
use cottontail::{GapPolicy, Ordering, Queue};

fn ordered_queue(name: &str, store: Arc<dyn SequenceStore>) -> Queue {
    Queue::new(name).expires(EXPIRES).ordered(
        Ordering::shared(store)
            .partitions(6)
            .prefetch(400)
            .hold_limit(300)
            .park_delay(Duration::from_millis(200))
            .rebalance_interval(Duration::from_millis(300)),
    )
}

async fn cleanup(queue: &Queue) {
    delete_queues(&ordered_queue_names(queue, 6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_keys_shuffled_with_duplicates_apply_in_order_on_three_instances() {
    let name = unique("ordered");
    let store: Arc<dyn SequenceStore> = Arc::new(MemorySequences::new());
    let queue = ordered_queue(&name, store);
    let applied = Applied::default();
    let names: Vec<String> = (0..3).map(|i| unique(&format!("ord-{i}"))).collect();
    let mut fleet = Vec::new();
    for n in &names {
        fleet.push(instance(&queue, &applied, n).await);
    }
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, events(200, 50, 10)).await;
    let a = applied.clone();
    wait_until(
        Duration::from_secs(120),
        "10,000 events applied",
        move || {
            let a = a.clone();
            async move { a.distinct() == 10_000 }
        },
    )
    .await;
    for app in fleet {
        app.stop().await.unwrap();
    }
    assert_eq!(
        assert_in_order(&applied, 200, 50),
        0,
        "no instance died: nothing ran twice"
    );
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_while_an_instance_is_killed_and_restarted() {
    let name = unique("ordered-kill");
    let store: Arc<dyn SequenceStore> = Arc::new(MemorySequences::new());
    let queue = ordered_queue(&name, store);
    let applied = Applied::default();
    let names: Vec<String> = (0..3).map(|i| unique(&format!("ordk-{i}"))).collect();
    let mut fleet = Vec::new();
    for n in &names {
        fleet.push(instance(&queue, &applied, n).await);
    }
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, events(200, 50, 10)).await;
    let a = applied.clone();
    wait_until(Duration::from_secs(60), "a fifth applied", move || {
        let a = a.clone();
        async move { a.distinct() >= 2_000 }
    })
    .await;
    // Kill one instance's connection (it comes back by itself, like a restarted worker).
    assert!(close_connection(&names[1]) >= 1);
    let a = applied.clone();
    wait_until(
        Duration::from_secs(120),
        "10,000 events applied",
        move || {
            let a = a.clone();
            async move { a.distinct() == 10_000 }
        },
    )
    .await;
    for app in fleet {
        app.stop().await.unwrap();
    }
    let repeats = assert_in_order(&applied, 200, 50);
    assert!(
        repeats <= 6,
        "{repeats} re-applications: more than the partitions in flight at the kill"
    );
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_three_times_the_prefetch_resolves_without_deadlock() {
    let run = WindowRun::start("gap", GapPolicy::Wait, Duration::from_secs(600)).await;
    // 2..=31 first: 30 messages ahead of a prefetch of 10.
    run.publish(2..=31).await;
    // The window fills and overflows: held messages are parked and cycle through the broker.
    let (m, q) = (run.metrics.clone(), run.name.clone());
    wait_until(Duration::from_secs(20), "parking engaged", move || {
        let parked = ordering_metric(&m, "cottontail_ordering_parked_total", &q);
        async move { parked >= 30.0 }
    })
    .await;
    assert_eq!(
        run.applied.distinct(),
        0,
        "nothing can run before 1 arrives"
    );
    run.publish([1]).await;
    let want: Vec<u64> = (1..=31).collect();
    run.applied
        .wait_for("k", &want, Duration::from_secs(60))
        .await;
    assert_in_order(&run.applied, 1, 31);
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_that_never_fills_follows_the_policy() {
    // SkipAhead: after the timeout, 3..=5 run without 2 ever arriving.
    let run = WindowRun::start("gap-skip", GapPolicy::SkipAhead, Duration::from_millis(800)).await;
    run.publish([1, 3, 4, 5]).await;
    run.applied
        .wait_for("k", &[1, 3, 4, 5], Duration::from_secs(20))
        .await;
    run.finish().await;

    // DeadLetter: the waiting messages go to the DLQ with kind sequence_gap.
    let run = WindowRun::start("gap-dlq", GapPolicy::DeadLetter, Duration::from_millis(800)).await;
    let dlq = collect(&run.conn, &run.queue.dlq_name()).await;
    run.publish([1, 3, 4]).await;
    let dead = dlq.wait_for(2, Duration::from_secs(20)).await;
    assert!(dead
        .iter()
        .all(|d| header_str(d, "x-error-kind").as_deref() == Some("sequence_gap")));
    assert_eq!(run.applied.of("k"), vec![1]);
    run.finish().await;
}
