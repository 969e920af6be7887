//! Dedup claims, cached replies, job statuses and ordered-delivery sequence state in Redis,
//! shared by every instance.
//!
//! Each operation is one command or one Lua script, so it is atomic on the server: two
//! instances claiming the same id at the same moment cannot both win. Expiry is Redis's own
//! (`PX`), so a crashed holder's claim lapses without anyone cleaning up.
//!
//! Keys:
//! - `<prefix>:dedup:<scope>:<id>` → `claim:<owner>` | `done0:` (no reply) | `done1:<reply bytes>`
//! - `<prefix>:join:<scope>:<id>` → a hash of a fan-in join's recorded fields (`HSETNX` and
//!   `HLEN` in one script)
//! - `<prefix>:watch:<scope>` → a sorted set of supervision watches by due time (ms since the
//!   epoch), and `<prefix>:watch:<scope>:values` → a hash of their values (both written in one
//!   `MULTI`)
//! - `<prefix>:job:<message_id>` → the [`JobStatus`] as JSON
//! - `<prefix>:seq:<scope>:<key>` → the next expected sequence number of `key` (decimal; a
//!   missing key means 1). Never expires: losing it would re-apply the key from 1.
//! - `<prefix>:stamp:<key>` → the last sequence number stamped for `key` (`INCR`). Never
//!   expires: losing it would hand out numbers again.
//! - `<prefix>:checkpoint:<scope>:<id>` → a long job's last saved state (`PX` = its TTL);
//!   cancelled ids under the scope [`CANCELLED_SCOPE`](crate::stores::CANCELLED_SCOPE).
//!
//! The id and the sequence key are used as they came from the wire (Redis keys are
//! binary-safe).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Client;

mod checkpoints;
mod jobs;
mod scripts;
mod sequences;

use scripts::{ADVANCE, CLAIM, COMPLETE, JOB_PUT_MANY, JOIN_RECORD, RELEASE};

use super::{bounded, millis, DEFAULT_TIMEOUT};
use crate::stores::{
    CheckpointStore, Claim, DedupStore, JobStatus, JobStore, SequenceStamper, SequenceStore,
    StoreError,
};
use crate::BoxFuture;

/// Re-exported so callers build clients and connections with the same `redis` as cottontail.
pub use ::redis as client;

/// The key prefix used by [`RedisStore::connect_default`].
pub const DEFAULT_PREFIX: &str = "cottontail";

/// A [`DedupStore`], [`JobStore`], [`SequenceStore`], [`SequenceStamper`] and [`CheckpointStore`] in Redis, shared
/// by all instances of a service.
///
/// Cloning is cheap (one multiplexed connection, reconnected automatically after a loss).
/// Every operation is limited to [`timeout`](Self::timeout) (2 s by default): a down or hung
/// Redis becomes a [`StoreError`], and the pipeline defers the message rather than running it
/// unchecked.
///
/// ```no_run
/// use cottontail::stores::RedisStore;
/// use cottontail::{App, Config, Dedup, Queue};
///
/// async fn pay() {}
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379", "payments").await?;
/// App::new(())
///     .job_store(store.clone())
///     .handler(Queue::new("pay").dedup(Dedup::new(store)), pay)
///     .run(Config::from_env()?)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    job_retention: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("job_retention", &self.job_retention)
            .finish()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host:port[/db]`, `rediss://` for TLS when the
    /// `redis` crate's TLS feature is on) and keys everything under `key_prefix` (several
    /// services can share one Redis with different prefixes).
    ///
    /// Fails if Redis cannot be reached now; later outages are retried per operation.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError(format!("redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(DEFAULT_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = bounded("redis", "connect", DEFAULT_TIMEOUT * 3, async {
            ConnectionManager::new_with_config(client, config)
                .await
                .map_err(failed)
        })
        .await?;
        Ok(Self::from_manager(conn, key_prefix))
    }

    /// [`connect`](Self::connect) with the prefix [`DEFAULT_PREFIX`] (`cottontail`).
    pub async fn connect_default(url: &str) -> Result<Self, StoreError> {
        Self::connect(url, DEFAULT_PREFIX).await
    }

    /// Uses a connection you configured yourself (TLS, your own reconnect and response
    /// timeouts). An empty `key_prefix` means [`DEFAULT_PREFIX`].
    pub fn from_manager(conn: ConnectionManager, key_prefix: &str) -> Self {
        let prefix = if key_prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            key_prefix
        };
        Self {
            conn,
            prefix: prefix.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            job_retention: Duration::from_secs(3600),
        }
    }

    /// The limit on each operation (default 2 s); past it the operation fails as a
    /// [`StoreError`]. ([`connect`](Self::connect) also sets a 2 s response timeout on the
    /// connection; use [`from_manager`](Self::from_manager) for longer ones.)
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// How long a job status is kept after its last update (default 1 h).
    pub fn job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The underlying connection (cheap to clone), e.g. for health checks.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// `<prefix>:dedup:<scope>:<id>`, as raw bytes.
    pub fn dedup_key(&self, scope: &str, id: &str) -> Vec<u8> {
        key(&self.prefix, &[b"dedup", scope.as_bytes(), id.as_bytes()])
    }

    /// `<prefix>:join:<scope>:<id>` (a fan-in join's hash), as raw bytes.
    pub fn join_key(&self, scope: &str, id: &str) -> Vec<u8> {
        key(&self.prefix, &[b"join", scope.as_bytes(), id.as_bytes()])
    }

    /// `<prefix>:watch:<scope>` (the due times) and `…:values` (the watches' values).
    fn watch_keys(&self, scope: &str) -> (Vec<u8>, Vec<u8>) {
        let due = key(&self.prefix, &[b"watch", scope.as_bytes()]);
        let values = key(&self.prefix, &[b"watch", scope.as_bytes(), b"values"]);
        (due, values)
    }

    /// `<prefix>:job:<message_id>`, as raw bytes.
    pub fn job_key(&self, message_id: &str) -> Vec<u8> {
        key(&self.prefix, &[b"job", message_id.as_bytes()])
    }

    /// `<prefix>:seq:<scope>:<key>` (a key's next expected sequence number), as raw bytes.
    pub fn sequence_key(&self, scope: &str, sequence_key: &str) -> Vec<u8> {
        key(
            &self.prefix,
            &[b"seq", scope.as_bytes(), sequence_key.as_bytes()],
        )
    }

    /// `<prefix>:stamp:<key>` (the last number stamped for a key), as raw bytes.
    pub fn stamp_key(&self, sequence_key: &str) -> Vec<u8> {
        key(&self.prefix, &[b"stamp", sequence_key.as_bytes()])
    }

    /// `<prefix>:checkpoint:<scope>:<id>` (a long job's saved state), as raw bytes.
    pub fn checkpoint_key(&self, scope: &str, id: &str) -> Vec<u8> {
        key(
            &self.prefix,
            &[b"checkpoint", scope.as_bytes(), id.as_bytes()],
        )
    }
}

/// `prefix:part:part…`, bytes as given.
fn key(prefix: &str, parts: &[&[u8]]) -> Vec<u8> {
    let len = prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut key = Vec::with_capacity(len);
    key.extend_from_slice(prefix.as_bytes());
    for part in parts {
        key.push(b':');
        key.extend_from_slice(part);
    }
    key
}

fn failed(e: ::redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

fn claim_value(owner: &str) -> Vec<u8> {
    let mut v = b"claim:".to_vec();
    v.extend_from_slice(owner.as_bytes());
    v
}

fn done_value(reply: Option<Vec<u8>>) -> Vec<u8> {
    match reply {
        None => b"done0:".to_vec(),
        Some(reply) => {
            let mut v = Vec::with_capacity(reply.len() + 6);
            v.extend_from_slice(b"done1:");
            v.extend_from_slice(&reply);
            v
        }
    }
}

/// Reads a stored next-expected number (missing = 1). Only the canonical decimal form is
/// accepted: [`ADVANCE`] compares strings, so a value it could never match (`05`, `+5`) must
/// be an error here rather than a key that silently never advances.
fn parse_next(raw: Option<Vec<u8>>) -> Result<u64, StoreError> {
    let Some(raw) = raw else {
        return Ok(1);
    };
    std::str::from_utf8(&raw)
        .ok()
        .and_then(|s| s.parse::<u64>().ok().filter(|n| n.to_string() == s))
        .ok_or_else(|| {
            StoreError(format!(
                "redis sequence next: the key holds {:?}, not a sequence number",
                String::from_utf8_lossy(&raw)
            ))
        })
}

/// Reads the claim script's answer without trusting its shape.
fn parse_claim(answer: Vec<Vec<u8>>) -> Result<Claim, StoreError> {
    let mut parts = answer.into_iter();
    match (parts.next().as_deref(), parts.next()) {
        (Some(b"acquired"), _) => Ok(Claim::Acquired),
        (Some(b"busy"), _) => Ok(Claim::Busy),
        (Some(b"done"), reply) => Ok(Claim::Done { reply }),
        (Some(b"corrupt"), _) => Err(StoreError(
            "redis claim: the key holds a value cottontail did not write".into(),
        )),
        (other, _) => Err(StoreError(format!(
            "redis claim: unexpected answer {:?}",
            other.map(String::from_utf8_lossy)
        ))),
    }
}

impl DedupStore for RedisStore {
    fn claim(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.dedup_key(scope, id);
        let value = claim_value(owner);
        let limit = self.timeout;
        Box::pin(async move {
            let answer: Vec<Vec<u8>> = bounded("redis", "claim", limit, async {
                CLAIM
                    .key(key)
                    .arg(value)
                    .arg(millis(lease))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            parse_claim(answer)
        })
    }

    fn complete(
        &self,
        scope: &str,
        id: &str,
        _owner: &str,
        reply: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.dedup_key(scope, id);
        let value = done_value(reply);
        let limit = self.timeout;
        Box::pin(async move {
            let _written: i64 = bounded("redis", "complete", limit, async {
                COMPLETE
                    .key(key)
                    .arg(value)
                    .arg(millis(retention))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            Ok(())
        })
    }

    fn release(&self, scope: &str, id: &str, owner: &str) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.dedup_key(scope, id);
        let value = claim_value(owner);
        let limit = self.timeout;
        Box::pin(async move {
            let _deleted: i64 = bounded("redis", "release", limit, async {
                RELEASE
                    .key(key)
                    .arg(value)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            Ok(())
        })
    }

    fn join_record(
        &self,
        scope: &str,
        id: &str,
        field: &str,
        value: Vec<u8>,
        retention: Duration,
    ) -> BoxFuture<Result<u64, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.join_key(scope, id);
        let field = field.to_owned();
        let limit = self.timeout;
        Box::pin(async move {
            bounded("redis", "join record", limit, async {
                JOIN_RECORD
                    .key(key)
                    .arg(field)
                    .arg(value)
                    .arg(millis(retention))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await
        })
    }

    fn join_fields(
        &self,
        scope: &str,
        id: &str,
    ) -> BoxFuture<Result<BTreeMap<String, Vec<u8>>, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.join_key(scope, id);
        let limit = self.timeout;
        Box::pin(async move {
            bounded("redis", "join fields", limit, async {
                ::redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await
        })
    }

    fn watch(
        &self,
        scope: &str,
        id: &str,
        due_ms: u64,
        value: Vec<u8>,
    ) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let (due, values) = self.watch_keys(scope);
        let id = id.to_owned();
        let limit = self.timeout;
        Box::pin(async move {
            bounded("redis", "watch", limit, async {
                ::redis::pipe()
                    .atomic()
                    .zadd(due, &id, due_ms)
                    .ignore()
                    .hset(values, &id, value)
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await
        })
    }

    fn unwatch(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let (due, values) = self.watch_keys(scope);
        let id = id.to_owned();
        let limit = self.timeout;
        Box::pin(async move {
            bounded("redis", "unwatch", limit, async {
                ::redis::pipe()
                    .atomic()
                    .zrem(due, &id)
                    .ignore()
                    .hdel(values, &id)
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await
        })
    }

    fn due(
        &self,
        scope: &str,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<crate::stores::DueWatches, StoreError>> {
        let mut conn = self.conn.clone();
        let (due, values) = self.watch_keys(scope);
        let timeout = self.timeout;
        Box::pin(async move {
            bounded("redis", "due watches", timeout, async {
                let ids: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
                    .arg(due)
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let found: Vec<Option<Vec<u8>>> = ::redis::cmd("HMGET")
                    .arg(values)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)?;
                // A watch dropped between the two reads has no value left: skipped.
                Ok(ids
                    .into_iter()
                    .zip(found)
                    .filter_map(|(id, value)| Some((id, value?)))
                    .collect())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests;
