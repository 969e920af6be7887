//! Competing consumers: two app instances on one queue split the work, each message once.
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
}

#[derive(Clone)]
struct Seen {
    all: Counter,
    mine: Counter,
}

async fn record(State(seen): State<Seen>, Json(job): Json<Job>) -> Result<(), HandlerError> {
    seen.all.add(&job.id);
    seen.mine.add(&job.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_1000_messages_each_handled_exactly_once() {
    let name = unique("competing");
    let queue = Queue::new(&name).expires(EXPIRES).concurrency(8);
    let all = Counter::default();
    let (mine_a, mine_b) = (Counter::default(), Counter::default());
    let a = start(
        App::new(Seen {
            all: all.clone(),
            mine: mine_a.clone(),
        })
        .handler(queue.clone(), record),
        &unique("conn-a"),
    )
    .await;
    let b = start(
        App::new(Seen {
            all: all.clone(),
            mine: mine_b.clone(),
        })
        .handler(queue.clone(), record),
        &unique("conn-b"),
    )
    .await;

    let conn = connect(&unique("publisher")).await;
    let ch = confirm_channel(&conn).await;
    let items = (0..1000)
        .map(|i| (format!(r#"{{"id":"m{i}"}}"#).into_bytes(), json_props()))
        .collect();
    publish_many(&ch, &name, items).await;

    let seen = all.clone();
    wait_until(
        Duration::from_secs(30),
        "1000 distinct messages handled",
        move || {
            let seen = seen.clone();
            async move { seen.keys() == 1000 }
        },
    )
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    // Nothing redelivered after the drain: every message handled exactly once, in total.
    assert_eq!(
        all.total(),
        1000,
        "duplicates: {:?}",
        all.snapshot()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .collect::<Vec<_>>()
    );
    assert!(
        mine_a.total() > 0 && mine_b.total() > 0,
        "a={} b={}",
        mine_a.total(),
        mine_b.total()
    );
    assert_eq!(mine_a.total() + mine_b.total(), 1000);
    assert_eq!(queue_depth(&conn, &name).await, 0);
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
