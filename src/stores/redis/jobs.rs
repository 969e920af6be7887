//! Job statuses in Redis: one key per message id, with the status JSON and a TTL.

use super::*;

impl JobStore for RedisStore {
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.job_key(message_id);
        let limit = self.timeout;
        Box::pin(async move {
            let raw: Option<Vec<u8>> = bounded("redis", "job get", limit, async {
                ::redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            raw.map(|bytes| serde_json::from_slice(&bytes))
                .transpose()
                .map_err(|e| StoreError(format!("redis job get: stored status is not valid: {e}")))
        })
    }

    fn put(&self, status: JobStatus) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.job_key(&status.message_id);
        let limit = self.timeout;
        let retention = millis(self.job_retention);
        Box::pin(async move {
            let json =
                serde_json::to_vec(&status).map_err(|e| StoreError(format!("job status: {e}")))?;
            bounded("redis", "job put", limit, async {
                ::redis::cmd("SET")
                    .arg(key)
                    .arg(json)
                    .arg("PX")
                    .arg(retention)
                    .exec_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await
        })
    }

    /// One `EVALSHA` for the whole batch.
    fn put_many(self: Arc<Self>, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        self.job_put_many(statuses)
    }
}

impl RedisStore {
    fn job_put_many(&self, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let limit = self.timeout;
        let mut call = JOB_PUT_MANY.prepare_invoke();
        call.arg(millis(self.job_retention));
        for status in &statuses {
            match serde_json::to_vec(status) {
                Ok(json) => call.key(self.job_key(&status.message_id)).arg(json),
                Err(e) => {
                    return Box::pin(async move { Err(StoreError(format!("job status: {e}"))) })
                }
            };
        }
        Box::pin(async move {
            bounded("redis", "job put_many", limit, async {
                call.invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(failed)
            })
            .await
        })
    }
}
