//! Dedup, job statuses and exactly-once transactions in a real PostgreSQL: duplicates are acked
//! without running and get the cached reply; instances with their own pools run each id once;
//! a dead holder's lease lapses; with `begin_once`, a handler's own writes and the done mark
//! commit together, and a failure before the commit leaves neither.
//!
//! Uses `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`); every test uses its
//! own scope (the queue name or a unique string) and deletes its rows.
#![cfg(feature = "postgres")]
use cottontail_test_support as common;

use std::time::{Duration, Instant};

use common::dedup::{outcome, pay, Effects, Pay};
use common::*;
use cottontail::stores::postgres::deadpool_postgres::{Manager, Pool};
use cottontail::stores::postgres::tokio_postgres::{self, NoTls};
use cottontail::stores::{Claim, DedupStore};
use cottontail::stores::{JobStatus, JobStore};
use cottontail::stores::{Once, PostgresStore};
use cottontail::{App, Attempt, Dedup, HandlerError, Json, MessageId, Queue, RetryPolicy, State};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn store() -> PostgresStore {
    PostgresStore::connect(&database_url())
        .await
        .expect("connect to PostgreSQL at DATABASE_URL")
}

/// A plain connection for the test's own checks.
async fn sql() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Deletes the dedup rows of `scope`.
async fn cleanup(scope: &str) {
    let db = sql().await;
    db.execute("DELETE FROM cottontail_dedup WHERE scope = $1", &[&scope])
        .await
        .unwrap();
}

/// The dedup row of an id: (state, has_reply).
async fn row(scope: &str, id: &str) -> Option<(String, bool)> {
    sql()
        .await
        .query_opt(
            "SELECT state, has_reply FROM cottontail_dedup WHERE scope = $1 AND id = $2",
            &[&scope, &id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_three_times_runs_once_and_replies_the_same_three_times() {
    let (name, _) = dedup::same_message_three_times("pg-dedup3", Dedup::new(store().await)).await;
    assert_eq!(row(&name, "pay-1").await, Some(("done".into(), true)));
    cleanup(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_their_own_pools_run_each_id_once() {
    let name = unique("pg-dedup-conc");
    let queue = |store: PostgresStore| {
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
    let app_a = App::new(fx.clone()).handler(queue(store().await), pay);
    let app_b = App::new(fx.clone()).handler(queue(store().await), pay);
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
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(queue_depth(&conn, &name).await, 0);
    let q = queue(store().await);
    delete_queues(&handler_queues(&q, &RetryPolicy::default())).await;
    cleanup(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_by_a_dead_instance_lapses_and_the_message_is_processed() {
    // An instance claimed the id, then died without completing or releasing.
    let dead = store().await;
    let live = Dedup::new(store().await);
    let name = common::dedup::an_orphaned_claim_lapses("pg-dedup-lease", &dead, live).await;
    cleanup(&name).await;
}

// ---------------------------------------------------------------------------------------------
// Exactly once with begin_once
// ---------------------------------------------------------------------------------------------

/// A side-effect table of this test only; dropped by `drop_table`.
async fn side_table() -> String {
    let table = format!("fx_{}_{}", std::process::id(), fastrand::u32(..));
    sql()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (message_id text NOT NULL, amount int NOT NULL)"
        ))
        .await
        .unwrap();
    table
}

async fn drop_table(table: &str) {
    sql()
        .await
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
}

async fn side_rows(table: &str, id: &str) -> i64 {
    sql()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE message_id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

#[derive(Clone)]
struct Ledger {
    db: PostgresStore,
    scope: String,
    table: String,
    /// Bodies that reached the insert (committed or not).
    runs: Counter,
    /// Fail attempt 1 after the insert, before the commit.
    fail_first: bool,
}

async fn charge(
    State(l): State<Ledger>,
    MessageId(id): MessageId,
    Attempt(attempt): Attempt,
    Json(p): Json<Pay>,
) -> Result<Json<serde_json::Value>, HandlerError> {
    let id = id.ok_or_else(|| HandlerError::invalid_input("message_id required"))?;
    let tx = match l.db.begin_once(&l.scope, &id).await? {
        Once::Done { reply } => {
            let body = reply.unwrap_or_else(|| b"null".to_vec());
            return Ok(Json(serde_json::from_slice(&body)?));
        }
        Once::New(tx) => tx,
    };
    let amount = p.amount as i32;
    tx.client()
        .execute(
            &format!(
                "INSERT INTO {} (message_id, amount) VALUES ($1, $2)",
                l.table
            ),
            &[&id, &amount],
        )
        .await?;
    l.runs.add(&id);
    // Long enough that concurrent duplicates find the transaction open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if l.fail_first && attempt == 1 {
        // `tx` is dropped here: the insert above rolls back.
        return Err(HandlerError::transient("boom", "failed before the commit"));
    }
    let reply = serde_json::json!({"charged": p.amount, "attempt": attempt});
    tx.commit(Some(serde_json::to_vec(&reply)?)).await?;
    Ok(Json(reply))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_once_commits_the_effect_once_for_three_deliveries_and_replies_the_same() {
    let name = unique("pg-once");
    let table = side_table().await;
    let ledger = Ledger {
        db: store().await,
        scope: name.clone(),
        table: table.clone(),
        runs: Counter::default(),
        fail_first: false,
    };
    let policy = RetryPolicy::fixed(Duration::from_millis(300))
        .jitter(0.0)
        .max_attempts(20);
    // Three at once: the duplicates meet the open transaction, wait or retry, then see Done.
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(3)
        .retry(policy.clone());
    let app = App::new(ledger.clone()).handler(queue.clone(), charge);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;
    for i in 0..3 {
        let props = json_props()
            .with_message_id("charge-1".into())
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id(format!("call-{i}").into());
        publish(&ch, &name, br#"{"amount":42}"#, props).await;
    }
    let got = replies.wait_for(3, Duration::from_secs(30)).await;
    let bodies: Vec<_> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.data).into_owned())
        .collect();
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "same reply each time: {bodies:?}"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&bodies[0]).unwrap(),
        serde_json::json!({"charged": 42, "attempt": 1})
    );
    assert_eq!(
        side_rows(&table, "charge-1").await,
        1,
        "the effect committed once"
    );
    assert_eq!(ledger.runs.get("charge-1"), 1);
    assert_eq!(outcome(&metrics, &name, "ok"), 3.0);
    assert_eq!(outcome(&metrics, &name, "dead_lettered"), 0.0);
    assert_eq!(row(&name, "charge-1").await, Some(("done".into(), true)));
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
    drop_table(&table).await;
    cleanup(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_commit_leaves_no_effect_and_no_dedup_row_so_the_retry_runs() {
    let name = unique("pg-once-fail");
    let table = side_table().await;
    // One connection: the retry reuses the failed attempt's connection, which must come back
    // rolled back (not with the first insert still pending in an open transaction).
    let config: tokio_postgres::Config = database_url().parse().unwrap();
    let pool = Pool::builder(Manager::new(config, NoTls))
        .max_size(1)
        .build()
        .unwrap();
    let db = PostgresStore::from_pool(pool, true).await.unwrap();
    let ledger = Ledger {
        db,
        scope: name.clone(),
        table: table.clone(),
        runs: Counter::default(),
        fail_first: true,
    };
    let policy = RetryPolicy::fixed(Duration::from_millis(1500))
        .jitter(0.0)
        .max_attempts(5);
    let queue = Queue::new(&name).expires(EXPIRES).retry(policy.clone());
    let app = App::new(ledger.clone()).handler(queue.clone(), charge);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(
        &ch,
        &name,
        br#"{"amount":9}"#,
        json_props().with_message_id("charge-2".into()),
    )
    .await;
    let (m, handler) = (metrics.clone(), name.clone());
    wait_until(Duration::from_secs(20), "first attempt failed", move || {
        let retried = outcome(&m, &handler, "retried");
        async move { retried == 1.0 }
    })
    .await;
    // Between the failure and the retry: nothing of attempt 1 is visible.
    assert_eq!(ledger.runs.get("charge-2"), 1);
    assert_eq!(
        side_rows(&table, "charge-2").await,
        0,
        "the insert rolled back"
    );
    assert_eq!(row(&name, "charge-2").await, None, "no dedup row");

    let (m, handler) = (metrics.clone(), name.clone());
    wait_until(Duration::from_secs(20), "the retry succeeded", move || {
        let ok = outcome(&m, &handler, "ok");
        async move { ok == 1.0 }
    })
    .await;
    assert_eq!(
        ledger.runs.get("charge-2"),
        2,
        "the retry ran the body again"
    );
    assert_eq!(side_rows(&table, "charge-2").await, 1);
    assert_eq!(row(&name, "charge-2").await, Some(("done".into(), true)));
    running.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &policy)).await;
    drop_table(&table).await;
    cleanup(&name).await;
}

#[tokio::test]
async fn begin_once_is_exclusive_while_open_and_done_after_commit() {
    let scope = unique("pg-once-store");
    let store = store().await.timeout(Duration::from_millis(600));
    let Ok(Once::New(first)) = store.begin_once(&scope, "m").await else {
        panic!("first begin_once is new");
    };
    assert_eq!(first.id(), "m");
    // Another attempt for the same id waits for the open transaction, then gives up.
    let started = Instant::now();
    let second = store.begin_once(&scope, "m").await;
    assert!(second.is_err(), "{second:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Other ids are not blocked.
    let Ok(Once::New(other)) = store.begin_once(&scope, "other").await else {
        panic!("another id is independent");
    };
    other.rollback().await.unwrap();
    first.commit(Some(b"r".to_vec())).await.unwrap();
    let third = store.begin_once(&scope, "m").await;
    assert!(
        matches!(&third, Ok(Once::Done { reply: Some(r) }) if r == b"r"),
        "{third:?}"
    );
    // Committed without a reply vs with an empty one.
    let Ok(Once::New(tx)) = store.begin_once(&scope, "none").await else {
        panic!()
    };
    tx.commit(None).await.unwrap();
    let Ok(Once::New(tx)) = store.begin_once(&scope, "empty").await else {
        panic!()
    };
    tx.commit(Some(Vec::new())).await.unwrap();
    assert!(matches!(
        store.begin_once(&scope, "none").await,
        Ok(Once::Done { reply: None })
    ));
    assert!(matches!(
        store.begin_once(&scope, "empty").await,
        Ok(Once::Done { reply: Some(r) }) if r.is_empty()
    ));
    // The rows are plain dedup rows: the claim path sees them as done too.
    assert_eq!(
        store.claim(&scope, "m", "x", Duration::from_secs(1)).await,
        Ok(Claim::Done {
            reply: Some(b"r".to_vec())
        })
    );
    cleanup(&scope).await;
}

#[tokio::test]
async fn dropping_a_once_transaction_rolls_it_back() {
    let scope = unique("pg-once-drop");
    let store = store().await;
    let Ok(Once::New(tx)) = store.begin_once(&scope, "m").await else {
        panic!()
    };
    drop(tx);
    let mut again = None;
    for _ in 0..20 {
        match store.begin_once(&scope, "m").await {
            Ok(Once::New(tx)) => {
                again = Some(tx);
                break;
            }
            // The rollback runs in the background; the lock can outlive the drop briefly.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(done) => panic!("rolled back, yet {done:?}"),
        }
    }
    let tx = again.expect("the id is free again after the drop");
    tx.rollback().await.unwrap();
    assert_eq!(row(&scope, "m").await, None);
    // A claim from the Dedup path is not taken over by begin_once (and says why).
    store
        .claim(&scope, "claimed", "a", Duration::from_secs(10))
        .await
        .unwrap();
    let err = store.begin_once(&scope, "claimed").await.unwrap_err();
    assert!(err.0.contains("claimed"), "{err}");
    cleanup(&scope).await;
}

// ---------------------------------------------------------------------------------------------
// The store's semantics, against the real server
// ---------------------------------------------------------------------------------------------

const S: Duration = Duration::from_secs(1);
const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn claims_are_exclusive_until_the_lease_lapses_and_the_owner_can_renew() {
    let h = unique("pg-h");
    let other = unique("pg-other");
    let store = store().await;
    assert_eq!(store.claim(&h, "m", "a", SHORT).await, Ok(Claim::Acquired));
    assert_eq!(store.claim(&h, "m", "b", 10 * S).await, Ok(Claim::Busy));
    assert_eq!(
        store.claim(&other, "m", "b", 10 * S).await,
        Ok(Claim::Acquired),
        "scopes are independent"
    );
    assert_eq!(store.claim(&h, "m", "a", 10 * S).await, Ok(Claim::Acquired));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(
        store.claim(&h, "m", "b", S).await,
        Ok(Claim::Busy),
        "renewed"
    );

    assert_eq!(store.claim(&h, "n", "a", SHORT).await, Ok(Claim::Acquired));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(
        store.claim(&h, "n", "b", S).await,
        Ok(Claim::Acquired),
        "lapsed"
    );
    cleanup(&h).await;
    cleanup(&other).await;
}

#[tokio::test]
async fn racing_claims_have_exactly_one_winner() {
    let h = unique("pg-race");
    let store = store().await;
    for round in 0..10 {
        let id = format!("m{round}");
        let attempts = (0..8).map(|i| {
            let (store, h, id) = (store.clone(), h.clone(), id.clone());
            tokio::spawn(async move { store.claim(&h, &id, &format!("o{i}"), 10 * S).await })
        });
        let results = futures::future::join_all(attempts).await;
        let won = results
            .iter()
            .filter(|r| matches!(r, Ok(Ok(Claim::Acquired))))
            .count();
        let busy = results
            .iter()
            .filter(|r| matches!(r, Ok(Ok(Claim::Busy))))
            .count();
        assert_eq!((won, busy), (1, 7), "{results:?}");
    }
    cleanup(&h).await;
}

#[tokio::test]
async fn done_ids_return_their_reply_until_retention_ends() {
    let h = unique("pg-done");
    let store = store().await;
    store.claim(&h, "m", "a", S).await.unwrap();
    store
        .complete(&h, "m", "a", Some(b"r\0\xff".to_vec()), SHORT)
        .await
        .unwrap();
    assert_eq!(
        store.claim(&h, "m", "b", S).await,
        Ok(Claim::Done {
            reply: Some(b"r\0\xff".to_vec())
        })
    );
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(store.claim(&h, "m", "b", S).await, Ok(Claim::Acquired));

    store.complete(&h, "none", "a", None, 60 * S).await.unwrap();
    store
        .complete(&h, "empty", "a", Some(Vec::new()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim(&h, "none", "b", S).await,
        Ok(Claim::Done { reply: None })
    );
    assert_eq!(
        store.claim(&h, "empty", "b", S).await,
        Ok(Claim::Done {
            reply: Some(Vec::new())
        })
    );
    cleanup(&h).await;
}

#[tokio::test]
async fn release_only_drops_the_owners_claim() {
    let h = unique("pg-release");
    let store = store().await;
    store.claim(&h, "m", "a", 10 * S).await.unwrap();
    store.release(&h, "m", "b").await.unwrap();
    assert_eq!(store.claim(&h, "m", "b", S).await, Ok(Claim::Busy));
    store.release(&h, "m", "a").await.unwrap();
    assert_eq!(row(&h, "m").await, None);
    assert_eq!(store.claim(&h, "m", "b", S).await, Ok(Claim::Acquired));
    store.complete(&h, "m", "b", None, 60 * S).await.unwrap();
    store.release(&h, "m", "b").await.unwrap();
    assert_eq!(
        store.claim(&h, "m", "c", S).await,
        Ok(Claim::Done { reply: None })
    );
    cleanup(&h).await;
}

#[tokio::test]
async fn success_is_recorded_even_after_another_owner_took_over_and_the_first_reply_stays() {
    let h = unique("pg-late");
    let store = store().await;
    store.claim(&h, "m", "a", SHORT).await.unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(store.claim(&h, "m", "b", 10 * S).await, Ok(Claim::Acquired));
    store
        .complete(&h, "m", "a", Some(b"from a".to_vec()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim(&h, "m", "c", S).await,
        Ok(Claim::Done {
            reply: Some(b"from a".to_vec())
        })
    );
    store
        .complete(&h, "m", "b", Some(b"from b".to_vec()), 60 * S)
        .await
        .unwrap();
    assert_eq!(
        store.claim(&h, "m", "c", S).await,
        Ok(Claim::Done {
            reply: Some(b"from a".to_vec())
        })
    );
    cleanup(&h).await;
}

#[tokio::test]
async fn job_statuses_round_trip_and_expire() {
    let store = store().await.job_retention(SHORT);
    let id = unique("pg-job");
    assert_eq!(store.get(&id).await, Ok(None));
    let job = JobStatus {
        status: "running".into(),
        message_id: id.clone(),
        handler: "h".into(),
        attempts: 1,
        created_at: 1.5,
        updated_at: 2.5,
        ..JobStatus::default()
    };
    store.put(job.clone()).await.unwrap();
    assert_eq!(store.get(&id).await, Ok(Some(job.clone())));
    let done = JobStatus {
        status: "succeeded".into(),
        result: Some(serde_json::json!({"ok": true})),
        ..job
    };
    store.put(done.clone()).await.unwrap();
    assert_eq!(store.get(&id).await, Ok(Some(done)));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(store.get(&id).await, Ok(None), "retention over");
    sql()
        .await
        .execute("DELETE FROM cottontail_jobs WHERE message_id = $1", &[&id])
        .await
        .unwrap();
}

#[tokio::test]
async fn job_batches_keep_each_jobs_first_creation_time() {
    let prefix = unique("pg-batch");
    let ids = common::dedup::job_batches_keep_the_first_creation_time(
        std::sync::Arc::new(store().await),
        &prefix,
    )
    .await;
    sql()
        .await
        .execute(
            "DELETE FROM cottontail_jobs WHERE message_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_migration_is_idempotent_and_safe_to_run_concurrently() {
    // In a schema of its own, so the tables really are created here, by four at once.
    let schema = format!(
        "cottontail_test_{}_{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let admin = sql().await;
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let base = database_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    let starts = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PostgresStore::connect(&url).await })
    });
    let mut stores = Vec::new();
    for started in futures::future::join_all(starts).await {
        stores.push(started.unwrap().expect("connect and migrate"));
    }
    let tables: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    // dedup, jobs, sequences, stamps, joins, watches, checkpoints.
    assert_eq!(tables, 7);
    // Again, now that everything exists; and the store works there.
    stores[0].migrate().await.unwrap();
    let h = unique("pg-schema");
    assert_eq!(stores[1].claim(&h, "m", "a", S).await, Ok(Claim::Acquired));
    assert_eq!(stores[2].claim(&h, "m", "b", S).await, Ok(Claim::Busy));
    stores[3].purge_expired().await.unwrap();
    drop(stores);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test]
async fn expired_rows_are_purged() {
    let h = unique("pg-purge");
    let store = store().await;
    for i in 0..5 {
        store
            .complete(&h, &format!("m{i}"), "a", None, Duration::from_millis(1))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(store.purge_expired().await.unwrap() >= 5);
    let left: i64 = sql()
        .await
        .query_one(
            "SELECT count(*) FROM cottontail_dedup WHERE scope = $1",
            &[&h],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn connecting_to_no_database_is_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let started = Instant::now();
    assert!(PostgresStore::connect(&url).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(PostgresStore::connect("not a url").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_completes_once_whatever_the_duplicates() {
    dedup::join_completes_once(std::sync::Arc::new(store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_come_due_in_order() {
    dedup::watches_come_due_in_order(std::sync::Arc::new(store().await)).await;
}
