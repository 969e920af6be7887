//! Deadlines (scheduler–agent–supervisor), as pure functions: what a watch records of the
//! step message in flight, what the supervisor does with one past its deadline, and the
//! workflow's state as `/jobs/{id}` shows it. The supervisor's I/O is in the pipeline.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::plan::{self, Next, Outgoing, Plan};
use super::slip::{Body, Slip};
use crate::error::HandlerError;

/// What the supervisor does with a workflow whose step was not completed within its deadline
/// (see [`Workflow::deadline`](super::Workflow::deadline)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDeadline {
    /// Send the stuck step's message again (safe: each step is deduplicated by workflow id
    /// and step), at most `max` times; past that, compensate.
    Redispatch {
        /// Re-dispatches before the workflow compensates.
        max: u32,
    },
    /// Compensate the completed steps at once; the caller gets `compensated` with the stuck
    /// step as `failed_step` and kind `deadline_exceeded` in the message.
    Compensate,
}

/// A workflow's deadline: how long each step (or compensation) message may stay
/// uncompleted after it was sent, and what happens then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub after: Duration,
    pub policy: OnDeadline,
}

/// The step or compensation message a workflow waits for, kept in the store (one watch per
/// message, by its `message_id`) until the message's continuation is published.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub(crate) struct Watch {
    /// Its queue.
    pub queue: String,
    /// Its `message_id` (`<workflow id>:<step>`, or the compensation's).
    pub message_id: String,
    /// Its slip.
    pub slip: Slip,
    /// Its body.
    pub body: Body,
    /// When it is due, ms since the epoch.
    pub due_ms: u64,
    /// How many times the supervisor sent it again.
    pub redispatches: u32,
}

/// What the supervisor does with a watch past its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send the message again and watch it anew.
    Redispatch,
    /// Fail the step (`deadline_exceeded`): the completed steps are compensated.
    Compensate,
}

impl Action {
    /// The `action` label of `cottontail_workflow_deadlines_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Action::Redispatch => "redispatched",
            Action::Compensate => "compensated",
        }
    }
}

impl Watch {
    /// Watches `out`, sent now, due `deadline` later.
    pub(crate) fn new(out: &Outgoing, now_ms: u64, deadline: Duration) -> Self {
        Watch {
            queue: out.queue.clone(),
            message_id: out.message_id.clone(),
            slip: out.slip.clone(),
            body: out.body.clone(),
            due_ms: due(now_ms, deadline),
            redispatches: 0,
        }
    }

    /// The message to send again.
    pub(crate) fn outgoing(&self) -> Outgoing {
        Outgoing {
            queue: self.queue.clone(),
            message_id: self.message_id.clone(),
            slip: self.slip.clone(),
            body: self.body.clone(),
        }
    }

    /// The watch after a re-dispatch now: due a whole deadline later, counted.
    pub(crate) fn redispatched(&self, now_ms: u64, deadline: Duration) -> Self {
        Watch {
            due_ms: due(now_ms, deadline),
            redispatches: self.redispatches + 1,
            ..self.clone()
        }
    }

    /// Whether it watches a compensation message (whose workflow is compensating already).
    fn is_compensation(&self) -> bool {
        self.slip.failure.is_some()
    }
}

fn due(now_ms: u64, deadline: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX))
}

/// What to do with `watch`, past its deadline, under `policy`. A compensation is always sent
/// again (there is nothing to compensate a compensation with, and it must not be dropped);
/// a step is re-dispatched while the policy allows, then compensated.
pub(crate) fn decide(watch: &Watch, policy: OnDeadline) -> Action {
    match policy {
        _ if watch.is_compensation() => Action::Redispatch,
        OnDeadline::Redispatch { max } if watch.redispatches < max => Action::Redispatch,
        OnDeadline::Redispatch { .. } | OnDeadline::Compensate => Action::Compensate,
    }
}

/// The plan of a step that missed its deadline: it fails with kind `deadline_exceeded`, so
/// the completed steps are compensated, most recent first.
pub(crate) fn exceeded(watch: &Watch, deadline: Duration) -> Plan {
    let error = HandlerError::permanent(
        "deadline_exceeded",
        format!(
            "deadline exceeded: not completed within {deadline:?} of being sent \
             ({} re-dispatches)",
            watch.redispatches
        ),
    );
    plan::step_failed(watch.slip.clone(), watch.body.clone(), &error)
}

/// The steps of `body` completed, in workflow order.
pub(crate) fn completed(steps: &[String], body: &Body) -> Vec<String> {
    steps
        .iter()
        .filter(|s| body.results.contains_key(s.as_str()))
        .cloned()
        .collect()
}

/// The workflow object of `/jobs/{id}` once `plan` is published: `current_step` (the step
/// waited for; a fan-out step while its children run), `completed` (steps completed, in
/// workflow order), `failed_step`, `compensating` (the compensation waited for),
/// `compensated`, `compensation_failed`, `outcome` (`null` while running, then the job
/// status of the end). `completed_before`: the steps completed before the message `plan`
/// continues.
pub(crate) fn state(steps: &[String], completed_before: &[String], plan: &Plan) -> Value {
    let just_done = plan.progress.as_ref().and_then(|p| p["step"].as_str());
    let completed: Vec<&String> = steps
        .iter()
        .filter(|s| completed_before.contains(s) || just_done == Some(s.as_str()))
        .collect();
    let mut state = json!({
        "current_step": null,
        "completed": completed,
        "failed_step": null,
        "compensating": null,
        "compensated": [],
        "compensation_failed": [],
        "outcome": null,
    });
    let mut from_slip = |slip: &Slip| {
        match &slip.failure {
            Some(failure) => {
                state["failed_step"] = json!(failure.step);
                state["compensating"] = json!(slip.step);
            }
            None => state["current_step"] = json!(slip.step),
        }
        state["compensated"] = json!(slip.compensated);
        state["compensation_failed"] = json!(slip.compensation_failed);
    };
    match &plan.next {
        Next::Send(out) => from_slip(&out.slip),
        Next::FanOut(fan_out) => from_slip(&fan_out.state.slip),
        Next::Finish(last) => {
            if let plan::Final::Compensated {
                failure,
                compensated,
                compensation_failed,
            } = last
            {
                state["failed_step"] = json!(failure.step);
                state["compensated"] = json!(compensated);
                state["compensation_failed"] = json!(compensation_failed);
            }
            if let plan::Final::Failed(failure) = last {
                state["failed_step"] = json!(failure.step);
            }
            state["outcome"] = json!(last.job_status());
        }
    }
    state
}

#[cfg(test)]
mod tests;
