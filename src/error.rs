//! Errors as values: a [`HandlerError`] says what went wrong and whether trying again can help;
//! the framework turns it into an outcome (retry later or dead-letter now).

use std::borrow::Cow;
use std::fmt;

/// Whether a failed message is worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Something outside the message failed (a database blip, a timeout): retry later.
    Transient,
    /// The message itself is unusable (bad input, impossible request): dead-letter now.
    Permanent,
}

/// A handler failure: a machine-readable `kind`, a human-readable `message` and a
/// [`Disposition`].
///
/// Any error converts into a *transient* `HandlerError` (kind `error`): every
/// `std::error::Error + Send + Sync`, `anyhow::Error`, `Box<dyn Error + Send + Sync>` and
/// `String`, so `?` works in handlers; say [`HandlerError::permanent`] when retrying cannot
/// help.
///
/// ```
/// use cottontail::HandlerError;
///
/// let bad = HandlerError::permanent("invalid_input", "max_side must be positive");
/// assert!(!bad.is_transient());
///
/// let io: HandlerError = std::io::Error::other("disk busy").into();
/// assert!(io.is_transient());
/// assert_eq!(io.kind(), "error");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    kind: Cow<'static, str>,
    message: String,
    disposition: Disposition,
}

impl HandlerError {
    /// A failure that retrying cannot fix: the message goes to `<queue>.dlq` now.
    pub fn permanent(kind: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            disposition: Disposition::Permanent,
        }
    }

    /// A failure that may pass on a later attempt: the message is retried per the
    /// handler's retry policy.
    pub fn transient(kind: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            disposition: Disposition::Transient,
        }
    }

    /// The input did not fit the handler (bad JSON, missing header…): permanent.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::permanent("invalid_input", message)
    }

    /// Machine-readable kind, e.g. `invalid_input`, `timeout`, `panic`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Human-readable description.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Retry later (`Transient`) or dead-letter now (`Permanent`).
    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    /// Shorthand for `disposition() == Transient`.
    pub fn is_transient(&self) -> bool {
        self.disposition == Disposition::Transient
    }

    /// The same error, made permanent (e.g. after the last retry).
    pub fn into_permanent(mut self) -> Self {
        self.disposition = Disposition::Permanent;
        self
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Everything that converts into a boxed error — any `std::error::Error + Send + Sync`,
/// `anyhow::Error`, `Box<dyn Error + Send + Sync>`, `String`, `&str` — is a transient failure,
/// so `?` works in handlers whatever error type the code around them uses.
impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let error: Box<dyn std::error::Error + Send + Sync> = error.into();
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::transient("error", message)
    }
}

/// Framework errors: configuration, topology and connection problems that stop an app.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker already has this queue with other arguments than the handler declares.
    #[error("{0}")]
    QueueMismatch(String),
    /// A setting or environment variable is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Talking to the broker failed.
    #[error("broker: {0}")]
    Broker(String),
    /// Publishing failed (nacked, unroutable or connection lost).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Binding the HTTP port failed.
    #[error("http: {0}")]
    Http(#[from] std::io::Error),
    /// A store (dedup, job status, sequences) failed, e.g. while connecting at startup.
    #[error(transparent)]
    Store(#[from] crate::stores::StoreError),
    /// A message could not be encoded as JSON.
    #[error("encoding: {0}")]
    Encode(String),
    /// A task of the framework ended unexpectedly (a panic): a bug, not a setting.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn broker(error: lapin::Error) -> Self {
        Error::Broker(crate::redact::redact(&error.to_string()))
    }
}

/// Why a publish did not make it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message (negative confirm).
    #[error("the broker nacked the message")]
    Nacked,
    /// `mandatory` was set and no queue was bound for the routing key.
    #[error(
        "unroutable: no queue bound for exchange '{exchange}' and routing key '{routing_key}'"
    )]
    Unroutable {
        /// Target exchange ("" is the default exchange).
        exchange: String,
        /// Routing key (the queue name on the default exchange).
        routing_key: String,
    },
    /// The routing key or exchange name is longer than AMQP allows (255 bytes).
    #[error("name too long for AMQP: {0}")]
    InvalidName(String),
    /// The connection or channel failed before the confirm arrived.
    #[error("connection: {0}")]
    Connection(String),
}
