//! What comes after a workflow message, as pure functions of its slip, its body and how it
//! ended: the next step, the next compensation, or the final reply (no I/O here; the pipeline
//! publishes the plan).

use std::sync::Arc;

use serde_json::{json, Value};

use super::slip::{Body, Caller, Failure, Slip};
use super::Context;
use crate::error::HandlerError;
use crate::names;

/// Builds the final `ok` output from the completed workflow's context.
pub(crate) type Finish = Arc<dyn Fn(&Context) -> Result<Value, HandlerError> + Send + Sync>;

/// What to publish after a workflow message, in order: the progress reply (if any), then
/// `next`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// `{"step": "<name>", "state": "done"}` after a completed step.
    pub progress: Option<Value>,
    /// The next message, or the final reply.
    pub next: Next,
}

/// The message a plan continues with.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Next {
    /// A step or compensation message.
    Send(Box<Outgoing>),
    /// The workflow ended: the caller's one final reply.
    Finish(Final),
}

/// A step or compensation message to publish.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outgoing {
    /// Its queue.
    pub queue: String,
    /// Its `message_id`: workflow id and step, what the step is deduplicated by.
    pub message_id: String,
    /// Its slip (headers).
    pub slip: Slip,
    /// Its body.
    pub body: Body,
}

/// How a workflow ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Final {
    /// Every step completed; the finish's output.
    Succeeded(Value),
    /// A step failed; the completed steps were compensated (or their compensations
    /// dead-lettered).
    Compensated {
        /// The failure.
        failure: Failure,
        /// Steps undone, in the order they were undone (reverse order of completion).
        compensated: Vec<String>,
        /// Steps whose compensation was dead-lettered (`compensation_failed`).
        compensation_failed: Vec<String>,
    },
}

impl Final {
    /// The `ok` output, or the `error` envelope of the final reply.
    pub(crate) fn reply(&self) -> Result<&Value, Value> {
        match self {
            Final::Succeeded(output) => Ok(output),
            Final::Compensated { .. } => Err(json!({ "error": self.error() })),
        }
    }

    /// The `error` object: `{"kind": "compensated", "message", "failed_step", "compensated"}`
    /// (and `compensation_failed` when a compensation was dead-lettered).
    pub(crate) fn error(&self) -> Value {
        let Final::Compensated {
            failure,
            compensated,
            compensation_failed,
        } = self
        else {
            return Value::Null;
        };
        let mut error = json!({
            "kind": "compensated",
            "message": format!(
                "step '{}' failed ({}): {}",
                failure.step, failure.kind, failure.message
            ),
            "failed_step": failure.step,
            "compensated": compensated,
        });
        if !compensation_failed.is_empty() {
            error["compensation_failed"] = json!(compensation_failed);
        }
        error
    }

    /// The workflow's job status: `succeeded`, `compensated`, or `dead_lettered` when a
    /// compensation was dead-lettered (something is left to undo by hand).
    pub(crate) fn job_status(&self) -> &'static str {
        match self {
            Final::Succeeded(_) => "succeeded",
            Final::Compensated {
                compensation_failed,
                ..
            } if compensation_failed.is_empty() => "compensated",
            Final::Compensated { .. } => "dead_lettered",
        }
    }
}

/// A new workflow: its first step, or (no steps) its finish.
pub(crate) fn start(
    workflow: &str,
    id: &str,
    steps: &[String],
    caller: Caller,
    input: Value,
    now_ms: u64,
    finish: &Finish,
) -> Plan {
    let slip = Slip {
        workflow: workflow.to_owned(),
        id: id.to_owned(),
        step: String::new(),
        itinerary: steps.to_vec(),
        compensations: Vec::new(),
        compensated: Vec::new(),
        compensation_failed: Vec::new(),
        failure: None,
        caller,
        started_ms: now_ms,
    };
    let body = Body {
        input,
        results: Default::default(),
    };
    Plan {
        progress: None,
        next: forward(slip, body, finish),
    }
}

/// Step `slip.step` completed with `output`: its output joins the context, it joins the
/// compensation log if it has a compensation, and the workflow moves on.
pub(crate) fn step_done(
    mut slip: Slip,
    mut body: Body,
    output: Value,
    compensable: bool,
    finish: &Finish,
) -> Plan {
    let step = std::mem::take(&mut slip.step);
    body.results.insert(step.clone(), output);
    if compensable {
        slip.compensations.insert(0, step.clone());
    }
    Plan {
        progress: Some(json!({"step": step, "state": "done"})),
        next: forward(slip, body, finish),
    }
}

/// Step `slip.step` failed for good: the completed steps are undone, most recent first.
pub(crate) fn step_failed(slip: Slip, body: Body, error: &HandlerError) -> Plan {
    let failure = Failure {
        step: slip.step.clone(),
        kind: error.kind().to_owned(),
        message: error.message().to_owned(),
    };
    Plan {
        progress: None,
        next: compensate(slip, body, failure),
    }
}

/// The compensation of `slip.step` ended: `undone` (it succeeded) or dead-lettered; the next
/// compensation follows either way, so one that fails does not leave the others undone.
pub(crate) fn compensation_done(mut slip: Slip, body: Body, undone: bool) -> Plan {
    let step = std::mem::take(&mut slip.step);
    if undone {
        slip.compensated.push(step);
    } else {
        slip.compensation_failed.push(step);
    }
    let failure = slip.failure.clone().unwrap_or_else(|| Failure {
        step: String::new(),
        kind: "unknown".into(),
        message: String::new(),
    });
    Plan {
        progress: None,
        next: compensate(slip, body, failure),
    }
}

/// The next step of the itinerary, or the finish when there is none.
fn forward(mut slip: Slip, body: Body, finish: &Finish) -> Next {
    if slip.itinerary.is_empty() {
        let context = Context::new(&slip.workflow, &slip.id, body.clone());
        return match finish(&context) {
            Ok(output) => Next::Finish(Final::Succeeded(output)),
            Err(error) => {
                // Every step completed: all of them are undone.
                slip.step = "finish".into();
                step_failed(slip, body, &error).next
            }
        };
    }
    slip.step = slip.itinerary.remove(0);
    Next::Send(Box::new(Outgoing {
        queue: names::workflow_step(&slip.workflow, &slip.step),
        message_id: names::workflow_step_id(&slip.id, &slip.step),
        slip,
        body,
    }))
}

/// The next compensation of the log, or the final `compensated` error when none is left.
fn compensate(mut slip: Slip, body: Body, failure: Failure) -> Next {
    if slip.compensations.is_empty() {
        return Next::Finish(Final::Compensated {
            failure,
            compensated: slip.compensated,
            compensation_failed: slip.compensation_failed,
        });
    }
    slip.step = slip.compensations.remove(0);
    slip.itinerary.clear();
    slip.failure = Some(failure);
    Next::Send(Box::new(Outgoing {
        queue: names::workflow_compensation(&slip.workflow, &slip.step),
        message_id: names::workflow_compensation_id(&slip.id, &slip.step),
        slip,
        body,
    }))
}

#[cfg(test)]
mod tests;
