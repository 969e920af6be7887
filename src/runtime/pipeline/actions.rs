//! Broker actions for an outcome, each confirmed before the ack: the reply, a retry copy or a
//! dead-letter copy (with an `error` reply to a waiting caller); and the routing of ordered
//! and banded entry queues.

use super::{Route, Verdict, Worker};
use crate::client::reply::{self, Status};
use crate::client::PublishError;
use crate::error::HandlerError;
use crate::extract::FromMessage;
use crate::message::Message;
use crate::outcome::Outcome;
use crate::runtime::copies;

impl Worker {
    /// Success: the reply (confirmed) to a waiting caller; failure: a retry or a dead-letter.
    pub(super) async fn act(&self, msg: &Message, outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::Done(body) => {
                self.job(msg, "succeeded", |j| {
                    j.result = serde_json::from_slice(&body).ok();
                })
                .await;
                if let Err(verdict) = self.reply_ok(msg, body).await {
                    return verdict;
                }
                if msg.checkpointed() {
                    self.forget_checkpoint(msg).await;
                }
                self.metrics.ok.inc();
                Verdict::Done
            }
            Outcome::Failed(error) => self.fail(msg, error).await,
            Outcome::Cancelled => self.cancelled(msg).await,
            Outcome::Continue(state) => self.next_slice(msg, state).await,
        }
    }

    /// A cancelled job (before it started or while it ran): the `cancelled` error reply
    /// (confirmed), its checkpoint removed, acked.
    pub(super) async fn cancelled(&self, msg: &Message) -> Verdict {
        tracing::info!("job cancelled");
        let error = HandlerError::permanent("cancelled", "the job was cancelled");
        self.job(msg, "cancelled", |j| {
            j.error = Some(error_json(&error));
        })
        .await;
        if let Some(reply_to) = msg.reply_target() {
            let sent = reply::send(
                msg.publisher(),
                reply_to,
                msg.correlation_id(),
                Status::Error,
                reply::error_body(&error),
                Some(msg.trace()),
            )
            .await;
            if let Err(e) = sent {
                return self.publish_failed(e);
            }
            self.metrics.reply_error.inc();
        }
        // Also when this attempt took none: an earlier one may have saved one.
        self.forget_checkpoint(msg).await;
        self.metrics.cancelled.inc();
        Verdict::Cancelled
    }

    /// A continuation: the next slice (confirmed), then the ack.
    async fn next_slice(&self, msg: &Message, state: Vec<u8>) -> Verdict {
        match copies::continuation(msg, state).await {
            Ok(()) => {
                self.metrics.continued.inc();
                Verdict::Continued
            }
            Err(e) => self.publish_failed(e),
        }
    }

    /// Removes the message's checkpoint: its job ended. A store that does not answer leaves
    /// it to expire.
    pub(super) async fn forget_checkpoint(&self, msg: &Message) {
        let Some(id) = msg.message_id() else {
            return;
        };
        if let Err(error) = msg.control().store.remove(msg.handler(), id).await {
            tracing::warn!(%error, "checkpoint not removed; it expires on its own");
        }
    }

    /// The `ok` reply (confirmed) to a caller waiting on `reply_to`, if any; a failed publish
    /// is the verdict.
    pub(super) async fn reply_ok(&self, msg: &Message, body: Vec<u8>) -> Result<(), Verdict> {
        let Some(reply_to) = msg.reply_target() else {
            return Ok(());
        };
        let trace = Some(msg.trace());
        let sent = reply::send(
            msg.publisher(),
            reply_to,
            msg.correlation_id(),
            Status::Ok,
            body,
            trace,
        )
        .await;
        if let Err(e) = sent {
            return Err(self.publish_failed(e));
        }
        self.metrics.reply_ok.inc();
        Ok(())
    }

    /// A failed attempt: retry later if the policy allows, otherwise dead-letter.
    pub(super) async fn fail(&self, msg: &Message, error: HandlerError) -> Verdict {
        let attempt = msg.attempt();
        if error.is_transient() {
            if let Some(delay) = self.queue.retry.delay_after(attempt) {
                tracing::warn!(%error, ?delay, "attempt failed; retry scheduled");
                self.job(msg, "failed", |j| {
                    j.error = Some(error_json(&error));
                    j.retrying = Some(true);
                })
                .await;
                return match copies::schedule_retry(msg, &error, &self.queue.retry, delay).await {
                    Ok(()) => {
                        self.metrics.retry(attempt);
                        Verdict::Retried
                    }
                    Err(e) => self.publish_failed(e),
                };
            }
        }
        self.give_up(msg, error, attempt).await
    }

    /// Dead-letters with the reason; the caller (if any) gets an `error` reply, unless it got
    /// one before this message was replayed from the DLQ.
    pub(crate) async fn dead_letter(
        &self,
        msg: &Message,
        error: HandlerError,
        attempts: u32,
    ) -> Verdict {
        tracing::warn!(%error, attempts, "dead-lettering message");
        self.job(msg, "dead_lettered", |j| {
            j.error = Some(error_json(&error));
            j.retrying = Some(false);
        })
        .await;
        if let Err(e) = copies::dead_letter(msg, &error, attempts).await {
            return self.publish_failed(e);
        }
        // Whether or not this delivery reached the handler (a crash loop's last one does
        // not), earlier attempts may have saved a checkpoint; dead-letters are rare enough.
        self.forget_checkpoint(msg).await;
        if let Some(reply_to) = msg.reply_target() {
            let body = reply::error_body(&error);
            if let Err(e) = reply::send(
                msg.publisher(),
                reply_to,
                msg.correlation_id(),
                Status::Error,
                body,
                Some(msg.trace()),
            )
            .await
            {
                // The dead-letter copy is safe; a lost error reply must not duplicate it.
                tracing::warn!(error = %e, "error reply not sent");
            } else {
                self.metrics.reply_error.inc();
            }
        }
        self.metrics.dead_letter(error.kind());
        self.recent.push(
            msg.handler(),
            msg.message_id(),
            error.kind(),
            error.message(),
        );
        Verdict::DeadLettered
    }

    pub(crate) fn publish_failed(&self, error: PublishError) -> Verdict {
        tracing::warn!(%error, "publish failed; message goes back to the queue");
        if matches!(error, PublishError::Connection(_)) {
            self.session_failed.cancel();
        }
        Verdict::Requeue
    }

    /// Moves an ordered message to its key's partition queue (confirmed before the ack).
    pub(super) async fn route(&self, msg: &Message, route: &Route) -> Verdict {
        let target = match route {
            Route::Partitions(partitions) => {
                let key = match crate::extract::Sequence::from_message(msg, &()) {
                    Ok(seq) => seq.key,
                    Err(error) => return self.dead_letter(msg, error, msg.attempt()).await,
                };
                let partition = crate::names::partition_of(&key, *partitions);
                crate::names::partition_queue(msg.queue(), partition)
            }
            Route::Bands(bands) => {
                let priority = msg.properties().priority().unwrap_or(0);
                crate::names::band_queue(msg.queue(), bands.band_of(priority))
            }
        };
        match copies::forward(msg, &target).await {
            Ok(()) => Verdict::Moved,
            Err(e) => self.publish_failed(e),
        }
    }
}

fn error_json(error: &HandlerError) -> serde_json::Value {
    serde_json::json!({"kind": error.kind(), "message": error.message()})
}
