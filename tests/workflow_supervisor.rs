//! The workflow supervisor against the real broker: a step whose handler hangs past the
//! workflow's deadline is recovered per policy — re-dispatched (its re-sent copy waits out the
//! hung attempt's dedup lease, which nothing renews, then runs and the workflow completes
//! while the first attempt still hangs), compensated at once, or compensated after the
//! allowed re-dispatches (two instances sharing Redis: once for the fleet) — each with its one
//! final reply, its `/jobs` state and its deadline metric.
#![cfg(feature = "redis")]
use cottontail_test_support as common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::stores::{JobStore, MemoryStore, RedisStore};
use cottontail::workflow::{Input, OnDeadline, Workflow};
use cottontail::{App, Dedup, HandlerError, Json, Running, State};
use serde_json::{json, Value};

/// What a test's handlers share.
#[derive(Clone, Default)]
struct Shared {
    /// Runs of the `confirm` step.
    confirms: Arc<AtomicU32>,
    /// Runs of `reserve`'s compensation.
    cancels: Arc<AtomicU32>,
    /// Set when the first `confirm` run ends (it never does by itself).
    first_ended: Arc<AtomicBool>,
    /// Whether every `confirm` run hangs (else only the first).
    always_hang: bool,
}

/// Sets its flag when dropped: with the hung handler's future, when the pipeline gives up on
/// it.
struct Ended(Arc<AtomicBool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn reserve(Input(v): Input<Value>) -> Result<Json<Value>, HandlerError> {
    Ok(Json(json!({"ref": format!("R-{}", v["id"])})))
}

async fn cancel(State(s): State<Shared>) -> Result<(), HandlerError> {
    s.cancels.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Hangs on its first run (on every run with `always_hang`); completes otherwise.
async fn confirm(State(s): State<Shared>) -> Result<Json<Value>, HandlerError> {
    let run = s.confirms.fetch_add(1, Ordering::SeqCst) + 1;
    if run == 1 || s.always_hang {
        let _ended = (run == 1).then(|| Ended(s.first_ended.clone()));
        std::future::pending::<()>().await;
    }
    Ok(Json(json!({"run": run})))
}

/// One instance of `reserve` (compensated by `cancel`) → `confirm`, with `deadline`.
async fn instance(
    name: &str,
    shared: &Shared,
    dedup: &Dedup,
    policy: OnDeadline,
    jobs: Option<RedisStore>,
) -> Running {
    let workflow = Workflow::new(name)
        .step("reserve", reserve)
        .compensate(cancel)
        .step("confirm", confirm)
        .deadline(Duration::from_secs(2), policy)
        .dedup(dedup.clone())
        .queues(|q| q.expires(EXPIRES));
    let mut app = App::new(shared.clone()).workflow(workflow);
    if let Some(store) = jobs {
        app = app.job_store(store);
    }
    let config = config(&unique("supervised"))
        .http("127.0.0.1:0".parse().unwrap())
        .shutdown_timeout(Duration::from_secs(1));
    start_with(app, config).await
}

/// Starts workflow `id` with `{"id": 7}`; returns the caller's inbox.
async fn call(name: &str, id: &str) -> (cottontail::lapin::Connection, Inbox) {
    let conn = connect(&unique("caller")).await;
    let ch = confirm_channel(&conn).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let props = json_props()
        .with_reply_to(reply_to.as_str().into())
        .with_correlation_id(id.into())
        .with_message_id(id.into());
    publish(&ch, name, br#"{"id": 7}"#, props).await;
    (conn, replies)
}

/// The final replies (not progress) received: `x-status` and body.
fn finals(inbox: &Inbox) -> Vec<(String, Value)> {
    inbox
        .all()
        .iter()
        .filter(|r| header_str(r, "x-status").as_deref() != Some("progress"))
        .map(|r| {
            let body = serde_json::from_slice(&r.data).unwrap();
            (header_str(r, "x-status").unwrap(), body)
        })
        .collect()
}

async fn wait_final(inbox: &Inbox) -> (String, Value) {
    wait_until(Duration::from_secs(40), "the final reply", || {
        let n = finals(inbox).len();
        async move { n >= 1 }
    })
    .await;
    finals(inbox).remove(0)
}

/// `/jobs/{id}` over HTTP.
async fn job(app: &Running, id: &str) -> Value {
    let (code, body) = http_get(app.http_addr().unwrap(), &format!("/jobs/{id}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `/jobs/{id}`'s workflow object has `key` = `want`.
async fn wait_job_workflow(app: &Running, id: &str, key: &str, want: Value) -> Value {
    let mut last = Value::Null;
    for _ in 0..500 {
        let (code, body) = http_get(app.http_addr().unwrap(), &format!("/jobs/{id}")).await;
        if code == 200 {
            last = serde_json::from_str(&body).unwrap();
            if last["workflow"][key] == want {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/jobs/{id} never had workflow.{key} = {want}: {last}");
}

fn deadlines(app_metrics: &str, name: &str, action: &str) -> f64 {
    metric_value(
        app_metrics,
        "cottontail_workflow_deadlines_total",
        &[("workflow", name), ("action", action)],
    )
    .unwrap_or(0.0)
}

async fn cleanup(name: &str, dedup: &Dedup) {
    let supervisor = cottontail::names::workflow_supervisor(name);
    let mut queues = workflow_queues(
        name,
        &["reserve", "confirm", "supervise"],
        &["reserve"],
        dedup,
    );
    queues.push(cottontail::names::schedule_leader_queue(&supervisor));
    queues.push(cottontail::names::schedule_state_queue(&supervisor));
    delete_queues_quietly(&queues).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_hung_past_its_deadline_is_redispatched_and_the_workflow_completes() {
    bounded(Duration::from_secs(90), async {
        let name = unique("deadline-redo");
        // A lease past the first re-dispatch (the 2 s deadline plus at most a 2 s tick), so
        // the copy meets the hung attempt's claim, and short of the test: the copy runs once
        // it lapses.
        let dedup = Dedup::new(MemoryStore::new(1000))
            .lease(Duration::from_secs(6))
            .busy_delay(Duration::from_millis(200));
        let shared = Shared::default();
        let policy = OnDeadline::Redispatch { max: 5 };
        let app = instance(&name, &shared, &dedup, policy, None).await;
        let (_conn, replies) = call(&name, "w-redo").await;

        // While `confirm` hangs, /jobs says so.
        let running = wait_job_workflow(&app, "w-redo", "current_step", json!("confirm")).await;
        assert_eq!(running["status"], "running");
        assert_eq!(running["workflow"]["completed"], json!(["reserve"]));
        assert_eq!(running["workflow"]["outcome"], Value::Null);

        let (status, body) = wait_final(&replies).await;
        assert_eq!(status, "ok", "{body}");
        assert_eq!(body["reserve"], json!({"ref": "R-7"}));
        assert_eq!(
            body["confirm"],
            json!({"run": 2}),
            "the re-sent copy completed it"
        );
        assert!(
            !shared.first_ended.load(Ordering::SeqCst),
            "completed while the first attempt still hangs: its lease lapsed unrenewed"
        );

        let done = wait_job_workflow(&app, "w-redo", "outcome", json!("succeeded")).await;
        assert_eq!(done["status"], "succeeded");
        assert_eq!(done["result"], body);
        assert_eq!(done["workflow"]["completed"], json!(["reserve", "confirm"]));
        assert_eq!(done["workflow"]["current_step"], Value::Null);
        assert_eq!(done["workflow"]["compensated"], json!([]));

        let text = http_get(app.http_addr().unwrap(), "/metrics").await.1;
        assert!(deadlines(&text, &name, "redispatched") >= 1.0, "{text}");
        assert_eq!(deadlines(&text, &name, "compensated"), 0.0);
        // The re-sent copy met the hung attempt's claim and waited (deferred, no attempt
        // spent) until its lease lapsed.
        let step_queue = cottontail::names::workflow_step(&name, "confirm");
        let deferred = metric_value(
            &text,
            "cottontail_deferred_total",
            &[("handler", step_queue.as_str()), ("reason", "busy")],
        );
        assert!(deferred.is_some_and(|n| n >= 1.0), "{deferred:?}");
        assert_eq!(shared.cancels.load(Ordering::SeqCst), 0);
        assert_eq!(finals(&replies).len(), 1, "one final reply");
        app.stop().await.unwrap();
        cleanup(&name, &dedup).await;
    })
    .await;
}

/// A workflow whose `confirm` always hangs ends `compensated` by the supervisor: `reserve`
/// undone once, the final error naming `confirm` and the exceeded deadline after
/// `redispatches` re-sends, `/jobs` showing it. With a Redis store, on two instances: the
/// supervisor acts once for the fleet.
async fn hung_step_is_compensated(
    name: &str,
    dedup: &Dedup,
    policy: OnDeadline,
    redispatches: u32,
    redis: Option<RedisStore>,
) {
    let shared = Shared {
        always_hang: true,
        ..Shared::default()
    };
    let mut fleet = Vec::new();
    for _ in 0..if redis.is_some() { 2 } else { 1 } {
        fleet.push(instance(name, &shared, dedup, policy, redis.clone()).await);
    }
    let app = &fleet[0];
    let (_conn, replies) = call(name, "w-undo").await;

    let (status, body) = wait_final(&replies).await;
    assert_eq!(status, "error", "{body}");
    let error = &body["error"];
    assert_eq!(error["kind"], "compensated", "{body}");
    assert_eq!(error["failed_step"], "confirm");
    assert_eq!(error["compensated"], json!(["reserve"]));
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("deadline exceeded")
            && message.contains(&format!("({redispatches} re-dispatches)")),
        "{message}"
    );

    let done = wait_job_workflow(app, "w-undo", "outcome", json!("compensated")).await;
    assert_eq!(done["status"], "compensated");
    assert_eq!(done["error"], *error);
    assert_eq!(
        done["workflow"],
        json!({"current_step": null, "completed": ["reserve"], "failed_step": "confirm",
            "compensating": null, "compensated": ["reserve"], "compensation_failed": [],
            "outcome": "compensated"})
    );
    if let Some(store) = &redis {
        let stored = store.get("w-undo").await.unwrap().unwrap();
        assert_eq!(stored.workflow, Some(done["workflow"].clone()));
    }
    // Summed over the fleet: the supervisor acted once per deadline.
    let (mut compensated, mut redispatched) = (0.0, 0.0);
    for app in &fleet {
        let text = http_get(app.http_addr().unwrap(), "/metrics").await.1;
        compensated += deadlines(&text, name, "compensated");
        redispatched += deadlines(&text, name, "redispatched");
    }
    assert_eq!(compensated, 1.0);
    assert_eq!(redispatched, f64::from(redispatches));
    assert_eq!(shared.cancels.load(Ordering::SeqCst), 1);
    assert_eq!(finals(&replies).len(), 1, "one final reply");
    for app in &fleet {
        assert_eq!(job(app, "w-undo").await["status"], "compensated");
    }
    for app in fleet {
        app.stop().await.unwrap();
    }
    cleanup(name, dedup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_hung_past_its_deadline_is_compensated_under_the_compensate_policy() {
    bounded(Duration::from_secs(90), async {
        let name = unique("deadline-undo");
        let dedup = Dedup::new(MemoryStore::new(1000));
        hung_step_is_compensated(&name, &dedup, OnDeadline::Compensate, 0, None).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_still_hung_after_its_redispatches_is_compensated_once_by_a_fleet_on_redis() {
    bounded(Duration::from_secs(90), async {
        let name = unique("deadline-max");
        let store = RedisStore::connect(&redis_url(), &unique("deadline"))
            .await
            .expect("Redis");
        // A lease longer than the test: the re-sent copy waits behind the hung attempt.
        let dedup = Dedup::new(store.clone())
            .lease(Duration::from_secs(60))
            .busy_delay(Duration::from_millis(200));
        let policy = OnDeadline::Redispatch { max: 1 };
        hung_step_is_compensated(&name, &dedup, policy, 1, Some(store)).await;
    })
    .await;
}
