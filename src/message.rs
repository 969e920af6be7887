//! The message a handler sees: body, AMQP properties and where it came from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::client::Publisher;
use crate::control::Control;
use crate::headers;
use crate::ops::trace_context::{TraceContext, TRACEPARENT};

/// One delivery, as seen by handlers and extractors. Cheap to clone.
#[derive(Clone)]
pub struct Message {
    inner: Arc<Inner>,
}

struct Inner {
    body: Vec<u8>,
    properties: BasicProperties,
    redelivered: bool,
    attempt: u32,
    trace: TraceContext,
    context: Arc<Context>,
    /// Cancelled when the job is cancelled (shared by the delivery's attempts).
    cancel: CancellationToken,
    /// Set once the handler took a [`Checkpoint`](crate::Checkpoint): the framework removes
    /// the checkpoint when the job ends.
    checkpointed: Arc<AtomicBool>,
}

/// What a handler's messages share: its name, queue, and the session's publisher.
pub(crate) struct Context {
    pub handler: String,
    pub queue: String,
    pub publisher: Publisher,
    /// Set while the handler's dedup store does not answer: outages are logged when they
    /// start and end, not once per deferred message.
    pub store_down: std::sync::atomic::AtomicBool,
    /// Checkpoints and cancellation (the app's).
    pub control: Arc<Control>,
}

impl Message {
    pub(crate) fn new(
        body: Vec<u8>,
        properties: BasicProperties,
        redelivered: bool,
        context: Arc<Context>,
    ) -> Self {
        let prior = headers::get_u64(properties.headers().as_ref(), headers::ATTEMPTS).unwrap_or(0);
        let attempt = u32::try_from(prior.saturating_add(1)).unwrap_or(u32::MAX);
        let trace = headers::get_str(properties.headers().as_ref(), TRACEPARENT)
            .and_then(TraceContext::parse)
            .map_or_else(TraceContext::new_root, |parent| parent.child());
        Self {
            inner: Arc::new(Inner {
                body,
                properties,
                redelivered,
                attempt,
                trace,
                context,
                cancel: CancellationToken::new(),
                checkpointed: Arc::default(),
            }),
        }
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// All AMQP properties (headers, ids, priority, timestamp…).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// The headers table, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.inner.properties.headers().as_ref()
    }

    /// `message_id`, the idempotency key.
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `correlation_id`, echoed on replies.
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `reply_to`: where replies go.
    pub fn reply_to(&self) -> Option<&str> {
        self.inner
            .properties
            .reply_to()
            .as_ref()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }

    /// Where the framework's replies go: `reply_to`, unless the caller already got its final
    /// reply (header [`REPLY_SENT`](crate::headers::REPLY_SENT), on a replayed dead-letter).
    pub(crate) fn reply_target(&self) -> Option<&str> {
        self.reply_to()
            .filter(|_| !self.has_header(crate::headers::REPLY_SENT))
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers().is_some_and(|h| h.inner().contains_key(name))
    }

    /// This is attempt number N (1 for the first delivery; retries count up).
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// This handling's trace context: the `traceparent` header's trace with a new span id, or
    /// a new trace when the message carried none. Replies and forwarded messages carry it.
    pub fn trace(&self) -> TraceContext {
        self.inner.trace
    }

    /// The broker's redelivered flag: an earlier delivery was not settled.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The handler's name (defaults to its queue name).
    pub fn handler(&self) -> &str {
        &self.inner.context.handler
    }

    /// The queue this message was consumed from.
    pub fn queue(&self) -> &str {
        &self.inner.context.queue
    }

    /// The same message as the next attempt (immediate in-process retries).
    pub(crate) fn next_attempt(&self) -> Message {
        let inner = &self.inner;
        Message {
            inner: Arc::new(Inner {
                body: inner.body.clone(),
                properties: inner.properties.clone(),
                redelivered: inner.redelivered,
                attempt: inner.attempt.saturating_add(1),
                trace: inner.trace,
                context: inner.context.clone(),
                cancel: inner.cancel.clone(),
                checkpointed: inner.checkpointed.clone(),
            }),
        }
    }

    pub(crate) fn publisher(&self) -> &Publisher {
        &self.inner.context.publisher
    }

    pub(crate) fn control(&self) -> &Arc<Control> {
        &self.inner.context.control
    }

    /// Cancelled when this job is cancelled.
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    pub(crate) fn mark_checkpointed(&self) {
        self.inner.checkpointed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn checkpointed(&self) -> bool {
        self.inner.checkpointed.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("handler", &self.handler())
            .field("message_id", &self.message_id())
            .field("correlation_id", &self.correlation_id())
            .field("attempt", &self.attempt())
            .field("bytes", &self.body().len())
            .finish()
    }
}
