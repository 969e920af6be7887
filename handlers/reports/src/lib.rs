//! Example handler crate: a scheduled singleton job.
//!
//! On each tick of its schedule exactly one instance of the service fires the job (see
//! `cottontail::Schedule`); the job runs as an ordinary handler on the `reports` queue
//! (singleton: one run at a time across the fleet, never overlapping itself) and publishes
//! `{"report": ..., "generated_at": ...}` to `reports.generated`.

use std::time::{SystemTime, UNIX_EPOCH};

use cottontail::{HandlerError, Outbox, Queue, Schedule, Tick};
use serde::Serialize;

/// The job's queue.
pub const QUEUE: &str = "reports";
/// Where reports go.
pub const OUTPUT: &str = "reports.generated";
/// Default schedule: every minute, on the minute (cron with seconds).
pub const DEFAULT_SCHEDULE: &str = "0 * * * * *";

/// The schedule, from a cron pattern (e.g. `REPORTS_SCHEDULE`).
pub fn schedule(pattern: &str) -> Result<Schedule, cottontail::Error> {
    Schedule::new("reports", pattern)
}

/// The job queue: a singleton, so a slow report never overlaps the next one.
pub fn queue() -> Queue {
    Queue::new(QUEUE).singleton()
}

/// A generated report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was reported on.
    pub report: serde_json::Value,
    /// When it was generated (RFC 3339-ish, seconds since the epoch as a float too).
    pub generated_at: f64,
}

/// The job: builds the report for the tick and publishes it (confirmed) to `reports.generated`.
pub async fn handle(outbox: Outbox, tick: Tick) -> Result<(), HandlerError> {
    let generated_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let report = Report {
        report: serde_json::json!({
            "schedule": tick.schedule,
            "tick": tick.tick,
            "tick_ms": tick.tick_ms,
            "kind": "heartbeat",
        }),
        generated_at,
    };
    outbox.send_json(OUTPUT, &report).await?;
    tracing::info!(tick = %tick.tick, "report generated");
    Ok(())
}
