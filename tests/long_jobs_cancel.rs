//! Cancellation across two instances: a running job stops within a second wherever it runs
//! (`Client::cancel`), a queued one never runs (`POST /jobs/{id}/cancel`, behind the API
//! token); the caller gets an `error` reply of kind `cancelled`, `/jobs/{id}` says
//! `cancelled`, the message is acked and not dead-lettered, and the metric outcome is
//! `cancelled`.
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dedup::outcome;
use common::long_jobs::{steps, Caller, StepLog};
use common::*;
use cottontail::client::Client;
use cottontail::stores::{CheckpointStore, JobStore, MemoryJobs, RedisStore, CANCELLED_SCOPE};
use cottontail::{App, Queue, Running};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "long-jobs-token";

/// Two instances of one service on `queue` (one job at a time each), sharing a job store as
/// Redis would; the first serves HTTP with an API token.
struct Fleet {
    queue: String,
    log: StepLog,
    jobs: Arc<MemoryJobs>,
    apps: Vec<(Running, cottontail::ops::Metrics)>,
}

impl Fleet {
    async fn start(prefix: &str) -> Fleet {
        let queue = unique(prefix);
        let log = StepLog::default();
        let jobs = Arc::new(MemoryJobs::default());
        let mut apps = Vec::new();
        for i in 0..2 {
            let app = App::new(log.clone())
                .shared_job_store(jobs.clone())
                .handler(
                    Queue::new(&queue)
                        .concurrency(1)
                        .prefetch(1)
                        .expires(EXPIRES),
                    steps,
                );
            let metrics = app.metrics().clone();
            let mut config = config(&unique(&format!("{prefix}-{i}")));
            if i == 0 {
                config = config.http("127.0.0.1:0".parse().unwrap()).api_token(TOKEN);
            }
            apps.push((start_with(app, config).await, metrics));
        }
        Fleet {
            queue,
            log,
            jobs,
            apps,
        }
    }

    fn http(&self) -> std::net::SocketAddr {
        self.apps[0].0.http_addr().unwrap()
    }

    fn cancelled(&self) -> f64 {
        let handler = self.queue.as_str();
        self.apps
            .iter()
            .map(|(_, m)| outcome(m, handler, "cancelled"))
            .sum()
    }

    async fn status(&self, id: &str) -> Option<String> {
        self.jobs.get(id).await.unwrap().map(|j| j.status)
    }

    async fn stop(self) {
        for (app, _) in self.apps {
            app.stop().await.unwrap();
        }
        delete_queues(&[self.queue.clone(), format!("{}.dlq", self.queue)]).await;
    }
}

#[tokio::test]
async fn a_running_job_stops_within_a_second_on_whichever_instance_runs_it() {
    let fleet = Fleet::start("cancel-running").await;
    let conn = connect("cancel-running-test").await;
    let caller = Caller::send(&conn, &fleet.queue, &json!({"steps": 1000, "step_ms": 50})).await;
    caller.wait_step(3, LIMIT).await;
    let client = Client::connect(&amqp_url(), "cancel-running-client")
        .await
        .unwrap();
    let asked = Instant::now();
    client.cancel(&caller.message_id).await.unwrap();
    let (status, body) = caller.final_reply(LIMIT).await;
    let took = asked.elapsed();
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "cancelled", "{body}");
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");
    // It stays stopped.
    let ran = fleet.log.steps(&caller.message_id).len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.log.steps(&caller.message_id).len(), ran);
    let id = caller.message_id.clone();
    wait_until(LIMIT, "status cancelled", || {
        let (fleet, id) = (&fleet, id.clone());
        async move { fleet.status(&id).await.as_deref() == Some("cancelled") }
    })
    .await;
    assert_eq!(fleet.cancelled(), 1.0);
    assert_eq!(
        queue_depth(&conn, &format!("{}.dlq", fleet.queue)).await,
        0,
        "acked, not dead-lettered"
    );
    assert_eq!(
        queue_counts(&conn, &fleet.queue).await.0,
        0,
        "nothing requeued"
    );
    let path = format!("/jobs/{}", caller.message_id);
    let auth = format!("Bearer {TOKEN}");
    let (code, job) = http_get_with(fleet.http(), &path, &[("Authorization", &auth)]).await;
    assert_eq!(code, 200);
    assert!(job.contains(r#""status":"cancelled""#), "{job}");
    client.close().await;
    fleet.stop().await;
}

#[tokio::test]
async fn a_queued_job_cancelled_over_http_never_runs() {
    let fleet = Fleet::start("cancel-queued").await;
    let conn = connect("cancel-queued-test").await;
    // Both instances busy with one job each; the third waits in the queue.
    let busy = [
        Caller::send(&conn, &fleet.queue, &json!({"steps": 1000, "step_ms": 50})).await,
        Caller::send(&conn, &fleet.queue, &json!({"steps": 1000, "step_ms": 50})).await,
    ];
    for caller in &busy {
        caller.wait_step(1, LIMIT).await;
    }
    let queued = Caller::send(&conn, &fleet.queue, &json!({"steps": 3, "step_ms": 1})).await;

    let path = format!("/jobs/{}/cancel", queued.message_id);
    let (code, _) = http_post_with(fleet.http(), &path, &[]).await;
    assert_eq!(code, 401, "cancel is behind the API token");
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_post_with(fleet.http(), &path, &[("Authorization", &auth)]).await;
    assert_eq!(code, 202, "{body}");
    // Free the instances; the queued job is delivered and skipped.
    for caller in &busy {
        let path = format!("/jobs/{}/cancel", caller.message_id);
        let (code, _) = http_post_with(fleet.http(), &path, &[("Authorization", &auth)]).await;
        assert_eq!(code, 202);
    }
    let (status, body) = queued.final_reply(LIMIT).await;
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "cancelled", "{body}");
    assert!(
        queued.progress_steps().is_empty(),
        "no progress: it never ran"
    );
    assert!(fleet.log.steps(&queued.message_id).is_empty(), "never ran");
    for caller in &busy {
        assert_eq!(
            caller.final_reply(LIMIT).await.1["error"]["kind"],
            "cancelled"
        );
    }
    let id = queued.message_id.clone();
    wait_until(LIMIT, "status cancelled", || {
        let (fleet, id) = (&fleet, id.clone());
        async move { fleet.status(&id).await.as_deref() == Some("cancelled") }
    })
    .await;
    assert_eq!(fleet.cancelled(), 3.0);
    assert_eq!(queue_depth(&conn, &format!("{}.dlq", fleet.queue)).await, 0);
    fleet.stop().await;
}

#[tokio::test]
async fn an_instance_started_after_the_cancel_skips_the_job_through_the_shared_store() {
    let store = RedisStore::connect(&redis_url(), &unique("cancel-store"))
        .await
        .expect("Redis at REDIS_URL");
    let queue = unique("cancel-later");
    let log = StepLog::default();
    let instance = |name: &str| {
        let app = App::new(log.clone())
            .checkpoint_store(Arc::new(store.clone()))
            .handler(
                Queue::new(&queue)
                    .concurrency(1)
                    .prefetch(1)
                    .expires(EXPIRES),
                steps,
            );
        let metrics = app.metrics().clone();
        let config = config(&unique(name)).shutdown_timeout(Duration::from_millis(200));
        async move { (start_with(app, config).await, metrics) }
    };
    let (first, first_metrics) = instance("cancel-later-a").await;
    let conn = connect("cancel-later-test").await;
    // The first instance is busy; the job to cancel waits behind it.
    let busy = Caller::send(&conn, &queue, &json!({"steps": 20, "step_ms": 50})).await;
    busy.wait_step(1, LIMIT).await;
    let queued = Caller::send(&conn, &queue, &json!({"steps": 3, "step_ms": 1})).await;
    let client = Client::connect(&amqp_url(), "cancel-later-client")
        .await
        .unwrap();
    client.cancel(&queued.message_id).await.unwrap();
    let id = queued.message_id.clone();
    wait_until(LIMIT, "the cancel in the store", || {
        let (store, id) = (store.clone(), id.clone());
        async move { store.load(CANCELLED_SCOPE, &id).await.unwrap().is_some() }
    })
    .await;
    // Gone before the job was delivered: the cancel is known only to the store now.
    first.stop().await.unwrap();
    assert_eq!(
        outcome(&first_metrics, &queue, "cancelled"),
        0.0,
        "not delivered there"
    );
    let (second, second_metrics) = instance("cancel-later-b").await;
    let (status, body) = queued.final_reply(LIMIT).await;
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "cancelled", "{body}");
    assert!(log.steps(&queued.message_id).is_empty(), "never ran");
    assert_eq!(outcome(&second_metrics, &queue, "cancelled"), 1.0);
    assert_eq!(
        busy.final_reply(LIMIT).await.0,
        "ok",
        "the other job was not touched"
    );
    client.close().await;
    second.stop().await.unwrap();
    delete_queues(&[queue.clone(), format!("{queue}.dlq")]).await;
}
