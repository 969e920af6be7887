//! Schedule-driven triggers with exactly one firing instance, using only the broker.
//!
//! Every instance runs the scheduler, but only the one holding the leadership token of the
//! single-active-consumer queue `cottontail.leader.<schedule>` fires; when its connection
//! dies, the broker hands the token (and so leadership) to the next instance at once. A tick
//! publishes a trigger message to the job's queue, so the job runs as an ordinary handler
//! (retries, DLQ, metrics, dedup); the trigger's `message_id` is `<schedule>@<tick epoch ms>`,
//! so a dedup store on the job handler makes a tick fire at most once even across a leader
//! change.
//!
//! The last fired tick is kept in the broker too (`cottontail.schedule.<schedule>.state`, a
//! one-message queue), so a new leader neither repeats the previous leader's last tick nor,
//! with [`Missed::FireOnce`], forgets one missed while no instance ran.
//!
//! Both queues are quorum queues, and each requeue of a quorum queue message counts toward
//! its delivery limit: RabbitMQ 4.0–4.2 drop a message requeued 20 times unless the queue
//! says otherwise (3.x counts too, with a `delivery-limit` policy; 4.3 counts a consumer that
//! ends, not a `basic.nack`). A token requeued at every leader change, or a state requeued
//! at every read, would be gone after so many. So neither is requeued by design: a leader
//! that receives a token delivered before swaps it for a fresh one (published, confirmed,
//! then the old one acked), swaps it anyway every 10 s (so the broker's consumer timeout
//! never takes it away), and reads the state by taking it and putting a fresh copy back.
//! The queues' arguments stay as they were (changing them would make existing queues refuse
//! the declaration).

mod state;
mod token;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use self::state::{last_fired, State};
use self::token::token_lost;
use crate::client::Publisher;
use crate::connection::{bounded, CLEANUP};
use crate::ops::health::Health;
use crate::schedule::{Missed, Schedule, Tick};
use crate::Error;

/// Where a schedule reports whether it can run (readiness, `/health/ready`).
pub(crate) struct Status {
    pub health: Arc<Health>,
    pub index: usize,
}

impl Status {
    fn running(&self) {
        self.health.set_schedule(self.index, Ok(()));
    }

    fn failing(&self, error: &Error) {
        self.health.set_schedule(self.index, Err(error.to_string()));
    }
}

/// How far an attempt got, or where it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The leader queue is declared and consumed.
    QueuedUp,
    /// Queued up for a while without the token: another instance leads.
    Standby,
    /// Holds the token and has read the schedule's state.
    Leading,
    /// Fired a tick.
    Fired,
}

/// When a schedule that failed counts as running again: once an attempt gets past the step
/// that failed, so a fault that recurs at each attempt (a fire refused every time) keeps it
/// unready instead of flapping to ready while the next attempt queues up. Waiting as a
/// standby while another instance leads is healthy whatever failed before.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    failed_at: Option<Step>,
}

impl Recovery {
    fn fail(&mut self, at: Step) {
        self.failed_at = Some(at);
    }

    /// Whether reaching `step` shows the schedule runs (the failure is then forgotten).
    fn reached(&mut self, step: Step) -> bool {
        let runs = match self.failed_at {
            None | Some(Step::QueuedUp | Step::Standby) => true,
            Some(Step::Leading) => step != Step::QueuedUp,
            Some(Step::Fired) => matches!(step, Step::Standby | Step::Fired),
        };
        if runs {
            self.failed_at = None;
        }
        runs
    }
}

/// How long a queued-up instance waits for the token before it counts as a standby.
pub(super) const STANDBY_AFTER: Duration = Duration::from_secs(2);

/// Delays between attempts of a schedule that cannot run: 200 ms growing to 10 s, without
/// end (a schedule must not give up while the app runs; readiness says it is stuck).
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long a leader that let a spent token go waits for the next one (it is the active
/// consumer, so the token comes within milliseconds unless none is left; then the attempt
/// ends, and queuing up again adds one).
pub(super) const TOKEN_BACK: Duration = Duration::from_secs(10);

/// How often a leader renews its token (see [`Scheduler::renewed`]): far below any consumer
/// timeout a broker would use, and only one publish and one ack.
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(10);

/// A wait that does not end (a schedule without further ticks).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// An attempt that ran this long was a success that ended, not a fault that repeats: the
/// next one starts from the shortest delay again.
const STEADY: Duration = Duration::from_secs(60);

/// One schedule for the life of a connection.
pub(crate) struct Scheduler {
    pub schedule: Arc<Schedule>,
    pub target: String,
    pub connection: Arc<Connection>,
    pub publisher: Publisher,
    pub metrics: crate::ops::metrics::ScheduleMetrics,
    pub status: Status,
}

impl Scheduler {
    /// Queues up for leadership, then fires; after any failure (a declare refused, an
    /// unroutable publish, a lost consumer) tries again with backoff until `stop`.
    ///
    /// Leadership is a *token* in the single-active-consumer queue `cottontail.leader.<name>`:
    /// the broker delivers to one consumer only, and one token at a time (prefetch 1); that
    /// consumer holds the token unacked for as long as it leads, and when its channel or
    /// connection ends the broker requeues the token to the next consumer. Every instance
    /// adds a token when it sees none ready, so the first instance bootstraps leadership;
    /// more than one token is harmless (the spares wait in the queue while the leader holds
    /// one), and `x-max-length` 1 with `reject-publish` (which counts ready messages only)
    /// keeps the spares few. A leader gives up leadership as soon as its token's consumer
    /// ends, and renews the token as described in the module docs.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut delays = retry_delays();
        let mut recovery = Recovery::default();
        loop {
            let started = tokio::time::Instant::now();
            let Err((step, error)) = self.attempt(&mut recovery, &stop).await else {
                return;
            };
            if stop.is_cancelled() {
                return;
            }
            recovery.fail(step);
            self.status.failing(&error);
            if started.elapsed() >= STEADY {
                delays = retry_delays();
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tracing::warn!(schedule = %self.schedule.name(), %error, ?delay, "schedule cannot run; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One turn: queue up, wait for the token, lead. `Ok` only when stopped.
    async fn attempt(
        &self,
        recovery: &mut Recovery,
        stop: &CancellationToken,
    ) -> Result<(), (Step, Error)> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| (Step::QueuedUp, Error::broker(e)))?;
        let result = async {
            let mut consumer = self
                .queue_up(&channel)
                .await
                .map_err(|e| (Step::QueuedUp, e))?;
            self.reach(recovery, Step::QueuedUp);
            let Some(token) = self.await_token(&mut consumer, recovery, stop).await? else {
                return Ok(());
            };
            let Some(token) = self
                .fresh_token(&channel, &mut consumer, token, stop)
                .await
                .map_err(|e| (Step::Leading, e))?
            else {
                return Ok(());
            };
            tracing::info!(schedule = %self.schedule.name(), "became schedule leader");
            self.metrics.leader.set(1);
            // The token stays unacked until the channel closes below, which hands it over.
            let result = self
                .lead(recovery, stop, &channel, &mut consumer, token)
                .await;
            self.metrics.leader.set(0);
            result
        }
        .await;
        // Closing the channel returns the token (if this instance held it) to the next in
        // line, this instance included once it queues up again.
        let _ = bounded(CLEANUP, channel.close(200, "schedule attempt over".into())).await;
        result
    }

    /// Marks the schedule running if reaching `step` shows it runs again.
    pub(super) fn reach(&self, recovery: &mut Recovery, step: Step) {
        if recovery.reached(step) {
            self.status.running();
        }
    }

    /// Fires the ticks for as long as this instance holds `token`: it renews the token every
    /// [`RENEW_EVERY`] and stops leading as soon as the token's consumer ends.
    pub(super) async fn lead(
        &self,
        recovery: &mut Recovery,
        stop: &CancellationToken,
        token_channel: &Channel,
        consumer: &mut lapin::Consumer,
        mut token: Delivery,
    ) -> Result<(), (Step, Error)> {
        let leading = |e| (Step::Leading, e);
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| leading(Error::broker(e)))?;
        let state_queue = self.schedule.state_queue();
        let last = last_fired(&channel, &state_queue, &self.publisher).await;
        let _ = bounded(CLEANUP, channel.close(200, "state read".into())).await;
        let mut last = last.map_err(leading)?;
        self.reach(recovery, Step::Leading);
        let schedule = &self.schedule;
        let now = Utc::now();
        if let (Missed::FireOnce, Some(previous)) = (schedule.missed, last) {
            if let Some(missed) = schedule.latest_at(now).filter(|t| *t > previous) {
                tracing::info!(schedule = %schedule.name(), tick = %missed, "firing a missed tick");
                self.fire(recovery, &state_queue, missed).await?;
                last = Some(missed);
            }
        }
        let mut renew_at = tokio::time::Instant::now() + RENEW_EVERY;
        let mut warned = false;
        loop {
            let from = match last {
                Some(l) if l > Utc::now() => l,
                _ => Utc::now(),
            };
            let next = schedule.next_after(from);
            if next.is_none() && !warned {
                tracing::warn!(schedule = %schedule.name(), "no further ticks");
                warned = true;
            }
            // No further tick: keep the token (renewed) so no other instance looks for one.
            let wait = next.map_or(NEVER, |n| (n - Utc::now()).to_std().unwrap_or_default());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::time::sleep_until(renew_at) => {
                    let renewed = self.renewed(token_channel, consumer, token, stop);
                    let Some(fresh) = renewed.await.map_err(leading)? else {
                        return Ok(());
                    };
                    token = fresh;
                    renew_at = tokio::time::Instant::now() + RENEW_EVERY;
                    continue;
                }
                event = consumer.next() => return Err(leading(token_lost(event))),
                _ = stop.cancelled() => return Ok(()),
            }
            if !self.connection.status().connected() || !token_channel.status().connected() {
                return Err(leading(Error::Broker(
                    "connection lost, and with it the leadership token".into(),
                )));
            }
            let Some(next) = next else { continue };
            self.fire(recovery, &state_queue, next).await?;
            last = Some(next);
        }
    }

    /// Fires `tick` and records it as the last fired.
    pub(super) async fn fire(
        &self,
        recovery: &mut Recovery,
        state_queue: &str,
        tick: DateTime<Utc>,
    ) -> Result<(), (Step, Error)> {
        self.publish_tick(state_queue, tick)
            .await
            .map_err(|e| (Step::Fired, e))?;
        self.reach(recovery, Step::Fired);
        Ok(())
    }

    pub(super) async fn publish_tick(
        &self,
        state_queue: &str,
        tick: DateTime<Utc>,
    ) -> Result<(), Error> {
        let (schedule, publisher) = (&self.schedule, &self.publisher);
        let tick_ms = tick.timestamp_millis();
        let body = serde_json::to_vec(&Tick {
            schedule: schedule.name().to_owned(),
            tick: tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            tick_ms,
        })
        .map_err(|e| Error::Encode(e.to_string()))?;
        let properties = BasicProperties::default()
            .with_message_id(format!("{}@{tick_ms}", schedule.name()).into())
            .with_timestamp(u64::try_from(tick.timestamp()).unwrap_or(0));
        publisher
            .publish_json(&self.target, &body, properties)
            .await?;
        let state = serde_json::to_vec(&State {
            last_tick_ms: tick_ms,
        })
        .map_err(|e| Error::Encode(e.to_string()))?;
        publisher
            .publish_json(state_queue, &state, BasicProperties::default())
            .await?;
        self.metrics.fires.inc();
        tracing::info!(schedule = %schedule.name(), %tick, "schedule fired");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_forgotten_only_past_the_step_that_failed() {
        let mut fresh = Recovery::default();
        assert!(
            fresh.reached(Step::QueuedUp),
            "no failure: queued up is running"
        );

        let mut declare = Recovery::default();
        declare.fail(Step::QueuedUp);
        assert!(declare.reached(Step::QueuedUp));

        let mut lead = Recovery::default();
        lead.fail(Step::Leading);
        assert!(!lead.reached(Step::QueuedUp));
        assert!(lead.reached(Step::Leading));

        // A fire refused at every attempt: queuing up and leading again prove nothing.
        let mut fire = Recovery::default();
        fire.fail(Step::Fired);
        assert!(!fire.reached(Step::QueuedUp));
        assert!(!fire.reached(Step::Leading));
        assert!(fire.reached(Step::Fired));
        assert!(
            fire.reached(Step::QueuedUp),
            "forgotten once a fire went through"
        );

        // Another instance leads: a standby is healthy whatever failed before.
        for step in [Step::QueuedUp, Step::Leading, Step::Fired] {
            let mut standby = Recovery::default();
            standby.fail(step);
            assert!(standby.reached(Step::Standby), "{step:?}");
        }
    }
}
