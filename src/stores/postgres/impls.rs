//! The store traits on [`PostgresStore`]: dedup claims, job statuses, sequence state,
//! stamps and checkpoints, each one statement per call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::sql::*;
use super::{from_bigint, pg, to_bigint, PostgresStore};
use crate::stores::{
    millis, CheckpointStore, Claim, DedupStore, JobStatus, JobStore, SequenceStamper,
    SequenceStore, StoreError,
};
use crate::BoxFuture;

/// Reads a `PEEK` row.
pub(super) fn decode(row: &tokio_postgres::Row) -> Result<Claim, StoreError> {
    let state: String = row.try_get(0).map_err(pg)?;
    match state.as_str() {
        "done" => {
            let reply: Option<Vec<u8>> = row.try_get(1).map_err(pg)?;
            let has_reply: bool = row.try_get(2).map_err(pg)?;
            Ok(Claim::Done {
                reply: if has_reply {
                    Some(reply.unwrap_or_default())
                } else {
                    None
                },
            })
        }
        "claimed" => Ok(Claim::Busy),
        other => Err(StoreError(format!(
            "postgres: unknown dedup state {other:?}"
        ))),
    }
}

impl DedupStore for PostgresStore {
    fn claim(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>> {
        let store = self.clone();
        let (scope, id, owner) = (scope.to_owned(), id.to_owned(), owner.to_owned());
        let lease = millis(lease) as f64;
        Box::pin(async move {
            store
                .with_client("claim", store.timeout, |c| async move {
                    let claim = c.prepare_cached(CLAIM).await?;
                    let peek = c.prepare_cached(PEEK).await?;
                    // The holder's row can expire between the two statements; then the next
                    // round takes it. Three rounds without a decision report Busy.
                    for _ in 0..3 {
                        if c.query_opt(&claim, &[&scope, &id, &owner, &lease])
                            .await?
                            .is_some()
                        {
                            return Ok(Ok(Claim::Acquired));
                        }
                        if let Some(row) = c.query_opt(&peek, &[&scope, &id]).await? {
                            return Ok(decode(&row));
                        }
                    }
                    Ok(Ok(Claim::Busy))
                })
                .await?
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
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        let retention = millis(retention) as f64;
        Box::pin(async move {
            store
                .with_client("complete", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(COMPLETE).await?;
                    let has_reply = reply.is_some();
                    c.execute(&stmt, &[&scope, &id, &reply, &has_reply, &retention])
                        .await
                })
                .await?;
            store.wrote();
            Ok(())
        })
    }

    fn release(&self, scope: &str, id: &str, owner: &str) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let (scope, id, owner) = (scope.to_owned(), id.to_owned(), owner.to_owned());
        Box::pin(async move {
            store
                .with_client("release", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(RELEASE).await?;
                    c.execute(&stmt, &[&scope, &id, &owner]).await
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
        let store = self.clone();
        let (scope, id, field) = (scope.to_owned(), id.to_owned(), field.to_owned());
        let retention = millis(retention) as f64;
        Box::pin(async move {
            let count: i64 = store
                .with_client("join record", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(JOIN_RECORD).await?;
                    c.query_one(&stmt, &[&scope, &id, &field, &value, &retention])
                        .await?
                        .try_get(0)
                })
                .await?;
            store.wrote();
            from_bigint("join count", count)
        })
    }

    fn join_fields(
        &self,
        scope: &str,
        id: &str,
    ) -> BoxFuture<Result<BTreeMap<String, Vec<u8>>, StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        Box::pin(async move {
            let rows = store
                .with_client("join fields", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(JOIN_FIELDS).await?;
                    c.query(&stmt, &[&scope, &id]).await
                })
                .await?;
            rows.iter()
                .map(|row| {
                    let field: String = row.try_get(0).map_err(pg)?;
                    let hex: String = row.try_get(1).map_err(pg)?;
                    Ok((field, from_hex(&hex)?))
                })
                .collect()
        })
    }

    fn watch(
        &self,
        scope: &str,
        id: &str,
        due_ms: u64,
        value: Vec<u8>,
    ) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        Box::pin(async move {
            let due = to_bigint("watch due", due_ms)?;
            store
                .with_client("watch", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(WATCH).await?;
                    c.execute(&stmt, &[&scope, &id, &due, &value]).await
                })
                .await?;
            Ok(())
        })
    }

    fn unwatch(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        Box::pin(async move {
            store
                .with_client("unwatch", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(UNWATCH).await?;
                    c.execute(&stmt, &[&scope, &id]).await
                })
                .await?;
            Ok(())
        })
    }

    fn due(
        &self,
        scope: &str,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<crate::stores::DueWatches, StoreError>> {
        let store = self.clone();
        let scope = scope.to_owned();
        Box::pin(async move {
            let now = to_bigint("due watches", now_ms)?;
            let limit = to_bigint("due watches", limit as u64)?;
            let rows = store
                .with_client("due watches", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(DUE).await?;
                    c.query(&stmt, &[&scope, &now, &limit]).await
                })
                .await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?)))
                .collect()
        })
    }
}

/// Decodes what `encode(…, 'hex')` wrote.
fn from_hex(hex: &str) -> Result<Vec<u8>, StoreError> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let bytes = hex.as_bytes();
    if bytes.len() % 2 != 0 {
        return Err(StoreError("postgres join: a value is not hex".into()));
    }
    bytes
        .chunks(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(high), Some(low)) => Ok(high << 4 | low),
            _ => Err(StoreError("postgres join: a value is not hex".into())),
        })
        .collect()
}

impl JobStore for PostgresStore {
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
        let store = self.clone();
        let message_id = message_id.to_owned();
        Box::pin(async move {
            let raw: Option<String> = store
                .with_client("job get", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(JOB_GET).await?;
                    match c.query_opt(&stmt, &[&message_id]).await? {
                        Some(row) => row.try_get(0),
                        None => Ok(None),
                    }
                })
                .await?;
            raw.map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| {
                    StoreError(format!("postgres job get: stored status is not valid: {e}"))
                })
        })
    }

    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let retention = millis(self.job_retention) as f64;
        Box::pin(async move {
            let json = serde_json::to_string(&status)
                .map_err(|e| StoreError(format!("job status: {e}")))?;
            store
                .with_client("job put", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(JOB_PUT).await?;
                    c.execute(&stmt, &[&status.message_id, &json, &retention])
                        .await
                })
                .await?;
            store.wrote();
            Ok(())
        })
    }

    /// One statement for the whole batch.
    fn put_many(self: Arc<Self>, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        let retention = millis(self.job_retention) as f64;
        Box::pin(async move {
            let ids: Vec<&str> = statuses.iter().map(|s| s.message_id.as_str()).collect();
            let docs = statuses
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError(format!("job status: {e}")))?;
            self.with_client("job put_many", self.timeout, |c| async move {
                let stmt = c.prepare_cached(JOB_PUT_MANY).await?;
                c.execute(&stmt, &[&ids, &docs, &retention]).await
            })
            .await?;
            self.wrote();
            Ok(())
        })
    }
}

impl SequenceStore for PostgresStore {
    fn next(&self, scope: &str, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let store = self.clone();
        let (scope, key) = (scope.to_owned(), key.to_owned());
        Box::pin(async move {
            let stored: Option<i64> = store
                .with_client("sequence next", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(SEQ_NEXT).await?;
                    match c.query_opt(&stmt, &[&scope, &key]).await? {
                        Some(row) => row.try_get(0).map(Some),
                        None => Ok(None),
                    }
                })
                .await?;
            stored.map_or(Ok(1), |n| from_bigint("sequence next", n))
        })
    }

    fn advance(
        &self,
        scope: &str,
        key: &str,
        from: u64,
        to: u64,
    ) -> BoxFuture<Result<bool, StoreError>> {
        let store = self.clone();
        let (scope, key) = (scope.to_owned(), key.to_owned());
        Box::pin(async move {
            let (from, to) = (
                to_bigint("sequence advance", from)?,
                to_bigint("sequence advance", to)?,
            );
            store
                .with_client("sequence advance", store.timeout, |c| async move {
                    if from == 1 {
                        let stmt = c.prepare_cached(SEQ_ADVANCE_FROM_ONE).await?;
                        Ok(c.query_opt(&stmt, &[&scope, &key, &to]).await?.is_some())
                    } else {
                        let stmt = c.prepare_cached(SEQ_ADVANCE).await?;
                        Ok(c.execute(&stmt, &[&scope, &key, &from, &to]).await? == 1)
                    }
                })
                .await
        })
    }
}

impl SequenceStamper for PostgresStore {
    fn stamp(&self, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let store = self.clone();
        let key = key.to_owned();
        Box::pin(async move {
            let last: i64 = store
                .with_client("stamp", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(STAMP).await?;
                    c.query_one(&stmt, &[&key]).await?.try_get(0)
                })
                .await?;
            from_bigint("stamp", last)
        })
    }
}

impl CheckpointStore for PostgresStore {
    fn load(&self, scope: &str, id: &str) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        Box::pin(async move {
            store
                .with_client("checkpoint load", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(CHECKPOINT_LOAD).await?;
                    match c.query_opt(&stmt, &[&scope, &id]).await? {
                        Some(row) => row.try_get(0).map(Some),
                        None => Ok(None),
                    }
                })
                .await
        })
    }

    fn save(
        &self,
        scope: &str,
        id: &str,
        state: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        let ttl = millis(ttl) as f64;
        Box::pin(async move {
            store
                .with_client("checkpoint save", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(CHECKPOINT_SAVE).await?;
                    c.execute(&stmt, &[&scope, &id, &state, &ttl]).await
                })
                .await?;
            store.wrote();
            Ok(())
        })
    }

    fn remove(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        let (scope, id) = (scope.to_owned(), id.to_owned());
        Box::pin(async move {
            store
                .with_client("checkpoint remove", store.timeout, |c| async move {
                    let stmt = c.prepare_cached(CHECKPOINT_REMOVE).await?;
                    c.execute(&stmt, &[&scope, &id]).await
                })
                .await?;
            Ok(())
        })
    }
}
