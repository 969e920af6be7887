//! Checkpoints: a redelivered long job resumes from its last checkpoint (at most the step
//! that was running is done twice), the checkpoint is removed when the job ends (succeeded or
//! dead-lettered), and the Redis and PostgreSQL stores keep the store contract.
use cottontail_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::long_jobs::{steps, Caller, Ran, StepLog};
use common::*;
use cottontail::stores::{CheckpointStore, MemoryCheckpoints, PostgresStore, RedisStore};
use cottontail::{App, Checkpoint, HandlerError, Json, Queue, RetryPolicy};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

fn queue(prefix: &str) -> Queue {
    Queue::new(unique(prefix))
        .concurrency(1)
        .expires(EXPIRES)
        .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(3))
}

#[tokio::test]
async fn a_retried_job_resumes_from_its_last_checkpoint_which_is_removed_when_it_succeeds() {
    let store = Arc::new(MemoryCheckpoints::default());
    let log = StepLog::default();
    let q = queue("ckpt-resume");
    let name = q.name().to_owned();
    let app = start(
        App::new(log.clone())
            .checkpoint_store(store.clone())
            .handler(q, steps),
        &unique("ckpt-resume"),
    )
    .await;
    let conn = connect("ckpt-resume-test").await;
    // The first attempt panics right after saving step 4 (a crash after the checkpoint).
    let caller = Caller::send(
        &conn,
        &name,
        &json!({"steps": 10, "step_ms": 5, "fail_at": 4}),
    )
    .await;
    let (status, body) = caller.final_reply(LIMIT).await;
    assert_eq!(status, "ok", "{body}");
    let ran: Ran = serde_json::from_value(body).unwrap();
    assert_eq!(
        ran,
        Ran {
            steps: 10,
            resumed_from: 4,
            executed: 6
        }
    );
    assert_eq!(
        log.steps(&caller.message_id),
        (1..=10).collect::<Vec<_>>(),
        "every step once"
    );
    assert_eq!(
        store.load(&name, &caller.message_id).await.unwrap(),
        None,
        "the checkpoint goes with the job"
    );
    app.stop().await.unwrap();
}

/// Saves a checkpoint, then fails for good.
async fn save_then_refuse(checkpoint: Checkpoint<u64>) -> Result<Json<()>, HandlerError> {
    checkpoint.save(&7).await?;
    Err(HandlerError::permanent("invalid_input", "no"))
}

#[tokio::test]
async fn a_dead_lettered_job_leaves_no_checkpoint_and_one_without_a_message_id_is_refused() {
    let store = Arc::new(MemoryCheckpoints::default());
    let q = queue("ckpt-dlq");
    let (name, dlq) = (q.name().to_owned(), q.dlq_name());
    let app = start(
        App::new(())
            .checkpoint_store(store.clone())
            .handler(q, save_then_refuse),
        &unique("ckpt-dlq"),
    )
    .await;
    let conn = connect("ckpt-dlq-test").await;
    let caller = Caller::send(&conn, &name, &json!({})).await;
    let (status, body) = caller.final_reply(LIMIT).await;
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "invalid_input");
    assert_eq!(store.load(&name, &caller.message_id).await.unwrap(), None);

    // Checkpoints are keyed by message id: a message without one cannot have any.
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, b"{}", json_props()).await;
    let dead = collect(&conn, &dlq).await.wait_for(2, LIMIT).await;
    let kinds: Vec<_> = dead.iter().map(|d| header_str(d, "x-error")).collect();
    assert!(
        kinds
            .iter()
            .any(|k| k.as_deref() == Some("checkpoints need a message_id")),
        "{kinds:?}"
    );
    app.stop().await.unwrap();
}

/// What every checkpoint store must do: load the last save, keep handlers apart, forget on
/// remove, expire on the TTL.
async fn store_contract(store: &dyn CheckpointStore) {
    let (scope, other) = (unique("scope"), unique("scope"));
    let id = unique("id");
    let hour = Duration::from_secs(3600);
    assert_eq!(store.load(&scope, &id).await.unwrap(), None);
    store.save(&scope, &id, b"1".to_vec(), hour).await.unwrap();
    store.save(&scope, &id, b"22".to_vec(), hour).await.unwrap();
    assert_eq!(store.load(&scope, &id).await.unwrap(), Some(b"22".to_vec()));
    assert_eq!(store.load(&other, &id).await.unwrap(), None);
    store.remove(&scope, &id).await.unwrap();
    assert_eq!(store.load(&scope, &id).await.unwrap(), None);
    store.remove(&scope, &id).await.unwrap();
    store
        .save(&scope, &id, b"3".to_vec(), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.load(&scope, &id).await.unwrap(), None, "expired");
    assert!(store.shared());
}

#[tokio::test]
async fn the_redis_store_keeps_the_checkpoint_contract() {
    let store = RedisStore::connect(&redis_url(), &unique("ckpt"))
        .await
        .expect("Redis at REDIS_URL");
    store_contract(&store).await;
}

#[tokio::test]
async fn the_postgres_store_keeps_the_checkpoint_contract() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let store = PostgresStore::connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL");
    store_contract(&store).await;
}
