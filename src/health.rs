//! Readiness: connected, and every handler's consumer running.

use std::sync::atomic::{AtomicBool, Ordering};

/// Live view of the app's connection and consumers.
#[derive(Debug)]
pub struct Health {
    connected: AtomicBool,
    consuming: Vec<(String, AtomicBool)>,
}

impl Health {
    pub(crate) fn new(handlers: impl IntoIterator<Item = String>) -> Self {
        Self {
            connected: AtomicBool::new(false),
            consuming: handlers
                .into_iter()
                .map(|h| (h, AtomicBool::new(false)))
                .collect(),
        }
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        if !up {
            for (_, flag) in &self.consuming {
                flag.store(false, Ordering::SeqCst);
            }
        }
    }

    pub(crate) fn set_consuming(&self, index: usize, up: bool) {
        if let Some((_, flag)) = self.consuming.get(index) {
            flag.store(up, Ordering::SeqCst);
        }
    }

    /// Connected and every handler consuming.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.iter().all(|(_, f)| f.load(Ordering::SeqCst))
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
}
