//! Topology: a queue that exists with other arguments gives an explanation, not a raw
//! PRECONDITION_FAILED.
use cottontail_test_support as common;

use common::*;
use cottontail::lapin::types::{AMQPValue, FieldTable};
use cottontail::{App, Error, Queue, RetryPolicy};

async fn noop() {}

#[tokio::test]
async fn a_queue_argument_mismatch_is_explained() {
    let name = unique("mismatch");
    let conn = connect(&unique("setup")).await;
    let ch = conn.create_channel().await.unwrap();
    // Someone made the queue earlier with a crash-loop limit of 2; the handler now says 10.
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(EXPIRES.as_millis() as i64),
    );
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("cottontail.dlx".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(name.as_str().into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(3));
    declare_plain(&ch, &name, args).await;

    let queue = Queue::new(&name).expires(EXPIRES).delivery_limit(10);
    let running = App::new(())
        .handler(queue.clone(), noop)
        .start(config(&unique("app")))
        .await
        .unwrap();
    let err = running.join().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::QueueMismatch(_)), "{err:?}");
    assert!(text.contains(&format!("queue '{name}'")), "{text}");
    assert!(text.contains("x-delivery-limit = 3,"), "{text}");
    assert!(text.contains("declares x-delivery-limit = 11"), "{text}");
    assert!(text.contains(".delivery_limit(..)"), "{text}");
    assert!(text.contains("rabbitmqctl delete_queue"), "{text}");
    assert!(!text.contains("PRECONDITION_FAILED"), "{text}");
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
}

#[tokio::test]
async fn priority_with_a_forced_quorum_queue_is_a_configuration_error() {
    let queue = Queue::new(unique("prio"))
        .priority(5)
        .queue_type(cottontail::QueueType::Quorum);
    let err = App::new(())
        .handler(queue, noop)
        .start(config(&unique("app")))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("classic queue"), "{err}");
}
