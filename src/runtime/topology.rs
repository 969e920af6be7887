//! Declares a handler's queues: the work queue, its `<queue>.dlq` bound to the dead-letter
//! exchange, and the retry tier queues. Turns the broker's terse PRECONDITION_FAILED into an
//! explanation of which argument differs and how to fix it, and upgrades tier queues that an
//! older version declared without at-least-once dead-lettering.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::queue::{Queue, QueueType};
use crate::Error;

/// Declares everything `queue` needs. Each declaration uses its own channel attempt so a
/// mismatch can be explained precisely.
pub(crate) async fn declare(connection: &Connection, queue: &Queue) -> Result<(), Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    channel
        .exchange_declare(
            crate::names::DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)?;

    let dlq = queue.dlq_name();
    declare_queue(&channel, &dlq, quorum_args(queue.expires), queue).await?;
    let channel = reopen(connection, channel).await?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            crate::names::DEAD_LETTER_EXCHANGE.into(),
            queue.name.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)?;

    declare_queue(&channel, &queue.name, work_args(queue), queue).await?;
    let channel = reopen(connection, channel).await?;

    let mut channel = channel;
    for tier in queue.delay_tiers() {
        let name = crate::names::tier_queue(&queue.name, tier);
        channel = declare_tier(connection, channel, &name, tier_args(queue, tier), queue).await?;
    }
    if let Some(ordering) = &queue.ordering {
        let mut partition = queue.clone();
        partition.ordering = None;
        // One active consumer per partition, enforced by the broker.
        partition.singleton = true;
        for n in 0..ordering.partitions {
            let name = crate::names::partition_queue(&queue.name, n);
            declare_queue(&channel, &name, work_args(&partition), queue).await?;
        }
        let members = crate::names::members_queue(&queue.name);
        declare_queue(&channel, &members, quorum_args(queue.expires), queue).await?;
    }
    if let Some(bands) = &queue.bands {
        let mut band = queue.clone();
        band.bands = None;
        for n in 0..bands.len() {
            let name = crate::names::band_queue(&queue.name, n);
            declare_queue(&channel, &name, work_args(&band), queue).await?;
        }
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Declares a durable quorum queue that handlers publish into.
pub(crate) async fn declare_output(connection: &Connection, name: &str) -> Result<(), Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    let queue = Queue::new(name).handler_name(format!("output {name}"));
    declare_queue(&channel, name, quorum_args(None), &queue).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// A fresh channel if the previous one was closed by an error; otherwise the same one.
async fn reopen(connection: &Connection, channel: Channel) -> Result<Channel, Error> {
    if channel.status().connected() {
        Ok(channel)
    } else {
        connection.create_channel().await.map_err(Error::broker)
    }
}

/// The work queue's arguments, from the handler's settings.
pub(crate) fn work_args(queue: &Queue) -> FieldTable {
    let mut args = FieldTable::default();
    match queue.effective_type() {
        QueueType::Quorum => {
            args.insert("x-queue-type".into(), string("quorum"));
            // Backstop for crash loops: cottontail dead-letters with a reason at
            // `delivery_limit`; the broker's own limit (set explicitly, since RabbitMQ 4
            // defaults to 20) catches anything past that.
            args.insert(
                "x-delivery-limit".into(),
                long(u128::from(queue.delivery_limit) + 1),
            );
        }
        QueueType::Classic => {
            args.insert("x-queue-type".into(), string("classic"));
            if let Some(max) = queue.priority {
                args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(max));
            }
        }
    }
    args.insert(
        "x-dead-letter-exchange".into(),
        string(crate::names::DEAD_LETTER_EXCHANGE),
    );
    args.insert("x-dead-letter-routing-key".into(), string(&queue.name));
    if queue.singleton {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if let Some(expires) = queue.expires {
        args.insert("x-expires".into(), long(expires.as_millis()));
    }
    args
}

/// A retry tier queue's arguments: a TTL that dead-letters each copy back to the work queue.
///
/// At least once: with the default (at-most-once) strategy the broker drops a copy that
/// expires while the work queue cannot take it (leader election, node loss), and its original
/// was acked long ago. `at-least-once` keeps the copy until the work queue confirmed it; it
/// needs a quorum source queue with `reject-publish` overflow (with `drop-head` the broker
/// silently falls back to at-most-once; tier queues have no length limit, so it never rejects).
pub(crate) fn tier_args(queue: &Queue, tier: Duration) -> FieldTable {
    let mut args = quorum_args(queue.expires);
    args.insert("x-message-ttl".into(), long(tier.as_millis()));
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(&queue.name));
    for (key, value) in AT_LEAST_ONCE {
        args.insert(key.into(), string(value));
    }
    args
}

/// The arguments that make a quorum queue dead-letter at least once.
const AT_LEAST_ONCE: [(&str, &str); 2] = [
    ("x-dead-letter-strategy", "at-least-once"),
    ("x-overflow", "reject-publish"),
];

/// Declares a tier queue. One that exists without at-least-once (declared by an older
/// version) is replaced when empty; while it still holds copies it is kept as it is, with a
/// warning, so that an upgrade never stops a service from starting. Each declaration (every
/// start and reconnect) tries again. Returns the channel to go on with.
async fn declare_tier(
    connection: &Connection,
    channel: Channel,
    name: &str,
    args: FieldTable,
    queue: &Queue,
) -> Result<Channel, Error> {
    let error = match try_declare(&channel, name, args.clone()).await {
        Ok(()) => return Ok(channel),
        Err(error) => error,
    };
    let text = error.to_string();
    if !declared_at_most_once(&text) {
        return Err(explained(error, name, queue));
    }
    // The failed declaration closed the channel.
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    let waiting = channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)?
        .message_count();
    if waiting > 0 {
        tracing::warn!(
            queue = name,
            handler = queue.handler(),
            waiting,
            "{}",
            keep_warning(name, waiting)
        );
        return Ok(channel);
    }
    // Quorum queues do not support `if-empty`; a copy published between the count and the
    // delete would go with the queue, so say so if it happened.
    let deleted = channel
        .queue_delete(short(name)?, Default::default())
        .await
        .map_err(Error::broker)?;
    if deleted > 0 {
        tracing::error!(
            queue = name,
            deleted,
            "retry copies arrived in the tier queue while it was being upgraded and were deleted with it"
        );
    }
    declare_queue(&channel, name, args, queue).await?;
    tracing::info!(
        queue = name,
        handler = queue.handler(),
        "upgraded the retry tier queue to at-least-once dead-lettering"
    );
    Ok(channel)
}

/// Whether a PRECONDITION_FAILED names one of the at-least-once arguments: the queue was
/// declared before cottontail set them.
pub(crate) fn declared_at_most_once(broker_text: &str) -> bool {
    mismatched_arg(broker_text).is_some_and(|(arg, _)| AT_LEAST_ONCE.iter().any(|(k, _)| *k == arg))
}

/// What an operator reads when an old tier queue is kept.
pub(crate) fn keep_warning(name: &str, waiting: u32) -> String {
    let pattern = format!("^{}$", name.replace('.', "\\."));
    format!(
        "retry tier queue '{name}' was declared by an older cottontail with at-most-once \
         dead-lettering and still holds {waiting} retry copies; it is kept as it is (a copy that \
         expires while the work queue is unavailable can be lost) and upgraded by the first \
         start or reconnect that finds it empty. To make it at-least-once now, unless another \
         policy applies to it: rabbitmqctl set_policy {name}.upgrade '{pattern}' \
         '{{\"dead-letter-strategy\":\"at-least-once\",\"overflow\":\"reject-publish\"}}' \
         --apply-to queues"
    )
}

fn quorum_args(expires: Option<Duration>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    if let Some(expires) = expires {
        args.insert("x-expires".into(), long(expires.as_millis()));
    }
    args
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    queue: &Queue,
) -> Result<(), Error> {
    try_declare(channel, name, args)
        .await
        .map_err(|error| explained(error, name, queue))
}

/// Declares a durable queue, returning the broker's error as it is.
async fn try_declare(channel: &Channel, name: &str, args: FieldTable) -> Result<(), Error> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match channel.queue_declare(short(name)?, options, args).await {
        Ok(_) => Ok(()),
        Err(error) => Err(Error::broker(error)),
    }
}

fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::Config(format!("queue name too long: {name}")))
}

/// A declaration error, explained when it is an argument mismatch.
fn explained(error: Error, name: &str, queue: &Queue) -> Error {
    match explain_mismatch(&error.to_string(), name, queue) {
        Some(explained) => Error::QueueMismatch(explained),
        None => error,
    }
}

/// The argument a PRECONDITION_FAILED "inequivalent arg" reply names, and the rest of it.
fn mismatched_arg(broker_text: &str) -> Option<(&str, &str)> {
    let rest = broker_text.split("inequivalent arg '").nth(1)?;
    rest.split_once('\'')
}

/// Explains a PRECONDITION_FAILED "inequivalent arg" reply, or `None` for other errors.
pub(crate) fn explain_mismatch(broker_text: &str, name: &str, queue: &Queue) -> Option<String> {
    let (arg, rest) = mismatched_arg(broker_text)?;
    let wanted = rest
        .split("received ")
        .nth(1)
        .and_then(|r| r.split(" but current is ").next())
        .map(clean_value)
        .unwrap_or_else(|| "?".into());
    let current = rest
        .split(" but current is ")
        .nth(1)
        .map(clean_value)
        .unwrap_or_else(|| "?".into());
    let setting = match arg {
        "x-queue-type" | "x-max-priority" => {
            "the queue type / priority levels (.priority(..), .queue_type(..))"
        }
        "x-delivery-limit" => "the crash-loop limit (.delivery_limit(..))",
        "x-expires" => "the queue expiry (.expires(..))",
        "x-single-active-consumer" => "the singleton flag (.singleton())",
        "x-message-ttl" => "the retry policy's delays (.retry(..))",
        "x-dead-letter-strategy" | "x-overflow" => {
            "nothing in the handler: cottontail declares retry tier queues with at-least-once \
             dead-lettering and upgrades older ones by itself"
        }
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
            "the dead-letter routing (the queue was probably created outside cottontail)"
        }
        _ => "the handler's queue settings",
    };
    Some(format!(
        "queue '{name}' (handler '{handler}') already exists on the broker with {arg} = {current}, \
         but cottontail declares {arg} = {wanted}. RabbitMQ cannot change a queue's arguments in \
         place. Fix: change {setting} to match the existing queue, or drain and delete the queue \
         (`rabbitmqctl delete_queue {name}`) so cottontail can declare it anew.",
        handler = queue.handler(),
    ))
}

fn clean_value(raw: &str) -> String {
    let raw = raw.trim();
    if raw == "none" {
        return "none (not set)".into();
    }
    let raw = raw.strip_prefix("the value ").unwrap_or(raw);
    match raw.split_once(" of type ") {
        Some((value, _)) => value.trim_matches('\'').to_owned(),
        None => raw.trim_matches('\'').to_owned(),
    }
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn long(n: u128) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_an_inequivalent_queue_type() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'jobs' in \
                    vhost '/': received the value 'quorum' of type 'longstr' but current is none";
        let q = Queue::new("jobs");
        let msg = explain_mismatch(text, "jobs", &q).unwrap();
        assert!(msg.contains("x-queue-type = none (not set)"), "{msg}");
        assert!(msg.contains("declares x-queue-type = quorum"), "{msg}");
        assert!(msg.contains("rabbitmqctl delete_queue jobs"), "{msg}");
        assert!(explain_mismatch("NOT_FOUND - no queue", "jobs", &q).is_none());
    }

    #[test]
    fn recognises_a_tier_queue_declared_at_most_once() {
        let text = |arg: &str| {
            format!(
                "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue 'jobs.retry.1000' in \
                 vhost '/': received the value 'at-least-once' of type 'longstr' but current is none"
            )
        };
        assert!(declared_at_most_once(&text("x-dead-letter-strategy")));
        assert!(declared_at_most_once(&text("x-overflow")));
        assert!(!declared_at_most_once(&text("x-expires")));
        assert!(!declared_at_most_once("NOT_FOUND - no queue"));
    }

    #[test]
    fn tier_queues_dead_letter_at_least_once() {
        let args = tier_args(&Queue::new("jobs"), Duration::from_secs(1));
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-dead-letter-strategy"), Some(string("at-least-once")));
        assert_eq!(get("x-overflow"), Some(string("reject-publish")));
        assert_eq!(get("x-queue-type"), Some(string("quorum")));
        assert_eq!(get("x-dead-letter-routing-key"), Some(string("jobs")));
    }

    #[test]
    fn the_keep_warning_gives_a_policy_matching_only_that_queue() {
        let text = keep_warning("jobs.retry.1000", 3);
        assert!(text.contains("holds 3 retry copies"), "{text}");
        assert!(text.contains(r"'^jobs\.retry\.1000$'"), "{text}");
        assert!(
            text.contains(r#""dead-letter-strategy":"at-least-once""#),
            "{text}"
        );
    }
}
