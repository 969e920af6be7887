//! The supervisor's side of a workflow: watches on forwarded messages (kept in the workflow's
//! dedup store until the next step is sent) and the tick that acts on overdue ones per the
//! workflow's deadline policy (pure decisions in `workflow::deadline`).

use super::*;

/// The most watches one supervisor tick acts on (the next tick takes the rest).
const SCAN_LIMIT: usize = 100;

impl Worker {
    /// Keeps `watch` in the workflow's dedup store (scope: the workflow's name).
    pub(super) async fn keep_watch(
        &self,
        flow: &Flow,
        watch: &Watch,
    ) -> Result<(), crate::stores::StoreError> {
        let Some(dedup) = &self.queue.dedup else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(watch)
            .map_err(|e| crate::stores::StoreError(format!("watch: {e}")))?;
        dedup
            .store
            .watch(
                &flow.role.definition.name,
                &watch.message_id,
                watch.due_ms,
                bytes,
            )
            .await
    }

    /// Drops the watch of `message_id`; one left behind by a failure is dropped by the
    /// supervisor when it comes due (its continuation is marked done).
    pub(super) async fn drop_watch(&self, flow: &Flow, message_id: &str) {
        let Some(dedup) = &self.queue.dedup else {
            return;
        };
        let dropped = dedup
            .store
            .unwatch(&flow.role.definition.name, message_id)
            .await;
        if let Err(error) = dropped {
            tracing::debug!(%error, "workflow watch not dropped; the supervisor will");
        }
    }

    /// A tick of the workflow's supervisor schedule (fired by the one instance leading it):
    /// acts on each watch past its deadline. A store that does not answer skips the tick;
    /// the next one tries again.
    pub(super) async fn supervise(&self, msg: &Message, flow: &Flow) -> Verdict {
        let definition = &flow.role.definition;
        let (Some(deadline), Some(dedup)) = (definition.deadline, &self.queue.dedup) else {
            return Verdict::Done;
        };
        let due = match dedup
            .store
            .due(&definition.name, now_ms(), SCAN_LIMIT)
            .await
        {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "workflow supervisor cannot read its watches");
                return Verdict::Done;
            }
        };
        for (message_id, bytes) in due {
            let Ok(watch) = serde_json::from_slice::<Watch>(&bytes) else {
                tracing::error!(message_id, "unreadable workflow watch dropped");
                self.drop_watch(flow, &message_id).await;
                continue;
            };
            if let Err(verdict) = self.overdue(msg, flow, deadline, watch).await {
                return verdict;
            }
        }
        Verdict::Done
    }

    /// One step or compensation message past its deadline. Its continuation's claim tells
    /// whether it is stuck: done (it moved on; the watch was left behind) drops the watch,
    /// held (it is continuing now) leaves it, free means stuck: it is sent again, or (held
    /// by the supervisor, so a late run of the step cannot continue too) failed with
    /// `deadline_exceeded` and compensated.
    pub(super) async fn overdue(
        &self,
        msg: &Message,
        flow: &Flow,
        deadline: Deadline,
        watch: Watch,
    ) -> Result<(), Verdict> {
        let Some(dedup) = &self.queue.dedup else {
            return Ok(());
        };
        // The step queue's handler, whose claims its continuation is marked in.
        let scope = watch.queue.as_str();
        let marker = names::workflow_continued(&watch.message_id);
        let owner = format!("{}/{}", self.owner, self.claims.fetch_add(1, Relaxed));
        match dedup.store.claim(scope, &marker, &owner, dedup.lease).await {
            Ok(Claim::Done { .. }) => {
                self.drop_watch(flow, &watch.message_id).await;
                return Ok(());
            }
            Ok(Claim::Busy) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, "workflow supervisor cannot claim; next tick");
                return Ok(());
            }
            Ok(Claim::Acquired) => {}
        }
        let claim = Claimed {
            dedup,
            owner,
            id: marker,
        };
        let action = deadline::decide(&watch, deadline.policy);
        tracing::warn!(
            workflow = %flow.role.definition.name,
            message_id = %watch.message_id,
            redispatches = watch.redispatches,
            action = action.label(),
            "workflow step past its deadline"
        );
        match action {
            Action::Redispatch => {
                claim.release(scope).await;
                let again = watch.redispatched(now_ms(), deadline.after);
                if let Err(error) = self.keep_watch(flow, &again).await {
                    tracing::warn!(%error, "workflow watch not renewed; next tick");
                    return Ok(());
                }
                if let Err(e) = self.publish_outgoing(msg, &watch.outgoing()).await {
                    return Err(self.publish_failed(e));
                }
                flow.metrics.redispatched.inc();
            }
            Action::Compensate => {
                let plan = deadline::exceeded(&watch, deadline.after);
                let from = Continuing {
                    id: &watch.slip.id,
                    caller: &watch.slip.caller,
                    watched: Some(&watch.message_id),
                    completed: deadline::completed(&flow.role.definition.steps, &watch.body),
                    how: How::Fresh,
                };
                self.proceed(msg, flow, from, plan, Some(&claim), scope)
                    .await?;
                flow.metrics.deadline_compensated.inc();
            }
        }
        Ok(())
    }
}
