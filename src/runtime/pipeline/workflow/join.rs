//! Fan-in: the state a fan-out step's join continues from, and the join queue's handler
//! (record each child's reply once, continue once when all are in).

use super::*;

impl Worker {
    /// Stores what the join of `fan_out` continues from (first write wins).
    pub(super) async fn keep_join_state(
        &self,
        fan_out: &plan::FanOut,
    ) -> Result<(), crate::stores::StoreError> {
        let Some(dedup) = &self.queue.dedup else {
            return Ok(());
        };
        let state = serde_json::to_vec(&fan_out.state)
            .map_err(|e| crate::stores::StoreError(format!("join state: {e}")))?;
        dedup
            .store
            .join_record(
                &fan_out.join_queue,
                &fan_out.join_id,
                plan::JOIN_STATE,
                state,
                dedup.retention,
            )
            .await
            .map(drop)
    }

    /// A child's reply on a fan-out step's join queue: recorded under its index (the first
    /// record of an index stays); the reply that completes the join (or any later duplicate,
    /// on any instance) continues the workflow, once, under `<id>:<step>#joined`. Progress
    /// replies of children are dropped.
    pub(super) async fn join(&self, msg: &Message, flow: &Flow, compensable: bool) -> Verdict {
        let status = headers::get_string(msg.headers(), headers::STATUS);
        let ok = match status.as_deref().and_then(Status::parse) {
            Some(Status::Progress) => return Verdict::Done,
            Some(status) => status == Status::Ok,
            None => {
                let error = HandlerError::invalid_input("not a child reply: no x-status header");
                return self.dead_letter(msg, error, msg.attempt()).await;
            }
        };
        let Some((join_id, index, children)) = msg.correlation_id().and_then(plan::parse_child)
        else {
            let error = HandlerError::invalid_input(
                "not a child reply: correlation_id is not <workflow id>:<step>:<i>/<n>",
            );
            return self.dead_letter(msg, error, msg.attempt()).await;
        };
        let Some(dedup) = &self.queue.dedup else {
            let error = HandlerError::permanent("workflow", "a join needs a dedup store");
            return self.dead_letter(msg, error, msg.attempt()).await;
        };
        let record = plan::child_record(ok, msg.body());
        // A `Record` always serializes.
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        let scope = msg.handler();
        let recorded = dedup
            .store
            .join_record(scope, join_id, &index.to_string(), bytes, dedup.retention)
            .await;
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(error) => {
                tracing::warn!(%error, "join not recorded; child reply deferred");
                return self.defer_for_store(msg).await;
            }
        };
        self.metrics.ok.inc();
        if !plan::join_complete(recorded, children) {
            return Verdict::Done;
        }
        let fields = match dedup.store.join_fields(scope, join_id).await {
            Ok(fields) => fields,
            Err(error) => {
                tracing::warn!(%error, "join not read; child reply deferred");
                return self.defer_for_store(msg).await;
            }
        };
        let definition = &flow.role.definition;
        let Some(plan) = plan::joined(&fields, compensable, &definition.finish) else {
            let error = HandlerError::permanent(
                "workflow",
                format!("join {join_id} is complete but its fields are not readable"),
            );
            return self.dead_letter(msg, error, msg.attempt()).await;
        };
        let (id, _) = join_id.rsplit_once(':').unwrap_or((join_id, ""));
        let (caller, completed) =
            match serde_json::from_slice::<plan::JoinState>(&fields[plan::JOIN_STATE]) {
                Ok(state) => (
                    state.slip.caller,
                    deadline::completed(&definition.steps, &state.body),
                ),
                Err(_) => (Caller::default(), Vec::new()),
            };
        let marker = names::workflow_joined(join_id);
        let from = Continuing {
            id,
            caller: &caller,
            watched: Some(join_id),
            completed,
            how: How::Fresh,
        };
        match self
            .continue_with(msg, flow, Some(&marker), from, || plan)
            .await
        {
            Ok(()) => Verdict::Done,
            Err(verdict) => verdict,
        }
    }
}
