//! Extractors for step and compensation handlers: the workflow's input, its context (the
//! outputs of the steps completed so far) and, in a compensation, what its step recorded.

use serde::de::DeserializeOwned;

use super::slip::{Body, Slip};
use crate::error::HandlerError;
use crate::extract::FromMessage;
use crate::message::Message;

/// The context of a running workflow: its id, its input and the output of each completed
/// step. A step or compensation handler argument; also what [`Workflow::finish`] builds the
/// final output from.
///
/// [`Workflow::finish`]: super::Workflow::finish
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    workflow: String,
    id: String,
    body: Body,
}

impl Context {
    pub(crate) fn new(workflow: &str, id: &str, body: Body) -> Self {
        Self {
            workflow: workflow.to_owned(),
            id: id.to_owned(),
            body,
        }
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        &self.workflow
    }

    /// The workflow id (the entry message's `message_id`): a good idempotency key for the
    /// remote services a step calls.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The workflow's input (the entry message's body).
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&self.body.input).map_err(|e| {
            HandlerError::invalid_input(format!(
                "workflow input is not valid for {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// The output of the completed step `step`.
    pub fn result<T: DeserializeOwned>(&self, step: &str) -> Result<T, HandlerError> {
        let value = self.body.results.get(step).ok_or_else(|| {
            HandlerError::permanent("workflow", format!("step '{step}' has no recorded output"))
        })?;
        T::deserialize(value).map_err(|e| {
            HandlerError::permanent(
                "workflow",
                format!(
                    "output of step '{step}' is not valid for {}: {e}",
                    std::any::type_name::<T>()
                ),
            )
        })
    }

    /// Every completed step's output, by step name.
    pub fn results(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.body.results
    }

    fn of(msg: &Message) -> Result<(Slip, Self), HandlerError> {
        let slip = Slip::from_headers(msg.headers())?;
        let body = Body::parse(msg.body())?;
        let context = Context::new(&slip.workflow, &slip.id, body);
        Ok((slip, context))
    }
}

impl<S> FromMessage<S> for Context {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Context::of(msg).map(|(_, context)| context)
    }
}

/// The workflow's input, deserialized from JSON (a step or compensation handler argument).
///
/// An input that does not fit `T` is invalid input: the step fails for good and the
/// workflow compensates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Input<T>(pub T);

impl<S, T: DeserializeOwned> FromMessage<S> for Input<T> {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        let (_, context) = Context::of(msg)?;
        context.input().map(Input)
    }
}

/// In a compensation handler: the output the compensated step recorded (its reservation id,
/// its charge…), deserialized from JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded<T>(pub T);

impl<S, T: DeserializeOwned> FromMessage<S> for Recorded<T> {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        let (slip, context) = Context::of(msg)?;
        context.result(&slip.step).map(Recorded)
    }
}
