//! Dedup: claim the message id before the handler runs (a duplicate is acked with its cached
//! reply, a busy id or an unreachable store defers the message), settle the claim after.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Verdict, Worker};
use crate::message::Message;
use crate::outcome::Outcome;
use crate::queue::Dedup;
use crate::runtime::copies;
use crate::stores::Claim;

/// A claim this attempt holds: settled after the handler ran.
pub(super) struct Claimed<'a> {
    pub(super) dedup: &'a Dedup,
    pub(super) owner: String,
    pub(super) id: String,
}

/// What a claim found in the store.
pub(super) enum Found<'a> {
    /// Nobody ran it to the end: this attempt holds the claim (`None`: no dedup).
    Fresh(Option<Claimed<'a>>),
    /// It already succeeded; the recorded reply, if one was kept.
    Done(Option<Vec<u8>>),
}

impl Worker {
    /// Claims the message id in the dedup store. `Ok(Some)` = run it (and settle the claim
    /// after); `Ok(None)` = run it, no dedup; `Err(verdict)` = do not run it.
    pub(super) async fn claim(&self, msg: &Message) -> Result<Option<Claimed<'_>>, Verdict> {
        let Some(id) = msg.message_id() else {
            return Ok(None);
        };
        match self.claim_id(msg, id).await? {
            Found::Fresh(claim) => Ok(claim),
            Found::Done(reply) => {
                tracing::debug!("duplicate of a message that already succeeded");
                let body = reply.unwrap_or_else(|| b"null".to_vec());
                self.reply_ok(msg, body).await?;
                self.metrics.duplicate.inc();
                Err(Verdict::Duplicate)
            }
        }
    }

    /// Claims `id` (the message id, or a key derived from it) in the handler's dedup store;
    /// a busy id or an unreachable store defers the message (`Err`).
    pub(super) async fn claim_id(&self, msg: &Message, id: &str) -> Result<Found<'_>, Verdict> {
        let Some(dedup) = &self.queue.dedup else {
            return Ok(Found::Fresh(None));
        };
        // A token per claim: this instance's identity and a counter.
        let owner = format!("{}/{}", self.owner, self.claims.fetch_add(1, Relaxed));
        match dedup
            .store
            .claim(msg.handler(), id, &owner, dedup.lease)
            .await
        {
            Ok(Claim::Acquired) => {
                if self.context.store_down.swap(false, Relaxed) {
                    tracing::info!("dedup store answers again");
                }
                Ok(Found::Fresh(Some(Claimed {
                    dedup,
                    owner,
                    id: id.to_owned(),
                })))
            }
            Ok(Claim::Done { reply }) => Ok(Found::Done(reply)),
            Ok(Claim::Busy) => {
                tracing::debug!(delay = ?dedup.busy_delay, "message id busy on another instance; deferred");
                self.metrics.deferred_busy.inc();
                Err(self.defer(msg, dedup.busy_delay).await)
            }
            Err(error) => {
                // Never run without the check, and never spend an attempt on the store's
                // outage: the message waits in the broker like a busy id, so an outage of
                // any length ends with every message run once.
                if self.context.store_down.swap(true, Relaxed) {
                    tracing::debug!(%error, "dedup store unavailable; message deferred");
                } else {
                    tracing::warn!(%error, delay = ?dedup.busy_delay,
                        "dedup store unavailable; deferring messages until it answers");
                }
                self.metrics.deferred_store.inc();
                Err(self.defer(msg, dedup.busy_delay).await)
            }
        }
    }

    /// Puts the message back in the broker for `delay` without counting an attempt.
    pub(super) async fn defer(&self, msg: &Message, delay: Duration) -> Verdict {
        match copies::park(msg, delay, None).await {
            Ok(()) => Verdict::Moved,
            Err(e) => self.publish_failed(e),
        }
    }

    /// Records success (with the reply) or releases the claim so a retry can run.
    pub(super) async fn settle_claim(
        &self,
        claim: Option<Claimed<'_>>,
        msg: &Message,
        outcome: &Outcome,
    ) {
        let Some(claim) = claim else {
            return;
        };
        match outcome {
            Outcome::Done(body) => {
                claim
                    .complete(msg.handler(), msg.reply_to().map(|_| body.clone()))
                    .await
            }
            // Failed (a retry must be able to claim), cancelled, or continued (the next slice
            // carries the same id).
            Outcome::Failed(_) | Outcome::Cancelled | Outcome::Continue(_) => {
                claim.release(msg.handler()).await
            }
        }
    }
}

impl Claimed<'_> {
    /// Records the id as done, keeping `reply`.
    pub(super) async fn complete(&self, scope: &str, reply: Option<Vec<u8>>) {
        let dedup = self.dedup;
        let result = dedup
            .store
            .complete(scope, &self.id, &self.owner, reply, dedup.retention)
            .await;
        if let Err(error) = result {
            // The handler ran; the lease lapses by itself. Duplicates become possible again
            // after it does, which at-least-once delivery allows.
            tracing::warn!(%error, "dedup store not updated");
        }
    }

    /// Drops the claim so another attempt can run.
    pub(super) async fn release(&self, scope: &str) {
        if let Err(error) = self.dedup.store.release(scope, &self.id, &self.owner).await {
            // The lease lapses by itself.
            tracing::warn!(%error, "dedup store not updated");
        }
    }
}
