//! `/metrics` counts exactly what happened, per handler.
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::stores::MemoryStore;
use cottontail::{App, Attempt, Dedup, HandlerError, Json, Queue, RetryPolicy};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    kind: String,
}

async fn job(Attempt(attempt): Attempt, Json(job): Json<Job>) -> Result<(), HandlerError> {
    match job.kind.as_str() {
        "retry-once" if attempt == 1 => Err(HandlerError::transient("blip", "first attempt fails")),
        "bad" => Err(HandlerError::permanent("bad", "never valid")),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_ok_retried_dead_lettered_and_duplicate_exactly() {
    let name = unique("metrics");
    let policy = RetryPolicy::fixed(Duration::from_millis(100))
        .jitter(0.0)
        .max_attempts(3);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .dedup(Dedup::shared(Arc::new(MemoryStore::new(1000))));
    let config = config(&unique("app")).http("127.0.0.1:0".parse().unwrap());
    let app = start_with(App::new(()).handler(queue.clone(), job), config).await;
    let http = app.http_addr().unwrap();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;

    let (n, r, d, u) = (10, 4, 3, 2);
    let mut items = vec![];
    for i in 0..n {
        items.push((
            br#"{"kind":"ok"}"#.to_vec(),
            json_props().with_message_id(format!("ok{i}").into()),
        ));
    }
    for i in 0..r {
        items.push((
            br#"{"kind":"retry-once"}"#.to_vec(),
            json_props().with_message_id(format!("r{i}").into()),
        ));
    }
    for i in 0..d {
        items.push((
            br#"{"kind":"bad"}"#.to_vec(),
            json_props().with_message_id(format!("d{i}").into()),
        ));
    }
    publish_many(&ch, &name, items).await;
    let count = |text: &str, outcome: &str| {
        metric_value(
            text,
            "cottontail_messages_total",
            &[("handler", &name), ("outcome", outcome)],
        )
        .unwrap_or(-1.0)
    };
    let done = |text: &str| {
        count(text, "ok") == (n + r) as f64 && count(text, "dead_lettered") == d as f64
    };
    wait_until(Duration::from_secs(20), "all settled", || async move {
        done(&http_get(http, "/metrics").await.1)
    })
    .await;
    for i in 0..u {
        publish(
            &ch,
            &name,
            br#"{"kind":"ok"}"#,
            json_props().with_message_id(format!("ok{i}").into()),
        )
        .await;
    }
    wait_until(
        Duration::from_secs(20),
        "duplicates counted",
        || async move { count(&http_get(http, "/metrics").await.1, "duplicate") == u as f64 },
    )
    .await;

    let (status, text) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(count(&text, "ok"), (n + r) as f64);
    assert_eq!(count(&text, "retried"), r as f64);
    assert_eq!(count(&text, "dead_lettered"), d as f64);
    assert_eq!(count(&text, "duplicate"), u as f64);
    let h = [("handler", name.as_str()), ("queue", name.as_str())];
    // Runs: every ok once, every retry-once twice, every bad once; duplicates never run.
    assert_eq!(
        metric_value(&text, "cottontail_handler_duration_seconds_count", &h),
        Some((n + 2 * r + d) as f64)
    );
    assert_eq!(metric_value(&text, "cottontail_in_flight", &h), Some(0.0));
    assert_eq!(
        metric_value(
            &text,
            "cottontail_retries_total",
            &[("handler", &name), ("attempt", "1")]
        ),
        Some(r as f64)
    );
    assert_eq!(
        metric_value(
            &text,
            "cottontail_dead_letters_total",
            &[("handler", &name), ("kind", "bad")]
        ),
        Some(d as f64)
    );
    assert_eq!(
        metric_value(&text, "cottontail_connection_up", &[]),
        Some(1.0)
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}
