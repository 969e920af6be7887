//! Dead-letters: bad input goes to `<queue>.dlq` intact with the reason headers, and a
//! panicking handler neither crashes the worker nor stops the other messages.
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::lapin::types::AMQPValue;
use cottontail::{App, HandlerError, Json, Queue, RetryPolicy, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
    #[serde(default)]
    panic: bool,
}

async fn work(State(done): State<Counter>, Json(job): Json<Job>) -> Result<(), HandlerError> {
    if job.panic {
        panic!("boom on {}", job.id);
    }
    done.add(&job.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_dead_lettered_intact_with_a_reason() {
    let name = unique("dlq");
    let queue = Queue::new(&name).expires(EXPIRES);
    let app = start(
        App::new(Counter::default()).handler(queue.clone(), work),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    let ch = confirm_channel(&conn).await;

    let props = with_header(
        json_props()
            .with_message_id("mid-1".into())
            .with_correlation_id("cid-1".into()),
        "x-custom",
        AMQPValue::LongString("kept".into()),
    );
    publish(&ch, &name, b"{not json", props).await;
    publish(
        &ch,
        &name,
        br#"{"wrong_field": 1}"#,
        json_props().with_message_id("mid-2".into()),
    )
    .await;

    let dead = dlq.wait_for(2, Duration::from_secs(20)).await;
    let first = dead
        .iter()
        .find(|d| d.properties.message_id().as_ref().unwrap().as_str() == "mid-1")
        .unwrap();
    assert_eq!(first.data, b"{not json");
    assert_eq!(
        first.properties.correlation_id().as_ref().unwrap().as_str(),
        "cid-1"
    );
    assert_eq!(header_str(first, "x-custom").as_deref(), Some("kept"));
    assert_eq!(
        header_str(first, "x-error-kind").as_deref(),
        Some("invalid_input")
    );
    assert!(header_str(first, "x-error")
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(header_u64(first, "x-attempts"), Some(1));
    assert_eq!(
        header_str(first, "x-handler").as_deref(),
        Some(name.as_str())
    );
    let second = dead
        .iter()
        .find(|d| d.properties.message_id().as_ref().unwrap().as_str() == "mid-2")
        .unwrap();
    assert!(header_str(second, "x-error")
        .unwrap()
        .contains("missing field `id`"));

    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_does_not_stop_the_others() {
    let name = unique("panic");
    let policy = RetryPolicy::none();
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .concurrency(4);
    let done = Counter::default();
    let app = start(
        App::new(done.clone()).handler(queue.clone(), work),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    let ch = confirm_channel(&conn).await;
    let items = (0..100)
        .map(|i| {
            let panic = i % 10 == 0;
            (
                format!(r#"{{"id":"j{i}","panic":{panic}}}"#).into_bytes(),
                json_props(),
            )
        })
        .collect();
    publish_many(&ch, &name, items).await;

    let dead = dlq.wait_for(10, Duration::from_secs(20)).await;
    let d2 = done.clone();
    wait_until(Duration::from_secs(20), "90 good messages", move || {
        let d2 = d2.clone();
        async move { d2.keys() == 90 }
    })
    .await;
    assert!(
        app.health().is_ready(),
        "worker still consuming after panics"
    );
    for d in &dead {
        assert_eq!(header_str(d, "x-error-kind").as_deref(), Some("panic"));
        assert!(header_str(d, "x-error").unwrap().contains("boom on"));
    }
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}
