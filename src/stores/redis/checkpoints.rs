//! Checkpoints of long jobs in Redis: one key per handler and message id, with a TTL.

use super::*;

impl CheckpointStore for RedisStore {
    fn load(&self, scope: &str, id: &str) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.checkpoint_key(scope, id);
        let limit = self.timeout;
        Box::pin(bounded("redis", "checkpoint load", limit, async move {
            ::redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(failed)
        }))
    }

    fn save(
        &self,
        scope: &str,
        id: &str,
        state: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.checkpoint_key(scope, id);
        let limit = self.timeout;
        Box::pin(bounded("redis", "checkpoint save", limit, async move {
            ::redis::cmd("SET")
                .arg(key)
                .arg(state)
                .arg("PX")
                .arg(millis(ttl))
                .exec_async(&mut conn)
                .await
                .map_err(failed)
        }))
    }

    fn remove(&self, scope: &str, id: &str) -> BoxFuture<Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        let key = self.checkpoint_key(scope, id);
        let limit = self.timeout;
        Box::pin(bounded("redis", "checkpoint remove", limit, async move {
            ::redis::cmd("DEL")
                .arg(key)
                .exec_async(&mut conn)
                .await
                .map_err(failed)
        }))
    }
}
