//! The in-process end of a [`Publisher`](super::Publisher): publishes are kept, in order, for
//! [`testing`](crate::testing) to read, instead of going to a broker.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lapin::BasicProperties;
use serde::de::DeserializeOwned;

use super::PublishError;
use crate::headers;
use crate::names::{dlq, DEAD_LETTER_EXCHANGE};

/// One message published while a handler ran in [`testing`](crate::testing): where it went
/// and what it carried.
#[derive(Clone, Debug)]
pub struct Published {
    /// The exchange (`""` is the default exchange, which routes by queue name).
    pub exchange: String,
    /// The routing key (the queue name, through the default exchange).
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// The properties, headers included.
    pub properties: BasicProperties,
    /// Whether an unroutable publish is an error (it is for copies and [`Outbox`](crate::Outbox)
    /// messages, not for replies).
    pub mandatory: bool,
}

impl Published {
    /// The body, deserialized from JSON.
    ///
    /// # Panics
    ///
    /// When the body is not valid JSON for `T` (this is for tests: the panic says why).
    #[track_caller]
    pub fn json<T: DeserializeOwned>(&self) -> T {
        from_json(&self.body)
    }

    /// A header as text (numbers rendered), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        headers::get_string(self.properties.headers().as_ref(), name)
    }

    /// A header as a non-negative integer, if present.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        headers::get_u64(self.properties.headers().as_ref(), name)
    }

    /// The queue this publish lands in, when the name alone says: the default exchange
    /// routes by queue name, `cottontail.dlx` to `<key>.dlq`.
    pub(crate) fn queue(&self) -> Option<String> {
        match self.exchange.as_str() {
            "" => Some(self.routing_key.clone()),
            DEAD_LETTER_EXCHANGE => Some(dlq(&self.routing_key)),
            _ => None,
        }
    }
}

#[track_caller]
pub(crate) fn from_json<T: DeserializeOwned>(body: &[u8]) -> T {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "body is not valid JSON for {}: {e}; body: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(body)
        )
    })
}

/// Publishes of one in-process run, in order. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub(crate) struct Recorder(Arc<Mutex<Recording>>);

/// What a [`Recorder`] holds.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    /// Every publish, with whether the handler (not the pipeline around it) made it.
    pub published: Vec<(bool, Published)>,
    /// How many times the handler was called.
    pub runs: u32,
    /// Set while the handler runs.
    in_handler: bool,
    /// Queues that do not exist: a mandatory publish to one fails as unroutable.
    missing: Vec<String>,
}

impl Recorder {
    /// A recorder for which the queues in `missing` do not exist.
    pub(crate) fn new(missing: Vec<String>) -> Self {
        Self(Arc::new(Mutex::new(Recording {
            missing,
            ..Recording::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        // A panicking handler cannot leave the recording half-written: keep reading it.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a publish as the broker would take it: to a missing queue, a mandatory publish
    /// fails and any other is dropped.
    pub(crate) fn record(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let published = Published {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body: body.to_vec(),
            properties,
            mandatory,
        };
        let mut recording = self.lock();
        if let Some(queue) = published.queue() {
            if recording.missing.contains(&queue) {
                return match mandatory {
                    true => Err(PublishError::Unroutable {
                        exchange: published.exchange,
                        routing_key: published.routing_key,
                    }),
                    false => Ok(()),
                };
            }
        }
        let by_handler = recording.in_handler;
        recording.published.push((by_handler, published));
        Ok(())
    }

    /// Marks the handler as running until the guard drops (also when a timeout cancels it or
    /// it panics), and counts the call.
    pub(crate) fn enter_handler(&self) -> HandlerRunning {
        let mut recording = self.lock();
        recording.in_handler = true;
        recording.runs += 1;
        HandlerRunning(self.clone())
    }

    /// Everything recorded so far.
    pub(crate) fn take(&self) -> Recording {
        let mut recording = self.lock();
        Recording {
            published: std::mem::take(&mut recording.published),
            runs: recording.runs,
            in_handler: false,
            missing: Vec::new(),
        }
    }
}

/// Holds the "handler running" mark of a [`Recorder`].
pub(crate) struct HandlerRunning(Recorder);

impl Drop for HandlerRunning {
    fn drop(&mut self) {
        self.0.lock().in_handler = false;
    }
}
