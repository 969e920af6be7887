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
    /// Not done yet: republish the message with this body (the updated state) and ack this
    /// delivery (see [`Continue`]).
    Continue(Vec<u8>),
    /// The job was cancelled: acked, not dead-lettered; the caller gets an `error` reply of
    /// kind `cancelled`. The framework ends a cancelled run with it on its own.
    Cancelled,
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

/// Ends a handler's turn without ending the job: the framework republishes the message to
/// its queue with `state` as the new body (same `message_id`, `reply_to`, `correlation_id`,
/// headers; header `x-continuation` counts the slices), waits for the broker's confirm, then
/// acks the delivery. The next slice runs as a fresh delivery, on any instance.
///
/// This is how a job longer than the broker's `consumer_timeout` runs without holding a
/// delivery that long, and without a store: each slice holds its delivery only for its own
/// run, and frees the prefetch slot in between. The state is the body, so the handler's input
/// type reads both the first request and its continuations.
///
/// ```
/// use cottontail::{Continue, IntoOutcome, Json, Outcome};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize, Serialize)]
/// struct Export { pages: u32, #[serde(default)] done: u32 }
///
/// async fn export(Json(mut job): Json<Export>) -> Outcome {
///     // … export page `job.done` …
///     job.done += 1;
///     if job.done < job.pages {
///         return Continue::with(&job).into_outcome();
///     }
///     Json(serde_json::json!({"pages": job.pages})).into_outcome()
/// }
/// ```
///
/// Not for ordered handlers (a continuation goes to the back of the queue, behind later
/// sequence numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Continue(Outcome);

impl Continue {
    /// Continue with `state` (any JSON-serializable value) as the next slice's body.
    pub fn with<T: Serialize>(state: &T) -> Self {
        Continue(match serde_json::to_vec(state) {
            Ok(body) => Outcome::Continue(body),
            Err(e) => Outcome::Failed(HandlerError::permanent(
                "serialization",
                format!("the continuation state is not serializable to JSON: {e}"),
            )),
        })
    }
}

impl IntoOutcome for Continue {
    fn into_outcome(self) -> Outcome {
        self.0
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
            other => panic!("did not fail: {other:?}"),
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
    fn a_continuation_carries_its_state_as_the_next_body() {
        assert_eq!(
            Continue::with(&serde_json::json!({"done": 3})).into_outcome(),
            Outcome::Continue(br#"{"done":3}"#.to_vec())
        );
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
