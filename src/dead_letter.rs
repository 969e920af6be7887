//! Dead-letter and retry copies: the original body and properties, plus the framework's
//! headers. Copies are published with confirms *before* the original is acked.

use std::time::Duration;

use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::error::HandlerError;
use crate::headers;
use crate::message::Message;
use crate::publisher::PublishError;
use crate::retry::{self, RetryPolicy};
use crate::topology::DEAD_LETTER_EXCHANGE;
use crate::trace_context::TRACEPARENT;

/// Publishes the message to `<queue>.dlq` (through the dead-letter exchange) with `x-error`,
/// `x-error-kind`, `x-attempts` and `x-handler`.
pub(crate) async fn dead_letter(
    msg: &Message,
    error: &HandlerError,
    attempts: u32,
) -> Result<(), PublishError> {
    let mut table = copy_headers(msg, &[headers::LAST_ERROR]);
    headers::set_string(&mut table, headers::ERROR, error.message());
    headers::set_string(&mut table, headers::ERROR_KIND, error.kind());
    headers::set_int(&mut table, headers::ATTEMPTS, u64::from(attempts));
    headers::set_string(&mut table, headers::HANDLER, msg.handler());
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish(
            DEAD_LETTER_EXCHANGE,
            msg.queue(),
            msg.body(),
            properties,
            true,
        )
        .await
}

/// Publishes a retry copy to the tier queue for `delay`; it returns to the work queue when
/// its TTL runs out, carrying `x-attempts` = attempts made so far.
pub(crate) async fn schedule_retry(
    msg: &Message,
    error: &HandlerError,
    policy: &RetryPolicy,
    delay: Duration,
) -> Result<(), PublishError> {
    let mut table = copy_headers(msg, &[headers::DELIVERY_COUNT, headers::REDELIVERIES]);
    headers::set_int(&mut table, headers::ATTEMPTS, u64::from(msg.attempt()));
    headers::set_string(&mut table, headers::LAST_ERROR, error.to_string());
    let ttl = policy.jittered(delay).as_millis().max(1);
    let properties = republish_properties(msg.properties())
        .with_headers(table)
        .with_expiration(ttl.to_string().into());
    msg.publisher()
        .publish(
            "",
            &retry::tier_queue(msg.queue(), delay),
            msg.body(),
            properties,
            true,
        )
        .await
}

/// Puts the message aside for `delay` without counting an attempt (its id is busy on
/// another instance).
pub(crate) async fn park(
    msg: &Message,
    delay: Duration,
    held_since_ms: Option<u64>,
) -> Result<(), PublishError> {
    let mut table = copy_headers(msg, &[headers::DELIVERY_COUNT, headers::REDELIVERIES]);
    if let Some(since) = held_since_ms {
        headers::set_int(&mut table, headers::HELD_SINCE, since);
    }
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish(
            "",
            &retry::tier_queue(msg.queue(), delay),
            msg.body(),
            properties,
            true,
        )
        .await
}

/// Moves the message, intact, to `queue` (an ordered handler's partition).
pub(crate) async fn forward(msg: &Message, queue: &str) -> Result<(), PublishError> {
    let table = copy_headers(msg, &[headers::DELIVERY_COUNT, headers::REDELIVERIES]);
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish("", queue, msg.body(), properties, true)
        .await
}

/// Re-enqueues a redelivered message on a classic queue with its redelivery count bumped, so
/// crash loops are counted without `x-delivery-count` (quorum queues only).
pub(crate) async fn requeue_counted(msg: &Message, redeliveries: u64) -> Result<(), PublishError> {
    let mut table = copy_headers(msg, &[]);
    headers::set_int(&mut table, headers::REDELIVERIES, redeliveries);
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish("", msg.queue(), msg.body(), properties, true)
        .await
}

/// The message's headers minus `drop`. A message that came without `traceparent` gets this
/// handling's, so its later attempts (and a replay from the DLQ) join one trace instead of
/// each starting their own.
fn copy_headers(msg: &Message, drop: &[&str]) -> FieldTable {
    let mut table = headers::without(msg.headers(), drop);
    if !table.contains_key(TRACEPARENT) {
        headers::set_string(&mut table, TRACEPARENT, msg.trace().to_string());
    }
    table
}

/// The original properties minus `expiration` (a TTL must not follow a copy around) and
/// `user_id` (the broker rejects a user id that is not the publishing connection's), for
/// republishing a message (retry, dead-letter, replay); persistent. Headers are the caller's.
pub fn republish_properties(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        properties = properties.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        properties = properties.with_cluster_id(v.clone());
    }
    properties
}
