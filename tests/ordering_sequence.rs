//! Ordered delivery: shuffled, duplicated events of many keys are applied in sequence order,
//! once each, by several instances; gaps wider than the prefetch resolve; open gaps follow
//! the policy.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cottontail::{
    App, GapPolicy, HandlerError, MemorySequences, Ordering, Queue, Running, Sequence,
    SequenceStore,
};

/// Every application of (key, seq), in the order they happened.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl Applied {
    fn distinct(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|v| {
                let mut v = v.clone();
                v.dedup();
                v.len()
            })
            .sum()
    }
}

async fn apply(
    cottontail::State(applied): cottontail::State<Applied>,
    seq: Sequence,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_micros(200)).await;
    applied
        .0
        .lock()
        .unwrap()
        .entry(seq.key)
        .or_default()
        .push(seq.number);
    Ok(())
}

fn events(
    keys: usize,
    per_key: u64,
    dup_every: usize,
) -> Vec<(Vec<u8>, cottontail::lapin::BasicProperties)> {
    let mut items = Vec::new();
    for k in 0..keys {
        for s in 1..=per_key {
            let props =
                json_props().with_headers(cottontail::sequence_headers(&format!("key-{k}"), s));
            items.push((b"{}".to_vec(), props.clone()));
            if items.len() % dup_every == 0 {
                items.push((b"{}".to_vec(), props));
            }
        }
    }
    fastrand::shuffle(&mut items);
    items
}

/// Asserts each key's first applications are exactly 1..=n in order; re-applications (a
/// message redelivered after its owner died between running and saving) may only repeat the
/// number just applied.
fn assert_in_order(applied: &Applied, keys: usize, per_key: u64) -> usize {
    let map = applied.0.lock().unwrap();
    assert_eq!(map.len(), keys);
    let mut repeats = 0;
    for (key, seqs) in map.iter() {
        let mut expected = 1;
        for (i, s) in seqs.iter().enumerate() {
            if *s == expected {
                expected += 1;
            } else {
                assert!(
                    i > 0 && *s == seqs[i - 1],
                    "{key}: applied {s} out of order: {seqs:?}"
                );
                repeats += 1;
            }
        }
        assert_eq!(expected, per_key + 1, "{key}: {seqs:?}");
    }
    repeats
}

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
    let mut names = handler_queues(queue, &cottontail::RetryPolicy::default());
    for n in 0..6 {
        names.push(cottontail::partition_queue(queue.name(), n));
    }
    names.push(cottontail::members_queue(queue.name()));
    delete_queues(&names).await;
}

async fn instance(queue: &Queue, applied: &Applied, name: &str) -> Running {
    start(
        App::new(applied.clone()).handler(queue.clone(), apply),
        name,
    )
    .await
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

fn small_window(
    name: &str,
    store: Arc<dyn SequenceStore>,
    policy: GapPolicy,
    gap_timeout: Duration,
) -> Queue {
    Queue::new(name).expires(EXPIRES).ordered(
        Ordering::shared(store)
            .partitions(1)
            .prefetch(10)
            .hold_limit(5)
            .park_delay(Duration::from_millis(100))
            .gap_timeout(gap_timeout)
            .gap_policy(policy)
            .rebalance_interval(Duration::from_millis(300)),
    )
}

async fn cleanup_small(queue: &Queue) {
    let mut names = handler_queues(queue, &cottontail::RetryPolicy::default());
    names.push(cottontail::partition_queue(queue.name(), 0));
    names.push(cottontail::members_queue(queue.name()));
    delete_queues(&names).await;
}

fn seq_props(key: &str, n: u64) -> cottontail::lapin::BasicProperties {
    json_props().with_headers(cottontail::sequence_headers(key, n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_three_times_the_prefetch_resolves_without_deadlock() {
    let name = unique("gap");
    let queue = small_window(
        &name,
        Arc::new(MemorySequences::new()),
        GapPolicy::Wait,
        Duration::from_secs(600),
    );
    let applied = Applied::default();
    let app = App::new(applied.clone()).handler(queue.clone(), apply);
    let metrics = app.metrics().clone();
    let app = start(app, &unique("gap-app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    // 2..=31 first: 30 messages ahead of a prefetch of 10.
    let items = (2..=31)
        .map(|n| (b"{}".to_vec(), seq_props("k", n)))
        .collect();
    publish_many(&ch, &name, items).await;
    // The window fills and overflows: held messages are parked and cycle through the broker.
    let q = name.clone();
    wait_until(Duration::from_secs(20), "parking engaged", move || {
        let parked = metric_value(
            &metrics.render(),
            "cottontail_ordering_parked_total",
            &[("queue", &q)],
        );
        async move { parked.unwrap_or(0.0) >= 30.0 }
    })
    .await;
    assert_eq!(applied.distinct(), 0, "nothing can run before 1 arrives");
    publish(&ch, &name, b"{}", seq_props("k", 1)).await;
    let a = applied.clone();
    wait_until(Duration::from_secs(60), "all 31 applied", move || {
        let a = a.clone();
        async move { a.distinct() == 31 }
    })
    .await;
    app.stop().await.unwrap();
    assert_in_order(&applied, 1, 31);
    cleanup_small(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_that_never_fills_follows_the_policy() {
    // SkipAhead: after the timeout, 3..=5 run without 2 ever arriving.
    let name = unique("gap-skip");
    let queue = small_window(
        &name,
        Arc::new(MemorySequences::new()),
        GapPolicy::SkipAhead,
        Duration::from_millis(800),
    );
    let applied = Applied::default();
    let app = instance(&queue, &applied, &unique("skip-app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let items = [1, 3, 4, 5]
        .into_iter()
        .map(|n| (b"{}".to_vec(), seq_props("k", n)))
        .collect();
    publish_many(&ch, &name, items).await;
    let a = applied.clone();
    wait_until(
        Duration::from_secs(20),
        "3..=5 applied after the skip",
        move || {
            let a = a.clone();
            async move { a.distinct() == 4 }
        },
    )
    .await;
    assert_eq!(applied.0.lock().unwrap()["k"], vec![1, 3, 4, 5]);
    app.stop().await.unwrap();
    cleanup_small(&queue).await;

    // DeadLetter: the waiting messages go to the DLQ with kind sequence_gap.
    let name = unique("gap-dlq");
    let queue = small_window(
        &name,
        Arc::new(MemorySequences::new()),
        GapPolicy::DeadLetter,
        Duration::from_millis(800),
    );
    let applied = Applied::default();
    let app = instance(&queue, &applied, &unique("dlq-app")).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    let items = [1, 3, 4]
        .into_iter()
        .map(|n| (b"{}".to_vec(), seq_props("k", n)))
        .collect();
    publish_many(&ch, &name, items).await;
    let dead = dlq.wait_for(2, Duration::from_secs(20)).await;
    assert!(dead
        .iter()
        .all(|d| header_str(d, "x-error-kind").as_deref() == Some("sequence_gap")));
    assert_eq!(applied.0.lock().unwrap()["k"], vec![1]);
    app.stop().await.unwrap();
    cleanup_small(&queue).await;
}
