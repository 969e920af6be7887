//! `stop()` closes the consume channels itself before the connection. A channel whose last
//! handle drops while the connection closes makes lapin send its own `channel.close` into the
//! closing connection: lapin logs "invalid channel state: Closing", fails the connection, and
//! now and then the close never resolves (a hung `stop()`). Before the consume loops closed
//! their channels this happened in ~70 % of start/stop cycles.
//!
//! Its own test binary: the subscriber counts every lapin error in the process.
use cottontail_test_support as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::{App, Queue, QueueType, RetryPolicy};
use tracing_subscriber::layer::SubscriberExt;

/// Counts lapin's ERROR events.
#[derive(Clone, Default)]
struct LapinErrors(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LapinErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("lapin") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn noop() {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stop_cycles_close_without_lapin_errors() {
    let errors = LapinErrors::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(errors.clone()))
        .expect("the only subscriber in this test binary");
    for cycle in 0..10 {
        let name = unique("stop-cycle");
        // Light topology (a classic queue and its DLQ, no retry tiers): this is about channels.
        let queue = Queue::new(&name)
            .expires(EXPIRES)
            .queue_type(QueueType::Classic)
            .retry(RetryPolicy::none())
            .prefetch(1);
        let running = start(App::new(()).handler(queue, noop), &unique("stop-cycle")).await;
        bounded(Duration::from_secs(20), running.stop())
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: stop failed: {e}"));
    }
    assert_eq!(
        errors.0.load(Ordering::Relaxed),
        0,
        "lapin reported connection errors while stopping"
    );
}
