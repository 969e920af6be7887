//! Job statuses are an observation, never part of the ack path: with the job store hung
//! (SIGSTOP) or dead (killed), messages with ids are handled and acked at normal speed; the
//! statuses the store could not take wait in the app's bounded buffer and are written once it
//! is back (nothing counted in `cottontail_job_status_dropped_total` at this size).
//!
//! Uses a private `redis-server` child process as the job store (never the shared Redis).
#![cfg(feature = "redis")]
use cottontail_test_support as common;

use std::time::{Duration, Instant};

use common::dedup::outcome;
use common::private_redis::PrivateRedis;
use common::*;
use cottontail::ops::Metrics;
use cottontail::stores::JobStore;
use cottontail::stores::RedisStore;
use cottontail::{App, Queue};

/// Messages per outage.
const N: usize = 50;

/// What N messages of a no-op handler take with a working store (well under a second), with
/// room for a busy machine. Each store operation is limited to 2 s, so statuses recorded in
/// line would take several times this.
const NORMAL: Duration = Duration::from_secs(5);

async fn noop() {}

/// Every sample of the dropped-status counter, summed over its labels.
fn dropped(metrics: &Metrics) -> f64 {
    const NAME: &str = "cottontail_job_status_dropped_total";
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(NAME) && l[NAME.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Messages ready or unacked in `queue`, as the broker counts them.
fn unsettled(queue: &str) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let (q, n) = l.split_once('\t')?;
            (q == queue).then(|| n.trim().parse().ok())?
        })
        .expect("the queue is listed")
}

/// Waits until `id` has its final status in the store.
async fn recorded(store: &RedisStore, id: &str) {
    let (store, id) = (store.clone(), id.to_owned());
    wait_until(
        Duration::from_secs(30),
        &format!("status of {id} recorded"),
        move || {
            let (store, id) = (store.clone(), id.clone());
            async move {
                matches!(store.get(&id).await, Ok(Some(job)) if job.status == "succeeded")
            }
        },
    )
    .await;
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    Hung,
    Dead,
}

#[tokio::test]
async fn a_hung_or_dead_job_store_never_holds_up_acks() {
    bounded(Duration::from_secs(240), async {
        let mut redis = PrivateRedis::start();
        let store = RedisStore::connect(&redis.url(), "jobs").await.unwrap();
        let name = unique("jobs-outage");
        let app = App::new(())
            .job_store(store.clone())
            .handler(Queue::new(&name).expires(EXPIRES), noop);
        let metrics = app.metrics().clone();
        let running = start(app, &unique("app")).await;
        let conn = connect(&unique("client")).await;
        let ch = confirm_channel(&conn).await;

        let before = json_props().with_message_id("before".into());
        publish(&ch, &name, b"{}", before).await;
        recorded(&store, "before").await;

        let mut handled = 1;
        for outage in [Outage::Hung, Outage::Dead] {
            match outage {
                Outage::Hung => redis.signal("STOP"),
                Outage::Dead => redis.kill(),
            }
            let counted = dropped(&metrics);
            let started = Instant::now();
            let items = (0..N)
                .map(|i| {
                    let id = format!("{outage:?}-{i}");
                    (b"{}".to_vec(), json_props().with_message_id(id.into()))
                })
                .collect();
            publish_many(&ch, &name, items).await;
            handled += N;
            let (m, handler) = (metrics.clone(), name.clone());
            wait_until(
                Duration::from_secs(120),
                "all handled and acked",
                move || {
                    let ok = outcome(&m, &handler, "ok");
                    async move { ok >= handled as f64 }
                },
            )
            .await;
            let took = started.elapsed();
            eprintln!("{N} messages handled in {took:?} with the job store {outage:?}");
            assert!(
                took < NORMAL,
                "{N} messages took {took:?} with the job store {outage:?}"
            );
            let queue = name.clone();
            wait_until(Duration::from_secs(10), "all acked", move || {
                let left = unsettled(&queue);
                async move { left == 0 }
            })
            .await;
            match outage {
                Outage::Hung => redis.signal("CONT"),
                Outage::Dead => redis.restart(),
            }
            let id = format!("after-{outage:?}");
            publish(
                &ch,
                &name,
                b"{}",
                json_props().with_message_id(id.as_str().into()),
            )
            .await;
            handled += 1;
            recorded(&store, &id).await;
            // What was handled during the outage is recorded too, nothing was dropped.
            for i in [0, N / 2, N - 1] {
                recorded(&store, &format!("{outage:?}-{i}")).await;
            }
            assert_eq!(dropped(&metrics), counted, "statuses dropped");
        }

        running.stop().await.unwrap();
        delete_queues_quietly(&[name.clone(), format!("{name}.dlq")]).await;
    })
    .await;
}
