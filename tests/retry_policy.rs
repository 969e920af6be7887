//! Retries with broker-held delays: attempts, delays, exhaustion to the DLQ, timeouts, and
//! other work flowing while a retry waits.
use cottontail_test_support as common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use cottontail::{App, Attempt, HandlerError, Json, Queue, RetryPolicy, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
    /// Fail (transiently) until this attempt number.
    #[serde(default)]
    succeed_on: u32,
    /// Sleep this long on the first attempt (timeout tests).
    #[serde(default)]
    first_sleep_ms: u64,
}

/// (id, attempt, when) of every handler run, and the ids that succeeded.
#[derive(Clone, Default)]
struct Log {
    runs: Arc<Mutex<Vec<(String, u32, Instant)>>>,
    done: Counter,
}

impl Log {
    fn runs_of(&self, id: &str) -> Vec<(u32, Instant)> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == id)
            .map(|r| (r.1, r.2))
            .collect()
    }
}

async fn flaky(
    State(log): State<Log>,
    Attempt(attempt): Attempt,
    Json(job): Json<Job>,
) -> Result<(), HandlerError> {
    log.runs
        .lock()
        .unwrap()
        .push((job.id.clone(), attempt, Instant::now()));
    if attempt == 1 && job.first_sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.first_sleep_ms)).await;
    }
    if attempt < job.succeed_on {
        return Err(HandlerError::transient(
            "flaky",
            format!("attempt {attempt} failed"),
        ));
    }
    log.done.add(&job.id);
    Ok(())
}

async fn done(log: &Log, id: &str, limit: Duration) {
    let (log, id2) = (log.clone(), id.to_owned());
    wait_until(limit, &format!("{id} handled"), move || {
        let (log, id2) = (log.clone(), id2.clone());
        async move { log.done.get(&id2) > 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_twice_then_succeeding_runs_on_attempt_3_after_the_delays() {
    let name = unique("retry3");
    let policy = RetryPolicy::exponential(Duration::from_millis(400))
        .jitter(0.0)
        .max_attempts(4);
    let queue = Queue::new(&name).expires(EXPIRES).retry(policy.clone());
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"id":"a","succeed_on":3}"#, json_props()).await;
    done(&log, "a", Duration::from_secs(20)).await;

    let runs = log.runs_of("a");
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let first_gap = runs[1].1 - runs[0].1;
    let second_gap = runs[2].1 - runs[1].1;
    // Broker TTLs: 400 ms then 800 ms; allow for broker and scheduling latency.
    assert!(
        first_gap >= Duration::from_millis(380) && first_gap < Duration::from_millis(2500),
        "{first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(780) && second_gap < Duration::from_millis(3000),
        "{second_gap:?}"
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_retries_run_before_delays() {
    let name = unique("immediate");
    let policy = RetryPolicy::fixed(Duration::from_secs(30))
        .immediate(2)
        .max_attempts(5);
    let queue = Queue::new(&name).expires(EXPIRES).retry(policy.clone());
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"id":"i","succeed_on":3}"#, json_props()).await;
    // Well before the 30 s delay: attempts 2 and 3 were immediate.
    done(&log, "i", Duration::from_secs(10)).await;
    assert_eq!(log.runs_of("i").len(), 3);
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_ends_in_the_dlq_with_attempts_and_error_and_an_error_reply() {
    let name = unique("exhaust");
    let policy = RetryPolicy::fixed(Duration::from_millis(100))
        .jitter(0.0)
        .max_attempts(3);
    let queue = Queue::new(&name).expires(EXPIRES).retry(policy.clone());
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let dlq = collect(&conn, &queue.dlq_name()).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;
    let props = json_props()
        .with_reply_to(reply_to.as_str().into())
        .with_correlation_id("x1".into());
    publish(&ch, &name, br#"{"id":"never","succeed_on":99}"#, props).await;

    let dead = dlq.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(header_u64(&dead[0], "x-attempts"), Some(3));
    assert_eq!(
        header_str(&dead[0], "x-error").as_deref(),
        Some("attempt 3 failed")
    );
    assert_eq!(
        header_str(&dead[0], "x-error-kind").as_deref(),
        Some("flaky")
    );
    assert_eq!(log.runs_of("never").len(), 3);
    let reply = replies.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(header_str(&reply[0], "x-status").as_deref(), Some("error"));
    assert_eq!(
        reply[0]
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "x1"
    );
    let body: serde_json::Value = serde_json::from_slice(&reply[0].data).unwrap();
    assert_eq!(body["error"]["kind"], "flaky");
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_messages_flow_while_a_retry_waits_in_the_broker() {
    let name = unique("flow");
    let policy = RetryPolicy::fixed(Duration::from_secs(3))
        .jitter(0.0)
        .max_attempts(2);
    // Concurrency 1, prefetch 1: if the waiting retry held the slot, nothing else could run.
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .concurrency(1)
        .prefetch(1);
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"id":"slow","succeed_on":2}"#, json_props()).await;
    let l = log.clone();
    wait_until(Duration::from_secs(10), "first attempt", move || {
        let l = l.clone();
        async move { !l.runs_of("slow").is_empty() }
    })
    .await;
    let first = log.runs_of("slow")[0].1;
    for i in 0..20 {
        publish(
            &ch,
            &name,
            format!(r#"{{"id":"q{i}"}}"#).as_bytes(),
            json_props(),
        )
        .await;
    }
    for i in 0..20 {
        done(&log, &format!("q{i}"), Duration::from_secs(10)).await;
    }
    assert_eq!(log.done.get("slow"), 0, "the retry came back too early");
    assert!(first.elapsed() < Duration::from_secs(3));
    done(&log, "slow", Duration::from_secs(15)).await;
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_in_the_broker_survives_a_worker_restart() {
    let name = unique("survive");
    let policy = RetryPolicy::fixed(Duration::from_millis(1500))
        .jitter(0.0)
        .max_attempts(3);
    let queue = Queue::new(&name).expires(EXPIRES).retry(policy.clone());
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app1"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"id":"r","succeed_on":2}"#, json_props()).await;
    let l = log.clone();
    wait_until(Duration::from_secs(10), "first attempt", move || {
        let l = l.clone();
        async move { !l.runs_of("r").is_empty() }
    })
    .await;
    app.stop().await.unwrap(); // the retry now waits in `<queue>.retry.1500`, no worker alive

    let log2 = Log::default();
    let app2 = start(
        App::new(log2.clone()).handler(queue.clone(), flaky),
        &unique("app2"),
    )
    .await;
    done(&log2, "r", Duration::from_secs(15)).await;
    assert_eq!(
        log2.runs_of("r").iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2]
    );
    app2.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_over_its_timeout_is_cancelled_and_retried() {
    let name = unique("timeout");
    let policy = RetryPolicy::fixed(Duration::from_millis(100))
        .jitter(0.0)
        .max_attempts(3);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .timeout(Duration::from_millis(300));
    let log = Log::default();
    let app = start(
        App::new(log.clone()).handler(queue.clone(), flaky),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(
        &ch,
        &name,
        br#"{"id":"t","first_sleep_ms":60000}"#,
        json_props(),
    )
    .await;
    done(&log, "t", Duration::from_secs(10)).await;
    assert_eq!(
        log.runs_of("t").iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2]
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}
