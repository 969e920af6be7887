//! Ordered-delivery helpers shared by the ordering suites: a handler that records every
//! application per key, event streams, and small-window settings that force holding/parking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cottontail::lapin::BasicProperties;
use cottontail::stores::SequenceStore;
use cottontail::{App, GapPolicy, HandlerError, Ordering, Queue, Running, Sequence, State};

use super::*;

/// Every application of (key, seq), in the order they happened.
#[derive(Clone, Default)]
pub struct Applied(pub Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl Applied {
    /// Distinct (key, seq) pairs applied.
    pub fn distinct(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|v| {
                let mut v = v.clone();
                v.dedup();
                v.len()
            })
            .sum()
    }

    /// What `key` saw, in order.
    pub fn of(&self, key: &str) -> Vec<u64> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }

    pub fn push(&self, key: String, n: u64) {
        self.0.lock().unwrap().entry(key).or_default().push(n);
    }

    /// Waits until `key` saw exactly `want` (fails on a deadline).
    pub async fn wait_for(&self, key: &str, want: &[u64], limit: Duration) {
        let (me, key2, want2) = (self.clone(), key.to_owned(), want.to_vec());
        wait_until(limit, &format!("{key} applied {want:?}"), move || {
            let got = me.of(&key2);
            let want = want2.clone();
            async move { got == want }
        })
        .await;
    }
}

/// The recording handler.
pub async fn apply(State(applied): State<Applied>, seq: Sequence) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_micros(200)).await;
    applied.push(seq.key, seq.number);
    Ok(())
}

/// Events 1..=per_key for `keys` keys, every `dup_every`-th duplicated, shuffled.
pub fn events(keys: usize, per_key: u64, dup_every: usize) -> Vec<(Vec<u8>, BasicProperties)> {
    let mut items = Vec::new();
    for k in 0..keys {
        for s in 1..=per_key {
            let props = seq_props(&format!("key-{k}"), s);
            items.push((b"{}".to_vec(), props.clone()));
            if items.len() % dup_every == 0 {
                items.push((b"{}".to_vec(), props));
            }
        }
    }
    fastrand::shuffle(&mut items);
    items
}

/// Asserts each key's first applications are exactly 1..=n in order; re-applications (a
/// message redelivered after its owner died between running and saving) may only repeat the
/// number just applied. Returns the number of re-applications.
pub fn assert_in_order(applied: &Applied, keys: usize, per_key: u64) -> usize {
    let map = applied.0.lock().unwrap();
    assert_eq!(map.len(), keys);
    let mut repeats = 0;
    for (key, seqs) in map.iter() {
        let mut expected = 1;
        for (i, s) in seqs.iter().enumerate() {
            if *s == expected {
                expected += 1;
            } else {
                assert!(
                    i > 0 && *s == seqs[i - 1],
                    "{key}: applied {s} out of order: {seqs:?}"
                );
                repeats += 1;
            }
        }
        assert_eq!(expected, per_key + 1, "{key}: {seqs:?}");
    }
    repeats
}

/// JSON properties with `x-sequence-key` / `x-sequence`.
pub fn seq_props(key: &str, n: u64) -> BasicProperties {
    json_props().with_headers(cottontail::client::sequence_headers(key, n))
}

/// One partition, a window of 10 with at most 5 held, fast parking and rebalancing.
pub fn small_window(
    name: &str,
    store: Arc<dyn SequenceStore>,
    policy: GapPolicy,
    gap_timeout: Duration,
) -> Queue {
    Queue::new(name).expires(EXPIRES).ordered(
        Ordering::shared(store)
            .partitions(1)
            .prefetch(10)
            .hold_limit(5)
            .park_delay(Duration::from_millis(100))
            .gap_timeout(gap_timeout)
            .gap_policy(policy)
            .rebalance_interval(Duration::from_millis(300)),
    )
}

/// Every queue of an ordered handler with `partitions` partitions.
pub fn ordered_queue_names(queue: &Queue, partitions: u16) -> Vec<String> {
    let mut names = handler_queues(queue, &cottontail::RetryPolicy::default());
    for n in 0..partitions {
        names.push(cottontail::names::partition_queue(queue.name(), n));
    }
    names.push(cottontail::names::members_queue(queue.name()));
    names
}

/// Starts an app running [`apply`] on `queue`.
pub async fn instance(queue: &Queue, applied: &Applied, name: &str) -> Running {
    start(
        App::new(applied.clone()).handler(queue.clone(), apply),
        name,
    )
    .await
}

/// A sample of an ordering metric of `queue` (0 when absent).
pub fn ordering_metric(metrics: &cottontail::ops::Metrics, name: &str, queue: &str) -> f64 {
    metric_value(&metrics.render(), name, &[("queue", queue)]).unwrap_or(0.0)
}

/// A one-partition ordered app on a [`small_window`] with a memory sequence store, recording
/// with [`apply`], and a client channel publishing events of key `k`.
pub struct WindowRun {
    pub name: String,
    pub queue: Queue,
    pub applied: Applied,
    pub metrics: cottontail::ops::Metrics,
    pub app: Running,
    pub conn: cottontail::lapin::Connection,
    pub ch: cottontail::lapin::Channel,
}

impl WindowRun {
    pub async fn start(prefix: &str, policy: GapPolicy, gap_timeout: Duration) -> Self {
        let name = unique(prefix);
        let store = Arc::new(cottontail::stores::MemorySequences::new());
        let queue = small_window(&name, store, policy, gap_timeout);
        let applied = Applied::default();
        let app = App::new(applied.clone()).handler(queue.clone(), apply);
        let metrics = app.metrics().clone();
        let app = start(app, &unique(&format!("{prefix}-app"))).await;
        let conn = connect(&unique("client")).await;
        let ch = confirm_channel(&conn).await;
        Self {
            name,
            queue,
            applied,
            metrics,
            app,
            conn,
            ch,
        }
    }

    /// Publishes numbers `ns` of key `k`, in this order, and waits for the confirms.
    pub async fn publish(&self, ns: impl IntoIterator<Item = u64>) {
        let items = ns
            .into_iter()
            .map(|n| (b"{}".to_vec(), seq_props("k", n)))
            .collect();
        publish_many(&self.ch, &self.name, items).await;
    }

    /// Stops the app and deletes the handler's queues.
    pub async fn finish(self) {
        self.app.stop().await.unwrap();
        delete_queues(&ordered_queue_names(&self.queue, 1)).await;
    }
}
