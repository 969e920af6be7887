//! Dedup claims, cached replies, job statuses and ordered-delivery sequence state in
//! PostgreSQL, shared by every instance, and an exactly-once mode for handlers whose effects
//! are writes to the same database.
//!
//! Claims are single `INSERT … ON CONFLICT DO UPDATE … WHERE` statements, so two instances
//! racing for one id serialize on the row and exactly one wins. Every expiry is computed with
//! the database's clock (`now()`), so instances with skewed clocks agree.
//!
//! Fan-in joins (`cottontail_joins`: one row per join, its fields in a `jsonb` object) are
//! recorded by one upsert that returns the field count; the row lock serializes concurrent
//! records of one join, so exactly one of them completes it.
//!
//! Supervision watches (`cottontail_watches`: one row per watch, indexed by scope and due time)
//! are one upsert, one delete, one indexed range read.
//!
//! Long jobs' checkpoints (`cottontail_checkpoints`) are one upsert per save and expire on
//! their TTL like dedup rows.
//!
//! Sequence state (`cottontail_sequences`: the next expected number per handler and key) and
//! stamps (`cottontail_stamps`: the last number handed out per key) never expire; every
//! change is one statement, so it is atomic without an explicit transaction.
//!
//! [`PostgresStore::begin_once`] goes further than a claim: the dedup row is inserted inside
//! the handler's own transaction, so "the effect happened" and "the id is done" commit
//! together or not at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::NoTls;

mod impls;
mod once;
mod sql;

use impls::decode;
pub use once::{Once, OnceTx};
use sql::*;

use super::{bounded, millis, DEFAULT_TIMEOUT};
use crate::stores::{Claim, StoreError};

/// Re-exported so callers build pools with the same versions as cottontail.
pub use deadpool_postgres;
/// Re-exported so callers build pools with the same versions as cottontail.
pub use tokio_postgres;

/// The tables and indexes the store uses. Idempotent; [`PostgresStore::connect`] runs it
/// (under an advisory lock, so instances starting together do not race). Teams that manage
/// their schema with their own migration tool can copy it and use
/// [`PostgresStore::from_pool`] with `migrate: false`.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS cottontail_dedup (
    scope      text        NOT NULL,
    id         text        NOT NULL,
    state      text        NOT NULL,
    owner      text,
    reply      bytea,
    has_reply  boolean     NOT NULL DEFAULT false,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS cottontail_dedup_expires_at ON cottontail_dedup (expires_at);
CREATE TABLE IF NOT EXISTS cottontail_jobs (
    message_id text        PRIMARY KEY,
    status     jsonb       NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS cottontail_jobs_expires_at ON cottontail_jobs (expires_at);
CREATE TABLE IF NOT EXISTS cottontail_sequences (
    scope text   NOT NULL,
    key   text   NOT NULL,
    next  bigint NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS cottontail_stamps (
    key  text   PRIMARY KEY,
    last bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS cottontail_joins (
    scope      text        NOT NULL,
    id         text        NOT NULL,
    fields     jsonb       NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS cottontail_joins_expires_at ON cottontail_joins (expires_at);
CREATE TABLE IF NOT EXISTS cottontail_watches (
    scope  text   NOT NULL,
    id     text   NOT NULL,
    due_ms bigint NOT NULL,
    value  bytea  NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS cottontail_watches_due ON cottontail_watches (scope, due_ms);
CREATE TABLE IF NOT EXISTS cottontail_checkpoints (
    scope      text        NOT NULL,
    id         text        NOT NULL,
    state      bytea       NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS cottontail_checkpoints_expires_at ON cottontail_checkpoints (expires_at);
";

/// How many of the migration's tables and indexes exist ([`MIGRATED_ALL`] when it has run).
/// Every object [`MIGRATION`] creates must be listed, so a database migrated by an older
/// version (with fewer objects) is noticed and completed.
const MIGRATED: &str = "\
SELECT count(to_regclass(name)) FROM unnest(ARRAY['cottontail_dedup', 'cottontail_jobs',
    'cottontail_dedup_expires_at', 'cottontail_jobs_expires_at', 'cottontail_sequences',
    'cottontail_stamps', 'cottontail_joins', 'cottontail_joins_expires_at',
    'cottontail_watches', 'cottontail_watches_due', 'cottontail_checkpoints',
    'cottontail_checkpoints_expires_at']) AS name";

/// The number of objects [`MIGRATED`] counts.
const MIGRATED_ALL: i64 = 12;

/// Serializes concurrent migrations (`CREATE … IF NOT EXISTS` alone can still collide).
const MIGRATION_LOCK: i64 = 0x636f_7474_6f6e_7461;

/// A [`DedupStore`](crate::stores::DedupStore), [`JobStore`](crate::stores::JobStore), [`SequenceStore`](crate::stores::SequenceStore), [`SequenceStamper`](crate::stores::SequenceStamper) and [`CheckpointStore`](crate::stores::CheckpointStore) in PostgreSQL,
/// plus exactly-once transactions ([`begin_once`](Self::begin_once)).
///
/// Cloning is cheap (a shared connection pool). Every operation is limited to
/// [`timeout`](Self::timeout) (2 s by default): a down or hung database becomes a
/// [`StoreError`], and the pipeline retries the message later rather than running it
/// unchecked. A connection whose operation timed out is closed, never reused.
///
/// ```no_run
/// use cottontail::stores::PostgresStore;
/// use cottontail::{App, Config, Dedup, Queue};
///
/// async fn pay() {}
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://app@db:5432/app").await?;
/// App::new(())
///     .job_store(store.clone())
///     .handler(Queue::new("pay").dedup(Dedup::new(store)), pay)
///     .run(Config::from_env()?)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    timeout: Duration,
    job_retention: Duration,
    once_retention: Duration,
    writes: Arc<AtomicU64>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("timeout", &self.timeout)
            .field("job_retention", &self.job_retention)
            .field("once_retention", &self.once_retention)
            .finish()
    }
}

impl PostgresStore {
    /// Connects with a pool of up to 16 connections (no TLS: for TLS, build a pool with your
    /// connector and use [`from_pool`](Self::from_pool)) and runs [`MIGRATION`].
    ///
    /// `url` is a libpq-style URL or key-value string, e.g.
    /// `postgres://user:password@host:5432/db`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError(format!("postgres url: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(DEFAULT_TIMEOUT))
            .create_timeout(Some(DEFAULT_TIMEOUT))
            .recycle_timeout(Some(DEFAULT_TIMEOUT))
            .build()
            .map_err(|e| StoreError(format!("postgres pool: {e}")))?;
        Self::from_pool(pool, true).await
    }

    /// Uses your pool; with `migrate`, creates the tables if they are missing.
    pub async fn from_pool(pool: Pool, migrate: bool) -> Result<Self, StoreError> {
        let store = Self {
            pool,
            timeout: DEFAULT_TIMEOUT,
            job_retention: Duration::from_secs(3600),
            once_retention: Duration::from_secs(24 * 3600),
            writes: Arc::new(AtomicU64::new(0)),
        };
        if migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// The limit on each operation (default 2 s); past it the operation fails as a
    /// [`StoreError`].
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// How long a job status is kept after its last update (default 1 h).
    pub fn job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
        self
    }

    /// How long an id done through [`begin_once`](Self::begin_once) is remembered (default
    /// 24 h; the [`Dedup`](crate::Dedup) setting does not apply there).
    pub fn once_retention(mut self, retention: Duration) -> Self {
        self.once_retention = retention;
        self
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs [`MIGRATION`] under an advisory lock, unless every table and index exists
    /// already: even `CREATE INDEX IF NOT EXISTS` locks the table against writes, which would
    /// make a starting instance wait for (and hold up) the others' open transactions.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql =
            format!("BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); {MIGRATION} COMMIT;");
        // Creating tables can wait on other sessions' locks: allow more than one operation.
        let limit = self.timeout.max(Duration::from_secs(10));
        self.with_client("migrate", limit, |c| async move {
            let present: i64 = c.query_one(MIGRATED, &[]).await?.try_get(0)?;
            if present < MIGRATED_ALL {
                c.batch_execute(&sql).await?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes up to 10,000 expired rows from each table; returns how many went. Runs by
    /// itself every 1,000 writes; call it from a timer to keep the tables small when ids
    /// rarely repeat and writes are rare.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.with_client(
            "purge",
            self.timeout.max(Duration::from_secs(10)),
            |c| async move {
                let mut deleted = 0;
                for message in c.simple_query(PURGE).await? {
                    if let tokio_postgres::SimpleQueryMessage::CommandComplete(n) = message {
                        deleted += n;
                    }
                }
                Ok(deleted)
            },
        )
        .await
    }

    /// Starts an exactly-once unit of work for `id` in `scope`: a transaction in which the
    /// handler makes its own writes (through [`OnceTx::client`]) and that marks the id done
    /// when it commits. A crash, an error or a drop before [`OnceTx::commit`] rolls back both;
    /// a duplicate after the commit gets [`Once::Done`] with the reply stored at commit.
    ///
    /// While one transaction for an id is open, another `begin_once` for the same id waits
    /// (at most half the [`timeout`](Self::timeout)) and then fails with a [`StoreError`]:
    /// return it from the handler (`?`) and the message is retried later.
    ///
    /// A handler that uses `begin_once` must not also have a [`Dedup`](crate::Dedup) setting
    /// on the same scope with this store: `begin_once` replaces it (a claim row left by the
    /// claim path is reported as an error until its lease lapses).
    ///
    /// ```no_run
    /// use cottontail::stores::{Once, PostgresStore};
    /// use cottontail::{HandlerError, Json, MessageId, State};
    ///
    /// async fn pay(
    ///     State(db): State<PostgresStore>,
    ///     MessageId(id): MessageId,
    ///     Json(amount): Json<i64>,
    /// ) -> Result<Json<serde_json::Value>, HandlerError> {
    ///     let id = id.ok_or_else(|| HandlerError::invalid_input("message_id required"))?;
    ///     let tx = match db.begin_once("pay", &id).await? {
    ///         // A duplicate: answer what the first run answered.
    ///         Once::Done { reply } => {
    ///             let body = reply.unwrap_or_else(|| b"null".to_vec());
    ///             return Ok(Json(serde_json::from_slice(&body)?));
    ///         }
    ///         Once::New(tx) => tx,
    ///     };
    ///     tx.client()
    ///         .execute("INSERT INTO charges (id, amount) VALUES ($1, $2)", &[&id, &amount])
    ///         .await?;
    ///     let reply = serde_json::json!({ "charged": amount });
    ///     tx.commit(Some(serde_json::to_vec(&reply)?)).await?;
    ///     Ok(Json(reply))
    /// }
    /// ```
    pub async fn begin_once(&self, scope: &str, id: &str) -> Result<Once, StoreError> {
        let retention = millis(self.once_retention) as f64;
        let lock_ms = millis(self.timeout / 2);
        let (scope, id) = (scope.to_owned(), id.to_owned());
        let limit = self.timeout;
        let pool = self.pool.clone();
        bounded("postgres", "begin_once", limit, async move {
            // Cancelled half-way (timeout), `conn` drops unsettled: the connection closes and
            // the server rolls back.
            let conn = Pooled::get(&pool).await?;
            conn.batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{lock_ms}ms'"))
                .await
                .map_err(pg)?;
            let inserted = async {
                let stmt = conn.prepare_cached(ONCE).await?;
                conn.query_opt(&stmt, &[&scope, &id, &retention]).await
            }
            .await;
            let inserted = match inserted {
                Ok(row) => row.is_some(),
                Err(e) => {
                    // Usually the lock timeout: another transaction for this id is open.
                    conn.rollback_and_settle().await;
                    return Err(pg(e));
                }
            };
            if inserted {
                conn.batch_execute("SET LOCAL lock_timeout TO DEFAULT")
                    .await
                    .map_err(pg)?;
                return Ok(Once::New(OnceTx {
                    conn: Some(Box::new(conn)),
                    scope,
                    id,
                    timeout: limit,
                }));
            }
            let peeked = async {
                let stmt = conn.prepare_cached(PEEK).await?;
                conn.query_opt(&stmt, &[&scope, &id]).await
            }
            .await;
            conn.rollback_and_settle().await;
            match peeked.map_err(pg)? {
                Some(row) => match decode(&row)? {
                    Claim::Done { reply } => Ok(Once::Done { reply }),
                    _ => Err(StoreError(format!(
                        "{scope}/{id} is claimed through the Dedup path (begin_once replaces \
                         Dedup for a handler)"
                    ))),
                },
                // Expired between the two statements: the retry takes it.
                None => Err(StoreError(format!("{scope}/{id} changed while checking"))),
            }
        })
        .await
    }

    /// Runs `op` on a pooled connection within `limit`. A connection whose operation failed
    /// or was cut short is closed rather than returned to the pool half-way through.
    async fn with_client<T, F, Fut>(
        &self,
        what: &str,
        limit: Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Pooled>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let pool = self.pool.clone();
        bounded("postgres", what, limit, async move {
            let conn = Arc::new(Pooled::get(&pool).await?);
            let result = op(conn.clone()).await.map_err(pg)?;
            if let Ok(conn) = Arc::try_unwrap(conn) {
                conn.settle();
            }
            Ok(result)
        })
        .await
    }

    /// Counts a write; every [`PURGE_EVERY`] writes, purges expired rows in the background.
    fn wrote(&self) {
        if self.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            let store = self.clone();
            tokio::spawn(async move {
                if let Err(error) = store.purge_expired().await {
                    tracing::debug!(%error, "expired dedup rows not purged");
                }
            });
        }
    }
}

pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError(format!("{} ({})", db.message(), db.code().code())),
        None => StoreError(e.to_string()),
    }
}

/// A sequence number as a `bigint`.
pub(super) fn to_bigint(what: &str, n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError(format!("postgres {what}: {n} is past bigint")))
}

/// A stored `bigint` as a sequence number (they start at 1).
pub(super) fn from_bigint(what: &str, n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
        StoreError(format!(
            "postgres {what}: stored {n}, not a sequence number"
        ))
    })
}

/// A pooled connection that goes back to the pool only when [`settle`](Self::settle)d: when
/// dropped unsettled (an error, a timeout, a cancelled future), the connection is closed, so
/// no half-done statement or open transaction reaches the next user.
struct Pooled(Option<Object>);

impl Pooled {
    async fn get(pool: &Pool) -> Result<Self, StoreError> {
        pool.get()
            .await
            .map(|obj| Self(Some(obj)))
            .map_err(|e| StoreError(format!("no connection: {e}")))
    }

    /// Returns the connection to the pool.
    fn settle(mut self) {
        drop(self.0.take());
    }

    /// Ends the transaction and returns the connection to the pool, or closes it if even
    /// that fails.
    async fn rollback_and_settle(self) {
        if self.batch_execute("ROLLBACK").await.is_ok() {
            self.settle();
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        match &self.0 {
            Some(obj) => obj,
            None => unreachable!("a Pooled holds its connection until settled or dropped"),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            // Detached from the pool; dropping the client closes the connection.
            drop(Object::take(obj));
        }
    }
}
