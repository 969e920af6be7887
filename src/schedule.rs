//! Schedule-driven triggers with exactly one firing instance, using only the broker.
//!
//! Every instance runs the scheduler, but only the one holding the leadership token of the
//! single-active-consumer queue `cottontail.leader.<schedule>` fires; when its connection
//! dies, the broker hands the token (and so leadership) to the next instance at once. A tick publishes a trigger message to the
//! job's queue, so the job runs as an ordinary handler (retries, DLQ, metrics, dedup); the
//! trigger's `message_id` is `<schedule>@<tick epoch ms>`, so a dedup store on the job handler
//! makes a tick fire at most once even across a leader change.
//!
//! The last fired tick is kept in the broker too (`cottontail.schedule.<schedule>.state`, a
//! one-message queue), so a new leader neither repeats the previous leader's last tick nor,
//! with [`Missed::FireOnce`], forgets one missed while no instance ran.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::extract::FromMessage;
use crate::publisher::Publisher;
use crate::{Error, HandlerError, Message};

/// What happens to ticks that passed while no instance was leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Missed {
    /// Forget them; fire from the next tick on (the default: safe for jobs that must not
    /// pile up).
    #[default]
    Skip,
    /// Fire the most recent missed tick once, right after taking over, then continue.
    FireOnce,
}

/// A cron schedule (croner syntax, seconds optional) in an explicit time zone.
///
/// ```
/// use cottontail::Schedule;
/// let nightly = Schedule::new("nightly-report", "0 30 2 * * *").unwrap().timezone("Europe/Oslo").unwrap();
/// assert_eq!(nightly.name(), "nightly-report");
/// assert!(Schedule::new("bad", "not a cron").is_err());
/// ```
#[derive(Clone)]
pub struct Schedule {
    name: String,
    pattern: String,
    cron: Cron,
    tz: chrono_tz::Tz,
    missed: Missed,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("pattern", &self.pattern)
            .field("tz", &self.tz)
            .field("missed", &self.missed)
            .finish()
    }
}

impl Schedule {
    /// A schedule named `name` (unique per broker: it names the leader queue) firing on
    /// `pattern`, in UTC until [`Schedule::timezone`] says otherwise.
    pub fn new(name: impl Into<String>, pattern: &str) -> Result<Self, Error> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| Error::Config(format!("cron pattern '{pattern}': {e}")))?;
        Ok(Self {
            name: name.into(),
            pattern: pattern.to_owned(),
            cron,
            tz: chrono_tz::UTC,
            missed: Missed::Skip,
        })
    }

    /// Evaluates the pattern in an IANA time zone (`"Europe/Oslo"`), DST included.
    pub fn timezone(mut self, name: &str) -> Result<Self, Error> {
        self.tz = name
            .parse()
            .map_err(|_| Error::Config(format!("unknown time zone '{name}'")))?;
        Ok(self)
    }

    /// The missed-tick policy.
    pub fn missed(mut self, policy: Missed) -> Self {
        self.missed = policy;
        self
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = self.tz.from_utc_datetime(&t.naive_utc());
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest tick at or before `t`.
    pub fn latest_at(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = self.tz.from_utc_datetime(&t.naive_utc());
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    fn leader_queue(&self) -> String {
        format!("cottontail.leader.{}", self.name)
    }

    fn state_queue(&self) -> String {
        format!("cottontail.schedule.{}.state", self.name)
    }
}

/// The trigger message a schedule publishes; also an extractor for job handlers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Tick {
    /// The schedule's name.
    pub schedule: String,
    /// The scheduled time (RFC 3339, UTC).
    pub tick: String,
    /// The scheduled time in milliseconds since the epoch.
    pub tick_ms: i64,
}

impl<S> FromMessage<S> for Tick {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        serde_json::from_slice(msg.body())
            .map_err(|e| HandlerError::invalid_input(format!("not a schedule tick: {e}")))
    }
}

#[derive(Deserialize, Serialize)]
struct State {
    last_tick_ms: i64,
}

/// Runs one schedule for the life of a connection: queue up for leadership, then fire.
///
/// Leadership is a *token* in the single-active-consumer queue `cottontail.leader.<name>`:
/// the broker delivers to one consumer only; that consumer holds the token unacked for as long
/// as it lives, and when its connection dies the broker requeues the token to the next
/// consumer. Every instance adds a token when it sees none ready (`x-max-length` 1 with
/// `reject-publish` keeps it to one spare), so the first instance bootstraps leadership.
pub(crate) async fn run(
    schedule: Arc<Schedule>,
    target: String,
    connection: Arc<Connection>,
    publisher: Publisher,
    metrics: crate::metrics::ScheduleMetrics,
    stop: CancellationToken,
) {
    let result = async {
        let mut consumer = queue_up(&schedule, &connection, &publisher).await?;
        let token = tokio::select! {
            token = consumer.next() => token,
            _ = stop.cancelled() => return Ok(()),
        };
        match token {
            Some(Ok(_held)) => {
                tracing::info!(schedule = %schedule.name, "became schedule leader");
                metrics.leader.set(1);
                let result =
                    lead(&schedule, &target, &connection, &publisher, &metrics, &stop).await;
                metrics.leader.set(0);
                // `_held` stays unacked until here: the connection's end hands it over.
                result
            }
            Some(Err(e)) => Err(Error::broker(e)),
            None => Err(Error::Broker("leader queue consumer cancelled".into())),
        }
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(schedule = %schedule.name, %error, "scheduler stopped");
    }
}

/// Declares the leader queue, adds a token if none is ready, and consumes it.
async fn queue_up(
    schedule: &Schedule,
    connection: &Connection,
    publisher: &Publisher,
) -> Result<lapin::Consumer, Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    channel
        .basic_qos(1, BasicQosOptions { global: false })
        .await
        .map_err(Error::broker)?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let leader_queue = schedule.leader_queue();
    let declared = channel
        .queue_declare(
            leader_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(Error::broker)?;
    if declared.message_count() == 0 {
        // Refused when a spare token is already there: that is fine.
        let _ = publisher
            .publish_json(&leader_queue, b"{}", BasicProperties::default())
            .await;
    }
    channel
        .basic_consume(
            leader_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)
}

async fn lead(
    schedule: &Schedule,
    target: &str,
    connection: &Connection,
    publisher: &Publisher,
    metrics: &crate::metrics::ScheduleMetrics,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    let state_queue = schedule.state_queue();
    channel
        .queue_declare(
            state_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(Error::broker)?;
    let mut last = match channel
        .basic_get(
            state_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(Error::broker)?
    {
        Some(got) => {
            let state: Option<State> = serde_json::from_slice(&got.delivery.data).ok();
            let _ = got
                .delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            state.and_then(|s| Utc.timestamp_millis_opt(s.last_tick_ms).single())
        }
        None => None,
    };
    let now = Utc::now();
    if let (Missed::FireOnce, Some(previous)) = (schedule.missed, last) {
        if let Some(missed) = schedule.latest_at(now).filter(|t| *t > previous) {
            tracing::info!(schedule = %schedule.name, tick = %missed, "firing a missed tick");
            fire(schedule, target, publisher, &state_queue, missed, metrics).await?;
            last = Some(missed);
        }
    }
    loop {
        let from = match last {
            Some(l) if l > Utc::now() => l,
            _ => Utc::now(),
        };
        let Some(next) = schedule.next_after(from) else {
            tracing::warn!(schedule = %schedule.name, "no further ticks");
            stop.cancelled().await;
            return Ok(());
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        if !connection.status().connected() {
            return Err(Error::Broker("connection lost".into()));
        }
        fire(schedule, target, publisher, &state_queue, next, metrics).await?;
        last = Some(next);
    }
}

async fn fire(
    schedule: &Schedule,
    target: &str,
    publisher: &Publisher,
    state_queue: &str,
    tick: DateTime<Utc>,
    metrics: &crate::metrics::ScheduleMetrics,
) -> Result<(), Error> {
    let tick_ms = tick.timestamp_millis();
    let body = serde_json::to_vec(&Tick {
        schedule: schedule.name.clone(),
        tick: tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        tick_ms,
    })
    .map_err(|e| Error::Config(e.to_string()))?;
    let properties = BasicProperties::default()
        .with_message_id(format!("{}@{tick_ms}", schedule.name).into())
        .with_timestamp(u64::try_from(tick.timestamp()).unwrap_or(0));
    publisher.publish_json(target, &body, properties).await?;
    let state = serde_json::to_vec(&State {
        last_tick_ms: tick_ms,
    })
    .map_err(|e| Error::Config(e.to_string()))?;
    publisher
        .publish_json(state_queue, &state, BasicProperties::default())
        .await?;
    metrics.fires.inc();
    tracing::info!(schedule = %schedule.name, %tick, "schedule fired");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_optional_and_time_zones_apply() {
        let every_second = Schedule::new("s", "* * * * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            every_second.next_after(t),
            Some(t + chrono::Duration::seconds(1))
        );
        let minutely = Schedule::new("m", "* * * * *").unwrap();
        assert_eq!(
            minutely.next_after(t),
            Some(t + chrono::Duration::minutes(1))
        );
        // 02:30 in Oslo in January is 01:30 UTC.
        let oslo = Schedule::new("o", "0 30 2 * * *")
            .unwrap()
            .timezone("Europe/Oslo")
            .unwrap();
        assert_eq!(
            oslo.next_after(t),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 1, 30, 0).unwrap())
        );
        assert_eq!(
            oslo.latest_at(t),
            Some(Utc.with_ymd_and_hms(2025, 12, 31, 1, 30, 0).unwrap())
        );
        assert!(Schedule::new("x", "0 0 0 * * *")
            .unwrap()
            .timezone("Mars/Olympus")
            .is_err());
    }
}
