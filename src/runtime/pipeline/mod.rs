//! The one place where a delivery becomes an outcome and the outcome becomes broker actions.
//!
//! ```text
//! delivery ─► guards ─► cancelled? ─► dedup claim ─► run (job status, handler + timeout +
//!   (guards.rs)  (control.rs)  (dedup.rs)     cancel + panic catch, immediate retries; run.rs)
//!          ─► settle claim ─► reply / retry copy / dead-letter copy / continuation
//!              (dedup.rs)        (confirmed; actions.rs) ─► ack (acker)
//! ```
//! Workflow queues run the same steps and then continue their workflow (`workflow.rs`).
//! Nothing is acked before what it produced is confirmed; when a publish fails the message is
//! requeued instead, so it is never lost.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::BoxedHandler;
use crate::message::{Context, Message};
use crate::ops::metrics::HandlerMetrics;
use crate::ops::status::RecentDeadLetters;
use crate::ops::trace_context::Hex;
use crate::queue::Queue;
mod actions;
mod dedup;
mod guards;
mod run;
mod workflow;

pub(crate) use workflow::Flow;

use crate::runtime::acker::Settle;
use crate::runtime::job_writer::JobRecorder;

/// How a message left the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The handler succeeded (reply confirmed).
    Done,
    /// Already succeeded before (dedup); the cached reply was sent.
    Duplicate,
    /// A retry copy waits in the broker.
    Retried,
    /// Dead-lettered with its reason.
    DeadLettered,
    /// Cancelled (before or while it ran); the `cancelled` reply was sent.
    Cancelled,
    /// Republished as the job's next slice (a continuation), confirmed.
    Continued,
    /// A copy was re-enqueued (classic redelivery count, busy id, parked, routed).
    Moved,
    /// A publish failed: give the delivery back to the queue.
    Requeue,
}

impl Verdict {
    pub(crate) fn settle(self) -> Settle {
        match self {
            Verdict::Requeue => Settle::Requeue,
            _ => Settle::Ack,
        }
    }
}

/// Where an entry-queue worker moves messages instead of handling them.
#[derive(Clone)]
pub(crate) enum Route {
    /// Ordered handlers: to the key's partition queue.
    Partitions(u16),
    /// Priority bands: to the band queue of the message's priority.
    Bands(crate::queue::Bands),
}

/// Everything one handler needs to process deliveries within one connection session.
pub(crate) struct Worker {
    pub queue: Arc<Queue>,
    pub service: BoxedHandler,
    pub context: Arc<Context>,
    pub metrics: HandlerMetrics,
    /// Cancelled when a publish fails for connection reasons: the session must restart.
    pub session_failed: CancellationToken,
    /// Job status recording, when enabled for the handler.
    pub jobs: Option<JobRecorder>,
    /// This instance's identity; with a counter, each claim's owner token.
    pub owner: Arc<str>,
    pub claims: Arc<std::sync::atomic::AtomicU64>,
    /// Feeds the status page's recent dead-letters.
    pub recent: RecentDeadLetters,
    /// Set on an ordered handler's entry-queue worker: route instead of handling.
    pub route: Option<Route>,
    /// Spans per message (off only to measure their cost).
    pub instrumented: bool,
    /// Set on the queues of a workflow: its part in it.
    pub workflow: Option<Flow>,
}

impl Worker {
    /// Processes one delivery to what the broker should be told about it.
    pub(crate) async fn process(&self, delivery: Delivery) -> Settle {
        let msg = self.message(delivery.data, delivery.properties, delivery.redelivered);
        let span = self.span_for(&msg);
        self.decide(msg).instrument(span).await.settle()
    }

    /// The message's span, or none when instrumentation is off.
    pub(crate) fn span_for(&self, msg: &Message) -> tracing::Span {
        if self.instrumented {
            Self::span(msg)
        } else {
            tracing::Span::none()
        }
    }

    /// The span every message is handled in.
    pub(crate) fn span(msg: &Message) -> tracing::Span {
        tracing::info_span!(
            "message",
            handler = %msg.handler(),
            queue = %msg.queue(),
            // Absent ids are left out rather than recorded empty.
            message_id = msg.message_id(),
            correlation_id = msg.correlation_id(),
            attempt = msg.attempt(),
            trace_id = %Hex::<32>(msg.trace().trace_id),
            span_id = %Hex::<16>(msg.trace().span_id.into()),
        )
    }

    /// Builds the handler-facing message from a delivery.
    pub(crate) fn message(
        &self,
        data: Vec<u8>,
        properties: lapin::BasicProperties,
        redelivered: bool,
    ) -> Message {
        Message::new(data, properties, redelivered, self.context.clone())
    }

    /// Everything from the guards to the broker actions (also what
    /// [`testing`](crate::testing) runs).
    pub(crate) async fn decide(&self, msg: Message) -> Verdict {
        self.observe_age(&msg);
        if let Some(route @ Route::Partitions(_)) = &self.route {
            // The guards of a sequenced message run at its turn in its partition, where a
            // dead-letter moves its key on; dead-lettered here, it would leave a gap for good.
            return self.route(&msg, route).await;
        }
        if let Some(verdict) = self.guard(&msg).await {
            return verdict;
        }
        if let Some(route) = &self.route {
            return self.route(&msg, route).await;
        }
        self.handle(msg).await
    }

    /// Everything after the guards, as one composition: dedup claim → run (job status, the
    /// handler with its timeout and panic catch, immediate retries) → settle the claim →
    /// broker actions. Each step lives in the module named for it.
    pub(crate) async fn handle(&self, msg: Message) -> Verdict {
        if let Some(id) = msg.message_id() {
            if msg.control().is_cancelled(id).await {
                return self.cancelled(&msg).await;
            }
        }
        if let Some(flow) = &self.workflow {
            // The same steps, then the workflow's continuation (`workflow.rs`).
            return self.handle_workflow(msg, flow).await;
        }
        let claim = match self.claim(&msg).await {
            Ok(claim) => claim,
            Err(verdict) => return verdict,
        };
        let (msg, outcome) = self.run(msg).await;
        self.settle_claim(claim, &msg, &outcome).await;
        self.act(&msg, outcome).await
    }

    fn observe_age(&self, msg: &Message) {
        if let Some(ts) = msg.properties().timestamp() {
            if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
                // AMQP timestamps are seconds; some clients send milliseconds.
                let ts = if *ts > 100_000_000_000 {
                    *ts as f64 / 1000.0
                } else {
                    *ts as f64
                };
                let age = now.as_secs_f64() - ts;
                if age.is_finite() && age >= 0.0 {
                    self.metrics.age.observe(age);
                }
            }
        }
    }
}
