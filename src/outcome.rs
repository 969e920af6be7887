//! What a handler's return value becomes: success (ack, and reply when asked) or a failure
//! (retry later or dead-letter now).

use serde::Serialize;

use crate::error::HandlerError;
use crate::extract::Json;

/// The result of running a handler on one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success; the JSON reply body sent when the message has a `reply_to`.
    Done(Vec<u8>),
    /// Failure; its [`Disposition`](crate::Disposition) decides retry or dead-letter.
    Failed(HandlerError),
}

/// Converts a handler's return value into an [`Outcome`].
///
/// Implemented for `()`, [`Json<T>`], [`Outcome`], [`HandlerError`] and
/// `Result<T: Serialize, E: Into<HandlerError>>`.
pub trait IntoOutcome {
    /// Performs the conversion.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Done(b"null".to_vec())
    }
}

impl IntoOutcome for HandlerError {
    fn into_outcome(self) -> Outcome {
        Outcome::Failed(self)
    }
}

impl<T: Serialize> IntoOutcome for Json<T> {
    fn into_outcome(self) -> Outcome {
        serialize(&self.0)
    }
}

impl<T: Serialize, E: Into<HandlerError>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(value) => serialize(&value),
            Err(error) => Outcome::Failed(error.into()),
        }
    }
}

fn serialize<T: Serialize>(value: &T) -> Outcome {
    match serde_json::to_vec(value) {
        Ok(body) => Outcome::Done(body),
        Err(e) => Outcome::Failed(HandlerError::permanent(
            "serialization",
            format!("the handler's output is not serializable to JSON: {e}"),
        )),
    }
}

impl From<HandlerError> for Outcome {
    fn from(error: HandlerError) -> Self {
        Outcome::Failed(error)
    }
}
