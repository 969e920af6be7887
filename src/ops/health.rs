//! Readiness: connected, every handler's consumer running, and every schedule able to run
//! (leading, or waiting for leadership).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Why a schedule is not running before its first attempt of a session has gone through.
const NOT_QUEUED_UP: &str = "not queued up for leadership yet";

/// Live view of the app's connection, consumers and schedules.
#[derive(Debug)]
pub struct Health {
    connected: AtomicBool,
    consuming: Vec<(String, AtomicBool)>,
    /// Per schedule: `None` while it runs (leads, or waits for leadership: a healthy
    /// standby), else why it cannot.
    schedules: Vec<(String, Mutex<Option<String>>)>,
}

impl Health {
    pub(crate) fn new(
        handlers: impl IntoIterator<Item = String>,
        schedules: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            connected: AtomicBool::new(false),
            consuming: handlers
                .into_iter()
                .map(|h| (h, AtomicBool::new(false)))
                .collect(),
            schedules: schedules
                .into_iter()
                .map(|s| (s, Mutex::new(Some(NOT_QUEUED_UP.to_owned()))))
                .collect(),
        }
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        if !up {
            for (_, flag) in &self.consuming {
                flag.store(false, Ordering::SeqCst);
            }
            for index in 0..self.schedules.len() {
                self.set_schedule(index, Err(NOT_QUEUED_UP.to_owned()));
            }
        }
    }

    pub(crate) fn set_consuming(&self, index: usize, up: bool) {
        if let Some((_, flag)) = self.consuming.get(index) {
            flag.store(up, Ordering::SeqCst);
        }
    }

    /// `Ok` while schedule `index` runs, `Err(reason)` while it cannot.
    pub(crate) fn set_schedule(&self, index: usize, state: Result<(), String>) {
        if let Some((_, slot)) = self.schedules.get(index) {
            if let Ok(mut slot) = slot.lock() {
                *slot = state.err();
            }
        }
    }

    /// Connected, every handler consuming and every schedule running.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.iter().all(|(_, f)| f.load(Ordering::SeqCst))
            && self
                .schedules()
                .iter()
                .all(|(_, failure)| failure.is_none())
    }

    /// Connected to a broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Each handler's name and whether its consumer runs.
    pub fn handlers(&self) -> Vec<(String, bool)> {
        self.consuming
            .iter()
            .map(|(h, f)| (h.clone(), f.load(Ordering::SeqCst)))
            .collect()
    }

    /// Each schedule's name and, while it cannot run, why.
    pub fn schedules(&self) -> Vec<(String, Option<String>)> {
        self.schedules
            .iter()
            .map(|(s, slot)| {
                let failure = slot
                    .lock()
                    .map(|f| f.clone())
                    .unwrap_or_else(|e| e.into_inner().clone());
                (s.clone(), failure)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_that_cannot_run_makes_the_app_unready_until_it_runs() {
        let health = Health::new(["h".to_owned()], ["nightly".to_owned()]);
        health.set_connected(true);
        health.set_consuming(0, true);
        assert!(!health.is_ready(), "not queued up yet");
        health.set_schedule(0, Ok(()));
        assert!(health.is_ready());
        health.set_schedule(0, Err("declare failed".into()));
        assert!(!health.is_ready());
        assert_eq!(
            health.schedules(),
            vec![("nightly".to_owned(), Some("declare failed".to_owned()))]
        );
        health.set_schedule(0, Ok(()));
        assert!(health.is_ready());
        health.set_connected(false);
        health.set_connected(true);
        health.set_consuming(0, true);
        assert!(!health.is_ready(), "a new session queues up again");
    }
}
