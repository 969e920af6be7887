//! Extractors: the arguments of a handler function.
//!
//! Each argument type implements [`FromMessage`]; when extraction fails the handler does not
//! run and the message is dead-lettered with the extractor's reason (bad input never becomes
//! a retry loop).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::reply;
use crate::error::HandlerError;
use crate::headers;
use crate::message::Message;

/// Builds a handler argument from the message (and the app state).
///
/// Implement it for your own types to extract tenant ids, auth claims and the like:
///
/// ```
/// use cottontail::{FromMessage, HandlerError, Message};
///
/// struct Tenant(String);
///
/// impl<S> FromMessage<S> for Tenant {
///     fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
///         cottontail::headers::get_string(msg.headers(), "x-tenant")
///             .map(Tenant)
///             .ok_or_else(|| HandlerError::invalid_input("missing header x-tenant"))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument: it is not an extractor (`FromMessage<{S}>`)",
    label = "not an extractor",
    note = "handler arguments are extractors: `Json<T>` for the body (`Json<String>` for a JSON \
            string), `State<T>`, `Message`, `Attempt`, `MessageId`, `CorrelationId`, `Priority`, \
            `Sequence`, `Progress`, `Outbox`, `TraceContext`; in workflow steps also \
            `workflow::{{Input, Context, Recorded}}`; or your own `impl FromMessage<S>`"
)]
pub trait FromMessage<S>: Sized {
    /// Extracts the value, or says why the message does not fit this handler.
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError>;
}

/// The body, deserialized from JSON. Also the way to reply with JSON.
///
/// A body that is not valid JSON for `T` is dead-lettered with kind `invalid_input`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<S, T: DeserializeOwned> FromMessage<S> for Json<T> {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        serde_json::from_slice(msg.body()).map(Json).map_err(|e| {
            HandlerError::invalid_input(format!(
                "body is not valid JSON for {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl<T: Serialize> Serialize for Json<T> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        self.0.serialize(s)
    }
}

/// The application state given to [`App::new`](crate::App::new), or a part of it (see
/// [`FromRef`]), cloned per message (wrap large state in an `Arc`).
#[derive(Clone, Copy, Debug, Default)]
pub struct State<T>(pub T);

impl<S, T: FromRef<S>> FromMessage<S> for State<T> {
    fn from_message(_: &Message, state: &S) -> Result<Self, HandlerError> {
        Ok(State(T::from_ref(state)))
    }
}

/// Picks a part of the app state, so handler crates can take `State<TheirPart>` while the
/// service composes many parts into one state (as in axum).
///
/// ```
/// use cottontail::FromRef;
///
/// #[derive(Clone)]
/// struct Orders;
/// #[derive(Clone)]
/// struct AppState { orders: Orders }
///
/// impl FromRef<AppState> for Orders {
///     fn from_ref(state: &AppState) -> Self { state.orders.clone() }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`State<{Self}>` needs a `{Self}` from the app state `{S}`, and there is none (no `FromRef<{S}>` for `{Self}`)",
    label = "no `{Self}` in the app state",
    note = "`State<T>` takes the whole state given to `App::new` (`T` = `{S}`), or a part of it: \
            `impl FromRef<{S}> for {Self} {{ fn from_ref(state: &{S}) -> Self {{ state.field.clone() }} }}`"
)]
pub trait FromRef<S> {
    /// Clones the part out of the state.
    fn from_ref(state: &S) -> Self;
}

impl<T: Clone> FromRef<T> for T {
    fn from_ref(state: &T) -> Self {
        state.clone()
    }
}

impl<S> FromMessage<S> for Message {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(msg.clone())
    }
}

/// The attempt number: 1 on first delivery, 2 on the first retry, …
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl<S> FromMessage<S> for Attempt {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Attempt(msg.attempt()))
    }
}

/// The `message_id` property, if the publisher set one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageId(pub Option<String>);

impl<S> FromMessage<S> for MessageId {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(MessageId(msg.message_id().map(str::to_owned)))
    }
}

/// The `correlation_id` property, if the publisher set one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorrelationId(pub Option<String>);

impl<S> FromMessage<S> for CorrelationId {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(CorrelationId(msg.correlation_id().map(str::to_owned)))
    }
}

/// The message priority (0 when unset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority(pub u8);

impl<S> FromMessage<S> for Priority {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Priority(msg.properties().priority().unwrap_or(0)))
    }
}

/// The `x-sequence-key` / `x-sequence` headers of an ordered message.
///
/// Rejects (dead-letters) a message whose headers are missing or malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// The ordering key (e.g. an order id).
    pub key: String,
    /// 1, 2, 3… within the key.
    pub number: u64,
}

impl<S> FromMessage<S> for Sequence {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        let key = headers::get_string(msg.headers(), headers::SEQUENCE_KEY)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| HandlerError::invalid_input("missing header x-sequence-key"))?;
        let number = headers::get_u64(msg.headers(), headers::SEQUENCE)
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                HandlerError::invalid_input("header x-sequence must be an integer >= 1")
            })?;
        Ok(Sequence { key, number })
    }
}

/// Sends `x-status: progress` replies to the caller while the handler works.
///
/// Does nothing when the message has no `reply_to`, or when its caller already got its final
/// reply (a request replayed from the DLQ). Each send waits for the broker's confirm, so
/// progress arrives in order and before the final reply.
#[derive(Clone, Debug)]
pub struct Progress {
    msg: Message,
}

impl Progress {
    /// Sends one progress update (any JSON-serializable value).
    pub async fn send<T: Serialize>(&self, update: &T) -> Result<(), HandlerError> {
        let Some(reply_to) = self.msg.reply_target() else {
            return Ok(());
        };
        let body = serde_json::to_vec(update)?;
        reply::send(
            self.msg.publisher(),
            reply_to,
            self.msg.correlation_id(),
            reply::Status::Progress,
            body,
            Some(self.msg.trace()),
        )
        .await
        .map_err(|e| HandlerError::transient("publish", e.to_string()))
    }
}

impl<S> FromMessage<S> for Progress {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Progress { msg: msg.clone() })
    }
}

/// Publishes further messages with publisher confirms, on the handler's connection.
///
/// Awaiting [`Outbox::send_json`] returns once the broker confirmed, so a handler that forwards
/// work and then returns `Ok` never acks its input before its output is safe.
#[derive(Clone, Debug)]
pub struct Outbox {
    publisher: crate::client::Publisher,
    trace: crate::TraceContext,
}

impl Outbox {
    /// Publishes `body` (JSON) to `queue` through the default exchange, persistent, confirmed.
    pub async fn send_json<T: Serialize>(&self, queue: &str, body: &T) -> Result<(), HandlerError> {
        self.send(queue, body, lapin::BasicProperties::default())
            .await
    }

    /// [`send_json`](Self::send_json) with a `message_id`: a deterministic one (derived from
    /// what is announced, e.g. `<workflow id>:<step>:<action>`) lets consumers drop the copies
    /// a redelivered handler can publish again.
    pub async fn send_json_as<T: Serialize>(
        &self,
        queue: &str,
        message_id: &str,
        body: &T,
    ) -> Result<(), HandlerError> {
        let properties = lapin::BasicProperties::default().with_message_id(message_id.into());
        self.send(queue, body, properties).await
    }

    async fn send<T: Serialize>(
        &self,
        queue: &str,
        body: &T,
        properties: lapin::BasicProperties,
    ) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(body)?;
        let mut table = lapin::types::FieldTable::default();
        headers::set_string(
            &mut table,
            crate::ops::TRACEPARENT,
            self.trace.child().to_string(),
        );
        self.publisher
            .publish_json(queue, &bytes, properties.with_headers(table))
            .await
            .map_err(|e| HandlerError::transient("publish", e.to_string()))
    }

    /// The underlying publisher, for full control over exchange, routing key and properties.
    pub fn publisher(&self) -> &crate::client::Publisher {
        &self.publisher
    }
}

impl<S> FromMessage<S> for crate::TraceContext {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(msg.trace())
    }
}

impl<S> FromMessage<S> for Outbox {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Outbox {
            publisher: msg.publisher().clone(),
            trace: msg.trace(),
        })
    }
}

/// A long job's saved state for this message, so that a redelivery (after a crash, a lost
/// connection, a timeout) resumes where the last attempt left off instead of starting over.
///
/// Keyed by handler and `message_id` (a message without one is dead-lettered as
/// `invalid_input`), kept in the app's checkpoint store
/// ([`App::checkpoint_store`](crate::App::checkpoint_store): memory by default, Redis or
/// PostgreSQL to resume on any instance), and removed by the framework when the job ends
/// (succeeded, dead-lettered or cancelled). A save is one store round trip: fine every
/// second.
///
/// ```
/// use cottontail::{Checkpoint, HandlerError, Json};
///
/// async fn count(Json(n): Json<u64>, checkpoint: Checkpoint<u64>) -> Result<Json<u64>, HandlerError> {
///     let start = checkpoint.load().await?.unwrap_or(0);
///     for done in start..n {
///         // … one step of work …
///         checkpoint.save(&(done + 1)).await?;
///     }
///     Ok(Json(n))
/// }
/// ```
pub struct Checkpoint<T> {
    msg: Message,
    id: String,
    _state: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Checkpoint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("handler", &self.msg.handler())
            .field("message_id", &self.id)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Checkpoint<T> {
    /// The state last saved for this message; `None` when fresh. A stored state that no
    /// longer reads as `T` (the handler changed its type) is logged and counts as none.
    pub async fn load(&self) -> Result<Option<T>, HandlerError> {
        let raw = self
            .msg
            .control()
            .store
            .load(self.msg.handler(), &self.id)
            .await
            .map_err(|e| HandlerError::transient("checkpoint", e.to_string()))?;
        Ok(raw.and_then(|bytes| match serde_json::from_slice(&bytes) {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(%error, "stored checkpoint unreadable; starting over");
                None
            }
        }))
    }

    /// Saves `state` as this message's checkpoint (replacing the last one).
    pub async fn save(&self, state: &T) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(state)?;
        let control = self.msg.control();
        control
            .store
            .save(self.msg.handler(), &self.id, bytes, control.checkpoint_ttl)
            .await
            .map_err(|e| HandlerError::transient("checkpoint", e.to_string()))
    }
}

impl<S, T> FromMessage<S> for Checkpoint<T> {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        let id = msg
            .message_id()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| HandlerError::invalid_input("checkpoints need a message_id"))?;
        msg.mark_checkpointed();
        Ok(Checkpoint {
            msg: msg.clone(),
            id: id.to_owned(),
            _state: std::marker::PhantomData,
        })
    }
}

/// Tells a running handler that its job was cancelled (`Client::cancel`, `cottontail cancel`,
/// `POST /jobs/{id}/cancel`), on whichever instance runs it.
///
/// The framework stops a cancelled run by itself, at the handler's next `.await` (within a
/// second of the cancel): its caller gets an `error` reply of kind `cancelled`, and the
/// message is acked. Take this extractor to notice it where dropping the future cannot reach:
/// a loop inside `spawn_blocking`, or cleanup to do before returning.
#[derive(Clone, Debug)]
pub struct Cancellation(tokio_util::sync::CancellationToken);

impl Cancellation {
    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when the job is cancelled.
    pub async fn cancelled(&self) {
        self.0.cancelled().await
    }
}

impl<S> FromMessage<S> for Cancellation {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Cancellation(msg.cancel_token().clone()))
    }
}
