//! Crash loops: a message that kills the worker process every time (no chance to nack) ends
//! in the DLQ with a reason after the delivery limit, while other messages are processed.
//! Quorum queues count with `x-delivery-count`; classic (priority) queues with cottontail's
//! own `x-redeliveries`.
use cottontail_test_support as common;

use std::io::Write;
use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue};
use serde::Deserialize;

const CHILD_QUEUE: &str = "COTTONTAIL_TEST_CRASH_QUEUE";
const CHILD_LEDGER: &str = "COTTONTAIL_TEST_CRASH_LEDGER";
const CHILD_CLASSIC: &str = "COTTONTAIL_TEST_CRASH_CLASSIC";

#[derive(Deserialize)]
struct Job {
    id: String,
}

async fn fragile(
    cottontail::State(ledger): cottontail::State<String>,
    Json(job): Json<Job>,
) -> Result<(), HandlerError> {
    if job.id == "poison" {
        std::process::abort();
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)?;
    writeln!(f, "{}", job.id)?;
    Ok(())
}

fn queue(name: &str, classic: bool) -> Queue {
    let q = Queue::new(name)
        .expires(EXPIRES)
        .delivery_limit(3)
        .concurrency(1)
        .prefetch(1);
    if classic {
        q.priority(3)
    } else {
        q
    }
}

#[tokio::test]
async fn child_worker() {
    let (Ok(name), Ok(ledger)) = (std::env::var(CHILD_QUEUE), std::env::var(CHILD_LEDGER)) else {
        return;
    };
    let classic = std::env::var(CHILD_CLASSIC).is_ok();
    App::new(ledger)
        .handler(queue(&name, classic), fragile)
        .run(config(&unique("crash-child")))
        .await
        .unwrap();
}

async fn poison_ends_in_the_dlq(classic: bool) {
    let name = unique(if classic {
        "crash-classic"
    } else {
        "crash-quorum"
    });
    let ledger = std::env::temp_dir()
        .join(unique("ledger"))
        .to_string_lossy()
        .to_string();
    let mut env = vec![(CHILD_QUEUE, name.clone()), (CHILD_LEDGER, ledger.clone())];
    if classic {
        env.push((CHILD_CLASSIC, "1".into()));
    }
    let conn = connect(&unique("client")).await;
    // Declare the topology first (as the worker would) so messages can be published.
    let setup = App::new(ledger.clone())
        .handler(queue(&name, classic), fragile)
        .start(config(&unique("setup")))
        .await
        .unwrap();
    assert!(setup.wait_ready(Duration::from_secs(20)).await);
    setup.stop().await.unwrap();
    let dlq = collect(&conn, &format!("{name}.dlq")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"id":"poison"}"#, json_props()).await;
    let items = (0..20)
        .map(|i| (format!(r#"{{"id":"ok{i}"}}"#).into_bytes(), json_props()))
        .collect();
    publish_many(&ch, &name, items).await;

    let mut crashes = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut child = spawn_child("child_worker", &env);
        loop {
            let finished = !dlq.is_empty()
                && std::fs::read_to_string(&ledger)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    >= 20;
            if finished {
                sigterm(&child);
                assert!(wait_exit(&mut child, Duration::from_secs(30))
                    .await
                    .success());
                break;
            }
            if child.try_wait().unwrap().is_some() {
                crashes += 1;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "poison never reached the DLQ"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !dlq.is_empty()
            && std::fs::read_to_string(&ledger)
                .unwrap_or_default()
                .lines()
                .count()
                >= 20
        {
            break;
        }
    }
    assert_eq!(
        crashes, 3,
        "the poison message should crash the worker exactly delivery_limit times"
    );
    let dead = dlq.all();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, br#"{"id":"poison"}"#);
    assert_eq!(
        header_str(&dead[0], "x-error-kind").as_deref(),
        Some("crash_loop")
    );
    assert!(header_str(&dead[0], "x-error")
        .unwrap()
        .contains("without a verdict"));
    let mut lines: Vec<String> = std::fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), 20, "every other message processed");
    let _ = std::fs::remove_file(&ledger);
    let q = queue(&name, classic);
    delete_queues(&handler_queues(&q, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_worker_is_dead_lettered_after_the_limit_quorum() {
    poison_ends_in_the_dlq(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_worker_is_dead_lettered_after_the_limit_classic() {
    poison_ends_in_the_dlq(true).await;
}
