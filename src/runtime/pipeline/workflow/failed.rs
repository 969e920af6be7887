//! A workflow message that fails for good (its last attempt, a permanent error, a guard): the
//! step is recorded as failed and the workflow compensates instead of dead-lettering it.

use super::*;

impl Worker {
    /// A step or compensation that will not run again (a permanent failure, its last retry,
    /// a crash loop): a step is recorded as failed and the workflow compensates; a
    /// compensation is dead-lettered (`compensation_failed`) and the next one runs.
    pub(crate) async fn give_up(
        &self,
        msg: &Message,
        error: HandlerError,
        attempts: u32,
    ) -> Verdict {
        match &self.workflow {
            Some(flow) if flow.role.kind != RoleKind::Entry => match origin(msg, flow) {
                Ok(origin) => {
                    self.workflow_failed(msg, flow, origin, error, attempts, None)
                        .await
                }
                Err(invalid) => self.dead_letter(msg, invalid, attempts).await,
            },
            _ => self.dead_letter(msg, error, attempts).await,
        }
    }

    pub(super) async fn workflow_failed(
        &self,
        msg: &Message,
        flow: &Flow,
        origin: Origin,
        error: HandlerError,
        attempts: u32,
        claim: Option<&Claimed<'_>>,
    ) -> Verdict {
        let record = Record::Failed {
            kind: error.kind().to_owned(),
            message: error.message().to_owned(),
        };
        let verdict = if flow.role.kind == RoleKind::Compensation {
            // Not recorded: a replay from the DLQ runs it again (its continuation is marked,
            // so the workflow does not move on twice).
            if let Some(claim) = claim {
                claim.release(msg.handler()).await;
            }
            let reason = HandlerError::permanent("compensation_failed", error.to_string());
            tracing::error!(%error, attempts, "compensation failed; dead-lettered for an operator");
            self.job(msg, "dead_lettered", |j| {
                j.error = Some(serde_json::json!({"kind": "compensation_failed", "message": error.to_string()}));
                j.retrying = Some(false);
            })
            .await;
            if let Err(e) = copies::dead_letter(msg, &reason, attempts).await {
                return self.publish_failed(e);
            }
            self.metrics.dead_letter(reason.kind());
            if let Some(step) = &flow.metrics.step {
                step.compensation_failures.inc();
            }
            self.recent.push(
                msg.handler(),
                msg.message_id(),
                reason.kind(),
                reason.message(),
            );
            Verdict::DeadLettered
        } else {
            tracing::warn!(%error, attempts, "workflow step failed; compensating");
            self.job(msg, "failed", |j| {
                j.error =
                    Some(serde_json::json!({"kind": error.kind(), "message": error.message()}));
                j.retrying = Some(false);
            })
            .await;
            self.save(msg, claim, &record).await;
            Verdict::Done
        };
        match self.continue_once(msg, flow, origin, record, true).await {
            Ok(()) => verdict,
            Err(verdict) => verdict,
        }
    }
}
