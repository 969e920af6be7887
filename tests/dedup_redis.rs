//! Dedup and job statuses in a real Redis: duplicates are acked without running and get the
//! cached reply; instances with their own connections run each id once; a dead holder's lease
//! lapses; a Redis outage defers the message (never runs it unchecked, spends no attempt) until Redis is back.
//!
//! Uses `REDIS_URL` (default `redis://127.0.0.1:6379`) with a unique key prefix per test, and
//! a private `redis-server` child process for the outage tests.
#![cfg(feature = "redis")]
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dedup::{outcome, pay, Effects};
use common::private_redis::{free_port, PrivateRedis};
use common::*;
use cottontail::stores::RedisStore;
use cottontail::stores::{Claim, DedupStore};
use cottontail::stores::{JobStatus, JobStore};
use cottontail::{App, Dedup, Queue, RetryPolicy};

/// A store on the shared Redis under a prefix no other test uses.
async fn store() -> RedisStore {
    RedisStore::connect(&redis_url(), &unique("redis"))
        .await
        .expect("connect to Redis at REDIS_URL")
}

/// Deletes every key under the store's prefix.
async fn cleanup(store: &RedisStore) {
    let mut conn = store.connection();
    let pattern = format!("{}:*", store.prefix());
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Through an app
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_three_times_runs_once_and_replies_the_same_three_times() {
    let store = store().await;
    let (name, reply) =
        dedup::same_message_three_times("redis-dedup3", Dedup::new(store.clone())).await;
    // The reply is what Redis holds for the id.
    let held = store
        .claim(&name, "pay-1", "someone-else", Duration::from_secs(1))
        .await;
    assert_eq!(held, Ok(Claim::Done { reply: Some(reply) }));
    cleanup(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_their_own_connections_run_each_id_once() {
    let name = unique("redis-dedup-conc");
    let prefix = unique("redis");
    // Each instance has its own connection: nothing is shared but the Redis server.
    let store_a = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let store_b = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let queue = |store: RedisStore| {
        let dedup = Dedup::new(store).busy_delay(Duration::from_millis(300));
        Queue::new(&name)
            .expires(EXPIRES)
            .concurrency(4)
            .dedup(dedup)
    };
    let fx = Effects {
        runs: Counter::default(),
        delay: Duration::from_millis(700),
    };
    let app_a = App::new(fx.clone()).handler(queue(store_a.clone()), pay);
    let app_b = App::new(fx.clone()).handler(queue(store_b), pay);
    let metrics = [app_a.metrics().clone(), app_b.metrics().clone()];
    let a = start(app_a, &unique("a")).await;
    let b = start(app_b, &unique("b")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let items = (0..20)
        .flat_map(|i| {
            let props = json_props().with_message_id(format!("m{i}").into());
            [
                (br#"{"amount":1}"#.to_vec(), props.clone()),
                (br#"{"amount":1}"#.to_vec(), props),
            ]
        })
        .collect();
    publish_many(&ch, &name, items).await;
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(30), "20 ids handled", move || {
        let runs = runs.clone();
        async move { runs.keys() == 20 }
    })
    .await;
    let handler = name.clone();
    let counted = metrics.clone();
    wait_until(
        Duration::from_secs(30),
        "20 duplicates counted",
        move || {
            let total: f64 = counted
                .iter()
                .map(|m| outcome(m, &handler, "duplicate"))
                .sum();
            async move { total == 20.0 }
        },
    )
    .await;
    assert_eq!(fx.runs.total(), 20, "{:?}", fx.runs.snapshot());
    let ok: f64 = metrics.iter().map(|m| outcome(m, &name, "ok")).sum();
    assert_eq!(ok, 20.0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(queue_depth(&conn, &name).await, 0);
    let q = queue(store_a.clone());
    delete_queues(&handler_queues(&q, &RetryPolicy::default())).await;
    cleanup(&store_a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_by_a_dead_instance_lapses_and_the_message_is_processed() {
    // An instance claimed the id, then died without completing or releasing.
    let dead = store().await;
    let live = RedisStore::connect(&redis_url(), dead.prefix())
        .await
        .unwrap();
    let live = Dedup::new(live);
    common::dedup::an_orphaned_claim_lapses("redis-dedup-lease", &dead, live).await;
    cleanup(&dead).await;
}

/// Deferrals of `handler` (messages put back in the broker without spending an attempt).
fn deferred(metrics: &cottontail::ops::Metrics, handler: &str, reason: &str) -> f64 {
    let labels = [("handler", handler), ("reason", reason)];
    metric_value(&metrics.render(), "cottontail_deferred_total", &labels).unwrap_or(0.0)
}

/// A store outage spends no attempt: the message waits in the broker (never runs without
/// the check) and runs once when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_defers_the_message_and_it_succeeds_once_after_redis_is_back() {
    let mut redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), "outage").await.unwrap();
    let name = unique("redis-outage");
    let policy = RetryPolicy::fixed(Duration::from_millis(300))
        .jitter(0.0)
        .max_attempts(2);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .dedup(Dedup::new(store.clone()).busy_delay(Duration::from_millis(200)));
    let fx = Effects {
        runs: Counter::default(),
        delay: Duration::ZERO,
    };
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;

    redis.kill();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(
        &ch,
        &name,
        br#"{"amount":7}"#,
        json_props().with_message_id("during-outage".into()),
    )
    .await;
    let (m, handler) = (metrics.clone(), name.clone());
    wait_until(
        Duration::from_secs(20),
        "deferred again and again while Redis is down",
        move || {
            let waits = deferred(&m, &handler, "store_unavailable");
            async move { waits >= 5.0 }
        },
    )
    .await;
    assert_eq!(
        fx.runs.total(),
        0,
        "never runs without the dedup check while the store is down"
    );
    assert_eq!(outcome(&metrics, &name, "retried"), 0.0, "no attempt spent");
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);

    redis.restart();
    let runs = fx.runs.clone();
    wait_until(
        Duration::from_secs(30),
        "processed after Redis is back",
        move || {
            let runs = runs.clone();
            async move { runs.get("during-outage") == 1 }
        },
    )
    .await;
    let (m, handler) = (metrics.clone(), name.clone());
    wait_until(Duration::from_secs(10), "ok counted", move || {
        let ok = outcome(&m, &handler, "ok");
        async move { ok == 1.0 }
    })
    .await;
    assert_eq!(fx.runs.total(), 1, "{:?}", fx.runs.snapshot());
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    // The reconnected store holds the success.
    let held = store
        .claim(&name, "during-outage", "x", Duration::from_secs(1))
        .await;
    assert!(matches!(held, Ok(Claim::Done { .. })), "{held:?}");
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

/// With in-process (immediate) retries in the policy, a store outage still only defers: no
/// copy to a retry queue that does not exist, no spinning redelivery, no crash-loop verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_with_immediate_retries_only_defers() {
    let mut redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), "outage-imm")
        .await
        .unwrap();
    let name = unique("redis-outage-imm");
    let policy = RetryPolicy::exponential(Duration::from_secs(1)).immediate(2);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(policy.clone())
        .dedup(Dedup::new(store.clone()).busy_delay(Duration::from_millis(200)));
    let fx = Effects::new(Duration::ZERO);
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;
    redis.kill();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let items = (0..20)
        .map(|i| {
            let props = json_props().with_message_id(format!("imm-{i}").into());
            (br#"{"amount":1}"#.to_vec(), props)
        })
        .collect();
    publish_many(&ch, &name, items).await;
    let (m, handler) = (metrics.clone(), name.clone());
    wait_until(
        Duration::from_secs(20),
        "each deferred a few times",
        move || {
            let waits = deferred(&m, &handler, "store_unavailable");
            async move { waits >= 100.0 }
        },
    )
    .await;
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    redis.restart();
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(30), "all 20 ran", move || {
        let n = runs.keys();
        async move { n == 20 }
    })
    .await;
    assert!(
        fx.runs.snapshot().values().all(|n| *n == 1),
        "{:?}",
        fx.runs.snapshot()
    );
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    assert_eq!(queue_depth(&conn, &queue.dlq_name()).await, 0);
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
}

/// Issue 16, item 7: Redis killed for 30 s under a stream of 2,000 messages: nothing
/// dead-lettered, nothing lost, each effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_redis_outage_under_a_stream_loses_nothing_and_runs_each_once() {
    const N: usize = 2_000;
    let mut redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), "stream-outage")
        .await
        .unwrap();
    let name = unique("redis-stream-outage");
    // The default retry policy: 5 attempts within 15 s, shorter than the outage.
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .dedup(Dedup::new(store.clone()));
    let fx = Effects::new(Duration::ZERO);
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let stream = {
        let (ch, name) = (ch.clone(), name.clone());
        tokio::spawn(async move {
            // 50 messages a second for 40 s.
            for i in 0..N {
                let props = json_props().with_message_id(format!("s-{i}").into());
                publish(&ch, &name, br#"{"amount":1}"#, props).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(30), "the stream flowing", move || {
        let n = runs.keys();
        async move { n >= 200 }
    })
    .await;
    redis.kill();
    // The fault's length, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    redis.restart();
    bounded(Duration::from_secs(60), stream).await.unwrap();
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(120), "all 2,000 ran", move || {
        let n = runs.keys();
        async move { n == N }
    })
    .await;
    let twice: Vec<_> = fx
        .runs
        .snapshot()
        .into_iter()
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    assert_eq!(queue_depth(&conn, &queue.dlq_name()).await, 0);
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_statuses_written_by_one_instance_are_read_by_another() {
    let name = unique("redis-jobs");
    let prefix = unique("redis");
    let writer = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let reader = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let queue = Queue::new(&name).expires(EXPIRES);
    let fx = Effects {
        runs: Counter::default(),
        delay: Duration::ZERO,
    };
    let app = App::new(fx.clone())
        .job_store(writer.clone())
        .handler(queue.clone(), pay);
    let running = start(app, &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let id = unique("job");
    publish(
        &ch,
        &name,
        br#"{"amount":3}"#,
        json_props().with_message_id(id.as_str().into()),
    )
    .await;
    let (r, i) = (reader.clone(), id.clone());
    wait_until(Duration::from_secs(20), "job succeeded", move || {
        let (r, i) = (r.clone(), i.clone());
        async move {
            matches!(r.get(&i).await, Ok(Some(JobStatus { ref status, .. })) if status == "succeeded")
        }
    })
    .await;
    let job = reader.get(&id).await.unwrap().unwrap();
    assert_eq!(job.handler, name);
    assert_eq!(
        job.result,
        Some(serde_json::json!({"charged": 3, "run": 1}))
    );
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
    cleanup(&writer).await;
}

// ---------------------------------------------------------------------------------------------
// The store's semantics, against the real server
// ---------------------------------------------------------------------------------------------

const S: Duration = Duration::from_secs(1);
const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn claims_are_exclusive_until_the_lease_lapses_and_the_owner_can_renew() {
    let store = store().await;
    assert_eq!(store.claim("h", "m", "a", SHORT).await, Ok(Claim::Acquired));
    assert_eq!(store.claim("h", "m", "b", 10 * S).await, Ok(Claim::Busy));
    assert_eq!(
        store.claim("other-handler", "m", "b", 10 * S).await,
        Ok(Claim::Acquired),
        "scopes are independent"
    );
    // The owner renews its own claim (and extends it).
    assert_eq!(
        store.claim("h", "m", "a", 10 * S).await,
        Ok(Claim::Acquired)
    );
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(
        store.claim("h", "m", "b", S).await,
        Ok(Claim::Busy),
        "renewed"
    );

    assert_eq!(store.claim("h", "n", "a", SHORT).await, Ok(Claim::Acquired));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(
        store.claim("h", "n", "b", S).await,
        Ok(Claim::Acquired),
        "lapsed"
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn done_ids_return_their_reply_until_retention_ends() {
    let store = store().await;
    store.claim("h", "m", "a", S).await.unwrap();
    store
        .complete("h", "m", "a", Some(b"r\0\xff".to_vec()), SHORT)
        .await
        .unwrap();
    assert_eq!(
        store.claim("h", "m", "b", S).await,
        Ok(Claim::Done {
            reply: Some(b"r\0\xff".to_vec())
        }),
        "binary replies survive"
    );
    assert_eq!(
        store.claim("h", "m", "a", S).await,
        Ok(Claim::Done {
            reply: Some(b"r\0\xff".to_vec())
        }),
        "even for the former owner"
    );
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Acquired));

    // No reply and an empty reply are different answers.
    store
        .complete("h", "none", "a", None, 60 * S)
        .await
        .unwrap();
    store
        .complete("h", "empty", "a", Some(Vec::new()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim("h", "none", "b", S).await,
        Ok(Claim::Done { reply: None })
    );
    assert_eq!(
        store.claim("h", "empty", "b", S).await,
        Ok(Claim::Done {
            reply: Some(Vec::new())
        })
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn release_only_drops_the_owners_claim() {
    let store = store().await;
    store.claim("h", "m", "a", 10 * S).await.unwrap();
    store.release("h", "m", "b").await.unwrap();
    assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Busy));
    store.release("h", "m", "a").await.unwrap();
    assert_eq!(store.claim("h", "m", "b", S).await, Ok(Claim::Acquired));
    // A done id is not released by anyone.
    store.complete("h", "m", "b", None, 60 * S).await.unwrap();
    store.release("h", "m", "b").await.unwrap();
    assert_eq!(
        store.claim("h", "m", "c", S).await,
        Ok(Claim::Done { reply: None })
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn success_is_recorded_even_after_another_owner_took_over_and_the_first_reply_stays() {
    let store = store().await;
    store.claim("h", "m", "a", SHORT).await.unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(
        store.claim("h", "m", "b", 10 * S).await,
        Ok(Claim::Acquired)
    );
    // `a` finishes late: success is success.
    store
        .complete("h", "m", "a", Some(b"from a".to_vec()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim("h", "m", "c", S).await,
        Ok(Claim::Done {
            reply: Some(b"from a".to_vec())
        })
    );
    // `b` also succeeds: duplicates keep getting the reply they got before.
    store
        .complete("h", "m", "b", Some(b"from b".to_vec()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim("h", "m", "c", S).await,
        Ok(Claim::Done {
            reply: Some(b"from a".to_vec())
        })
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn ids_are_kept_as_they_came_in_the_key() {
    let store = store().await;
    let odd = "a b:c\n\u{e9}\u{1f600}*?[x]";
    assert_eq!(store.claim("h", odd, "a", S).await, Ok(Claim::Acquired));
    let mut conn = store.connection();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(store.dedup_key("h", odd))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1);
    let mut expected = format!("{}:dedup:h:", store.prefix()).into_bytes();
    expected.extend_from_slice(odd.as_bytes());
    assert_eq!(store.dedup_key("h", odd), expected);
    assert_eq!(
        store.claim("h", "a b:c", "b", S).await,
        Ok(Claim::Acquired),
        "a prefix of the id is another id"
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn job_statuses_round_trip_and_expire() {
    let store = store().await.job_retention(SHORT);
    assert_eq!(store.get("missing").await, Ok(None));
    let job = JobStatus {
        status: "running".into(),
        message_id: "j1".into(),
        handler: "h".into(),
        attempts: 1,
        created_at: 1.5,
        updated_at: 2.5,
        ..JobStatus::default()
    };
    store.put(job.clone()).await.unwrap();
    assert_eq!(store.get("j1").await, Ok(Some(job.clone())));
    let done = JobStatus {
        status: "succeeded".into(),
        result: Some(serde_json::json!({"ok": true})),
        ..job
    };
    store.put(done.clone()).await.unwrap();
    assert_eq!(store.get("j1").await, Ok(Some(done)));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(store.get("j1").await, Ok(None), "retention over");
    cleanup(&store).await;
}

#[tokio::test]
async fn job_batches_keep_each_jobs_first_creation_time() {
    let store = store().await;
    common::dedup::job_batches_keep_the_first_creation_time(Arc::new(store.clone()), "batch").await;
    cleanup(&store).await;
}

#[tokio::test]
async fn a_hung_redis_is_an_error_within_the_timeout_not_a_stuck_call() {
    let mut redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), "hung")
        .await
        .unwrap()
        .timeout(Duration::from_millis(500));
    assert_eq!(store.claim("h", "m", "a", S).await, Ok(Claim::Acquired));
    redis.signal("STOP");
    let started = Instant::now();
    let claim = store.claim("h", "m", "a", S).await;
    let release = store.release("h", "m", "a").await;
    let job = store.get("j").await;
    redis.signal("CONT");
    assert!(claim.is_err(), "{claim:?}");
    assert!(release.is_err(), "{release:?}");
    assert!(job.is_err(), "{job:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // And it answers again once Redis does.
    let store = store.timeout(Duration::from_secs(2));
    let mut again = Err(cottontail::stores::StoreError(String::new()));
    for _ in 0..20 {
        again = store.claim("h", "m", "a", S).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(again, Ok(Claim::Acquired));
    redis.kill();
}

#[tokio::test]
async fn connecting_to_no_redis_is_an_error() {
    let port = free_port();
    let result = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "x").await;
    assert!(result.is_err());
    assert!(RedisStore::connect("not a url", "x").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_completes_once_whatever_the_duplicates() {
    let store = store().await;
    dedup::join_completes_once(Arc::new(store.clone())).await;
    cleanup(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_come_due_in_order() {
    let store = store().await;
    dedup::watches_come_due_in_order(Arc::new(store.clone())).await;
    cleanup(&store).await;
}
