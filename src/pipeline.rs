//! The one place where a delivery becomes an outcome and the outcome becomes broker actions.
//!
//! ```text
//! delivery ─► guards (size, crash loop) ─► handler (+ timeout, panic catch, immediate retries)
//!          ─► outcome ─► reply / retry copy / dead-letter copy (confirmed) ─► ack
//! ```
//! Nothing is acked before what it produced is confirmed; when a publish fails the message is
//! requeued instead, so it is never lost.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::acker::Settle;
use crate::dead_letter;
use crate::dedup::{Claim, Dedup};
use crate::error::HandlerError;
use crate::extract::FromMessage;
use crate::handler::Service;
use crate::headers;
use crate::jobs::JobRecorder;
use crate::message::{Context, Message};
use crate::metrics::HandlerMetrics;
use crate::outcome::Outcome;
use crate::publisher::PublishError;
use crate::queue::{Queue, QueueType};
use crate::reply::{self, Status};
use crate::status::RecentDeadLetters;
use crate::trace_context::Hex;

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
    pub service: Service,
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

    async fn decide(&self, msg: Message) -> Verdict {
        self.observe_age(&msg);
        if let Some(verdict) = self.guard(&msg).await {
            return verdict;
        }
        if let Some(route) = &self.route {
            return self.route(&msg, route).await;
        }
        self.handle(msg).await
    }

    /// Claim, run, reply/retry/dead-letter: everything after the guards.
    pub(crate) async fn handle(&self, msg: Message) -> Verdict {
        // A claim owner token only when there is something to claim (no allocation otherwise).
        let owner = match (&self.queue.dedup, msg.message_id()) {
            (Some(_), Some(_)) => {
                let token = self
                    .claims
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{}/{token}", self.owner)
            }
            _ => String::new(),
        };
        let claimed = match self.claim(&msg, &owner).await {
            Ok(claimed) => claimed,
            Err(verdict) => return verdict,
        };
        let (msg, outcome) = self.run(msg).await;
        if let Some(dedup) = claimed {
            self.settle_claim(dedup, &msg, &owner, &outcome).await;
        }
        match outcome {
            Outcome::Done(body) => {
                self.job(&msg, "succeeded", |j| {
                    j.result = serde_json::from_slice(&body).ok();
                })
                .await;
                if let Some(reply_to) = msg.reply_to() {
                    let sent = reply::send(
                        msg.publisher(),
                        reply_to,
                        msg.correlation_id(),
                        Status::Ok,
                        body,
                        Some(msg.trace()),
                    )
                    .await;
                    if let Err(e) = sent {
                        return self.publish_failed(e);
                    }
                    self.metrics.reply_ok.inc();
                }
                self.metrics.ok.inc();
                Verdict::Done
            }
            Outcome::Failed(error) => self.fail(&msg, error).await,
        }
    }

    /// Claims the message id in the dedup store. `Ok(Some)` = run it (and settle the claim
    /// after); `Ok(None)` = run it, no dedup; `Err(verdict)` = do not run it.
    async fn claim(&self, msg: &Message, owner: &str) -> Result<Option<&Dedup>, Verdict> {
        let (Some(dedup), Some(id)) = (&self.queue.dedup, msg.message_id()) else {
            return Ok(None);
        };
        match dedup
            .store
            .claim(msg.handler(), id, owner, dedup.lease)
            .await
        {
            Ok(Claim::Acquired) => Ok(Some(dedup)),
            Ok(Claim::Done { reply }) => {
                tracing::debug!("duplicate of a message that already succeeded");
                if let Some(reply_to) = msg.reply_to() {
                    let body = reply.unwrap_or_else(|| b"null".to_vec());
                    let sent = reply::send(
                        msg.publisher(),
                        reply_to,
                        msg.correlation_id(),
                        Status::Ok,
                        body,
                        Some(msg.trace()),
                    )
                    .await;
                    if let Err(e) = sent {
                        return Err(self.publish_failed(e));
                    }
                    self.metrics.reply_ok.inc();
                }
                self.metrics.duplicate.inc();
                Err(Verdict::Duplicate)
            }
            Ok(Claim::Busy) => {
                tracing::debug!(delay = ?dedup.busy_delay, "message id busy on another instance; parked");
                Err(match dead_letter::park(msg, dedup.busy_delay, None).await {
                    Ok(()) => Verdict::Moved,
                    Err(e) => self.publish_failed(e),
                })
            }
            Err(error) => {
                // Never run without the check: a store outage is a transient failure.
                let error = HandlerError::transient("store_unavailable", error.to_string());
                Err(self.fail(msg, error).await)
            }
        }
    }

    /// Records success (with the reply) or releases the claim so a retry can run.
    async fn settle_claim(&self, dedup: &Dedup, msg: &Message, owner: &str, outcome: &Outcome) {
        let Some(id) = msg.message_id() else { return };
        let result = match outcome {
            Outcome::Done(body) => {
                let reply = msg.reply_to().map(|_| body.clone());
                dedup
                    .store
                    .complete(msg.handler(), id, owner, reply, dedup.retention)
                    .await
            }
            Outcome::Failed(_) => dedup.store.release(msg.handler(), id, owner).await,
        };
        if let Err(error) = result {
            // The handler ran; the lease lapses by itself. Duplicates become possible again
            // after it does, which at-least-once delivery allows.
            tracing::warn!(%error, "dedup store not updated");
        }
    }

    /// Checks that run before the handler: oversized bodies and crash loops.
    pub(crate) async fn guard(&self, msg: &Message) -> Option<Verdict> {
        if msg.body().len() > self.queue.max_body {
            let error = HandlerError::permanent(
                "too_large",
                format!(
                    "body of {} bytes exceeds the handler's limit of {} bytes",
                    msg.body().len(),
                    self.queue.max_body
                ),
            );
            return Some(self.dead_letter(msg, error, msg.attempt()).await);
        }
        let limit = u64::from(self.queue.delivery_limit);
        let redeliveries = match self.queue.effective_type() {
            QueueType::Quorum => {
                headers::get_u64(msg.headers(), headers::DELIVERY_COUNT).unwrap_or(0)
            }
            QueueType::Classic => {
                let counted = headers::get_u64(msg.headers(), headers::REDELIVERIES).unwrap_or(0);
                if msg.redelivered() && counted < limit {
                    // Classic queues do not count redeliveries: re-enqueue a counted copy
                    // (confirmed) and drop this delivery.
                    return Some(match dead_letter::requeue_counted(msg, counted + 1).await {
                        Ok(()) => Verdict::Moved,
                        Err(e) => self.publish_failed(e),
                    });
                }
                counted
            }
        };
        if redeliveries >= limit {
            let error = HandlerError::permanent(
                "crash_loop",
                format!(
                    "delivered {} times without a verdict (the worker crashed, was killed or \
                     lost its connection while handling it); delivery limit is {limit}",
                    // The count comes from a header: any value, u64::MAX included.
                    redeliveries.saturating_add(1)
                ),
            );
            return Some(self.dead_letter(msg, error, msg.attempt()).await);
        }
        None
    }

    /// Runs the handler, repeating immediate retries in process.
    async fn run(&self, mut msg: Message) -> (Message, Outcome) {
        loop {
            let outcome = self.run_once(msg.clone()).await;
            if let Outcome::Failed(error) = &outcome {
                if error.is_transient()
                    && self.queue.retry.delay_after(msg.attempt()) == Some(Duration::ZERO)
                {
                    tracing::debug!(%error, "immediate retry");
                    self.metrics.retry(msg.attempt());
                    msg = msg.next_attempt();
                    continue;
                }
            }
            return (msg, outcome);
        }
    }

    /// Moves an ordered message to its key's partition queue (confirmed before the ack).
    async fn route(&self, msg: &Message, route: &Route) -> Verdict {
        let target = match route {
            Route::Partitions(partitions) => {
                let key = match crate::extract::Sequence::from_message(msg, &()) {
                    Ok(seq) => seq.key,
                    Err(error) => return self.dead_letter(msg, error, msg.attempt()).await,
                };
                let partition = crate::ordering::partition_of(&key, *partitions);
                crate::ordering::partition_queue(msg.queue(), partition)
            }
            Route::Bands(bands) => {
                let priority = msg.properties().priority().unwrap_or(0);
                crate::queue::band_queue(msg.queue(), bands.band_of(priority))
            }
        };
        match dead_letter::forward(msg, &target).await {
            Ok(()) => Verdict::Moved,
            Err(e) => self.publish_failed(e),
        }
    }

    /// Records a job status transition when the message has an id and tracking is on.
    async fn job(&self, msg: &Message, status: &str, detail: impl FnOnce(&mut crate::JobStatus)) {
        if let (Some(jobs), Some(id)) = (&self.jobs, msg.message_id()) {
            jobs.record(id, status, msg.attempt(), detail).await;
        }
    }

    /// One handler run: timed, time-limited, with panics caught as transient failures.
    async fn run_once(&self, msg: Message) -> Outcome {
        self.job(&msg, "running", |_| {}).await;
        self.metrics.in_flight.inc();
        let timer = self.metrics.duration.start_timer();
        let call = AssertUnwindSafe(self.service.call(msg)).catch_unwind();
        let result = match self.queue.timeout {
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Ok(Outcome::Failed(HandlerError::transient(
                    "timeout",
                    format!("handler ran longer than {limit:?} and was cancelled"),
                ))),
            },
            None => call.await,
        };
        timer.observe_duration();
        self.metrics.in_flight.dec();
        match result {
            Ok(outcome) => outcome,
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                tracing::error!(panic = %text, "handler panicked");
                Outcome::Failed(HandlerError::transient(
                    "panic",
                    format!("handler panicked: {text}"),
                ))
            }
        }
    }

    /// A failed attempt: retry later if the policy allows, otherwise dead-letter.
    async fn fail(&self, msg: &Message, error: HandlerError) -> Verdict {
        let attempt = msg.attempt();
        if error.is_transient() {
            if let Some(delay) = self.queue.retry.delay_after(attempt) {
                tracing::warn!(%error, ?delay, "attempt failed; retry scheduled");
                self.job(msg, "failed", |j| {
                    j.error = Some(error_json(&error));
                    j.retrying = Some(true);
                })
                .await;
                return match dead_letter::schedule_retry(msg, &error, &self.queue.retry, delay)
                    .await
                {
                    Ok(()) => {
                        self.metrics.retry(attempt);
                        Verdict::Retried
                    }
                    Err(e) => self.publish_failed(e),
                };
            }
        }
        self.dead_letter(msg, error, attempt).await
    }

    /// Dead-letters with the reason; the caller (if any) gets an `error` reply.
    pub(crate) async fn dead_letter(
        &self,
        msg: &Message,
        error: HandlerError,
        attempts: u32,
    ) -> Verdict {
        tracing::warn!(%error, attempts, "dead-lettering message");
        self.job(msg, "dead_lettered", |j| {
            j.error = Some(error_json(&error));
            j.retrying = Some(false);
        })
        .await;
        if let Err(e) = dead_letter::dead_letter(msg, &error, attempts).await {
            return self.publish_failed(e);
        }
        if let Some(reply_to) = msg.reply_to() {
            let body = reply::error_body(&error);
            if let Err(e) = reply::send(
                msg.publisher(),
                reply_to,
                msg.correlation_id(),
                Status::Error,
                body,
                Some(msg.trace()),
            )
            .await
            {
                // The dead-letter copy is safe; a lost error reply must not duplicate it.
                tracing::warn!(error = %e, "error reply not sent");
            } else {
                self.metrics.reply_error.inc();
            }
        }
        self.metrics.dead_letter(error.kind());
        self.recent.push(
            msg.handler(),
            msg.message_id(),
            error.kind(),
            error.message(),
        );
        Verdict::DeadLettered
    }

    pub(crate) fn publish_failed(&self, error: PublishError) -> Verdict {
        tracing::warn!(%error, "publish failed; message goes back to the queue");
        if matches!(error, PublishError::Connection(_)) {
            self.session_failed.cancel();
        }
        Verdict::Requeue
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

fn error_json(error: &HandlerError) -> serde_json::Value {
    serde_json::json!({"kind": error.kind(), "message": error.message()})
}
