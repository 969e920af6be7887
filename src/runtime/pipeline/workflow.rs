//! Workflow messages (see [`workflow`](crate::workflow)): the entry, step and compensation
//! queues run their handler like any other, then *record, continue, mark*:
//!
//! ```text
//! claim <id> ─► run ─► record {"ok": output} | {"failed": …} under <id>
//!   ─► claim <id>#continued ─► progress reply, next message or final reply (confirmed)
//!   ─► mark <id>#continued done ─► ack
//! ```
//! A redelivered message whose `<id>` is recorded does not run again: it continues from the
//! record, unless `<id>#continued` says that was done too. What to publish is decided by the
//! pure functions of `workflow::plan`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use super::dedup::{Claimed, Found};
use super::{Verdict, Worker};
use crate::client::reply::{self, Status};
use crate::client::PublishError;
use crate::error::HandlerError;
use crate::headers;
use crate::message::Message;
use crate::names;
use crate::ops::metrics::WorkflowMetrics;
use crate::ops::trace_context::TRACEPARENT;
use crate::outcome::Outcome;
use crate::runtime::copies;
use crate::runtime::job_writer::JobRecorder;
use crate::stores::Claim;
use crate::workflow::deadline::{self, Action, Deadline, Watch};
use crate::workflow::plan::{self, Final, Next, Outgoing, Plan, Record};
use crate::workflow::slip::{Body, Caller, Slip};
use crate::workflow::{Role, RoleKind};

/// A workflow queue's part in its workflow, with its handles.
#[derive(Clone)]
pub(crate) struct Flow {
    pub role: Arc<Role>,
    pub metrics: WorkflowMetrics,
    /// Statuses of whole workflows, by workflow id.
    pub jobs: Option<JobRecorder>,
}

/// Where a workflow message stands: a new workflow, or a step / compensation with its slip.
enum Origin {
    Entry {
        id: String,
        caller: Caller,
        input: Value,
    },
    Slip {
        slip: Box<Slip>,
        body: Body,
    },
}

impl Origin {
    /// The workflow id.
    fn id(&self) -> &str {
        match self {
            Origin::Entry { id, .. } => id,
            Origin::Slip { slip, .. } => &slip.id,
        }
    }

    fn caller(&self) -> &Caller {
        match self {
            Origin::Entry { caller, .. } => caller,
            Origin::Slip { slip, .. } => &slip.caller,
        }
    }
}

/// How a continuation came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// A new workflow: counted as started.
    Entry,
    /// After a handler run (or a join, or the supervisor) in this attempt.
    Fresh,
    /// A redelivery continuing from its record: it may come after the workflow moved on, so
    /// it does not write the workflow's `running` state.
    Again,
}

/// What a continuation continues.
struct Continuing<'a> {
    /// The workflow id.
    id: &'a str,
    caller: &'a Caller,
    /// The watched step or compensation message whose continuation this is: its watch is
    /// dropped once the continuation is published.
    watched: Option<&'a str>,
    /// The steps completed before it (for the workflow's `/jobs` state).
    completed: Vec<String>,
    how: How,
}

/// The most watches one supervisor tick acts on (the next tick takes the rest).
const SCAN_LIMIT: usize = 100;

/// Now, in ms since the epoch.
fn now_ms() -> u64 {
    (crate::stores::now() * 1000.0) as u64
}

impl Worker {
    /// A workflow message, after the guards.
    pub(super) async fn handle_workflow(&self, msg: Message, flow: &Flow) -> Verdict {
        match flow.role.kind {
            RoleKind::Join { compensable } => return self.join(&msg, flow, compensable).await,
            RoleKind::Supervisor => return self.supervise(&msg, flow).await,
            _ => {}
        }
        let origin = match origin(&msg, flow) {
            Ok(origin) => origin,
            Err(error) => return self.dead_letter(&msg, error, msg.attempt()).await,
        };
        let claim = match msg.message_id() {
            Some(id) => match self.claim_id(&msg, id).await {
                Err(verdict) => return verdict,
                Ok(Found::Done(record)) => {
                    // Ran to an end before (a redelivery, a duplicate): continue from the
                    // record, never run the effect again.
                    let Some(record) = record.and_then(|r| serde_json::from_slice(&r).ok()) else {
                        tracing::warn!("workflow message recorded without a readable record");
                        self.metrics.duplicate.inc();
                        return Verdict::Duplicate;
                    };
                    return match self.continue_once(&msg, flow, origin, record, false).await {
                        Ok(()) => {
                            self.metrics.duplicate.inc();
                            Verdict::Duplicate
                        }
                        Err(verdict) => verdict,
                    };
                }
                Ok(Found::Fresh(claim)) => claim,
            },
            None => None,
        };
        let started = Instant::now();
        let (msg, outcome) = self.run(msg).await;
        let record = match outcome {
            Outcome::Done(body) => {
                let output = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if let (RoleKind::Step { .. }, Some(step)) = (flow.role.kind, &flow.metrics.step) {
                    step.duration.observe(started.elapsed().as_secs_f64());
                }
                if flow.role.kind != RoleKind::Entry {
                    // The entry's job is the workflow's: it stays `running`.
                    self.job(&msg, "succeeded", |j| j.result = Some(output.clone()))
                        .await;
                }
                self.metrics.ok.inc();
                Record::Ok(output)
            }
            Outcome::Failed(error)
                if error.is_transient()
                    && self.queue.retry.delay_after(msg.attempt()).is_some() =>
            {
                if let Some(claim) = &claim {
                    claim.release(msg.handler()).await;
                }
                return self.fail(&msg, error).await;
            }
            Outcome::Failed(error) => {
                if flow.role.kind == RoleKind::Entry {
                    if let Some(claim) = &claim {
                        claim.release(msg.handler()).await;
                    }
                    return self.dead_letter(&msg, error, msg.attempt()).await;
                }
                let attempts = msg.attempt();
                return self
                    .workflow_failed(&msg, flow, origin, error, attempts, claim.as_ref())
                    .await;
            }
            // A cancelled workflow message stops where it is (the caller gets `cancelled`).
            Outcome::Cancelled => {
                if let Some(claim) = &claim {
                    claim.release(msg.handler()).await;
                }
                return self.cancelled(&msg).await;
            }
            // The slip is the workflow's continuation; a step cannot have one of its own.
            Outcome::Continue(_) => {
                let error = HandlerError::permanent(
                    "invalid_outcome",
                    "a workflow step cannot return Continue (its slip is the continuation)",
                );
                let attempts = msg.attempt();
                return self
                    .workflow_failed(&msg, flow, origin, error, attempts, claim.as_ref())
                    .await;
            }
        };
        self.save(&msg, claim.as_ref(), &record).await;
        match self.continue_once(&msg, flow, origin, record, true).await {
            Ok(()) => Verdict::Done,
            Err(verdict) => verdict,
        }
    }

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

    async fn workflow_failed(
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

    /// Records how the handler ended under the message id (with the claim this attempt
    /// holds, or without one after a guard gave up).
    async fn save(&self, msg: &Message, claim: Option<&Claimed<'_>>, record: &Record) {
        let bytes = serde_json::to_vec(record).ok();
        match (claim, &self.queue.dedup, msg.message_id()) {
            (Some(claim), _, _) => claim.complete(msg.handler(), bytes).await,
            (None, Some(dedup), Some(id)) => {
                let saved = dedup
                    .store
                    .complete(msg.handler(), id, &self.owner, bytes, dedup.retention)
                    .await;
                if let Err(error) = saved {
                    tracing::warn!(%error, "dedup store not updated");
                }
            }
            _ => {}
        }
    }

    /// Publishes what follows `record`, once per message id: a second key records that it
    /// was published (a duplicate that finds it acks without publishing again). `fresh`: the
    /// handler ran in this attempt (not a redelivery continuing from its record).
    async fn continue_once(
        &self,
        msg: &Message,
        flow: &Flow,
        origin: Origin,
        record: Record,
        fresh: bool,
    ) -> Result<(), Verdict> {
        let marker = msg.message_id().map(names::workflow_continued);
        let id = origin.id().to_owned();
        let caller = origin.caller().clone();
        let entry = flow.role.kind == RoleKind::Entry;
        let completed = match &origin {
            Origin::Slip { body, .. } => deadline::completed(&flow.role.definition.steps, body),
            Origin::Entry { .. } => Vec::new(),
        };
        let from = Continuing {
            id: &id,
            caller: &caller,
            watched: msg.message_id().filter(|_| !entry),
            completed,
            how: match (entry, fresh) {
                (true, true) => How::Entry,
                (false, true) => How::Fresh,
                (_, false) => How::Again,
            },
        };
        let plan = || plan_for(flow, origin, record);
        self.continue_with(msg, flow, marker.as_deref(), from, plan)
            .await
    }

    /// Publishes `plan` once per `marker` (claimed before, marked done after; `None`: no
    /// dedup).
    async fn continue_with(
        &self,
        msg: &Message,
        flow: &Flow,
        marker: Option<&str>,
        from: Continuing<'_>,
        plan: impl FnOnce() -> Plan,
    ) -> Result<(), Verdict> {
        let claim = match marker {
            Some(marker) => match self.claim_id(msg, marker).await? {
                Found::Done(_) => return Ok(()),
                Found::Fresh(claim) => claim,
            },
            None => None,
        };
        self.proceed(msg, flow, from, plan(), claim.as_ref(), msg.handler())
            .await
    }

    /// Publishes `plan` under the continuation claim `claim` (of `scope`), completed once
    /// published: the workflow's state and watch first, then the messages, then the mark.
    async fn proceed(
        &self,
        msg: &Message,
        flow: &Flow,
        from: Continuing<'_>,
        mut plan: Plan,
        claim: Option<&Claimed<'_>>,
        scope: &str,
    ) -> Result<(), Verdict> {
        let definition = &flow.role.definition;
        let release = || async {
            if let Some(claim) = claim {
                claim.release(scope).await;
            }
        };
        if !definition.compensates {
            if let Next::Finish(last) = plan.next {
                plan.next = Next::Finish(last.without_compensations());
            }
        }
        if from.how == How::Entry {
            flow.metrics.started.inc();
        }
        if let (Some(deadline), Next::Send(out)) = (definition.deadline, &plan.next) {
            // Watched before it exists, so no step is ever in flight unwatched.
            let watch = Watch::new(out, now_ms(), deadline.after);
            if let Err(error) = self.keep_watch(flow, &watch).await {
                tracing::warn!(%error, "workflow watch not stored; continuation deferred");
                release().await;
                return Err(self.defer_for_store(msg).await);
            }
        }
        if from.how != How::Again && !matches!(plan.next, Next::Finish(_)) {
            // Stored before the next message exists, so it cannot land after the end (the
            // entry's `running` included).
            if let Some(jobs) = &flow.jobs {
                let state = deadline::state(&definition.steps, &from.completed, &plan);
                jobs.write_now(from.id, "running", 1, |j| j.workflow = Some(state))
                    .await;
            }
        }
        if let Next::FanOut(fan_out) = &plan.next {
            // The join's state is in the store before any child exists to complete it.
            if let Err(error) = self.keep_join_state(fan_out).await {
                tracing::warn!(%error, "join state not stored; fan-out deferred");
                release().await;
                return Err(self.defer_for_store(msg).await);
            }
        }
        // The end is stored before the final reply, so that the window between the reply and
        // the mark (where a killed instance leaves a redelivery to reply again) is one store
        // call; a redelivery that continues writes the same end again.
        self.account(flow, &from, &plan).await;
        if let Err(e) = self.publish_plan(msg, from.id, from.caller, &plan).await {
            release().await;
            return Err(self.publish_failed(e));
        }
        if let Some(claim) = claim {
            claim.complete(scope, None).await;
        }
        // A fan-out step stays watched until its watch comes due: the supervisor then finds
        // it continued and drops it (its children are not watched).
        if let (Some(_), Some(watched)) = (definition.deadline, from.watched) {
            let next = match &plan.next {
                Next::Send(out) => Some(out.message_id.as_str()),
                Next::FanOut(_) => Some(watched),
                Next::Finish(_) => None,
            };
            if next != Some(watched) {
                self.drop_watch(flow, watched).await;
            }
        }
        Ok(())
    }

    /// Keeps `watch` in the workflow's dedup store (scope: the workflow's name).
    async fn keep_watch(
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
    async fn drop_watch(&self, flow: &Flow, message_id: &str) {
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
    async fn supervise(&self, msg: &Message, flow: &Flow) -> Verdict {
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
    async fn overdue(
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

    /// Stores what the join of `fan_out` continues from (first write wins).
    async fn keep_join_state(
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

    /// Puts the message back for the dedup store's busy delay (the store did not answer).
    async fn defer_for_store(&self, msg: &Message) -> Verdict {
        let delay = self
            .queue
            .dedup
            .as_ref()
            .map_or(std::time::Duration::from_secs(1), |d| d.busy_delay);
        self.metrics.deferred_store.inc();
        self.defer(msg, delay).await
    }

    /// A child's reply on a fan-out step's join queue: recorded under its index (the first
    /// record of an index stays); the reply that completes the join (or any later duplicate,
    /// on any instance) continues the workflow, once, under `<id>:<step>#joined`. Progress
    /// replies of children are dropped.
    async fn join(&self, msg: &Message, flow: &Flow, compensable: bool) -> Verdict {
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

    /// The progress reply, then the next message or the final reply, each confirmed.
    async fn publish_plan(
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
    async fn publish_outgoing(&self, msg: &Message, out: &Outgoing) -> Result<(), PublishError> {
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
    async fn account(&self, flow: &Flow, from: &Continuing<'_>, plan: &Plan) {
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

/// The message's place in its workflow, read before its handler runs.
fn origin(msg: &Message, flow: &Flow) -> Result<Origin, HandlerError> {
    match flow.role.kind {
        RoleKind::Entry => {
            let input = serde_json::from_slice(msg.body()).map_err(|e| {
                HandlerError::invalid_input(format!("workflow input is not JSON: {e}"))
            })?;
            Ok(Origin::Entry {
                // Without a message id, a redelivered entry starts a second workflow.
                id: msg.message_id().map_or_else(
                    || format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                    str::to_owned,
                ),
                caller: Caller {
                    reply_to: msg.reply_to().map(str::to_owned),
                    correlation_id: msg.correlation_id().map(str::to_owned),
                },
                input,
            })
        }
        RoleKind::Step { .. }
        | RoleKind::Compensation
        | RoleKind::Join { .. }
        | RoleKind::Supervisor => {
            let slip = Slip::from_headers(msg.headers())?;
            if slip.workflow != flow.role.definition.name {
                return Err(HandlerError::invalid_input(format!(
                    "message of workflow '{}' on a queue of workflow '{}'",
                    slip.workflow, flow.role.definition.name
                )));
            }
            Ok(Origin::Slip {
                body: Body::parse(msg.body())?,
                slip: Box::new(slip),
            })
        }
    }
}

/// What follows: the pure part, in `workflow::plan`.
fn plan_for(flow: &Flow, origin: Origin, record: Record) -> Plan {
    let definition = &flow.role.definition;
    let failed = |kind: String, message: String| HandlerError::permanent(kind, message);
    match (origin, flow.role.kind, record) {
        (Origin::Entry { id, caller, input }, _, _) => plan::start(
            &definition.name,
            &id,
            &definition.steps,
            caller,
            input,
            (crate::stores::now() * 1000.0) as u64,
            &definition.finish,
        ),
        (Origin::Slip { slip, body }, RoleKind::Step { compensable }, Record::Ok(output)) => {
            match &flow.role.fan_out {
                Some(queue) => {
                    plan::fan_out(*slip, body, output, queue, compensable, &definition.finish)
                }
                None => plan::step_done(*slip, body, output, compensable, &definition.finish),
            }
        }
        (Origin::Slip { slip, body }, RoleKind::Step { .. }, Record::Failed { kind, message }) => {
            plan::step_failed(*slip, body, &failed(kind, message))
        }
        (Origin::Slip { slip, body }, _, record) => {
            plan::compensation_done(*slip, body, matches!(record, Record::Ok(_)))
        }
    }
}
