//! `cottontail cancel MESSAGE_ID` against the real broker: exit 0 once the cancel is sent, and
//! the running job stops with an `error` reply of kind `cancelled`.
use cottontail_test_support as common;

use std::time::Duration;

use common::long_jobs::{steps, Caller, StepLog};
use common::*;
use cottontail::{App, Queue};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
const CLI: &str = env!("CARGO_BIN_EXE_cottontail");

#[tokio::test]
async fn cancel_stops_a_running_job() {
    let q = Queue::new(unique("cli-cancel"))
        .concurrency(1)
        .expires(EXPIRES);
    let name = q.name().to_owned();
    let app = start(
        App::new(StepLog::default()).handler(q, steps),
        &unique("cli-cancel-app"),
    )
    .await;
    let conn = connect("cli-cancel-test").await;
    let job = Caller::send(&conn, &name, &json!({"steps": 1000, "step_ms": 50})).await;
    job.wait_step(2, LIMIT).await;
    let (code, _, err) = run_cli(CLI, &["cancel", &job.message_id]).await;
    assert_eq!(code, 0, "{err}");
    let (status, body) = job.final_reply(LIMIT).await;
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "cancelled", "{body}");
    // An unknown id is no error: nothing to stop.
    let (code, _, err) = run_cli(CLI, &["cancel", "no-such-job"]).await;
    assert_eq!(code, 0, "{err}");
    app.stop().await.unwrap();
}
