//! Sequence state and stamps in a real Redis and a real PostgreSQL: `next` starts at 1, the
//! compare-and-set moves only from the current value (exactly one of many racers wins, also
//! on a key never seen), stamps from many tasks are 1..=N without gap or duplicate, scopes and
//! keys are independent, and an older database gets the new tables. Then the acceptance test:
//! three worker processes apply 200 keys × 50 shuffled, duplicated events in order while one
//! is killed with SIGKILL and replaced; the state in the shared store carries the survivors
//! (and the replacement) on from where the dead one left off.
//!
//! Uses `REDIS_URL` (default `redis://127.0.0.1:6379`) with a unique key prefix per test and
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) with unique scopes and
//! keys; every test deletes its keys, rows, queues and files, also when it fails.
#![cfg(all(feature = "redis", feature = "postgres"))]
use cottontail_test_support as common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cottontail::stores::postgres::deadpool_postgres::{Manager, Pool};
use cottontail::stores::postgres::tokio_postgres::{self, NoTls};
use cottontail::stores::{MemorySequences, SequenceStamper, SequenceStore};
use cottontail::stores::{PostgresStore, RedisStore};
use cottontail::{App, HandlerError, Ordering, Queue, Sequence, State};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn redis_store(prefix: &str) -> RedisStore {
    RedisStore::connect(&redis_url(), prefix)
        .await
        .expect("connect to Redis at REDIS_URL")
}

/// Deletes every key under `prefix`.
async fn redis_cleanup(prefix: &str) {
    let Ok(store) = RedisStore::connect(&redis_url(), prefix).await else {
        return;
    };
    let mut conn = store.connection();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

async fn redis_key_count(prefix: &str) -> usize {
    let store = redis_store(prefix).await;
    let mut conn = store.connection();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.len()
}

async fn pg_store() -> PostgresStore {
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

/// Deletes the sequence rows of `scopes` and the stamps whose key starts with `stamp_prefix`.
async fn pg_cleanup(scopes: &[&str], stamp_prefix: &str) {
    let Ok((db, connection)) = tokio_postgres::connect(&database_url(), NoTls).await else {
        return;
    };
    tokio::spawn(connection);
    for scope in scopes {
        let _ = db
            .execute(
                "DELETE FROM cottontail_sequences WHERE scope = $1",
                &[scope],
            )
            .await;
    }
    let _ = db
        .execute(
            "DELETE FROM cottontail_stamps WHERE left(key, length($1)) = $1",
            &[&stamp_prefix],
        )
        .await;
}

/// Runs `body` in its own task so that `cleanup` runs whether it passes or panics; then
/// re-raises the panic.
async fn with_cleanup<B, C>(body: B, cleanup: C)
where
    B: std::future::Future<Output = ()> + Send + 'static,
    C: std::future::Future<Output = ()>,
{
    let outcome = tokio::spawn(body).await;
    cleanup.await;
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("test body did not finish: {error}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Semantics, shared by both stores
// ---------------------------------------------------------------------------------------------

/// The [`SequenceStore`] contract, as [`MemorySequences`] defines it. `scope` and `other` are
/// unused scopes; every key used starts with `tag`.
async fn compare_and_set<S: SequenceStore>(store: &S, scope: &str, other: &str, tag: &str) {
    let k = format!("{tag}:order 1/é");
    assert_eq!(store.next(scope, &k).await, Ok(1), "an unseen key is at 1");
    assert_eq!(
        store.advance(scope, &k, 2, 3).await,
        Ok(false),
        "an unseen key is at 1, not 2"
    );
    assert_eq!(
        store.next(scope, &k).await,
        Ok(1),
        "a failed CAS changes nothing"
    );
    assert_eq!(store.advance(scope, &k, 1, 2).await, Ok(true));
    assert_eq!(
        store.advance(scope, &k, 1, 2).await,
        Ok(false),
        "moved already"
    );
    assert_eq!(store.next(scope, &k).await, Ok(2));
    assert_eq!(store.advance(scope, &k, 2, 3).await, Ok(true));
    assert_eq!(store.advance(scope, &k, 3, 7).await, Ok(true), "skip ahead");
    assert_eq!(store.advance(scope, &k, 1, 2).await, Ok(false));
    assert_eq!(store.advance(scope, &k, 6, 7).await, Ok(false));
    assert_eq!(store.next(scope, &k).await, Ok(7));
    // A reset to 1 (operator) and on again.
    assert_eq!(store.advance(scope, &k, 7, 1).await, Ok(true));
    assert_eq!(store.next(scope, &k).await, Ok(1));
    assert_eq!(store.advance(scope, &k, 1, 2).await, Ok(true));
    // Large numbers stay exact (past Lua's and f64's 2^53).
    let big = (1u64 << 60) + 1;
    assert_eq!(store.advance(scope, &k, 2, big).await, Ok(true));
    assert_eq!(store.next(scope, &k).await, Ok(big));
    assert_eq!(store.advance(scope, &k, big - 1, 5).await, Ok(false));
    assert_eq!(store.advance(scope, &k, big, big + 1).await, Ok(true));
    assert_eq!(store.next(scope, &k).await, Ok(big + 1));

    // Scopes and keys are independent.
    assert_eq!(store.next(other, &k).await, Ok(1));
    assert_eq!(store.advance(other, &k, 1, 2).await, Ok(true));
    assert_eq!(store.next(other, &k).await, Ok(2));
    assert_eq!(store.next(scope, &k).await, Ok(big + 1));
    let k2 = format!("{tag}:order 2");
    assert_eq!(store.next(scope, &k2).await, Ok(1));
}

/// Many racers on one CAS: exactly one wins, on an unseen key (the insert race) and on a
/// stored one; and counting up together, each step is won once.
async fn racing<S: SequenceStore + Clone>(store: &S, scope: &str, tag: &str) {
    for round in 0..20 {
        let k = format!("{tag}:race-{round}");
        for from in [1u64, 2] {
            let barrier = Arc::new(tokio::sync::Barrier::new(8));
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (store, scope, k, barrier) =
                        (store.clone(), scope.to_owned(), k.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.advance(&scope, &k, from, from + 1).await.unwrap()
                    })
                })
                .collect();
            let mut wins = 0;
            for r in racers {
                wins += usize::from(r.await.unwrap());
            }
            assert_eq!(wins, 1, "{k}: CAS from {from} won {wins} times");
            assert_eq!(store.next(scope, &k).await, Ok(from + 1));
        }
    }

    let k = format!("{tag}:count");
    let steps: Vec<_> = (0..8)
        .map(|_| {
            let (store, scope, k) = (store.clone(), scope.to_owned(), k.clone());
            tokio::spawn(async move {
                let mut won = Vec::new();
                loop {
                    let n = store.next(&scope, &k).await.unwrap();
                    if n > 200 {
                        return won;
                    }
                    if store.advance(&scope, &k, n, n + 1).await.unwrap() {
                        won.push(n);
                    }
                }
            })
        })
        .collect();
    let mut won = Vec::new();
    for s in steps {
        won.extend(s.await.unwrap());
    }
    won.sort_unstable();
    assert_eq!(
        won,
        (1..=200).collect::<Vec<_>>(),
        "each step won exactly once"
    );
    assert_eq!(store.next(scope, &k).await, Ok(201));
}

/// Stamps from 8 concurrent tasks are 1..=N: no duplicate, no gap; keys are independent.
async fn stamping<S: SequenceStamper + Clone>(store: &S, tag: &str) {
    let k = format!("{tag}:stamped");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..125 {
                    got.push(store.stamp(&k).await.unwrap());
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one task's stamps increase"
        );
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1000).collect::<Vec<_>>(), "1..=1000, once each");
    assert_eq!(store.stamp(&k).await, Ok(1001));
    let other = format!("{tag}:other key/é");
    assert_eq!(store.stamp(&other).await, Ok(1));
    assert_eq!(store.stamp(&other).await, Ok(2));
    assert_eq!(store.stamp(&k).await, Ok(1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sequences_compare_and_set_race_and_stamp() {
    let prefix = unique("redis-seq");
    let p = prefix.clone();
    let body = async move {
        let store = redis_store(&p).await;
        compare_and_set(&store, "h1", "h2", "t").await;
        racing(&store, "h1", "t").await;
        stamping(&store, "t").await;

        // The layout is the documented one, with no expiry.
        let mut conn = store.connection();
        let raw: Option<String> = redis::cmd("GET")
            .arg(store.sequence_key("h1", "t:count"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(raw.as_deref(), Some("201"));
        assert_eq!(
            store.sequence_key("h1", "t:count"),
            format!("{p}:seq:h1:t:count").into_bytes()
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(store.sequence_key("h1", "t:count"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ttl, -1, "sequence state never expires");
        let raw: Option<String> = redis::cmd("GET")
            .arg(format!("{p}:stamp:t:stamped"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(raw.as_deref(), Some("1002"));
        let ttl: i64 = redis::cmd("PTTL")
            .arg(store.stamp_key("t:stamped"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ttl, -1, "stamps never expire");

        // A value cottontail did not write is an error, not a silent 1.
        let odd = store.sequence_key("h1", "t:odd");
        let _: () = redis::cmd("SET")
            .arg(&odd)
            .arg("05")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(store.next("h1", "t:odd").await.is_err());
        let _: () = redis::cmd("SET")
            .arg(store.stamp_key("t:odd"))
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(store.stamp("t:odd").await.is_err());
    };
    with_cleanup(body, redis_cleanup(&prefix)).await;
    assert_eq!(redis_key_count(&prefix).await, 0, "keys cleaned up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sequences_compare_and_set_race_and_stamp() {
    let tag = unique("pg-seq");
    let (s1, s2) = (format!("{tag}/h1"), format!("{tag}/h2"));
    let scopes = [s1.clone(), s2.clone()];
    let t = tag.clone();
    let body = async move {
        let store = pg_store().await;
        compare_and_set(&store, &s1, &s2, &t).await;
        racing(&store, &s1, &t).await;
        stamping(&store, &t).await;

        let db = sql().await;
        let row = db
            .query_one(
                "SELECT next FROM cottontail_sequences WHERE scope = $1 AND key = $2",
                &[&s1, &format!("{t}:count")],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 201);
        let row = db
            .query_one(
                "SELECT last FROM cottontail_stamps WHERE key = $1",
                &[&format!("{t}:stamped")],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1002);
        // A failed CAS on an unseen key leaves no row behind.
        assert_eq!(
            store.advance(&s1, &format!("{t}:none"), 5, 6).await,
            Ok(false)
        );
        let rows = db
            .query(
                "SELECT 1 FROM cottontail_sequences WHERE scope = $1 AND key = $2",
                &[&s1, &format!("{t}:none")],
            )
            .await
            .unwrap();
        assert!(rows.is_empty());
        // Numbers past bigint are refused, not wrapped.
        assert!(store
            .advance(&s1, &format!("{t}:none"), 1, u64::MAX)
            .await
            .is_err());
    };
    let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
    with_cleanup(body, pg_cleanup(&scope_refs, &tag)).await;
    let db = sql().await;
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM cottontail_sequences WHERE left(scope, length($1)) = $1)
                  + (SELECT count(*) FROM cottontail_stamps WHERE left(key, length($1)) = $1)",
            &[&tag],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "rows cleaned up");
}

/// The schema the store created before it kept sequences.
const PREVIOUS_MIGRATION: &str = "\
CREATE TABLE cottontail_dedup (
    scope text NOT NULL, id text NOT NULL, state text NOT NULL, owner text, reply bytea,
    has_reply boolean NOT NULL DEFAULT false, expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, id));
CREATE INDEX cottontail_dedup_expires_at ON cottontail_dedup (expires_at);
CREATE TABLE cottontail_jobs (
    message_id text PRIMARY KEY, status jsonb NOT NULL, expires_at timestamptz NOT NULL);
CREATE INDEX cottontail_jobs_expires_at ON cottontail_jobs (expires_at);";

/// A store on database `db` (of the same server), migrating if asked.
async fn store_on(db: &str, migrate: bool) -> PostgresStore {
    let mut config: tokio_postgres::Config = database_url().parse().unwrap();
    config.dbname(db);
    let pool = Pool::builder(Manager::new(config, NoTls))
        .max_size(2)
        .build()
        .unwrap();
    PostgresStore::from_pool(pool, migrate).await.unwrap()
}

async fn tables_in(db: &str) -> Vec<String> {
    let mut config: tokio_postgres::Config = database_url().parse().unwrap();
    config.dbname(db);
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let mut names: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'cottontail%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_the_previous_version_gets_the_sequence_tables() {
    let db = format!(
        "cottontail_migration_{}_{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let admin = sql().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let name = db.clone();
    let body = async move {
        let mut config: tokio_postgres::Config = database_url().parse().unwrap();
        config.dbname(&name);
        let (old, connection) = config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        old.batch_execute(PREVIOUS_MIGRATION).await.unwrap();
        assert_eq!(
            tables_in(&name).await,
            ["cottontail_dedup", "cottontail_jobs"]
        );

        let store = store_on(&name, true).await;
        assert_eq!(
            tables_in(&name).await,
            [
                "cottontail_checkpoints",
                "cottontail_dedup",
                "cottontail_jobs",
                "cottontail_joins",
                "cottontail_sequences",
                "cottontail_stamps",
                "cottontail_watches"
            ],
            "the missing tables were noticed and created"
        );
        assert_eq!(store.advance("h", "k", 1, 2).await, Ok(true));
        assert_eq!(store.stamp("k").await, Ok(1));
        // Migrating again (everything present) changes nothing.
        let again = store_on(&name, true).await;
        assert_eq!(again.next("h", "k").await, Ok(2));
        assert_eq!(again.stamp("k").await, Ok(2));
        store.migrate().await.unwrap();
        assert_eq!(store.next("h", "k").await, Ok(2));
    };
    let drop_db = async {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    };
    with_cleanup(body, drop_db).await;
}

// ---------------------------------------------------------------------------------------------
// Acceptance: ordered delivery across worker processes, one killed with SIGKILL
// ---------------------------------------------------------------------------------------------

const CHILD_QUEUE: &str = "COTTONTAIL_TEST_ORDERED_STORE_QUEUE";
const CHILD_LEDGER: &str = "COTTONTAIL_TEST_ORDERED_STORE_LEDGER";
/// `redis:<prefix>` or `postgres`.
const CHILD_STORE: &str = "COTTONTAIL_TEST_ORDERED_STORE_KIND";

const PARTITIONS: u16 = 6;
/// Longer than [`EXPIRES`]: the delay (park) tier and the DLQ have no consumers, so the broker
/// deletes them `x-expires` after their last declaration even while the workers publish to
/// them, and on a loaded machine this test can outlast [`EXPIRES`]. The test deletes its
/// queues itself; this is only the backstop.
const ORDERED_EXPIRES: Duration = Duration::from_secs(1800);
const KEYS: usize = 200;
const PER_KEY: u64 = 50;

fn ordered_queue(name: &str, store: Arc<dyn SequenceStore>) -> Queue {
    Queue::new(name).expires(ORDERED_EXPIRES).ordered(
        Ordering::shared(store)
            .partitions(PARTITIONS)
            .prefetch(400)
            .hold_limit(300)
            .park_delay(Duration::from_millis(200))
            .rebalance_interval(Duration::from_millis(300)),
    )
}

/// Applies an event: a little work, then one line `key seq` appended to the shared ledger (one
/// `write` on an `O_APPEND` file, so lines of different processes never interleave).
async fn apply(State(ledger): State<String>, seq: Sequence) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_micros(200)).await;
    let line = format!("{} {}\n", seq.key, seq.number);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)?
        .write_all(line.as_bytes())?;
    Ok(())
}

/// The worker process: a no-op unless the parent test set the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_worker() {
    let (Ok(name), Ok(ledger), Ok(kind)) = (
        std::env::var(CHILD_QUEUE),
        std::env::var(CHILD_LEDGER),
        std::env::var(CHILD_STORE),
    ) else {
        return;
    };
    let store: Arc<dyn SequenceStore> = match kind.split_once(':') {
        Some(("redis", prefix)) => Arc::new(redis_store(prefix).await),
        _ if kind == "postgres" => Arc::new(pg_store().await),
        _ => panic!("unknown store {kind:?}"),
    };
    let config = config(&unique("ordered-store-child")).shutdown_timeout(Duration::from_secs(20));
    App::new(ledger)
        .handler(ordered_queue(&name, store), apply)
        .run(config)
        .await
        .unwrap();
}

/// Every application per key, in ledger order. Only complete lines count unless `strict`
/// (after every writer is gone), when a malformed line fails the test.
fn read_ledger(path: &str, strict: bool) -> HashMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    if strict {
        assert_eq!(
            complete.len(),
            text.len(),
            "the ledger ends in a partial line"
        );
    }
    let mut map: HashMap<String, Vec<u64>> = HashMap::new();
    for line in complete.lines() {
        let parsed = line
            .rsplit_once(' ')
            .and_then(|(k, n)| Some((k, n.parse::<u64>().ok()?)));
        match parsed {
            Some((key, n)) => map.entry(key.to_owned()).or_default().push(n),
            None => assert!(!strict, "malformed ledger line {line:?}"),
        }
    }
    map
}

fn distinct(path: &str) -> usize {
    read_ledger(path, false)
        .into_iter()
        .flat_map(|(k, v)| v.into_iter().map(move |n| (k.clone(), n)))
        .collect::<HashSet<_>>()
        .len()
}

/// Waits until `n` distinct events are in the ledger; on timeout, says how many are.
async fn wait_applied(ledger: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let applied = distinct(ledger);
        if applied >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {n} events applied: {applied} are"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each key's first applications are exactly 1..=per_key in order; a re-application may only
/// repeat the number just applied (its owner died between running it and saving the state).
/// Returns the number of re-applications.
fn assert_in_order(applied: &HashMap<String, Vec<u64>>, keys: usize, per_key: u64) -> usize {
    assert_eq!(applied.len(), keys, "every key applied");
    let mut repeats = 0;
    for (key, seqs) in applied {
        let mut expected = 1;
        for (i, s) in seqs.iter().enumerate() {
            if *s == expected {
                expected += 1;
            } else {
                assert!(
                    i > 0 && *s == seqs[i - 1],
                    "{key}: applied {s} out of order: {seqs:?}"
                );
                repeats += 1;
            }
        }
        assert_eq!(expected, per_key + 1, "{key}: {seqs:?}");
    }
    repeats
}

/// Shuffled events of `keys` keys, 1..=per_key each, with every `dup_every`-th repeated.
fn events(
    keys: usize,
    per_key: u64,
    dup_every: usize,
) -> Vec<(Vec<u8>, cottontail::lapin::BasicProperties)> {
    let mut items = Vec::new();
    for k in 0..keys {
        for s in 1..=per_key {
            let props = json_props()
                .with_headers(cottontail::client::sequence_headers(&format!("key-{k}"), s));
            items.push((b"{}".to_vec(), props.clone()));
            if items.len() % dup_every == 0 {
                items.push((b"{}".to_vec(), props));
            }
        }
    }
    fastrand::shuffle(&mut items);
    items
}

/// Worker processes, killed (SIGKILL) if the test ends before they exit.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn queue_exists(name: &str) -> bool {
    let conn = connect(&unique("probe")).await;
    let ch = conn.create_channel().await.unwrap();
    let found = ch
        .queue_declare(
            name.into(),
            cottontail::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    found
}

/// The queues of the ordered handler `name`.
fn ordered_queues(name: &str) -> Vec<String> {
    let queue = ordered_queue(name, Arc::new(MemorySequences::new()));
    let mut names = handler_queues(&queue, &cottontail::RetryPolicy::default());
    for n in 0..PARTITIONS {
        names.push(cottontail::names::partition_queue(name, n));
    }
    names.push(cottontail::names::members_queue(name));
    names
}

/// Three workers apply the events; at a fifth, one is killed with SIGKILL and a replacement
/// starts; the rest finish in order, each re-application at most one per partition.
async fn a_killed_worker_loses_no_order(name: String, ledger: String, kind: String) {
    let started = Instant::now();
    let env = [
        (CHILD_QUEUE, name.clone()),
        (CHILD_LEDGER, ledger.clone()),
        (CHILD_STORE, kind.clone()),
    ];
    let mut fleet = Fleet((0..3).map(|_| spawn_child("child_worker", &env)).collect());
    let n = name.clone();
    wait_until(
        Duration::from_secs(30),
        "queues declared by the workers",
        move || {
            let n = n.clone();
            async move { queue_exists(&n).await }
        },
    )
    .await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, events(KEYS, PER_KEY, 10)).await;
    let total = KEYS * PER_KEY as usize;
    eprintln!("{kind}: published at {:?}", started.elapsed());

    wait_applied(&ledger, total / 5, Duration::from_secs(180)).await;
    let mut victim = fleet.0.remove(1);
    victim.kill().expect("SIGKILL the worker");
    victim.wait().unwrap();
    let at_kill = distinct(&ledger);
    eprintln!(
        "{kind}: killed a worker at {:?} ({at_kill} applied)",
        started.elapsed()
    );
    fleet.0.push(spawn_child("child_worker", &env));
    wait_applied(&ledger, total, Duration::from_secs(300)).await;
    let applied_in = started.elapsed();
    for child in &fleet.0 {
        sigterm(child);
    }
    for child in &mut fleet.0 {
        let status = wait_exit(child, Duration::from_secs(40)).await;
        assert!(status.success(), "worker exited with {status:?}");
    }

    let applied = read_ledger(&ledger, true);
    let repeats = assert_in_order(&applied, KEYS, PER_KEY);
    assert!(
        repeats <= usize::from(PARTITIONS),
        "{repeats} re-applications: more than the partitions in flight at the kill"
    );
    // The shared state agrees: every key waits for number 51.
    let store: Box<dyn SequenceStore> = match kind.split_once(':') {
        Some(("redis", prefix)) => Box::new(redis_store(prefix).await),
        _ => Box::new(pg_store().await),
    };
    for k in 0..KEYS {
        assert_eq!(
            store.next(&name, &format!("key-{k}")).await,
            Ok(PER_KEY + 1),
            "key-{k}"
        );
    }
    let _ = conn.close(200, "bye".into()).await;
    eprintln!("{kind}: {total} applied in {applied_in:?}, {repeats} re-applied after the kill");
}

fn ledger_path() -> String {
    std::env::temp_dir()
        .join(unique("ordered-ledger"))
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_order_holds_while_a_worker_process_is_killed_and_replaced() {
    let name = unique("ordered-redis");
    let prefix = unique("redis-ordered");
    let ledger = ledger_path();
    let body =
        a_killed_worker_loses_no_order(name.clone(), ledger.clone(), format!("redis:{prefix}"));
    let cleanup = async {
        let _ = std::fs::remove_file(&ledger);
        redis_cleanup(&prefix).await;
        delete_queues_quietly(&ordered_queues(&name)).await;
    };
    with_cleanup(bounded(Duration::from_secs(600), body), cleanup).await;
    assert_eq!(redis_key_count(&prefix).await, 0, "keys cleaned up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_order_holds_while_a_worker_process_is_killed_and_replaced() {
    let name = unique("ordered-pg");
    let ledger = ledger_path();
    let body = a_killed_worker_loses_no_order(name.clone(), ledger.clone(), "postgres".into());
    let cleanup = async {
        let _ = std::fs::remove_file(&ledger);
        pg_cleanup(&[&name], &name).await;
        delete_queues_quietly(&ordered_queues(&name)).await;
    };
    with_cleanup(bounded(Duration::from_secs(600), body), cleanup).await;
}
