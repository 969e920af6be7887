//! Exactly-once effects: the handler's own writes and the dedup row commit in one
//! transaction ([`PostgresStore::begin_once`]).

use super::*;

/// The answer of [`PostgresStore::begin_once`].
#[derive(Debug)]
pub enum Once {
    /// First time (or the earlier attempts rolled back): do the work in this transaction.
    New(OnceTx),
    /// Already committed once; `reply` is what that commit stored.
    Done {
        /// The reply body stored by [`OnceTx::commit`].
        reply: Option<Vec<u8>>,
    },
}

/// An open transaction holding the not-yet-visible "done" row of one id.
///
/// Run the handler's writes through [`client`](Self::client), then [`commit`](Self::commit).
/// Dropping it without committing rolls back (in a background task; without a runtime, by
/// closing the connection). Do not issue `COMMIT`, `ROLLBACK` or `BEGIN` yourself.
pub struct OnceTx {
    // Boxed: keeps `Once` small.
    pub(super) conn: Option<Box<Pooled>>,
    pub(super) scope: String,
    pub(super) id: String,
    pub(super) timeout: Duration,
}

impl std::fmt::Debug for OnceTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnceTx")
            .field("scope", &self.scope)
            .field("id", &self.id)
            .finish()
    }
}

impl OnceTx {
    /// The connection the transaction is open on: every statement run on it is part of the
    /// transaction (`prepare_cached` and the `tokio_postgres::Client` methods through `Deref`).
    pub fn client(&self) -> &ClientWrapper {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("an OnceTx holds its connection until it ends"),
        }
    }

    /// The id this transaction makes done.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stores `reply` with the done row and commits: the handler's writes and the done mark
    /// become visible together. On error (including a timeout) the outcome is unknown to
    /// this call but atomic: either both are committed (a retry gets [`Once::Done`]) or
    /// neither (a retry runs again).
    pub async fn commit(mut self, reply: Option<Vec<u8>>) -> Result<(), StoreError> {
        let Some(conn) = self.conn.take().map(|c| *c) else {
            return Err(StoreError(
                "postgres commit: transaction already ended".into(),
            ));
        };
        let (scope, id) = (
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.id),
        );
        bounded("postgres", "commit", self.timeout, async move {
            let stmt = conn.prepare_cached(ONCE_REPLY).await.map_err(pg)?;
            let has_reply = reply.is_some();
            let updated = conn
                .execute(&stmt, &[&scope, &id, &reply, &has_reply])
                .await
                .map_err(pg)?;
            if updated != 1 {
                // Unsettled: dropping `conn` closes it and the server rolls back.
                return Err(StoreError(format!(
                    "postgres commit: the done row of {scope}/{id} is gone"
                )));
            }
            conn.batch_execute("COMMIT").await.map_err(pg)?;
            conn.settle();
            Ok(())
        })
        .await
    }

    /// Rolls back now (instead of in the background on drop).
    pub async fn rollback(mut self) -> Result<(), StoreError> {
        let Some(conn) = self.conn.take().map(|c| *c) else {
            return Ok(());
        };
        bounded("postgres", "rollback", self.timeout, async move {
            conn.batch_execute("ROLLBACK").await.map_err(pg)?;
            conn.settle();
            Ok(())
        })
        .await
    }
}

impl Drop for OnceTx {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take().map(|c| *c) else {
            return;
        };
        let limit = self.timeout;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let rollback = tokio::time::timeout(limit, conn.batch_execute("ROLLBACK"));
                    if let Ok(Ok(())) = rollback.await {
                        conn.settle();
                    }
                    // Otherwise `conn` drops unsettled: closed, so the server rolls back.
                });
            }
            Err(_) => drop(conn),
        }
    }
}
