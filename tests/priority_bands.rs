//! Priority on quorum queues through weighted bands: a backlog of low-priority work is
//! overtaken by urgent messages published after it, and the low band keeps moving.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cottontail::{App, Bands, HandlerError, Json, Priority, Queue};
use serde::Deserialize;

/// The body is a JSON object; the test only needs it to parse.
#[derive(Deserialize)]
struct Job {}

/// Completion order: the priority of each finished message.
#[derive(Clone, Default)]
struct Order(Arc<Mutex<Vec<u8>>>);

async fn work(
    cottontail::State(order): cottontail::State<Order>,
    Priority(p): Priority,
    Json(_job): Json<Job>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    order.0.lock().unwrap().push(p);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_urgent_messages_overtake_a_backlog_of_five_hundred_through_bands() {
    let name = unique("prio");
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .bands(Bands::new(&[(5, 8), (0, 1)]))
        .concurrency(4);
    // Declare the topology, then stop: the backlog builds with no consumer.
    let order = Order::default();
    let setup = start(
        App::new(order.clone()).handler(queue.clone(), work),
        &unique("setup"),
    )
    .await;
    setup.stop().await.unwrap();

    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let low = (0..500).map(|n| {
        (
            format!(r#"{{"n":{n}}}"#).into_bytes(),
            json_props().with_priority(0),
        )
    });
    let high = (0..50).map(|n| {
        (
            format!(r#"{{"n":{n}}}"#).into_bytes(),
            json_props().with_priority(9),
        )
    });
    publish_many(&ch, &name, low.chain(high).collect()).await;

    let app = start(
        App::new(order.clone()).handler(queue.clone(), work),
        &unique("app"),
    )
    .await;
    let o = order.clone();
    wait_until(Duration::from_secs(60), "all 550 done", move || {
        let o = o.clone();
        async move { o.0.lock().unwrap().len() == 550 }
    })
    .await;
    let done = order.0.lock().unwrap().clone();
    let last_urgent = done.iter().rposition(|p| *p == 9).unwrap();
    // Weighted, not starved: low-priority work kept moving while urgent work was waiting.
    assert!(done[..last_urgent].contains(&0), "the low band never got a turn");
    assert!(
        last_urgent < 99,
        "the 50th urgent message finished as completion #{}",
        last_urgent + 1
    );
    app.stop().await.unwrap();
    let mut names = handler_queues(&queue, &cottontail::RetryPolicy::default());
    names.extend((0..2).map(|n| cottontail::band_queue(&name, n)));
    delete_queues(&names).await;
}
