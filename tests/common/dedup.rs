//! The dedup scenarios shared by the memory, Redis and PostgreSQL suites: the store changes,
//! the guarantees checked do not.

use std::time::Duration;

use cottontail::{App, Dedup, HandlerError, Json, MessageId, Queue, State};
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Deserialize, Serialize)]
pub struct Pay {
    pub amount: u32,
}

/// Every run of the handler, by message id (the "side effect").
#[derive(Clone)]
pub struct Effects {
    pub runs: Counter,
    pub delay: Duration,
}

impl Effects {
    pub fn new(delay: Duration) -> Self {
        Self {
            runs: Counter::default(),
            delay,
        }
    }
}

pub async fn pay(
    State(fx): State<Effects>,
    MessageId(id): MessageId,
    Json(p): Json<Pay>,
) -> Result<Json<serde_json::Value>, HandlerError> {
    tokio::time::sleep(fx.delay).await;
    fx.runs.add(id.as_deref().unwrap_or("none"));
    Ok(Json(
        serde_json::json!({"charged": p.amount, "run": fx.runs.total()}),
    ))
}

/// One handler's messages settled with `outcome`, from its app's metrics.
pub fn outcome(metrics: &cottontail::Metrics, handler: &str, outcome: &str) -> f64 {
    let labels = [("handler", handler), ("outcome", outcome)];
    metric_value(&metrics.render(), "cottontail_messages_total", &labels).unwrap_or(0.0)
}

/// The same message (`message_id` "pay-1", each with its own reply_to/correlation id) is
/// published 3 times to a handler deduplicated by `dedup`: the effect happens once, 2 are
/// counted duplicates, and all 3 callers get the same reply. Returns the queue name (the
/// dedup scope) and the reply body, for store-specific checks; the app is stopped and its
/// queues deleted.
pub async fn same_message_three_times(prefix: &str, dedup: Dedup) -> (String, Vec<u8>) {
    let name = unique(prefix);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(1)
        .dedup(dedup);
    let fx = Effects::new(Duration::ZERO);
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;

    let conn = connect(&unique("client")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;
    for i in 0..3 {
        let props = json_props()
            .with_message_id("pay-1".into())
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id(format!("call-{i}").into());
        publish(&ch, &name, br#"{"amount":42}"#, props).await;
    }
    let got = replies.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(fx.runs.get("pay-1"), 1, "the effect happened once");
    let bodies: Vec<_> = got.iter().map(|r| r.data.clone()).collect();
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "same reply each time: {bodies:?}"
    );
    let mut cids: Vec<_> = got
        .iter()
        .map(|r| r.properties.correlation_id().as_ref().unwrap().to_string())
        .collect();
    cids.sort();
    assert_eq!(cids, vec!["call-0", "call-1", "call-2"]);
    assert_eq!(outcome(&metrics, &name, "duplicate"), 2.0);
    assert_eq!(outcome(&metrics, &name, "ok"), 1.0);
    running.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
    (name, bodies[0].clone())
}
