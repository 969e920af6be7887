//! Every row of the README's "What happens to a message" table, in process through
//! `cottontail::testing` (no broker; each test runs in milliseconds). The broker tests
//! (`core_*`, `retry_*`, `dedup_*`) keep what only a broker shows: the TTL returning a retry,
//! acks, redeliveries, topology.

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cottontail::stores::{Claim, DedupStore, MemoryStore, StoreError};
use cottontail::testing::{Handled, Status, TestHandler, TestMessage};
use cottontail::{
    from_fn, Attempt, BoxFuture, Dedup, HandlerError, Json, Message, Next, Outbox, Progress, Queue,
    QueueType, RetryPolicy, Sequence, State,
};
use serde_json::{json, Value};

const QUEUE: &str = "work";

/// Echoes `{"n": …}`; `{"fail": "transient" | "permanent" | "panic" | "hang"}` fails that way.
async fn work(Json(req): Json<Value>) -> Result<Json<Value>, HandlerError> {
    match req["fail"].as_str() {
        Some("transient") => Err(HandlerError::transient("upstream", "payment API down")),
        Some("permanent") => Err(HandlerError::permanent("rejected", "card declined")),
        Some("panic") => panic!("index out of bounds"),
        Some("hang") => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Json(req))
        }
        _ => Ok(Json(req)),
    }
}

fn harness() -> TestHandler {
    TestHandler::new(Queue::new(QUEUE), work)
}

fn failing(how: &str) -> TestMessage {
    TestMessage::json(&json!({"fail": how}))
}

// Row 1: `Ok(value)` → reply `x-status: ok` with the value (confirmed) → ack.

#[tokio::test]
async fn ok_replies_with_the_value_then_acks() {
    let run = harness()
        .run(
            TestMessage::json(&json!({"n": 7}))
                .reply_to("caller")
                .correlation_id("c-7"),
        )
        .await;
    assert!(run.is_ok(), "{run:?}");
    assert!(run.acked());
    assert_eq!(run.runs, 1);
    let reply = run.reply().expect("an ok reply");
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.json::<Value>(), json!({"n": 7}));
    assert_eq!(reply.correlation_id.as_deref(), Some("c-7"));
    // The reply is the only publish: no copy anywhere.
    assert_eq!(run.published.len(), 1);
    assert_eq!(run.published[0].routing_key, "caller");
}

#[tokio::test]
async fn ok_without_reply_to_publishes_nothing() {
    let run = harness().run(TestMessage::json(&json!({"n": 1}))).await;
    assert!(run.is_ok());
    assert!(run.published.is_empty(), "{run:?}");
}

// Row 2: transient error, panic, timeout → copy to `<queue>.retry.<ms>` with `x-attempts`
// (confirmed) → ack.

#[tokio::test]
async fn a_transient_error_is_copied_to_the_retry_queue_with_its_attempts() {
    let run = harness()
        .run(failing("transient").reply_to("caller").message_id("m-1"))
        .await;
    let retry = run.retry().expect("retried");
    assert!(run.acked());
    assert_eq!(retry.delay, Duration::from_secs(1));
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.copy.exchange, "");
    assert_eq!(retry.copy.routing_key, "work.retry.1000");
    assert_eq!(retry.copy.json::<Value>(), json!({"fail": "transient"}));
    assert_eq!(
        retry
            .copy
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-1")
    );
    assert!(retry
        .copy
        .header("x-last-error")
        .unwrap()
        .contains("payment API down"));
    // The TTL is the delay with 20 % jitter.
    let ttl: u64 = retry
        .copy
        .properties
        .expiration()
        .as_ref()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!((800..=1200).contains(&ttl), "ttl {ttl}");
    // A retry is not the end: the caller gets no reply yet.
    assert!(run.replies.is_empty(), "{run:?}");
}

#[tokio::test]
async fn later_attempts_wait_longer() {
    let run = harness().run(failing("transient").attempt(3)).await;
    let retry = run.retry().expect("retried");
    assert_eq!(retry.delay, Duration::from_secs(4));
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.copy.routing_key, "work.retry.4000");
}

#[tokio::test]
async fn a_panic_is_retried_like_a_transient_error() {
    let run = harness().run(failing("panic")).await;
    let retry = run.retry().expect("retried");
    let last = retry.copy.header("x-last-error").unwrap();
    assert!(
        last.contains("panic") && last.contains("index out of bounds"),
        "{last}"
    );
}

#[tokio::test]
async fn a_timeout_is_retried_like_a_transient_error() {
    let started = Instant::now();
    let run = TestHandler::new(Queue::new(QUEUE).timeout(Duration::from_millis(20)), work)
        .run(failing("hang"))
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let last = run
        .retry()
        .expect("retried")
        .copy
        .header("x-last-error")
        .unwrap();
    assert!(last.contains("timeout"), "{last}");
}

#[tokio::test]
async fn immediate_retries_run_in_process_before_any_copy() {
    let calls = Arc::new(AtomicU32::new(0));
    // Fails twice, then succeeds.
    let flaky = |State(calls): State<Arc<AtomicU32>>, Attempt(n): Attempt| async move {
        calls.fetch_add(1, SeqCst);
        match n {
            1 | 2 => Err(HandlerError::transient("flaky", "not yet")),
            _ => Ok(Json(n)),
        }
    };
    let policy = RetryPolicy::exponential(Duration::from_secs(1)).immediate(2);
    let t = TestHandler::with_state(Queue::new(QUEUE).retry(policy), flaky, calls.clone());
    let run = t.run(TestMessage::json(&()).reply_to("caller")).await;
    assert!(run.is_ok(), "{run:?}");
    assert_eq!((run.runs, calls.load(SeqCst)), (3, 3));
    assert_eq!(run.reply().unwrap().json::<u32>(), 3);
}

// Row 3: last attempt failed, permanent error, bad input, oversized body → copy to
// `<queue>.dlq` with `x-error`, `x-error-kind`, `x-attempts`, `x-handler` (confirmed) →
// `error` reply → ack.

#[tokio::test]
async fn the_last_attempt_dead_letters_then_replies_error() {
    let run = harness()
        .run(
            failing("transient")
                .attempt(5)
                .reply_to("caller")
                .correlation_id("c"),
        )
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert!(run.acked());
    assert_eq!(dead.kind, "upstream");
    assert_eq!(dead.error, "payment API down");
    assert_eq!(dead.attempts, 5);
    assert_eq!(dead.handler, QUEUE);
    assert_eq!(dead.copy.exchange, "cottontail.dlx");
    assert_eq!(dead.copy.routing_key, QUEUE);
    assert_eq!(dead.copy.json::<Value>(), json!({"fail": "transient"}));
    // In this order: the dead-letter copy, then the error reply.
    let order: Vec<&str> = run
        .published
        .iter()
        .map(|p| p.routing_key.as_str())
        .collect();
    assert_eq!(order, [QUEUE, "caller"]);
    let reply = run.reply().unwrap();
    assert_eq!(reply.status, Status::Error);
    assert_eq!(reply.correlation_id.as_deref(), Some("c"));
    assert_eq!(
        reply.json::<Value>(),
        json!({"error": {"kind": "upstream", "message": "payment API down"}})
    );
}

#[tokio::test]
async fn a_policy_without_retries_dead_letters_the_first_failure() {
    let run = TestHandler::new(Queue::new(QUEUE).retry(RetryPolicy::none()), work)
        .run(failing("transient"))
        .await;
    assert_eq!(run.dead_letter().expect("dead-lettered").attempts, 1);
}

#[tokio::test]
async fn a_permanent_error_dead_letters_at_once() {
    let run = harness().run(failing("permanent").reply_to("caller")).await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!((dead.kind.as_str(), dead.attempts), ("rejected", 1));
    assert_eq!(run.reply().unwrap().status, Status::Error);
}

#[tokio::test]
async fn bad_input_is_dead_lettered_without_running_the_handler() {
    let run = harness()
        .run(TestMessage::bytes("{not json").reply_to("caller"))
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "invalid_input");
    assert!(dead.error.contains("not valid JSON"), "{}", dead.error);
    assert_eq!(dead.copy.body, b"{not json");
    assert_eq!(run.runs, 1, "the extractor ran, the handler body did not");
    assert_eq!(run.reply().unwrap().status, Status::Error);
}

#[tokio::test]
async fn an_oversized_body_is_dead_lettered_unread() {
    let run = TestHandler::new(Queue::new(QUEUE).max_body(16), work)
        .run(TestMessage::json(
            &json!({"n": "far more than sixteen bytes"}),
        ))
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "too_large");
    assert_eq!(run.runs, 0);
}

// Row 4: the worker dies mid-message `delivery_limit` times → dead-lettered with kind
// `crash_loop` on the next delivery.

#[tokio::test]
async fn a_crash_loop_is_dead_lettered_on_the_next_delivery() {
    let t = TestHandler::new(Queue::new(QUEUE).delivery_limit(3), work);
    // Quorum queues count deliveries in `x-delivery-count`.
    let run = t
        .run(TestMessage::json(&json!({})).header("x-delivery-count", 2))
        .await;
    assert!(run.is_ok(), "below the limit it runs: {run:?}");
    let run = t
        .run(TestMessage::json(&json!({})).header("x-delivery-count", 3))
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "crash_loop");
    assert_eq!(run.runs, 0);
}

#[tokio::test]
async fn classic_queues_count_redeliveries_themselves() {
    let t = TestHandler::new(
        Queue::new(QUEUE)
            .queue_type(QueueType::Classic)
            .delivery_limit(2),
        work,
    );
    // A redelivery is re-enqueued with its count, not run.
    let run = t.run(TestMessage::json(&json!({})).redelivered()).await;
    let Handled::Deferred(copy) = &run.handled else {
        panic!("{run:?}")
    };
    assert_eq!(copy.routing_key, QUEUE);
    assert_eq!(copy.header_u64("x-redeliveries"), Some(1));
    assert_eq!(run.runs, 0);
    // At the limit it is a crash loop.
    let run = t
        .run(
            TestMessage::json(&json!({}))
                .redelivered()
                .header("x-redeliveries", 2),
        )
        .await;
    assert_eq!(run.dead_letter().expect("dead-lettered").kind, "crash_loop");
}

// Row 5: properties that are not valid UTF-8 → dead-lettered unhandled with kind
// `invalid_properties`; `x-error` names the fields; the body is intact. (The frame guard
// that marks such a message below lapin is tested in `core_invalid_utf8` and its unit tests;
// its mark is a header, which a publisher may also set.)

#[tokio::test]
async fn invalid_properties_are_dead_lettered_unhandled_with_the_body_intact() {
    let run = harness()
        .run(
            TestMessage::json(&json!({"n": 1}))
                .reply_to("caller")
                .header("x-invalid-utf8", "message_id, header name"),
        )
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "invalid_properties");
    assert!(
        dead.error.contains("message_id, header name"),
        "{}",
        dead.error
    );
    assert_eq!(dead.copy.json::<Value>(), json!({"n": 1}));
    assert_eq!(
        dead.copy.header("x-invalid-utf8"),
        None,
        "a replay runs normally"
    );
    assert_eq!(run.runs, 0);
    assert_eq!(run.reply().unwrap().status, Status::Error);
}

// Below the table: nothing is acked before what it produced is confirmed; when a publish
// fails the message goes back to the queue instead.

#[tokio::test]
async fn a_failed_copy_sends_the_message_back_to_the_queue() {
    let run = harness()
        .missing_queue("work.retry.1000")
        .run(failing("transient"))
        .await;
    assert!(matches!(run.handled, Handled::Requeued), "{run:?}");
    assert!(!run.acked());
    let run = harness()
        .missing_queue("work.dlq")
        .run(failing("permanent").reply_to("caller"))
        .await;
    assert!(!run.acked(), "{run:?}");
    assert!(
        run.replies.is_empty(),
        "no error reply for a message that is not settled"
    );
}

#[tokio::test]
async fn a_failed_outbox_send_is_a_transient_failure() {
    let forward = |outbox: Outbox| async move { outbox.send_json("next", &1).await };
    let t = TestHandler::new(Queue::new(QUEUE), forward).missing_queue("next");
    let run = t.run(TestMessage::json(&())).await;
    let retry = run.retry().expect("retried");
    assert!(retry.copy.header("x-last-error").unwrap().contains("next"));
    assert!(run.outbox.is_empty());
}

// Replies: `progress` (zero or more) before the final `ok` / `error`; the outbox.

#[tokio::test]
async fn progress_and_outbox_messages_come_in_order_before_the_reply() {
    let steps = |progress: Progress, outbox: Outbox| async move {
        progress.send(&json!({"stage": 1})).await?;
        outbox
            .send_json("audit", &json!({"event": "halfway"}))
            .await?;
        progress.send(&json!({"stage": 2})).await?;
        Ok::<_, HandlerError>(Json("done"))
    };
    let run = TestHandler::new(Queue::new(QUEUE), steps)
        .run(
            TestMessage::json(&())
                .reply_to("caller")
                .correlation_id("c"),
        )
        .await;
    let statuses: Vec<Status> = run.replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Status::Progress, Status::Progress, Status::Ok]);
    let stages: Vec<Value> = run
        .progress()
        .map(|r| r.json::<Value>()["stage"].clone())
        .collect();
    assert_eq!(stages, [json!(1), json!(2)]);
    assert!(run
        .replies
        .iter()
        .all(|r| r.correlation_id.as_deref() == Some("c")));
    assert_eq!(run.outbox.len(), 1);
    assert_eq!(run.outbox[0].routing_key, "audit");
    assert!(run.outbox[0].mandatory);
    assert_eq!(run.outbox[0].json::<Value>(), json!({"event": "halfway"}));
    let order: Vec<&str> = run
        .published
        .iter()
        .map(|p| p.routing_key.as_str())
        .collect();
    assert_eq!(order, ["caller", "audit", "caller", "caller"]);
}

#[tokio::test]
async fn progress_without_reply_to_sends_nothing() {
    let quiet = |progress: Progress| async move { progress.send(&1).await };
    let run = TestHandler::new(Queue::new(QUEUE), quiet)
        .run(TestMessage::json(&()))
        .await;
    assert!(run.is_ok());
    assert!(run.published.is_empty());
}

// Dedup: a `message_id` that succeeded is acked with its cached reply, not run again.

#[tokio::test]
async fn a_duplicate_gets_the_cached_reply_without_running() {
    let t = TestHandler::new(
        Queue::new(QUEUE).dedup(Dedup::new(MemoryStore::new(100))),
        work,
    );
    let msg = TestMessage::json(&json!({"n": 1}))
        .message_id("m-1")
        .reply_to("caller");
    let first = t.run(msg.clone()).await;
    assert!(first.is_ok());
    let second = t.run(msg).await;
    assert!(matches!(second.handled, Handled::Duplicate), "{second:?}");
    assert_eq!(second.runs, 0);
    assert_eq!(second.reply().unwrap().json::<Value>(), json!({"n": 1}));
    // Another id runs.
    let other = t
        .run(TestMessage::json(&json!({"n": 2})).message_id("m-2"))
        .await;
    assert_eq!(other.runs, 1);
}

#[tokio::test]
async fn a_failed_attempt_releases_its_claim_for_the_retry() {
    let t = TestHandler::new(
        Queue::new(QUEUE).dedup(Dedup::new(MemoryStore::new(100))),
        work,
    );
    let run = t.run(failing("transient").message_id("m")).await;
    assert!(run.retry().is_some());
    let run = t.run(failing("transient").message_id("m").attempt(2)).await;
    assert_eq!(run.runs, 1, "the retry ran: {run:?}");
}

#[tokio::test]
async fn a_busy_id_is_deferred_without_spending_an_attempt() {
    let store = Arc::new(MemoryStore::new(100));
    let dedup = Dedup::shared(store.clone()).busy_delay(Duration::from_millis(250));
    let t = TestHandler::new(Queue::new(QUEUE).dedup(dedup), work);
    // Another instance holds the claim.
    let held = store
        .claim(QUEUE, "m", "elsewhere", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(held, Claim::Acquired);
    let run = t
        .run(TestMessage::json(&()).message_id("m").attempt(2))
        .await;
    let Handled::Deferred(copy) = &run.handled else {
        panic!("{run:?}")
    };
    assert_eq!(copy.routing_key, "work.retry.250");
    assert_eq!(copy.header_u64("x-attempts"), Some(1), "no attempt spent");
    assert_eq!(run.runs, 0);
    assert!(run.acked());
}

/// A dedup store that does not answer.
struct Down;

impl DedupStore for Down {
    fn claim(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn complete(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Option<Vec<u8>>,
        _: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn release(&self, _: &str, _: &str, _: &str) -> BoxFuture<Result<(), StoreError>> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
}

#[tokio::test]
async fn a_dedup_store_outage_defers_instead_of_running_unchecked() {
    let t = TestHandler::new(Queue::new(QUEUE).dedup(Dedup::new(Down)), work);
    let run = t.run(TestMessage::json(&()).message_id("m")).await;
    assert!(matches!(run.handled, Handled::Deferred(_)), "{run:?}");
    assert_eq!(run.runs, 0);
    // Without a message id there is nothing to check: it runs.
    assert!(t.run(TestMessage::json(&())).await.is_ok());
}

// Extractors and middleware run as in the app.

#[tokio::test]
async fn sequence_headers_reach_the_extractor() {
    let numbered =
        |seq: Sequence| async move { Ok::<_, HandlerError>(Json(json!([seq.key, seq.number]))) };
    let t = TestHandler::new(Queue::new(QUEUE), numbered);
    let run = t
        .run(TestMessage::json(&()).sequence("o-1", 4).reply_to("caller"))
        .await;
    assert_eq!(run.reply().unwrap().json::<Value>(), json!(["o-1", 4]));
    let run = t.run(TestMessage::json(&())).await;
    assert_eq!(
        run.dead_letter().expect("dead-lettered").kind,
        "invalid_input"
    );
}

#[tokio::test]
async fn middleware_wraps_the_handler_as_in_the_app() {
    let tenant_required = from_fn(|msg: Message, next: Next| async move {
        match cottontail::headers::get_string(msg.headers(), "x-tenant") {
            Some(_) => next.run(msg).await,
            None => HandlerError::permanent("unauthorized", "no tenant").into(),
        }
    });
    let t = harness().middleware(tenant_required);
    let run = t.run(TestMessage::json(&())).await;
    assert_eq!(
        run.dead_letter().expect("dead-lettered").kind,
        "unauthorized"
    );
    let run = t
        .run(TestMessage::json(&()).header("x-tenant", "acme"))
        .await;
    assert!(run.is_ok());
}

// Row: `Continue::with(state)` → the next slice (confirmed), same properties, → ack.

async fn sliced(Json(done): Json<u32>) -> cottontail::Outcome {
    use cottontail::IntoOutcome;
    if done < 2 {
        return cottontail::Continue::with(&(done + 1)).into_outcome();
    }
    Json(done).into_outcome()
}

#[tokio::test]
async fn a_continuation_republishes_the_message_with_its_new_state_then_acks() {
    let harness = TestHandler::new(Queue::new(QUEUE), sliced);
    let run = harness
        .run(
            TestMessage::json(&0)
                .message_id("job-1")
                .reply_to("caller")
                .correlation_id("c-1")
                .attempt(3),
        )
        .await;
    assert!(run.acked());
    let Handled::Continued(next) = &run.handled else {
        panic!("not continued: {run:?}");
    };
    assert_eq!(
        (next.exchange.as_str(), next.routing_key.as_str()),
        ("", QUEUE)
    );
    assert_eq!(next.json::<u32>(), 1);
    assert_eq!(
        next.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("job-1")
    );
    assert_eq!(
        next.properties.reply_to().as_ref().map(|s| s.as_str()),
        Some("caller")
    );
    assert_eq!(
        next.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("c-1")
    );
    assert_eq!(next.header_u64("x-continuation"), Some(1));
    assert_eq!(
        next.header_u64("x-attempts"),
        None,
        "each slice starts afresh"
    );
    assert!(run.reply().is_none(), "no reply until the last slice");

    // The last slice replies as usual.
    let last = harness
        .run(
            TestMessage::json(&2)
                .reply_to("caller")
                .correlation_id("c-1"),
        )
        .await;
    assert!(last.is_ok(), "{last:?}");
    assert_eq!(last.reply().unwrap().json::<u32>(), 2);
}
