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
/// `Result<T: Serialize, E: Into<HandlerError>>`: `E` is [`HandlerError`], any
/// `std::error::Error + Send + Sync`, `anyhow::Error`, `Box<dyn Error + Send + Sync>`, a
/// `String`, or your own type with `impl From<YourError> for HandlerError`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be returned by a handler (it is not `IntoOutcome`)",
    label = "not a handler result",
    note = "return `()`, `Json<T>`, `Outcome`, or `Result<T, E>` with `T: Serialize` and `E` one of: \
            `HandlerError`, any `std::error::Error + Send + Sync + 'static`, `anyhow::Error`, \
            `Box<dyn Error + Send + Sync>`, `String`, or a type with `From<E> for HandlerError`"
)]
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

// Not recommended: an unfit `Result` is then reported as a whole, with the note above, rather
// than as some nested `From` bound.
#[diagnostic::do_not_recommend]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(outcome: Outcome) -> HandlerError {
        match outcome {
            Outcome::Failed(error) => error,
            Outcome::Done(body) => panic!("succeeded: {body:?}"),
        }
    }

    #[test]
    fn the_error_types_teams_use_are_transient_failures() {
        let io: Result<(), std::io::Error> = Err(std::io::Error::other("disk busy"));
        let error = failed(io.into_outcome());
        assert!(error.is_transient());
        assert_eq!(error.message(), "disk busy");

        let any: Result<(), anyhow::Error> =
            Err(anyhow::anyhow!("socket closed").context("calling the payment API"));
        let error = failed(any.into_outcome());
        assert!(error.is_transient());
        assert_eq!(error.kind(), "error");
        assert_eq!(error.message(), "calling the payment API: socket closed");

        let boxed: Result<(), Box<dyn std::error::Error + Send + Sync>> = Err("no quota".into());
        assert_eq!(failed(boxed.into_outcome()).message(), "no quota");

        let text: Result<(), String> = Err("plain text".to_owned());
        assert!(failed(text.into_outcome()).is_transient());

        let permanent: Result<(), HandlerError> =
            Err(HandlerError::permanent("invalid_input", "bad"));
        assert!(!failed(permanent.into_outcome()).is_transient());
    }

    #[test]
    fn question_mark_converts_any_error_in_a_handler_error_function() {
        fn body() -> Result<(), HandlerError> {
            let _: u32 = "x".parse()?;
            Ok(())
        }
        assert!(body().unwrap_err().is_transient());
    }
}
