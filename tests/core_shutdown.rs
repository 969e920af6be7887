//! Graceful shutdown: SIGTERM with messages in flight loses none, handles none twice, and the
//! process exits 0.
use cottontail_test_support as common;

use std::io::Write;
use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue, State};
use serde::Deserialize;

const CHILD_QUEUE: &str = "COTTONTAIL_TEST_SHUTDOWN_QUEUE";
const CHILD_LEDGER: &str = "COTTONTAIL_TEST_SHUTDOWN_LEDGER";

#[derive(Deserialize)]
struct Job {
    id: String,
}

/// Works for a while, then appends the id to the ledger file: a line = a completed handling.
async fn slow_job(State(ledger): State<String>, Json(job): Json<Job>) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)?;
    writeln!(f, "{}", job.id)?;
    Ok(())
}

fn queue(name: &str) -> Queue {
    Queue::new(name).expires(EXPIRES).concurrency(4).prefetch(8)
}

/// The worker process: a no-op unless the parent test set the environment.
#[tokio::test]
async fn child_worker() {
    let (Ok(name), Ok(ledger)) = (std::env::var(CHILD_QUEUE), std::env::var(CHILD_LEDGER)) else {
        return;
    };
    let config = config(&unique("shutdown-child")).shutdown_timeout(Duration::from_secs(20));
    App::new(ledger)
        .handler(queue(&name), slow_job)
        .run(config)
        .await
        .unwrap();
}

fn ledger_lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_messages_in_flight_loses_none_and_exits_zero() {
    let name = unique("shutdown");
    let ledger = std::env::temp_dir()
        .join(unique("ledger"))
        .to_string_lossy()
        .to_string();
    let env = [(CHILD_QUEUE, name.clone()), (CHILD_LEDGER, ledger.clone())];

    let mut child = spawn_child("child_worker", &env);
    let conn = connect(&unique("client")).await;
    // The child declares the queue; wait for it before publishing.
    wait_until(
        Duration::from_secs(20),
        "queue declared by the child",
        || {
            let conn = &conn;
            let name = name.clone();
            async move {
                let ch = conn.create_channel().await.unwrap();
                ch.queue_declare(
                    name.as_str().into(),
                    cottontail::lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .is_ok()
            }
        },
    )
    .await;
    let ch = confirm_channel(&conn).await;
    let items = (0..40)
        .map(|i| (format!(r#"{{"id":"m{i}"}}"#).into_bytes(), json_props()))
        .collect();
    publish_many(&ch, &name, items).await;

    let path = ledger.clone();
    wait_until(
        Duration::from_secs(20),
        "some messages handled",
        move || {
            let path = path.clone();
            async move { ledger_lines(&path).len() >= 4 }
        },
    )
    .await;
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "worker exited with {status:?}");
    let after_first = ledger_lines(&ledger).len();
    assert!(
        after_first < 40,
        "the backlog should outlast the first worker"
    );

    // A second worker finishes the rest.
    let mut child = spawn_child("child_worker", &env);
    let path = ledger.clone();
    wait_until(Duration::from_secs(60), "all 40 handled", move || {
        let path = path.clone();
        async move { ledger_lines(&path).len() >= 40 }
    })
    .await;
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30))
        .await
        .success());

    let mut lines = ledger_lines(&ledger);
    lines.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(lines, expected, "each message handled exactly once");
    let _ = std::fs::remove_file(&ledger);
    delete_queues(&handler_queues(
        &queue(&name),
        &cottontail::RetryPolicy::default(),
    ))
    .await;
}
