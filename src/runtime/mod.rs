//! The machinery that runs handlers against the broker (crate-private): supervisor and
//! session, consume loops, the message pipeline, broker-side copies, acks, topology, the
//! scheduler and ordered partitions.

pub(crate) mod acker;
pub(crate) mod consume;
pub(crate) mod copies;
pub(crate) mod job_writer;
pub(crate) mod ordered;
pub(crate) mod pipeline;
pub(crate) mod scheduler;
pub(crate) mod session;
pub(crate) mod supervisor;
pub(crate) mod topology;

use tokio_util::sync::CancellationToken;

/// One connection session's lifecycle, as seen by the tasks it runs.
#[derive(Clone, Default)]
pub(crate) struct Lifecycle {
    /// Graceful stop: take no new work, finish what runs.
    pub stop: CancellationToken,
    /// The connection is gone (or going): drop everything, the broker requeues.
    pub failed: CancellationToken,
    /// The shutdown deadline passed: cut what still runs.
    pub abort: CancellationToken,
}
