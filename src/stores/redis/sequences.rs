//! Sequence state in Redis: each key's next expected number, and producer stamps.

use super::*;

impl SequenceStore for RedisStore {
    fn next(&self, scope: &str, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.sequence_key(scope, key);
        let limit = self.timeout;
        Box::pin(async move {
            let raw: Option<Vec<u8>> = bounded("redis", "sequence next", limit, async {
                ::redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            parse_next(raw)
        })
    }

    fn advance(
        &self,
        scope: &str,
        key: &str,
        from: u64,
        to: u64,
    ) -> BoxFuture<Result<bool, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.sequence_key(scope, key);
        let limit = self.timeout;
        Box::pin(async move {
            let moved: i64 = bounded("redis", "sequence advance", limit, async {
                ADVANCE
                    .key(key)
                    .arg(from.to_string())
                    .arg(to.to_string())
                    .invoke_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            Ok(moved == 1)
        })
    }
}

impl SequenceStamper for RedisStore {
    fn stamp(&self, key: &str) -> BoxFuture<Result<u64, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.stamp_key(key);
        let limit = self.timeout;
        Box::pin(async move {
            let n: i64 = bounded("redis", "stamp", limit, async {
                ::redis::cmd("INCR")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed)
            })
            .await?;
            u64::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| StoreError(format!("redis stamp: counter at {n}, not positive")))
        })
    }
}
