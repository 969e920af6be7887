//! The reports job through `cottontail::testing`: a tick in, a report out through the
//! `Outbox`. (The schedule firing once per fleet needs a broker: see `schedule_singleton`.)

use cottontail::testing::TestHandler;
use cottontail::testing::TestMessage;
use cottontail::Tick;
use cottontail_reports::{handle, queue, OUTPUT};
use serde_json::Value;

fn tick() -> TestMessage {
    TestMessage::json(&Tick {
        schedule: "reports".into(),
        tick: "2026-01-01T00:01:00Z".into(),
        tick_ms: 1_767_225_660_000,
    })
}

#[tokio::test]
async fn a_tick_publishes_a_report() {
    let run = TestHandler::new(queue(), handle).run(tick()).await;
    assert!(run.is_ok(), "{run:?}");
    assert_eq!(run.outbox.len(), 1);
    let sent = &run.outbox[0];
    assert_eq!(
        (sent.exchange.as_str(), sent.routing_key.as_str()),
        ("", OUTPUT)
    );
    assert!(
        sent.mandatory,
        "a missing output queue must fail the job, not drop the report"
    );
    assert_eq!(
        sent.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let report: Value = sent.json();
    assert_eq!(report["report"]["tick"], "2026-01-01T00:01:00Z");
    assert_eq!(report["report"]["tick_ms"], 1_767_225_660_000_i64);
    assert_eq!(report["report"]["schedule"], "reports");
    assert!(report["generated_at"].as_f64().unwrap() > 0.0);
    // The report carries the tick's trace onwards.
    assert!(sent.header("traceparent").is_some());
}

#[tokio::test]
async fn a_missing_output_queue_retries_the_job() {
    let t = TestHandler::new(queue(), handle).missing_queue(OUTPUT);
    let run = t.run(tick()).await;
    let retry = run.retry().expect("retried");
    assert_eq!(retry.attempts, 1);
    assert!(run.outbox.is_empty());
}

#[tokio::test]
async fn a_message_that_is_no_tick_is_dead_lettered() {
    let run = TestHandler::new(queue(), handle)
        .run(TestMessage::json(&serde_json::json!({"hello": 1})))
        .await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "invalid_input");
    assert!(dead.error.contains("not a schedule tick"), "{}", dead.error);
}
