//! Test handlers without a broker.
//!
//! [`TestHandler`] runs a handler, with its state and its [`Queue`] settings, through the
//! same pipeline the broker path uses (guards, dedup, extractors, timeout, panic catch,
//! immediate retries, retry / dead-letter decisions, replies), in process. Every publish —
//! replies, progress, retry and dead-letter copies, [`Outbox`](crate::Outbox) messages — is
//! recorded instead of sent, and read back into a [`Run`]: how the message left
//! ([`Handled`]), the replies in order, the messages the handler sent.
//!
//! ```
//! use cottontail::testing::{Handled, TestHandler, TestMessage};
//! use cottontail::{HandlerError, Json, Outbox, Progress, Queue};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, Serialize)]
//! struct Resize { width: u32 }
//!
//! async fn resize(progress: Progress, outbox: Outbox, Json(req): Json<Resize>)
//!     -> Result<Json<Resize>, HandlerError>
//! {
//!     match req.width {
//!         0 => return Err(HandlerError::permanent("invalid_input", "width must be positive")),
//!         13 => return Err(HandlerError::transient("storage", "bucket unavailable")),
//!         _ => {}
//!     }
//!     progress.send(&"resizing").await?;
//!     outbox.send_json("resized", &req).await?;
//!     Ok(Json(req))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let resizer = TestHandler::new(Queue::new("resize"), resize);
//!
//! // ok: a progress reply, then the `ok` reply; one message sent through the outbox.
//! let run = resizer.run(TestMessage::json(&Resize { width: 64 }).reply_to("replies")).await;
//! assert!(run.is_ok());
//! assert_eq!(run.progress().next().unwrap().json::<String>(), "resizing");
//! assert_eq!(run.reply().unwrap().json::<serde_json::Value>()["width"], 64);
//! assert_eq!(run.outbox[0].routing_key, "resized");
//!
//! // A transient error is retried from `resize.retry.1000`…
//! let run = resizer.run(TestMessage::json(&Resize { width: 13 })).await;
//! assert_eq!(run.retry().unwrap().delay, std::time::Duration::from_secs(1));
//! // …and dead-lettered on the policy's last attempt (5 by default).
//! let run = resizer.run(TestMessage::json(&Resize { width: 13 }).attempt(5)).await;
//! assert_eq!(run.dead_letter().unwrap().kind, "storage");
//!
//! // A permanent error: dead-lettered at once, and an `error` reply to the caller.
//! let run = resizer.run(TestMessage::json(&Resize { width: 0 }).reply_to("replies")).await;
//! let dead = run.dead_letter().unwrap();
//! assert_eq!((dead.kind.as_str(), dead.attempts), ("invalid_input", 1));
//! assert_eq!(run.reply().unwrap().status, cottontail::testing::Status::Error);
//!
//! // Bad input is dead-lettered by the extractor, never retried.
//! let run = resizer.run(TestMessage::bytes("not json")).await;
//! assert!(matches!(&run.handled, Handled::DeadLettered(d) if d.kind == "invalid_input"));
//! # }
//! ```
//!
//! What needs a broker is not simulated: topology, the TTL that returns a retry copy, acks
//! and redeliveries, ordered partitions and resequencing, priorities, schedules firing, job
//! statuses. Broker-side counters a message arrives with can be set as headers
//! ([`TestMessage::attempt`], `x-delivery-count`).

mod message;
mod run;

use std::sync::Arc;

use tracing::Instrument;

pub use crate::client::recorder::Published;
pub use crate::client::reply::Status;
pub use message::{HeaderValue, TestMessage};
pub use run::{DeadLetter, Handled, Reply, Retry, Run};

use crate::client::recorder::Recorder;
use crate::client::Publisher;
use crate::handler::{from_fn, BoxedHandler, Handler, Middleware, Next};
use crate::message::{Context, Message};
use crate::ops::metrics::Metrics;
use crate::ops::status::RecentDeadLetters;
use crate::queue::Queue;
use crate::runtime::pipeline::Worker;

/// A handler with its state and queue settings, run in process (see the [module](self)).
///
/// Runs are independent (each records its own publishes) and may run concurrently; what
/// outlives a run is what outlives a message in production: the dedup store and the state.
pub struct TestHandler {
    worker: Worker,
    /// The handler with its middleware, before the recorder's mark goes around it.
    handler: BoxedHandler,
    missing: Vec<String>,
}

impl TestHandler {
    /// A handler without state on `queue` (its retry policy, timeout, body limit, dedup…).
    ///
    /// # Panics
    ///
    /// When the queue settings are invalid (as [`App::start`](crate::App::start) refuses them).
    #[track_caller]
    pub fn new<H, Args>(queue: Queue, handler: H) -> Self
    where
        H: Handler<Args, ()>,
    {
        Self::with_state(queue, handler, ())
    }

    /// A handler with `state` (what [`App::new`](crate::App::new) would be given) on `queue`.
    ///
    /// # Panics
    ///
    /// When the queue settings are invalid (as [`App::start`](crate::App::start) refuses them).
    #[track_caller]
    pub fn with_state<H, Args, S>(queue: Queue, handler: H, state: S) -> Self
    where
        H: Handler<Args, S>,
        S: Send + Sync + 'static,
    {
        if let Err(e) = queue.validate() {
            panic!("cottontail::testing: {e}");
        }
        let handler = BoxedHandler::from_handler(handler, state);
        let context = Arc::new(Context {
            handler: queue.handler().to_owned(),
            queue: queue.name().to_owned(),
            // Unused: each run's messages carry their own recording publisher.
            publisher: Publisher::recording(Recorder::default()),
            store_down: Default::default(),
            control: Default::default(),
        });
        let worker = Worker {
            metrics: Metrics::default().handler(queue.handler(), queue.name()),
            queue: Arc::new(queue),
            service: marked(handler.clone()),
            context,
            session_failed: Default::default(),
            jobs: None,
            owner: "testing".into(),
            claims: Default::default(),
            recent: RecentDeadLetters::default(),
            route: None,
            instrumented: true,
            workflow: None,
        };
        Self {
            worker,
            handler,
            missing: Vec::new(),
        }
    }

    /// Wraps the handler in `middleware`, as [`App::middleware`](crate::App::middleware) does
    /// (the last one added runs first).
    pub fn middleware(mut self, middleware: Middleware) -> Self {
        self.handler = middleware(self.handler);
        self.worker.service = marked(self.handler.clone());
        self
    }

    /// Makes `queue` missing: a publish to it fails as unroutable, as the broker's would
    /// (an [`Outbox`](crate::Outbox) send, a retry or dead-letter copy; replies are dropped).
    pub fn missing_queue(mut self, queue: impl Into<String>) -> Self {
        self.missing.push(queue.into());
        self
    }

    /// Runs one message through the pipeline and reports what happened.
    pub async fn run(&self, message: TestMessage) -> Run {
        let recorder = Recorder::new(self.missing.clone());
        let context = Arc::new(Context {
            handler: self.worker.context.handler.clone(),
            queue: self.worker.context.queue.clone(),
            publisher: Publisher::recording(recorder.clone()),
            store_down: Default::default(),
            control: self.worker.context.control.clone(),
        });
        let TestMessage {
            body,
            properties,
            redelivered,
        } = message;
        let msg = Message::new(body, properties, redelivered, context);
        let reply_to = msg.reply_to().map(str::to_owned);
        let span = self.worker.span_for(&msg);
        let verdict = self.worker.decide(msg).instrument(span).await;
        Run::new(verdict, recorder.take(), reply_to.as_deref())
    }
}

impl std::fmt::Debug for TestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHandler")
            .field("handler", &self.worker.context.handler)
            .field("queue", &self.worker.context.queue)
            .finish_non_exhaustive()
    }
}

/// Marks the handler's own publishes (outbox, progress) apart from the pipeline's, and counts
/// the calls.
fn marked(handler: BoxedHandler) -> BoxedHandler {
    let mark = from_fn(|msg: Message, next: Next| async move {
        let _running = msg.publisher().recorder().map(Recorder::enter_handler);
        next.run(msg).await
    });
    mark(handler)
}
