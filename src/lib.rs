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
//!
//! Acks are coalesced (`multiple=true`) but never cover an unfinished message.
//!
//! ## CPU-bound work
//!
//! Handlers run on the async runtime, polled by their consumer's task (one per
//! [`Queue::consumers`], by default one per core): no task is spawned per message. Decode
//! images, compress or hash large inputs inside [`tokio::task::spawn_blocking`] so that one
//! heavy message cannot stall the other messages of its consumer (see the `thumbnails`
//! example crate).

#![warn(missing_docs)]

mod acker;
mod app;
pub mod client;
mod config;
mod connection;
mod dead_letter;
pub mod dedup;
mod error;
mod extract;
mod handler;
pub mod headers;
mod health;
mod http;
mod jobs;
mod message;
mod metrics;
mod ordering;
mod outcome;
mod pipeline;
mod publisher;
mod queue;
pub mod reply;
mod resequencer;
mod retry;
mod schedule;
mod status;
pub mod stores;
mod topology;
mod trace_context;

pub use app::{App, Running};
pub use client::{Call, Client, ClientBuilder, PublishOptions, RequestOptions, RpcError};
pub use config::{Config, DEFAULT_AMQP_URL};
pub use connection::{redact, Connector};
pub use dead_letter::republish_properties;
pub use dedup::{Dedup, DedupStore, MemoryStore};
pub use error::{Disposition, Error, HandlerError};
pub use extract::{
    Attempt, CorrelationId, FromMessage, FromRef, Json, MessageId, Outbox, Priority, Progress,
    Sequence, State,
};
pub use handler::{from_fn, BoxFuture, Handler, Layer, Next, Service};
pub use health::Health;
pub use jobs::{JobStatus, JobStore, MemoryJobs};
pub use message::Message;
pub use metrics::Metrics;
pub use ordering::{
    members_queue, partition_of, partition_queue, sequence_headers, GapPolicy, MemorySequences,
    MemoryStamper, Ordering, SequenceStamper, SequenceStore,
};
pub use outcome::{IntoOutcome, Outcome};
pub use publisher::{PublishError, Publisher};
pub use queue::{band_queue, Bands, Queue, QueueType};
pub use retry::{tier_queue, RetryPolicy};
pub use schedule::{Missed, Schedule, Tick};
pub use topology::DEAD_LETTER_EXCHANGE;
pub use trace_context::{TraceContext, TRACEPARENT};

/// Re-exported so handler crates use the same lapin as cottontail.
pub use lapin;
