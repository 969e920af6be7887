//! Workflows: routing slips with compensation.
//!
//! A workflow is an ordered list of steps, each an ordinary handler on its own queue, with
//! an optional compensation (also a handler on its own queue) that undoes it:
//!
//! ```no_run
//! use cottontail::workflow::{Input, Recorded, Workflow};
//! use cottontail::{App, HandlerError, Json};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Trip { trip_id: String }
//! #[derive(Deserialize, Serialize)]
//! struct Reservation { reference: String }
//!
//! async fn reserve(Input(trip): Input<Trip>) -> Result<Json<Reservation>, HandlerError> {
//!     Ok(Json(Reservation { reference: format!("H-{}", trip.trip_id) }))
//! }
//! async fn cancel(Recorded(r): Recorded<Reservation>) -> Result<(), HandlerError> {
//!     // cancel r.reference
//!     Ok(())
//! }
//! async fn charge(Input(trip): Input<Trip>) -> Result<Json<String>, HandlerError> {
//!     Err(HandlerError::permanent("declined", format!("card declined for {}", trip.trip_id)))
//! }
//!
//! # async fn run() -> Result<(), cottontail::Error> {
//! App::new(())
//!     .workflow(
//!         Workflow::new("trips")
//!             .step("hotel", reserve)
//!             .compensate(cancel)
//!             .step("payment", charge),
//!     )
//!     .run(cottontail::Config::from_env()?)
//!     .await
//! # }
//! ```
//!
//! **Queues.** The workflow's name is its entry queue (`trips`); step `s` runs on
//! `trips.s`, its compensation on `trips.s.compensate` (every name is in [`crate::names`]).
//!
//! **The routing slip.** The entry handler gives the workflow an id (the entry message's
//! `message_id`) and sends the first step message. Every step and compensation message
//! carries the slip in its headers: the steps still to run (`x-workflow-itinerary`), the
//! completed steps to undo if a later one fails, most recent first
//! (`x-workflow-compensations`), and the caller's `reply_to` and `correlation_id`
//! (`x-workflow-reply-to`, `x-workflow-correlation-id`; the message's own properties have no
//! `reply_to`, so the pipeline never answers the caller on a step's behalf). Any instance can
//! run any step, and a workflow in flight keeps the itinerary it started with across deploys.
//!
//! **The context.** Outputs are *merged into a context* rather than passed from one step to
//! the next: each step and compensation message's body is `{"input": <the entry body>,
//! "results": {"<step>": <its output>, …}}`. Steps read what they need with [`Input`],
//! [`Context`] and, in compensations, [`Recorded`] (their step's output); steps stay
//! independent of their neighbours (reordering or inserting a step changes no handler), a
//! compensation gets its step's data however many steps ran since, and
//! [`Workflow::finish`] builds the final output from everything (by default the `results`
//! object).
//!
//! **Guarantees.** Each step keeps every handler guarantee (retries with backoff, timeouts,
//! panics caught, middleware). On top, per step message (deduplicated by its `message_id`,
//! `<workflow id>:<step>`, through the workflow's dedup store):
//! - the handler runs at most once to success: its output (or its final failure) is recorded
//!   before anything is sent, and a redelivered step continues from the record instead of
//!   running its effect again;
//! - what follows — the `progress` reply `{"step", "state": "done"}`, then the next step
//!   message or the final reply — is published with confirms *before* the ack, and at most
//!   once per step message (a second key, `<message_id>#continued`, records it).
//!
//! **Compensation.** A step that fails permanently (or exhausts its retries, or crash-loops)
//! is recorded as failed and the compensations of the completed steps run one after another,
//! most recent first, each retried per its queue's policy. A compensation that still fails is
//! dead-lettered to its `.dlq` with kind `compensation_failed` (counted in
//! `cottontail_workflow_compensation_failures_total`) and the others still run. The caller then
//! gets one `error` reply `{"error": {"kind": "compensated", "message", "failed_step",
//! "compensated": [...]}}` (undone steps in the order they were undone; plus
//! `compensation_failed` when one was dead-lettered).
//!
//! **Fan-out / fan-in.** [`Workflow::fan_out`] adds a step whose output (a JSON array) is
//! sent as one child job per item to any handler queue, replying to the step's join queue
//! `<workflow>.<step>.join`; the join records each reply under its index in the dedup store
//! (first record stays) and the record that completes it continues the workflow, once, under
//! `<workflow id>:<step>#joined`. A failed child fails the step with its error and `index`.
//! A workflow that declares no compensation ends a failure with the failed step's own error
//! (status `failed`) instead of `compensated`.
//!
//! **Status.** `/jobs/{workflow id}` says `running` from the entry on, then `succeeded` (with
//! the final output), `compensated` (with the error object), or `dead_lettered` when a
//! compensation was dead-lettered; its `workflow` object says where it stands
//! (`current_step`, `completed`, `failed_step`, `compensating`, `compensated`,
//! `compensation_failed`, `outcome`). Each step message has its own job status too.
//!
//! **Deadlines.** With [`Workflow::deadline`], each step and compensation message is watched
//! in the dedup store from before it is sent until its continuation is published. A
//! supervisor — the schedule `<workflow>.supervise`, so one instance leads it — looks every
//! 2 s for watches past due whose continuation is not claimed: the stuck message is sent
//! again (deduplicated; a copy waits out the hung attempt's lease, which is never renewed) up
//! to the policy's maximum, then (or at once with [`OnDeadline::Compensate`]) the step fails
//! with kind `deadline_exceeded` and the workflow compensates. A compensation is always sent
//! again. A step that completes after its workflow was compensated is not undone.

pub(crate) mod deadline;
mod extract;
pub(crate) mod plan;
pub(crate) mod slip;

use std::sync::Arc;

use serde::Serialize;

pub use deadline::OnDeadline;
pub use extract::{Context, Input, Recorded};

use crate::error::HandlerError;
use crate::handler::{BoxedHandler, Handler};
use crate::message::Message;
use crate::names;
use crate::queue::{Dedup, Queue};
use crate::stores::MemoryStore;
use plan::Finish;

/// A workflow definition, registered with [`App::workflow`](crate::App::workflow) (see the
/// [module](self)).
pub struct Workflow<S> {
    name: String,
    steps: Vec<StepSpec<S>>,
    finish: Option<Finish>,
    dedup: Option<Dedup>,
    queues: Arc<dyn Fn(Queue) -> Queue + Send + Sync>,
    deadline: Option<deadline::Deadline>,
    errors: Vec<String>,
}

type MakeHandler<S> = Box<dyn FnOnce(S) -> BoxedHandler + Send>;

struct StepSpec<S> {
    name: String,
    handler: MakeHandler<S>,
    compensation: Option<MakeHandler<S>>,
    /// A fan-out step: the handler queue its child jobs go to.
    fan_out: Option<String>,
}

impl<S: Clone + Send + Sync + 'static> Workflow<S> {
    /// A workflow whose entry queue is `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            finish: None,
            dedup: None,
            queues: Arc::new(|queue| queue),
            deadline: None,
            errors: Vec::new(),
        }
    }

    /// Appends step `name`, run by `handler` on the queue `<workflow>.<name>`. Its `Ok`
    /// output is recorded in the context under `name`; a permanent failure (or the last
    /// retry's) makes the workflow compensate.
    pub fn step<H, Args>(mut self, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<Args, S>,
    {
        self.steps.push(StepSpec {
            name: name.into(),
            handler: Box::new(move |state| BoxedHandler::from_handler(handler, state)),
            compensation: None,
            fan_out: None,
        });
        self
    }

    /// Appends fan-out step `name` (a group with its join, a chord): `handler` runs on
    /// `<workflow>.<name>` and returns a JSON array, one child job input per item; each item
    /// is sent to the handler queue `queue` (any handler, through its normal contract, with
    /// `reply_to` = the join queue `<workflow>.<name>.join`). When every child has replied,
    /// the step completes with their outputs in input order (recorded under `name`, like any
    /// step's); if a child ends in an error (dead-lettered), the step fails with that child's
    /// error and `index` (the first failed one) and the workflow compensates. The join fires
    /// once per workflow even with duplicate or redelivered child replies and several
    /// instances: replies are recorded per index in the workflow's dedup store
    /// ([`DedupStore::join_record`](crate::stores::DedupStore::join_record)) and the
    /// continuation is marked like any step's.
    pub fn fan_out<H, Args>(mut self, name: impl Into<String>, handler: H, queue: &str) -> Self
    where
        H: Handler<Args, S>,
    {
        self = self.step(name, handler);
        if let Some(step) = self.steps.last_mut() {
            step.fan_out = Some(queue.to_owned());
        }
        self
    }

    /// Gives the step added last a compensation, run by `handler` on
    /// `<workflow>.<step>.compensate` when a later step fails. It can read its step's
    /// output with [`Recorded`].
    pub fn compensate<H, Args>(mut self, handler: H) -> Self
    where
        H: Handler<Args, S>,
    {
        match self.steps.last_mut() {
            Some(step) if step.compensation.is_none() => {
                step.compensation = Some(Box::new(move |state| {
                    BoxedHandler::from_handler(handler, state)
                }));
            }
            Some(step) => self
                .errors
                .push(format!("step '{}' has two compensations", step.name)),
            None => self
                .errors
                .push("compensate(..) comes after the step it undoes".into()),
        }
        self
    }

    /// Builds the final `ok` reply from the completed workflow's context (default: the
    /// `results` object). An error here fails the workflow as a failed step named `finish`:
    /// every completed step is compensated.
    pub fn finish<F, T>(mut self, finish: F) -> Self
    where
        F: Fn(&Context) -> Result<T, HandlerError> + Send + Sync + 'static,
        T: Serialize,
    {
        self.finish = Some(Arc::new(move |context| {
            let output = finish(context)?;
            serde_json::to_value(output).map_err(|e| {
                HandlerError::permanent("serialization", format!("finish output: {e}"))
            })
        }));
        self
    }

    /// The store that deduplicates the workflow's messages (by default a [`MemoryStore`] of
    /// this process: enough for one instance; several instances need a shared store, e.g.
    /// Redis or PostgreSQL).
    pub fn dedup(mut self, dedup: Dedup) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// Settings for every queue of the workflow (entry, steps, compensations), e.g. its
    /// retry policy, concurrency or timeout. Ordering and priority bands do not apply to
    /// workflow queues.
    pub fn queues(mut self, settings: impl Fn(Queue) -> Queue + Send + Sync + 'static) -> Self {
        self.queues = Arc::new(settings);
        self
    }

    /// Gives every step (and compensation) message `after` to complete once sent; past that
    /// the workflow's supervisor acts per `policy` (see the [module](self), "Deadlines").
    /// Needs a dedup store that keeps watches (memory, Redis, PostgreSQL); several instances
    /// need a shared one.
    pub fn deadline(mut self, after: std::time::Duration, policy: OnDeadline) -> Self {
        self.deadline = Some(deadline::Deadline { after, policy });
        self
    }

    /// The workflow's name (its entry queue).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The handlers to register: the entry, then each step and its compensation.
    pub(crate) fn into_handlers(
        self,
        state: &S,
    ) -> Result<Vec<(Queue, BoxedHandler, Arc<Role>)>, String> {
        self.validate()?;
        let Workflow {
            name,
            steps,
            finish,
            dedup,
            queues,
            deadline,
            ..
        } = self;
        let dedup = dedup.unwrap_or_else(|| Dedup::new(MemoryStore::new(100_000)));
        let definition = Arc::new(Definition {
            name: name.clone(),
            steps: steps.iter().map(|s| s.name.clone()).collect(),
            compensates: steps.iter().any(|s| s.compensation.is_some()),
            deadline,
            finish: finish.unwrap_or_else(|| {
                Arc::new(|context: &Context| {
                    Ok(serde_json::Value::Object(context.results().clone()))
                })
            }),
        });
        let queue = |name: String| {
            // The settings first: ordering and bands are refused at start, dedup is the
            // workflow's.
            queues(Queue::new(name)).dedup(dedup.clone())
        };
        let role = |kind: RoleKind, fan_out: Option<String>| {
            Arc::new(Role {
                definition: definition.clone(),
                kind,
                fan_out,
            })
        };
        let mut handlers = vec![(
            queue(name.clone()),
            BoxedHandler::from_handler(accept, ()),
            role(RoleKind::Entry, None),
        )];
        if definition.deadline.is_some() {
            handlers.push((
                queue(names::workflow_supervisor(&name)).concurrency(1),
                BoxedHandler::from_handler(accept, ()),
                role(RoleKind::Supervisor, None),
            ));
        }
        for step in steps {
            let compensable = step.compensation.is_some();
            if step.fan_out.is_some() {
                handlers.push((
                    queue(names::workflow_join(&name, &step.name)),
                    BoxedHandler::from_handler(accept, ()),
                    role(RoleKind::Join { compensable }, None),
                ));
            }
            handlers.push((
                queue(names::workflow_step(&name, &step.name)),
                (step.handler)(state.clone()),
                role(RoleKind::Step { compensable }, step.fan_out),
            ));
            if let Some(compensation) = step.compensation {
                handlers.push((
                    queue(names::workflow_compensation(&name, &step.name)),
                    compensation(state.clone()),
                    role(RoleKind::Compensation, None),
                ));
            }
        }
        Ok(handlers)
    }

    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if let Some(error) = self.errors.first() {
            return Err(format!("workflow '{name}': {error}"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let valid = !step.name.is_empty()
                && step
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid || names::RESERVED_STEP_NAMES.contains(&step.name.as_str()) {
                return Err(format!(
                    "workflow '{name}': step name '{}' must be letters, digits, '_' or '-', \
                     and not one of {:?}",
                    step.name,
                    names::RESERVED_STEP_NAMES
                ));
            }
            if step.name == "finish" || self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(format!(
                    "workflow '{name}': step name '{}' is used twice (or is 'finish')",
                    step.name
                ));
            }
        }
        Ok(())
    }
}

/// The entry handler: the input must be JSON; the rest (the workflow id, the first step
/// message) is the pipeline's.
async fn accept(msg: Message) -> Result<(), HandlerError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(msg.body())
        .map(|_| ())
        .map_err(|e| HandlerError::invalid_input(format!("workflow input is not JSON: {e}")))
}

/// What every queue of one workflow shares.
pub(crate) struct Definition {
    /// The workflow's name (entry queue).
    pub name: String,
    /// Its steps, in order: the itinerary a new workflow starts with.
    pub steps: Vec<String>,
    /// Whether any step has a compensation: a failure then ends as `compensated` (even with
    /// nothing to undo); otherwise as the failed step's own error.
    pub compensates: bool,
    /// Builds the final output.
    pub finish: Finish,
    /// How long a step may take, and what then.
    pub deadline: Option<deadline::Deadline>,
}

/// What one queue of a workflow is.
pub(crate) struct Role {
    pub definition: Arc<Definition>,
    pub kind: RoleKind,
    /// A fan-out step: the handler queue of its children.
    pub fan_out: Option<String>,
}

/// Which queue of a workflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoleKind {
    /// The entry queue: starts workflows.
    Entry,
    /// A step; `compensable` when it has a compensation.
    Step { compensable: bool },
    /// A step's compensation.
    Compensation,
    /// The join of a fan-out step (`compensable`: the step has a compensation): consumes the
    /// children's replies, never runs a handler.
    Join { compensable: bool },
    /// The supervisor's queue (a workflow with a deadline): each tick of its schedule scans
    /// the watches past their deadline; never runs a handler.
    Supervisor,
}
