//! What comes after a workflow message, as pure functions of its slip, its body and how it
//! ended: the next step, the next compensation, or the final reply (no I/O here; the pipeline
//! publishes the plan).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
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
    /// A fan-out step's child jobs; its join continues the workflow.
    FanOut(Box<FanOut>),
    /// The workflow ended: the caller's one final reply.
    Finish(Final),
}

/// How a workflow message's handler (or a fan-out child) ended, as recorded in the store.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Record {
    /// Its output.
    Ok(Value),
    /// It failed for good.
    Failed { kind: String, message: String },
}

/// The child jobs of a fan-out step and where they are joined.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FanOut {
    /// The handler queue every child goes to.
    pub queue: String,
    /// Where the children reply (`W.<step>.join`): the join's queue and store scope.
    pub join_queue: String,
    /// The join's id in the store: `<workflow id>:<step>`.
    pub join_id: String,
    /// The children, in order.
    pub children: Vec<Child>,
    /// What the join continues from, kept in the store under [`JOIN_STATE`].
    pub state: JoinState,
}

/// One child job of a fan-out.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Child {
    /// `<workflow id>:<step>:<i>`: the child's own dedup key and job status.
    pub message_id: String,
    /// `<workflow id>:<step>:<i>/<n>`: what its reply carries back to the join.
    pub correlation_id: String,
    /// Its body: the fan-out step's `i`-th output item.
    pub body: Value,
}

/// A fan-out step's slip and context, kept in the store with the children's results so that
/// whichever instance completes the join can continue the workflow.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub(crate) struct JoinState {
    /// The slip of the fan-out step's message (`step` is the fan-out step).
    pub slip: Slip,
    /// The context before the step.
    pub body: Body,
    /// How many children there are.
    pub children: u64,
}

/// The store field holding a join's [`JoinState`]; children are fields `"0"`, `"1"`, ….
pub(crate) const JOIN_STATE: &str = "state";

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
    /// A step failed in a workflow without compensations: the caller gets the step's own
    /// error (see [`Final::without_compensations`]).
    Failed(Failure),
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
    /// The end as a workflow that declares no compensation reports it: a failure is the
    /// failed step's own error (`{"kind", "message"}`, plus `index` for a fan-out), not
    /// `compensated` — a workflow that declares compensations always says `compensated`, even
    /// when nothing needed undoing.
    pub(crate) fn without_compensations(self) -> Final {
        match self {
            Final::Compensated {
                failure,
                compensated,
                compensation_failed,
            } if compensated.is_empty() && compensation_failed.is_empty() => Final::Failed(failure),
            other => other,
        }
    }

    /// The `ok` output, or the `error` envelope of the final reply.
    pub(crate) fn reply(&self) -> Result<&Value, Value> {
        match self {
            Final::Succeeded(output) => Ok(output),
            _ => Err(json!({ "error": self.error() })),
        }
    }

    /// The `error` object: `{"kind": "compensated", "message", "failed_step", "compensated"}`
    /// (and `compensation_failed` when a compensation was dead-lettered, `index` when a
    /// fan-out child failed), or the failed step's own `{"kind", "message"}` (and `index`).
    pub(crate) fn error(&self) -> Value {
        let (failure, compensated, compensation_failed) = match self {
            Final::Succeeded(_) => return Value::Null,
            Final::Failed(failure) => {
                let mut error = json!({"kind": failure.kind, "message": failure.message});
                if let Some(index) = failure.index {
                    error["index"] = json!(index);
                }
                return error;
            }
            Final::Compensated {
                failure,
                compensated,
                compensation_failed,
            } => (failure, compensated, compensation_failed),
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
        if let Some(index) = failure.index {
            error["index"] = json!(index);
        }
        error
    }

    /// The workflow's job status: `succeeded`, `compensated`, or `dead_lettered` when a
    /// compensation was dead-lettered (something is left to undo by hand).
    pub(crate) fn job_status(&self) -> &'static str {
        match self {
            Final::Succeeded(_) => "succeeded",
            Final::Failed(_) => "failed",
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
    failed_at(slip, body, error, None)
}

/// [`step_failed`], for a fan-out step whose child `index` failed.
fn failed_at(slip: Slip, body: Body, error: &HandlerError, index: Option<u64>) -> Plan {
    let failure = Failure {
        step: slip.step.clone(),
        kind: error.kind().to_owned(),
        message: error.message().to_owned(),
        index,
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
        index: None,
    });
    Plan {
        progress: None,
        next: compensate(slip, body, failure),
    }
}

/// Fan-out step `slip.step` completed with `output`, the inputs of its child jobs (a JSON
/// array): one child per item to `queue`, replying to the step's join queue. No child (an
/// empty array) joins at once with no results; an output that is not an array fails the
/// step.
pub(crate) fn fan_out(
    slip: Slip,
    body: Body,
    output: Value,
    queue: &str,
    compensable: bool,
    finish: &Finish,
) -> Plan {
    let items = match output {
        Value::Array(items) if items.is_empty() => {
            return step_done(slip, body, json!([]), compensable, finish)
        }
        Value::Array(items) => items,
        other => {
            let error = HandlerError::permanent(
                "workflow",
                format!("a fan-out step returns a JSON array of child inputs, not {other}"),
            );
            return step_failed(slip, body, &error);
        }
    };
    let (id, step) = (slip.id.clone(), slip.step.clone());
    let n = items.len();
    let children = items
        .into_iter()
        .enumerate()
        .map(|(i, body)| Child {
            message_id: names::workflow_child_id(&id, &step, i),
            correlation_id: names::workflow_child_correlation(&id, &step, i, n),
            body,
        })
        .collect();
    // The join continues from the step's own slip (`step` still set).
    Plan {
        progress: None,
        next: Next::FanOut(Box::new(FanOut {
            queue: queue.to_owned(),
            join_queue: names::workflow_join(&slip.workflow, &step),
            join_id: names::workflow_step_id(&id, &step),
            children,
            state: JoinState {
                slip,
                body,
                children: n as u64,
            },
        })),
    }
}

/// Reads a child reply's `correlation_id` (`<id>:<step>:<i>/<n>`): the join id
/// (`<id>:<step>`), the child's index and the number of children.
pub(crate) fn parse_child(correlation_id: &str) -> Option<(&str, u64, u64)> {
    let (join_id, place) = correlation_id.rsplit_once(':')?;
    let (i, n) = place.split_once('/')?;
    let (i, n) = (i.parse().ok()?, n.parse().ok()?);
    (i < n && join_id.contains(':')).then_some((join_id, i, n))
}

/// A child's reply as recorded for the join: its `ok` output, or the `error` envelope's kind
/// and message (`ok`: the reply's `x-status` was `ok`).
pub(crate) fn child_record(ok: bool, body: &[u8]) -> Record {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if ok {
        return Record::Ok(value);
    }
    let text = |key: &str| value["error"][key].as_str().map(str::to_owned);
    Record::Failed {
        kind: text("kind").unwrap_or_else(|| "failed".into()),
        message: text("message").unwrap_or_default(),
    }
}

/// Whether the join's recorded fields (its state and one per child) are all there.
pub(crate) fn join_complete(recorded: u64, children: u64) -> bool {
    recorded > children
}

/// Every child of a fan-out ended (`fields`: the join's store fields): the step completes
/// with the children's outputs in input order, or fails with the first failed child's error
/// and index. `None` when the fields are not a complete join.
pub(crate) fn joined(
    fields: &BTreeMap<String, Vec<u8>>,
    compensable: bool,
    finish: &Finish,
) -> Option<Plan> {
    let state: JoinState = serde_json::from_slice(fields.get(JOIN_STATE)?).ok()?;
    let mut outputs = Vec::new();
    for i in 0..state.children {
        let record: Record = serde_json::from_slice(fields.get(&i.to_string())?).ok()?;
        match record {
            Record::Ok(output) => outputs.push(output),
            Record::Failed { kind, message } => {
                let error = HandlerError::permanent(kind, message);
                return Some(failed_at(state.slip, state.body, &error, Some(i)));
            }
        }
    }
    let output = Value::Array(outputs);
    Some(step_done(
        state.slip,
        state.body,
        output,
        compensable,
        finish,
    ))
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
