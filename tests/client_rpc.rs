//! The typed client: many concurrent calls over one connection, timeouts with late replies
//! discarded, error replies, progress, unroutable publishes, the outstanding-call limit and a
//! lost connection.
use cottontail_test_support as common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::client::{Client, PublishError, PublishOptions, RequestOptions, RpcError};
use cottontail::lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use cottontail::lapin::types::{AMQPValue, FieldTable};
use cottontail::lapin::BasicProperties;
use cottontail::{App, Error, HandlerError, Json, Progress, Queue, RetryPolicy};
use futures::StreamExt;
use serde_json::{json, Value};

/// Overall deadline of each test.
const LIMIT: Duration = Duration::from_secs(180);

async fn echo(Json(v): Json<Value>) -> Json<Value> {
    Json(v)
}

async fn refuse(Json(_): Json<Value>) -> Result<Json<Value>, HandlerError> {
    Err(HandlerError::permanent("invalid_input", "no good"))
}

async fn with_progress(
    progress: Progress,
    Json(v): Json<Value>,
) -> Result<Json<Value>, HandlerError> {
    for step in 1..=3 {
        progress.send(&json!({ "step": step })).await?;
    }
    Ok(Json(json!({ "done": v })))
}

async fn client(name: &str) -> Client {
    Client::connect(&amqp_url(), name)
        .await
        .expect("client connects")
}

/// A queue with no consumer, for calls that must not be answered by a handler.
async fn silent_queue(conn: &cottontail::lapin::Connection) -> String {
    let name = unique("silent");
    let ch = conn.create_channel().await.unwrap();
    declare_plain(&ch, &name, expiring_quorum_args()).await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_concurrent_calls_each_get_their_own_reply() {
    bounded(LIMIT, async {
        let name = unique("rpc-echo");
        let queue = Queue::new(&name).expires(EXPIRES).concurrency(64);
        let app = start(App::new(()).handler(queue.clone(), echo), &unique("app")).await;
        let client = client(&unique("client")).await;

        let started = std::time::Instant::now();
        let calls = (0..5_000u32).map(|n| {
            let client = client.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let reply = client
                    .request_json(
                        &name,
                        &json!({ "n": n }),
                        RequestOptions::timeout(Duration::from_secs(60)),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("call {n} failed: {e}"));
                let reply: Value = serde_json::from_slice(&reply).unwrap();
                assert_eq!(
                    reply,
                    json!({ "n": n }),
                    "call {n} got another call's reply"
                );
            })
        });
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        eprintln!("5000 calls in {:?}", started.elapsed());
        assert_eq!(client.outstanding(), 0);
        assert_eq!(client.discarded_replies(), 0);

        client.close().await;
        app.stop().await.unwrap();
        delete_queues_quietly(&handler_queues(&queue, &RetryPolicy::default())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fires_and_the_late_reply_is_discarded() {
    bounded(LIMIT, async {
        let conn = connect(&unique("responder")).await;
        let name = silent_queue(&conn).await;

        // A raw responder that takes the request and hands it to the test instead of answering.
        let ch = conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Some(Ok(delivery)) = consumer.next().await {
                let _ = held_tx.send(delivery);
            }
        });

        let client = client(&unique("client")).await;
        let result = client
            .request(
                &name,
                b"{}",
                RequestOptions::timeout(Duration::from_millis(500)),
            )
            .await;
        assert!(matches!(result, Err(RpcError::Timeout)), "{result:?}");
        assert_eq!(
            client.outstanding(),
            0,
            "a timed-out call must release its slot"
        );

        // Now answer late, and also send a reply with a correlation id nobody issued.
        let request = tokio::time::timeout(Duration::from_secs(10), held_rx)
            .await
            .expect("the responder got the request")
            .unwrap();
        let reply_to = request.properties.reply_to().as_ref().unwrap().to_string();
        let correlation_id = request
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .to_string();
        let reply_ch = confirm_channel(&conn).await;
        for cid in [correlation_id.as_str(), "nobody-asked"] {
            let props = with_header(
                BasicProperties::default().with_correlation_id(cid.into()),
                "x-status",
                AMQPValue::LongString("ok".into()),
            );
            reply_ch
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{\"late\":true}",
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let c = client.clone();
        wait_until(Duration::from_secs(10), "2 discarded replies", move || {
            let c = c.clone();
            async move { c.discarded_replies() == 2 }
        })
        .await;

        client.close().await;
        delete_queues_quietly(&[name]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_surfaces_as_remote_and_progress_arrives_in_order() {
    bounded(LIMIT, async {
        let refuse_name = unique("rpc-refuse");
        let progress_name = unique("rpc-progress");
        let refuse_queue = Queue::new(&refuse_name).expires(EXPIRES);
        let progress_queue = Queue::new(&progress_name).expires(EXPIRES);
        let app = App::new(())
            .handler(refuse_queue.clone(), refuse)
            .handler(progress_queue.clone(), with_progress);
        let app = start(app, &unique("app")).await;
        let client = client(&unique("client")).await;

        let result = client
            .request(&refuse_name, b"{}", RequestOptions::default())
            .await;
        match result {
            Err(RpcError::Remote { kind, message }) => {
                assert_eq!(kind, "invalid_input");
                assert_eq!(message, "no good");
            }
            other => panic!("expected a remote error, got {other:?}"),
        }

        for round in 0..3 {
            let mut call = client
                .request_with_progress(
                    &progress_name,
                    &serde_json::to_vec(&json!({ "round": round })).unwrap(),
                    RequestOptions::default(),
                )
                .await
                .unwrap();
            let mut steps = Vec::new();
            while let Some(update) = call.next_progress().await {
                steps.push(update["step"].as_u64().unwrap());
            }
            assert_eq!(steps, [1, 2, 3]);
            let body: Value = serde_json::from_slice(&call.result().await.unwrap()).unwrap();
            assert_eq!(body, json!({ "done": { "round": round } }));
        }

        // A plain request to a progress-sending handler just gets the final reply.
        let body = client
            .request(&progress_name, b"{}", RequestOptions::default())
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({ "done": {} })
        );
        assert_eq!(client.discarded_replies(), 0);

        client.close().await;
        app.stop().await.unwrap();
        let mut queues = handler_queues(&refuse_queue, &RetryPolicy::default());
        queues.extend(handler_queues(&progress_queue, &RetryPolicy::default()));
        delete_queues_quietly(&queues).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_missing_queue_is_unroutable() {
    bounded(LIMIT, async {
    let conn = connect(&unique("checker")).await;
    let client = client(&unique("client")).await;
    let missing = unique("missing");

    let result = client
        .publish(&missing, b"{}", PublishOptions::default())
        .await;
    assert!(
        matches!(&result, Err(Error::Publish(PublishError::Unroutable { routing_key, .. })) if *routing_key == missing),
        "{result:?}"
    );
    let result = client
        .request(&missing, b"{}", RequestOptions::default())
        .await;
    assert!(
        matches!(
            &result,
            Err(RpcError::Publish(PublishError::Unroutable { .. }))
        ),
        "{result:?}"
    );

    // The client stays usable, and publish sets the requested properties.
    let name = silent_queue(&conn).await;
    let options = PublishOptions {
        priority: Some(3),
        message_id: Some("m-1".into()),
        headers: vec![("x-sequence".into(), "7".into())],
        correlation_id: Some("c-1".into()),
        reply_to: Some("somewhere".into()),
    };
    client
        .publish_json(&name, &json!({ "a": 1 }), options)
        .await
        .unwrap();
    let got = drain(&conn, &name).await;
    assert_eq!(got.len(), 1);
    let p = &got[0].properties;
    assert_eq!(got[0].data, br#"{"a":1}"#);
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
    assert_eq!(p.reply_to().as_ref().unwrap().as_str(), "somewhere");
    assert_eq!(header_u64(&got[0], "x-sequence"), Some(7));

    client.close().await;
    delete_queues_quietly(&[name]).await;
    })
    .await;
}

/// Set to end `flood`'s stream of progress updates.
static FLOOD_STOP: AtomicBool = AtomicBool::new(false);

/// Sends progress updates back to back until told to stop.
async fn flood(progress: Progress, Json(_): Json<Value>) -> Result<Json<Value>, HandlerError> {
    let mut sent = 0u64;
    while !FLOOD_STOP.load(Ordering::Relaxed) && sent < 1_000_000 {
        progress.send(&json!({ "n": sent })).await?;
        sent += 1;
    }
    Ok(Json(json!({ "sent": sent })))
}

/// Requests are not confirmed one by one, so an unroutable one is found among the returns the
/// broker sends; a steady stream of replies on the same client must not starve that check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_request_fails_at_once_while_replies_stream_in() {
    bounded(LIMIT, async {
        let name = unique("rpc-flood");
        let queue = Queue::new(&name).expires(EXPIRES);
        let app = start(App::new(()).handler(queue.clone(), flood), &unique("app")).await;
        let client = client(&unique("client")).await;
        let missing = unique("missing");

        let mut streaming = client
            .request_with_progress(&name, b"{}", RequestOptions::timeout(Duration::from_secs(120)))
            .await
            .expect("the flood call is sent");
        let received = Arc::new(AtomicU64::new(0));
        let reader = {
            let received = received.clone();
            tokio::spawn(async move {
                while streaming.next_progress().await.is_some() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
                streaming.result().await
            })
        };
        wait_until(Duration::from_secs(30), "progress updates streaming", || async {
            received.load(Ordering::Relaxed) > 200
        })
        .await;

        // Well under the time the busy stream would run: a starved check ends in a timeout.
        let short = RequestOptions::timeout(Duration::from_secs(5));
        let plain = client.request(&missing, b"{}", short.clone()).await;
        assert!(
            matches!(&plain, Err(RpcError::Publish(PublishError::Unroutable { routing_key, .. })) if *routing_key == missing),
            "{plain:?}"
        );
        let mut call = client
            .request_with_progress(&missing, b"{}", short)
            .await
            .expect("the request is sent");
        assert_eq!(call.next_progress().await, None);
        let result = call.result().await;
        assert!(
            matches!(&result, Err(RpcError::Publish(PublishError::Unroutable { .. }))),
            "{result:?}"
        );

        assert!(
            !reader.is_finished(),
            "the progress stream ended before the unroutable calls did"
        );
        FLOOD_STOP.store(true, Ordering::Relaxed);
        let done = reader.await.unwrap().expect("the flood call ends with a reply");
        let done: Value = serde_json::from_slice(&done).unwrap();
        assert!(done["sent"].as_u64().unwrap() > 200, "{done}");
        client.close().await;
        app.stop().await.unwrap();
        delete_queues_quietly(&handler_queues(&queue, &RetryPolicy::default())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_outstanding_limit_are_refused() {
    bounded(LIMIT, async {
        let conn = connect(&unique("checker")).await;
        let name = silent_queue(&conn).await;
        let client = Client::builder(&amqp_url())
            .connection_name(unique("client"))
            .max_outstanding(2)
            .connect()
            .await
            .unwrap();

        let options = RequestOptions::timeout(Duration::from_secs(30));
        let first = client
            .request_with_progress(&name, b"{}", options.clone())
            .await
            .unwrap();
        let _second = client
            .request_with_progress(&name, b"{}", options.clone())
            .await
            .unwrap();
        let third = client.request(&name, b"{}", options.clone()).await;
        assert!(matches!(third, Err(RpcError::Busy(2))), "{third:?}");

        // Abandoning a call frees its slot.
        drop(first);
        assert_eq!(client.outstanding(), 1);
        let third = client
            .request_with_progress(&name, b"{}", options)
            .await
            .unwrap();

        // A call that outlives its client fails at once instead of at its timeout.
        drop(client);
        let result = tokio::time::timeout(Duration::from_secs(5), third.result())
            .await
            .expect("an orphaned call ends promptly");
        assert!(matches!(result, Err(RpcError::Connection(_))), "{result:?}");
        delete_queues_quietly(&[name]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_fails_waiting_calls_and_the_client_reconnects() {
    bounded(LIMIT, async {
        let name = unique("rpc-reconnect");
        let queue = Queue::new(&name).expires(EXPIRES);
        let app = start(App::new(()).handler(queue.clone(), echo), &unique("app")).await;
        let conn = connect(&unique("checker")).await;
        let silent = silent_queue(&conn).await;
        let client_name = unique("client");
        let client = client(&client_name).await;

        let waiting = client
            .request_with_progress(
                &silent,
                b"{}",
                RequestOptions::timeout(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        let closed = tokio::task::spawn_blocking(move || close_connection(&client_name))
            .await
            .unwrap();
        assert_eq!(closed, 1);
        let result = tokio::time::timeout(Duration::from_secs(20), waiting.result())
            .await
            .expect("a call on a lost connection fails promptly, not at its timeout");
        assert!(matches!(result, Err(RpcError::Connection(_))), "{result:?}");

        let body = client
            .request(&name, b"{\"again\":1}", RequestOptions::default())
            .await
            .unwrap();
        assert_eq!(body, br#"{"again":1}"#);

        client.close().await;
        app.stop().await.unwrap();
        let mut queues = handler_queues(&queue, &RetryPolicy::default());
        queues.push(silent);
        delete_queues_quietly(&queues).await;
    })
    .await;
}
