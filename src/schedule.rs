//! Schedules: cron triggers fired by exactly one instance of the fleet (how: the scheduler in
//! `runtime`). A tick publishes a trigger message to the job's queue, so the job runs as an
//! ordinary handler (retries, DLQ, metrics, dedup); the trigger's `message_id` is
//! `<schedule>@<tick epoch ms>`, so a dedup store on the job handler makes a tick fire at
//! most once even across a leader change.

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::extract::FromMessage;
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
    pub(crate) name: String,
    pub(crate) pattern: String,
    pub(crate) cron: Cron,
    pub(crate) tz: chrono_tz::Tz,
    pub(crate) missed: Missed,
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

    pub(crate) fn leader_queue(&self) -> String {
        crate::names::schedule_leader_queue(&self.name)
    }

    pub(crate) fn state_queue(&self) -> String {
        crate::names::schedule_state_queue(&self.name)
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
