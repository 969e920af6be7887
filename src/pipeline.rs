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

use crate::acker::{Acker, Settle};
use crate::dead_letter;
use crate::error::HandlerError;
use crate::handler::Service;
use crate::headers;
use crate::message::{Context, Message};
use crate::metrics::HandlerMetrics;
use crate::outcome::Outcome;
use crate::publisher::PublishError;
use crate::queue::{Queue, QueueType};
use crate::reply::{self, Status};

/// Everything one handler needs to process deliveries within one connection session.
pub(crate) struct Worker {
    pub queue: Arc<Queue>,
    pub service: Service,
    pub context: Arc<Context>,
    pub acker: Acker,
    pub metrics: HandlerMetrics,
    /// Cancelled when a publish fails for connection reasons: the session must restart.
    pub session_failed: CancellationToken,
}

impl Worker {
    /// Processes one delivery to its verdict.
    pub(crate) async fn process(&self, delivery: Delivery) {
        let tag = delivery.delivery_tag;
        let msg = Message::new(
            delivery.data,
            delivery.properties,
            delivery.redelivered,
            self.context.clone(),
        );
        let span = tracing::info_span!(
            "message",
            handler = %msg.handler(),
            queue = %msg.queue(),
            message_id = msg.message_id().unwrap_or(""),
            correlation_id = msg.correlation_id().unwrap_or(""),
            attempt = msg.attempt(),
        );
        let verdict = self.decide(msg).instrument(span).await;
        self.acker.settle(tag, verdict);
    }

    async fn decide(&self, msg: Message) -> Settle {
        self.observe_age(&msg);
        if let Some(verdict) = self.guard(&msg).await {
            return verdict;
        }
        let (msg, outcome) = self.run(msg).await;
        match outcome {
            Outcome::Done(body) => {
                if let Some(reply_to) = msg.reply_to() {
                    let sent = reply::send(
                        msg.publisher(),
                        reply_to,
                        msg.correlation_id(),
                        Status::Ok,
                        body,
                    )
                    .await;
                    if let Err(e) = sent {
                        return self.publish_failed(e);
                    }
                    self.metrics.reply_ok.inc();
                }
                self.metrics.ok.inc();
                Settle::Ack
            }
            Outcome::Failed(error) => self.fail(&msg, error).await,
        }
    }

    /// Checks that run before the handler: oversized bodies and crash loops.
    async fn guard(&self, msg: &Message) -> Option<Settle> {
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
                        Ok(()) => Settle::Ack,
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
                    redeliveries + 1
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

    /// One handler run: timed, time-limited, with panics caught as transient failures.
    async fn run_once(&self, msg: Message) -> Outcome {
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
    async fn fail(&self, msg: &Message, error: HandlerError) -> Settle {
        let attempt = msg.attempt();
        if error.is_transient() {
            if let Some(delay) = self.queue.retry.delay_after(attempt) {
                tracing::warn!(%error, ?delay, "attempt failed; retry scheduled");
                return match dead_letter::schedule_retry(msg, &error, &self.queue.retry, delay)
                    .await
                {
                    Ok(()) => {
                        self.metrics.retry(attempt);
                        Settle::Ack
                    }
                    Err(e) => self.publish_failed(e),
                };
            }
        }
        self.dead_letter(msg, error, attempt).await
    }

    /// Dead-letters with the reason; the caller (if any) gets an `error` reply.
    async fn dead_letter(&self, msg: &Message, error: HandlerError, attempts: u32) -> Settle {
        tracing::warn!(%error, attempts, "dead-lettering message");
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
        Settle::Ack
    }

    fn publish_failed(&self, error: PublishError) -> Settle {
        tracing::warn!(%error, "publish failed; message goes back to the queue");
        if matches!(error, PublishError::Connection(_)) {
            self.session_failed.cancel();
        }
        Settle::Requeue
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
