//! Example handler crate: a long job that resumes from checkpoints and can be cancelled.
//!
//! `crunch` runs `steps` steps of about `step_ms` ms each. After each step it saves a
//! [`Checkpoint`] (the steps completed) and then sends a `progress` reply `{"step": s}`, so a
//! redelivery after a crash resumes from the last checkpoint: at most the one step that was
//! running when the worker died is done twice. The final `ok` reply says where this attempt
//! started and how much it ran: `{"steps": N, "resumed_from": s0, "executed": k}`.
//!
//! One job at a time per instance (concurrency and prefetch 1): a long job must not hold a
//! second one back in the prefetch buffer, where it would wait without running. A cancelled
//! job stops at its next step (the framework drops the run; see
//! [`Cancellation`](cottontail::Cancellation)).

use std::time::Duration;

use cottontail::{Checkpoint, HandlerError, Json, Progress, Queue};
use serde::{Deserialize, Serialize};

/// The job's queue.
pub const QUEUE: &str = "crunch";

/// The most steps one job may ask for.
pub const MAX_STEPS: u64 = 1_000_000;

/// The longest step one job may ask for (ms).
pub const MAX_STEP_MS: u64 = 60_000;

/// The handler's queue: one job at a time per instance.
pub fn queue() -> Queue {
    Queue::new(QUEUE).concurrency(1).prefetch(1)
}

/// The request.
#[derive(Debug, Deserialize)]
pub struct Request {
    /// Steps to run.
    pub steps: u64,
    /// About how long each step takes, in milliseconds.
    pub step_ms: u64,
}

/// The final reply.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {
    /// The steps of the job (the request's `steps`).
    pub steps: u64,
    /// The checkpoint this attempt started from (0 when fresh).
    pub resumed_from: u64,
    /// The steps this attempt ran.
    pub executed: u64,
}

/// The handler.
pub async fn handle(
    Json(req): Json<Request>,
    checkpoint: Checkpoint<u64>,
    progress: Progress,
) -> Result<Json<Done>, HandlerError> {
    if req.steps > MAX_STEPS || req.step_ms > MAX_STEP_MS {
        return Err(HandlerError::invalid_input(format!(
            "steps must be at most {MAX_STEPS} and step_ms at most {MAX_STEP_MS}"
        )));
    }
    // A checkpoint past `steps` (a reused message id) means the work is done.
    let resumed_from = checkpoint.load().await?.unwrap_or(0).min(req.steps);
    if resumed_from > 0 {
        tracing::info!(resumed_from, steps = req.steps, "resuming from checkpoint");
    }
    for done in resumed_from..req.steps {
        step(req.step_ms).await;
        let s = done + 1;
        checkpoint.save(&s).await?;
        progress.send(&serde_json::json!({ "step": s })).await?;
    }
    Ok(Json(Done {
        steps: req.steps,
        resumed_from,
        executed: req.steps - resumed_from,
    }))
}

/// One step of "work": a sleep stands for it (an await point, where a cancel stops the job).
async fn step(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
