//! The demo's long jobs (`docs/contracts.md`, "Long jobs"), against two real
//! `cottontail-demo` processes sharing Redis (and, for the resume, PostgreSQL): `crunch` resumes from its last checkpoint after
//! the worker running it is `kill -9`ed half-way (at most one step done twice), a running job
//! cancelled over HTTP on the *other* instance stops within a second, and a queued one
//! cancelled with `Client::cancel` never runs.
//!
//! The demo owns the fixed queue `crunch`: everything here runs in one test, in sequence.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Demo;
use cottontail::client::Client;
use cottontail::lapin::options::QueuePurgeOptions;
use cottontail::stores::{CheckpointStore, PostgresStore, RedisStore};
use cottontail_crunch::Done;
use cottontail_test_support::long_jobs::Caller;
use cottontail_test_support::{
    connect, http_get, http_post_with, metric_value, queue_depth, redis_url, wait_until,
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

fn addr(demo: &Demo) -> SocketAddr {
    demo.http.parse().unwrap()
}

/// Which of `demos` runs a `crunch` job now (its in-flight gauge), waiting for one to.
async fn runner(demos: &[&Demo]) -> usize {
    let deadline = Instant::now() + LIMIT;
    loop {
        for (i, demo) in demos.iter().enumerate() {
            let (_, text) = http_get(addr(demo), "/metrics").await;
            let running = metric_value(&text, "cottontail_in_flight", &[("handler", "crunch")]);
            if running == Some(1.0) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no instance runs the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn job_status(demo: &Demo, id: &str) -> String {
    let (_, body) = http_get(addr(demo), &format!("/jobs/{id}")).await;
    serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn wait_status(demo: &Demo, id: &str, status: &str) {
    wait_until(LIMIT, &format!("/jobs/{id} {status}"), || async move {
        job_status(demo, id).await == status
    })
    .await;
}

/// Two instances with `env`; the one running a 100-step job is `kill -9`ed after step 50 and
/// the other resumes from the last checkpoint. Returns the survivor.
async fn resumes_after_a_kill(
    env: &[(&str, &str)],
    slots: (u16, u16),
    store: &dyn CheckpointStore,
) -> Demo {
    let first = Demo::start_with(slots.0, env);
    let second = Demo::start_with(slots.1, env);
    let conn = connect("demo-long-jobs-kill").await;
    let job = Caller::send(&conn, "crunch", &json!({"steps": 100, "step_ms": 40})).await;
    let mut demos = vec![first, second];
    let running = runner(&[&demos[0], &demos[1]]).await;
    job.wait_step(50, LIMIT).await;
    let mut killed = demos.remove(running);
    killed.child.kill().unwrap();
    let _ = killed.child.wait();
    let before = job.progress_steps().into_iter().max().unwrap_or(0);
    let survivor = demos.remove(0);
    let (status, body) = job.final_reply(LIMIT).await;
    assert_eq!(status, "ok", "{body}");
    let done: Done = serde_json::from_value(body).unwrap();
    let s0 = done.resumed_from;
    eprintln!("crunch: killed after progress step {before}, resumed from checkpoint {s0}");
    assert_eq!((done.steps, done.executed), (100, 100 - s0));
    assert!(
        s0 >= before && before >= 50,
        "killed after step {before}, resumed from {s0}: no checkpoint lost"
    );
    let progress = job.progress_steps();
    let (first, second): (Vec<u64>, Vec<u64>) = progress.iter().partition(|s| **s <= s0);
    assert_eq!(
        second,
        (s0 + 1..=100).collect::<Vec<_>>(),
        "the second attempt ran from its checkpoint on, each step once"
    );
    // The first attempt reported every step up to its last checkpoint, except perhaps that
    // last one (killed between the save and the progress reply); the step it was running
    // when killed is the only one done twice.
    assert!(
        first == (1..=s0).collect::<Vec<_>>() || first == (1..s0).collect::<Vec<_>>(),
        "first attempt: {first:?}, resumed from {s0}"
    );
    wait_status(&survivor, &job.message_id, "succeeded").await;
    assert_eq!(
        store.load("crunch", &job.message_id).await.unwrap(),
        None,
        "the checkpoint went with the job"
    );

    let _ = conn.close(200, "".into()).await;
    survivor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crunch_resumes_after_a_kill_and_cancels_across_two_instances() {
    let redis = redis_url();
    let env = [("REDIS_URL", redis.as_str())];
    let conn = connect("demo-long-jobs").await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["crunch", "crunch.dlq"] {
        let _ = ch.queue_purge(q.into(), QueuePurgeOptions::default()).await;
    }

    // 1. kill -9 at about half-way: the other instance resumes from the last checkpoint.
    let store = RedisStore::connect_default(&redis).await.unwrap();
    let survivor = resumes_after_a_kill(&env, (1, 2), &store).await;

    // A fresh second instance in place of the killed one.
    let other = Demo::start_with(3, &env);
    let demos = [&survivor, &other];

    // 2. Cancel a running job over HTTP on the instance that does *not* run it.
    let job = Caller::send(&conn, "crunch", &json!({"steps": 1000, "step_ms": 50})).await;
    let running = runner(&demos).await;
    job.wait_step(2, LIMIT).await;
    let elsewhere = demos[1 - running];
    let asked = Instant::now();
    let path = format!("/jobs/{}/cancel", job.message_id);
    let (code, body) = http_post_with(addr(elsewhere), &path, &[]).await;
    assert_eq!(code, 202, "{body}");
    let (status, body) = job.final_reply(LIMIT).await;
    let took = asked.elapsed();
    assert_eq!(
        (status.as_str(), &body["error"]["kind"]),
        ("error", &json!("cancelled"))
    );
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");
    wait_status(elsewhere, &job.message_id, "cancelled").await;

    // 3. Cancel a queued job with Client::cancel: it never runs.
    let busy = [
        Caller::send(&conn, "crunch", &json!({"steps": 1000, "step_ms": 50})).await,
        Caller::send(&conn, "crunch", &json!({"steps": 1000, "step_ms": 50})).await,
    ];
    for job in &busy {
        job.wait_step(1, LIMIT).await;
    }
    let queued = Caller::send(&conn, "crunch", &json!({"steps": 5, "step_ms": 1})).await;
    let client = Client::connect(
        &cottontail_test_support::amqp_url(),
        "demo-long-jobs-client",
    )
    .await
    .unwrap();
    client.cancel(&queued.message_id).await.unwrap();
    for job in &busy {
        client.cancel(&job.message_id).await.unwrap();
    }
    let (status, body) = queued.final_reply(LIMIT).await;
    assert_eq!(
        (status.as_str(), &body["error"]["kind"]),
        ("error", &json!("cancelled"))
    );
    assert!(queued.progress_steps().is_empty(), "it never ran");
    wait_status(&survivor, &queued.message_id, "cancelled").await;
    assert_eq!(
        queue_depth(&conn, "crunch.dlq").await,
        0,
        "nothing dead-lettered"
    );
    client.close().await;

    survivor.stop();
    other.stop();

    // 4. The same resume with the PostgreSQL store.
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let store = PostgresStore::connect(&url).await.unwrap();
    resumes_after_a_kill(&[("DATABASE_URL", url.as_str())], (4, 5), &store)
        .await
        .stop();
}
