//! # cottontail
//!
//! Message handlers on RabbitMQ. A handler is an `async fn` whose arguments are *extractors*
//! and whose return value becomes an *outcome*; cottontail does the rest: competing consumers,
//! coalesced acks, replies to `reply_to`, broker-held retries, dead-letters with reasons,
//! reconnection, metrics, health endpoints and a graceful shutdown.
//!
//! ## A first handler
//!
//! ```no_run
//! use cottontail::{App, Config, HandlerError, Json, Queue};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Resize { width: u32 }
//!
//! #[derive(Serialize)]
//! struct Resized { width: u32 }
//!
//! async fn resize(Json(req): Json<Resize>) -> Result<Json<Resized>, HandlerError> {
//!     if req.width == 0 {
//!         // Permanent: straight to `resize.dlq`, and an `error` reply to the caller.
//!         return Err(HandlerError::permanent("invalid_input", "width must be positive"));
//!     }
//!     // Any other error (`?` on io, database…) is transient: retried with backoff.
//!     Ok(Json(Resized { width: req.width }))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), cottontail::Error> {
//!     App::new(())
//!         .handler(Queue::new("resize").concurrency(4), resize)
//!         .run(Config::from_env()?)
//!         .await
//! }
//! ```
//!
//! ## Outcomes
//!
//! | handler returns | broker actions (in order) |
//! |---|---|
//! | `Ok(value)` | reply `x-status: ok` to `reply_to` (confirmed), then ack |
//! | `Err(transient)`, panic, timeout | copy to a TTL retry queue with `x-attempts` (confirmed), then ack; after the last attempt, as permanent |
//! | `Err(permanent)`, bad input | copy to `<queue>.dlq` with `x-error`… (confirmed), `error` reply, then ack |
//! | [`Continue`] | the next slice (same message, new body) to the queue (confirmed), then ack |
//! | cancelled ([`Client::cancel`](client::Client::cancel)) | `error` reply of kind `cancelled` (confirmed), then ack |
//!
//! Acks are coalesced (`multiple=true`) but never cover an unfinished message.
//!
//! ## Testing handlers
//!
//! [`testing`] runs a handler, with its state and queue settings, through this same pipeline
//! in process: no broker, and every publish (reply, progress, retry or dead-letter copy,
//! [`Outbox`] message) recorded for the test to check.
//!
//! ## CPU-bound work
//!
//! Handlers run on the async runtime, polled by their consumer's task (one per
//! [`Queue::consumers`], by default one per core): no task is spawned per message. Decode
//! images, compress or hash large inputs inside [`tokio::task::spawn_blocking`] so that one
//! heavy message cannot stall the other messages of its consumer (see the `thumbnails`
//! example crate).
//!
//! ## Module map
//!
//! What a handler crate uses is at the root: [`App`], [`Queue`] and its settings, the
//! extractors, [`HandlerError`]. The rest, by concern (dependencies run one way: `names` ←
//! settings ← `runtime`; no module imports one that imports it back):
//!
//! | concern | where |
//! |---|---|
//! | the app builder and a started app | `app.rs` ([`App`], [`Running`]) |
//! | handlers, middleware | `handler/` ([`Handler`], [`from_fn`], [`Middleware`]) |
//! | extractors, return values, errors | `extract.rs`, `outcome.rs`, `error.rs` |
//! | the message a handler sees | `message.rs` ([`Message`]) |
//! | per-handler settings | `queue/` ([`Queue`], [`RetryPolicy`], [`Bands`], [`Ordering`], [`Dedup`]) |
//! | schedules | `schedule.rs` ([`Schedule`], [`Tick`]) |
//! | workflows: routing slips with compensation, fan-out/fan-in | [`workflow`] ([`Workflow`]; the slip and its plans are pure functions) |
//! | broker names of every queue and exchange | [`names`] |
//! | header names of the message contract | [`headers`] |
//! | dedup, job-status, sequence and checkpoint stores | [`stores`] (memory, Redis, PostgreSQL) |
//! | long jobs: checkpoints, continuations, cancellation | [`Checkpoint`], [`Cancellation`] (`extract.rs`), [`Continue`] (`outcome.rs`), `control.rs` (crate-private: cancelled ids, running jobs, the broadcast) |
//! | producers: publish, RPC calls, replies | [`client`] |
//! | connecting (URLs, TLS, the frame guard) | [`connection`] |
//! | HTTP, health, metrics, status page, trace context | [`ops`] |
//! | how it runs (crate-private) | `runtime/`: `supervisor` → `session` → `consume` loops → `pipeline/` (`guards` → `dedup` → `run` → `actions`; `workflow` continues a workflow) → `acker`; `copies` (retry, DLQ, park), `topology`, `job_writer`, `scheduler/`, `ordered/` (`balance`, `partition`, `resequencer`) |
//!
//! The external contracts (headers, replies, DLQ headers, queue names, HTTP, CLI) are in
//! `docs/contracts.md`.

#![warn(missing_docs)]

mod app;
pub mod client;
mod config;
pub mod connection;
mod control;
mod error;
mod extract;
mod handler;
pub mod headers;
mod message;
pub mod names;
pub mod ops;
mod outcome;
mod queue;
mod redact;
mod runtime;
mod schedule;
pub mod stores;
pub mod testing;
pub mod workflow;

pub use app::{App, Running};
pub use config::{Config, DEFAULT_CONSUMER_TIMEOUT};
pub use error::{Disposition, Error, HandlerError};
pub use extract::{
    Attempt, Cancellation, Checkpoint, CorrelationId, FromMessage, FromRef, Json, MessageId,
    Outbox, Priority, Progress, Sequence, State,
};
pub use handler::{from_fn, BoxedHandler, Handler, Middleware, Next};
pub use message::Message;
pub use ops::TraceContext;
pub use outcome::{Continue, IntoOutcome, Outcome};
pub use queue::{
    Bands, Dedup, GapPolicy, Ordering, Queue, QueueType, RetryPolicy, DEFAULT_HANDLER_TIMEOUT,
};
pub use schedule::{Missed, Schedule, Tick};
pub use workflow::Workflow;

/// A boxed, sendable future: what handlers, middleware and store methods return.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Re-exported so handler crates use the same lapin as cottontail.
pub use lapin;
