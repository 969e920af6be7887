//! Dead-letter and retry copies: the original body and properties, plus the framework's
//! headers. Copies are published with confirms *before* the original is acked.

use std::time::Duration;

use lapin::types::FieldTable;

use crate::client::republish_properties;
use crate::client::PublishError;
use crate::error::HandlerError;
use crate::headers;
use crate::message::Message;
use crate::names::DEAD_LETTER_EXCHANGE;
use crate::ops::trace_context::TRACEPARENT;
use crate::queue::RetryPolicy;

/// Publishes the message to `<queue>.dlq` (through the dead-letter exchange) with `x-error`,
/// `x-error-kind`, `x-attempts` and `x-handler`, and `x-reply-sent` when it has a `reply_to`
/// (its caller gets the `error` reply next; a replay must not answer it again).
pub(crate) async fn dead_letter(
    msg: &Message,
    error: &HandlerError,
    attempts: u32,
) -> Result<(), PublishError> {
    // The frame guard's mark goes: the reason is in `x-error`, and a replay runs normally.
    let mut table = copy_headers(msg, &[headers::LAST_ERROR, headers::INVALID_UTF8]);
    headers::set_string(&mut table, headers::ERROR, error.message());
    headers::set_string(&mut table, headers::ERROR_KIND, error.kind());
    headers::set_int(&mut table, headers::ATTEMPTS, u64::from(attempts));
    headers::set_string(&mut table, headers::HANDLER, msg.handler());
    if msg.reply_to().is_some() {
        headers::set_string(&mut table, headers::REPLY_SENT, "error");
    }
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
            &crate::names::tier_queue(msg.queue(), delay),
            msg.body(),
            properties,
            true,
        )
        .await
}

/// Puts the message aside for `delay` without counting an attempt (its id is busy on
/// another instance, a store is down, or an ordered partition holds too much).
pub(crate) async fn park(
    msg: &Message,
    delay: Duration,
    held_since_ms: Option<u64>,
) -> Result<(), PublishError> {
    let tier = crate::names::tier_queue(msg.queue(), delay);
    park_in(msg, &tier, held_since_ms).await
}

/// Puts a fresh copy of the message in `queue` (delivery counts dropped: it was not run, so
/// the time it spent waiting must not count against its crash-loop budget).
pub(crate) async fn park_in(
    msg: &Message,
    queue: &str,
    held_since_ms: Option<u64>,
) -> Result<(), PublishError> {
    let mut table = copy_headers(msg, &[headers::DELIVERY_COUNT, headers::REDELIVERIES]);
    if let Some(since) = held_since_ms {
        headers::set_int(&mut table, headers::HELD_SINCE, since);
    }
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish("", queue, msg.body(), properties, true)
        .await
}

/// Publishes the next slice of a continued job to its queue: `state` as the body, the same
/// properties, `x-continuation` counted up, and a fresh attempt and delivery count (each
/// slice is a new run).
pub(crate) async fn continuation(msg: &Message, state: Vec<u8>) -> Result<(), PublishError> {
    let slices = headers::get_u64(msg.headers(), headers::CONTINUATION).unwrap_or(0);
    let mut table = copy_headers(
        msg,
        &[
            headers::DELIVERY_COUNT,
            headers::REDELIVERIES,
            headers::ATTEMPTS,
            headers::LAST_ERROR,
        ],
    );
    headers::set_int(&mut table, headers::CONTINUATION, slices.saturating_add(1));
    let properties = republish_properties(msg.properties()).with_headers(table);
    msg.publisher()
        .publish("", msg.queue(), &state, properties, true)
        .await
}

/// Moves the message, intact, to `queue` (an ordered handler's partition, a priority band).
pub(crate) async fn forward(msg: &Message, queue: &str) -> Result<(), PublishError> {
    park_in(msg, queue, None).await
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
