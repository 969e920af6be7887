//! Publishing what a plan says, in order and confirmed: the progress reply, then the next
//! message or the final reply; and the metrics and statuses of a continued message.

use super::*;

impl Worker {
    /// The progress reply, then the next message or the final reply, each confirmed.
    pub(super) async fn publish_plan(
        &self,
        msg: &Message,
        id: &str,
        caller: &Caller,
        plan: &Plan,
    ) -> Result<(), PublishError> {
        let trace = msg.trace();
        let send = |status: Status, body: Vec<u8>, message_id: Option<String>| async move {
            match &caller.reply_to {
                Some(reply_to) => {
                    reply::send_as(
                        msg.publisher(),
                        reply_to,
                        caller.correlation_id.as_deref(),
                        message_id.as_deref(),
                        status,
                        body,
                        Some(trace),
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        if let Some(progress) = &plan.progress {
            send(Status::Progress, progress.to_string().into_bytes(), None).await?;
        }
        match &plan.next {
            Next::Send(out) => self.publish_outgoing(msg, out).await,
            Next::FanOut(fan_out) => {
                let sends = fan_out.children.iter().map(|child| {
                    let mut table = FieldTable::default();
                    headers::set_string(&mut table, TRACEPARENT, trace.child().to_string());
                    let properties = BasicProperties::default()
                        .with_message_id(child.message_id.as_str().into())
                        .with_correlation_id(child.correlation_id.as_str().into())
                        .with_reply_to(fan_out.join_queue.as_str().into())
                        .with_timestamp(crate::stores::now() as u64)
                        .with_headers(table);
                    let body = child.body.to_string().into_bytes();
                    async move {
                        msg.publisher()
                            .publish_json(&fan_out.queue, &body, properties)
                            .await
                    }
                });
                futures::future::try_join_all(sends).await.map(drop)
            }
            Next::Finish(last) => {
                // The same id on every copy a redelivery can repeat.
                let id = Some(names::workflow_final(id));
                match last.reply() {
                    Ok(output) => send(Status::Ok, output.to_string().into_bytes(), id).await,
                    Err(error) => send(Status::Error, error.to_string().into_bytes(), id).await,
                }
            }
        }
    }

    /// A step or compensation message, confirmed.
    pub(super) async fn publish_outgoing(
        &self,
        msg: &Message,
        out: &Outgoing,
    ) -> Result<(), PublishError> {
        let mut table = out.slip.to_headers();
        headers::set_string(&mut table, TRACEPARENT, msg.trace().child().to_string());
        let properties = BasicProperties::default()
            .with_message_id(out.message_id.as_str().into())
            .with_timestamp(crate::stores::now() as u64)
            .with_headers(table);
        msg.publisher()
            .publish_json(&out.queue, &out.body.to_bytes(), properties)
            .await
    }

    /// Metrics and the workflow's job status at its end, written to the store before the
    /// mark and the ack (see `JobRecorder::write_now`).
    pub(super) async fn account(&self, flow: &Flow, from: &Continuing<'_>, plan: &Plan) {
        let Next::Finish(last) = &plan.next else {
            return;
        };
        match last {
            Final::Succeeded(_) => flow.metrics.completed.inc(),
            Final::Failed(_) => flow.metrics.failed.inc(),
            Final::Compensated { .. } => flow.metrics.compensated.inc(),
        }
        if let Some(jobs) = &flow.jobs {
            let state = deadline::state(&flow.role.definition.steps, &from.completed, plan);
            jobs.write_now(from.id, last.job_status(), 1, |j| {
                match last.reply() {
                    Ok(output) => j.result = Some(output.clone()),
                    Err(_) => {
                        j.error = Some(last.error());
                        j.retrying = Some(false);
                    }
                }
                j.workflow = Some(state);
            })
            .await;
        }
    }
}
