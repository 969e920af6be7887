//! Connection recovery: a dropped connection is survived without restarting the process;
//! readiness reports 503 while disconnected; no message is lost.
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::lapin::{Connection, ConnectionProperties};
use cottontail::{App, HandlerError, Json, Queue, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
}

async fn slow_record(
    State(seen): State<Counter>,
    Json(job): Json<Job>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    seen.add(&job.id);
    Ok(())
}

async fn publish_range(conn: &Connection, queue: &str, range: std::ops::Range<u32>) {
    let ch = confirm_channel(conn).await;
    let items = range
        .map(|i| (format!(r#"{{"id":"m{i}"}}"#).into_bytes(), json_props()))
        .collect();
    publish_many(&ch, queue, items).await;
}

async fn wait_distinct(seen: &Counter, n: usize, limit: Duration) {
    let s = seen.clone();
    wait_until(limit, &format!("{n} distinct messages"), move || {
        let s = s.clone();
        async move { s.keys() >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_resume_after_the_connection_is_closed_under_load() {
    let name = unique("recovery");
    let conn_name = unique("recovery-app");
    let queue = Queue::new(&name).expires(EXPIRES).concurrency(4);
    let seen = Counter::default();
    let app = start(
        App::new(seen.clone()).handler(queue.clone(), slow_record),
        &conn_name,
    )
    .await;
    let client = connect(&unique("client")).await;
    // ~5 s of work at 4 × 5 ms: the connection dies in the middle of it.
    publish_range(&client, &name, 0..4000).await;
    wait_distinct(&seen, 50, Duration::from_secs(20)).await;

    assert!(
        close_connection(&conn_name) >= 1,
        "found no connection named {conn_name}"
    );
    let handled_at_close = seen.keys();
    assert!(
        handled_at_close < 4000,
        "the load finished before the connection was closed"
    );
    // Every message is handled (some maybe twice: those in flight when the connection died).
    wait_distinct(&seen, 4000, Duration::from_secs(90)).await;
    publish_range(&client, &name, 4000..4100).await;
    wait_distinct(&seen, 4100, Duration::from_secs(30)).await;
    assert!(app.health().is_ready());
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_disconnected_and_200_after_recovery() {
    let vhost = PrivateVhost::new("ready");
    let conn_name = unique("ready-app");
    let name = unique("ready");
    let queue = Queue::new(&name).concurrency(2);
    let seen = Counter::default();
    let config = cottontail::Config::new(vhost.url())
        .connection_name(&conn_name)
        .http("127.0.0.1:0".parse().unwrap());
    let app = start_with(
        App::new(seen.clone()).handler(queue.clone(), slow_record),
        config,
    )
    .await;
    let http = app.http_addr().unwrap();
    assert_eq!(http_get(http, "/health/ready").await.0, 200);
    assert_eq!(http_get(http, "/health/live").await.0, 200);

    // Take the app's access away and drop its connection: it cannot come back until allowed.
    vhost.deny();
    assert!(close_connection(&conn_name) >= 1);
    wait_until(
        Duration::from_secs(20),
        "503 while disconnected",
        || async move { http_get(http, "/health/ready").await.0 == 503 },
    )
    .await;
    let (_, metrics) = http_get(http, "/metrics").await;
    assert!(metrics.contains("cottontail_connection_up 0"), "{metrics}");
    assert_eq!(http_get(http, "/health/live").await.0, 200);

    vhost.allow();
    wait_until(
        Duration::from_secs(30),
        "200 after recovery",
        || async move { http_get(http, "/health/ready").await.0 == 200 },
    )
    .await;
    let (_, metrics) = http_get(http, "/metrics").await;
    assert!(metrics.contains("cottontail_connection_up 1"), "{metrics}");
    assert!(
        metrics.contains("cottontail_connection_recoveries_total 1"),
        "{metrics}"
    );

    // And it consumes again.
    let client = Connection::connect(
        &vhost.url(),
        ConnectionProperties::default().with_connection_name(unique("client").into()),
    )
    .await
    .unwrap();
    publish_range(&client, &name, 0..20).await;
    wait_distinct(&seen, 20, Duration::from_secs(20)).await;
    app.stop().await.unwrap();
}
