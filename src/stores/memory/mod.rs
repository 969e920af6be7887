//! In-process stores: for one instance, tests and development.

mod checkpoints;
mod dedup;
pub(crate) mod jobs;
mod sequences;

pub use checkpoints::MemoryCheckpoints;
pub use dedup::{Clock, MemoryStore, SystemClock};
pub use jobs::{MemoryJobs, DEFAULT_JOB_BYTES};
pub use sequences::{MemorySequences, MemoryStamper};
