//! Continuations: a job of 20 slices, each ending with `Continue`, runs as 20 deliveries of
//! one message (same `message_id`, `reply_to`, `correlation_id`), sends its progress in order
//! and exactly one final reply, and never holds a delivery longer than one slice.
use cottontail_test_support as common;

use std::time::{Duration, Instant};

use common::long_jobs::Caller;
use common::*;
use cottontail::{
    Continue, HandlerError, IntoOutcome, Json, Message, Outcome, Progress, Queue, State,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
const SLICE: Duration = Duration::from_millis(100);

#[derive(Deserialize, Serialize)]
struct Job {
    slices: u32,
    #[serde(default)]
    done: u32,
}

/// One delivery as the handler saw it.
#[derive(Clone, Debug)]
struct Seen {
    message_id: Option<String>,
    correlation_id: Option<String>,
    /// `x-continuation`: slices before this one.
    continuation: u64,
    /// How long the handler held the delivery.
    held: Duration,
}

#[derive(Clone, Default)]
struct Slices(std::sync::Arc<std::sync::Mutex<Vec<Seen>>>);

async fn slice(
    State(seen): State<Slices>,
    msg: Message,
    progress: Progress,
    Json(mut job): Json<Job>,
) -> Outcome {
    let started = Instant::now();
    tokio::time::sleep(SLICE).await;
    job.done += 1;
    if let Err(e) = progress.send(&json!({"slice": job.done})).await {
        return e.into_outcome();
    }
    let continuation = cottontail::headers::get_u64(msg.headers(), "x-continuation").unwrap_or(0);
    seen.0.lock().unwrap().push(Seen {
        message_id: msg.message_id().map(str::to_owned),
        correlation_id: msg.correlation_id().map(str::to_owned),
        continuation,
        held: started.elapsed(),
    });
    if job.done < job.slices {
        return Continue::with(&job).into_outcome();
    }
    Ok::<_, HandlerError>(Json(json!({"slices": job.done}))).into_outcome()
}

#[tokio::test]
async fn a_twenty_slice_job_runs_as_twenty_short_deliveries_with_one_final_reply() {
    let seen = Slices::default();
    let q = Queue::new(unique("slices")).concurrency(1).expires(EXPIRES);
    let name = q.name().to_owned();
    let app = start(
        cottontail::App::new(seen.clone()).handler(q, slice),
        &unique("slices-app"),
    )
    .await;
    let conn = connect("slices-test").await;
    let caller = Caller::send(&conn, &name, &json!({"slices": 20})).await;
    let (status, body) = caller.final_reply(LIMIT).await;
    assert_eq!(status, "ok", "{body}");
    assert_eq!(body, json!({"slices": 20}));
    // Nothing after the final reply.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = caller.replies();
    assert_eq!(replies.iter().filter(|(s, _)| s != "progress").count(), 1);
    let progress: Vec<u64> = replies
        .iter()
        .filter(|(s, _)| s == "progress")
        .filter_map(|(_, b)| b["slice"].as_u64())
        .collect();
    assert_eq!(progress, (1..=20).collect::<Vec<_>>(), "progress in order");

    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 20, "one delivery per slice");
    for (n, s) in seen.iter().enumerate() {
        assert_eq!(s.message_id.as_deref(), Some(caller.message_id.as_str()));
        assert_eq!(
            s.correlation_id.as_deref(),
            Some(caller.correlation_id.as_str())
        );
        assert_eq!(s.continuation, n as u64, "slice {n} is a fresh delivery");
        assert!(
            s.held < SLICE * 5,
            "slice {n} held its delivery {:?}",
            s.held
        );
    }
    assert_eq!(queue_depth(&conn, &name).await, 0);
    app.stop().await.unwrap();
}
