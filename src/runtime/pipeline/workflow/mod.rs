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

mod failed;
mod join;
mod publish;
mod supervise;

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
