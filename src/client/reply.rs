//! Replies to `reply_to` with the request's `correlation_id` and an `x-status` header.
//!
//! Bodies: `ok` carries the handler's output JSON, `error` carries
//! `{"error": {"kind": "...", "message": "..."}}`, `progress` carries progress JSON.

use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::client::{PublishError, Publisher};
use crate::error::HandlerError;
use crate::headers;
use crate::ops::trace_context::{TraceContext, TRACEPARENT};

/// The value of the `x-status` reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Final success; body is the handler's output.
    Ok,
    /// Final failure; body is the error envelope.
    Error,
    /// Intermediate progress; more replies follow.
    Progress,
}

impl Status {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Progress => "progress",
        }
    }

    /// Parses a header value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "ok" => Some(Status::Ok),
            "error" => Some(Status::Error),
            "progress" => Some(Status::Progress),
            _ => None,
        }
    }
}

/// The error envelope body of an `error` reply.
pub fn error_body(error: &HandlerError) -> Vec<u8> {
    serde_json::json!({"error": {"kind": error.kind(), "message": error.message()}})
        .to_string()
        .into_bytes()
}

/// Publishes one reply and waits for the confirm.
///
/// Not `mandatory`: a caller that went away (its reply queue is gone) must not turn a
/// finished job into a failure.
pub async fn send(
    publisher: &Publisher,
    reply_to: &str,
    correlation_id: Option<&str>,
    status: Status,
    body: Vec<u8>,
    trace: Option<TraceContext>,
) -> Result<(), PublishError> {
    send_as(
        publisher,
        reply_to,
        correlation_id,
        None,
        status,
        body,
        trace,
    )
    .await
}

/// [`send`] with a `message_id` on the reply: a deterministic one lets a caller drop the
/// copies a redelivery can repeat (e.g. a workflow's final reply, `<workflow id>#final`).
pub async fn send_as(
    publisher: &Publisher,
    reply_to: &str,
    correlation_id: Option<&str>,
    message_id: Option<&str>,
    status: Status,
    body: Vec<u8>,
    trace: Option<TraceContext>,
) -> Result<(), PublishError> {
    let mut table = FieldTable::default();
    headers::set_string(&mut table, headers::STATUS, status.as_str());
    if let Some(trace) = trace {
        headers::set_string(&mut table, TRACEPARENT, trace.to_string());
    }
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(table);
    if let Some(id) = correlation_id {
        properties = properties.with_correlation_id(id.into());
    }
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    publisher
        .publish("", reply_to, &body, properties, false)
        .await
}
