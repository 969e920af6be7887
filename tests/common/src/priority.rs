//! The priority race shared by the classic-queue and band tests: with the consumer stopped,
//! 500 priority-0 then 50 priority-9 messages; after it starts, every urgent one must finish
//! before the 100th completion.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cottontail::{App, HandlerError, Json, Priority, Queue};

use super::*;

/// Completion order: the priority of each finished message.
#[derive(Clone, Default)]
pub struct Completions(pub Arc<Mutex<Vec<u8>>>);

async fn work(
    cottontail::State(order): cottontail::State<Completions>,
    Priority(p): Priority,
    Json(_job): Json<serde_json::Value>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    order.0.lock().unwrap().push(p);
    Ok(())
}

/// Runs the race on `queue` and returns the completion order (priorities).
pub async fn urgent_overtakes_backlog(queue: &Queue) -> Vec<u8> {
    let order = Completions::default();
    // Declare the topology, then stop: the backlog builds with no consumer.
    let setup = start(
        App::new(order.clone()).handler(queue.clone(), work),
        &unique("setup"),
    )
    .await;
    setup.stop().await.unwrap();

    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let message = |p: u8| (b"{}".to_vec(), json_props().with_priority(p));
    let backlog = (0..500)
        .map(|_| message(0))
        .chain((0..50).map(|_| message(9)));
    publish_many(&ch, queue.name(), backlog.collect()).await;

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
    app.stop().await.unwrap();
    let done = order.0.lock().unwrap().clone();
    let last_urgent = done.iter().rposition(|p| *p == 9).unwrap();
    assert!(
        last_urgent < 99,
        "the 50th urgent message finished as completion #{}",
        last_urgent + 1
    );
    done
}
