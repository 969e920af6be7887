//! Operating a service: HTTP (health, metrics, job status, status page), metrics and trace
//! context.

pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod status;
pub(crate) mod trace_context;

pub use health::Health;
pub use metrics::Metrics;
pub use trace_context::{TraceContext, TRACEPARENT};
