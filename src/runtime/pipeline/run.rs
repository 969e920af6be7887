//! The handler's run: its job status, its timeout and panic catch, and the immediate
//! (in-process) retries of the policy.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use super::Worker;
use crate::error::HandlerError;
use crate::message::Message;
use crate::outcome::Outcome;

impl Worker {
    /// Runs the handler, repeating immediate retries in process.
    pub(super) async fn run(&self, mut msg: Message) -> (Message, Outcome) {
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

    /// Records a job status transition when the message has an id and tracking is on. Hands
    /// it to the app's job writer and returns at once: a slow or down job store never holds
    /// up the ack.
    pub(super) async fn job(
        &self,
        msg: &Message,
        status: &str,
        detail: impl FnOnce(&mut crate::stores::JobStatus),
    ) {
        let entry = |flow: &super::Flow| flow.role.kind == crate::workflow::RoleKind::Entry;
        if status == "running" && self.workflow.as_ref().is_some_and(entry) {
            // A workflow's `running` is the workflow's to write (`workflow.rs`).
            return;
        }
        if let (Some(jobs), Some(id)) = (&self.jobs, msg.message_id()) {
            jobs.record(id, status, msg.attempt(), detail);
        }
    }

    /// One handler run: timed, time-limited, stopped when its job is cancelled, with panics
    /// caught as transient failures.
    async fn run_once(&self, msg: Message) -> Outcome {
        self.job(&msg, "running", |_| {}).await;
        // Registered before the handler starts: a cancel heard from here on stops it.
        let _running = msg
            .message_id()
            .map(|id| msg.control().register(id, msg.cancel_token().clone()));
        let cancel = msg.cancel_token().clone();
        self.metrics.in_flight.inc();
        let timer = self.metrics.duration.start_timer();
        let call = AssertUnwindSafe(self.service.call(msg)).catch_unwind();
        let limited = async {
            match self.queue.timeout {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result,
                    Err(_) => Ok(Outcome::Failed(HandlerError::transient(
                        "timeout",
                        format!("handler ran longer than {limit:?} and was cancelled"),
                    ))),
                },
                None => call.await,
            }
        };
        // A cancelled job's future is dropped at its next await point.
        let result = tokio::select! {
            biased;
            result = limited => result,
            () = cancel.cancelled() => Ok(Outcome::Cancelled),
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
}
