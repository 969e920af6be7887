//! Declares a handler's queues: the work queue, its `<queue>.dlq` bound to the dead-letter
//! exchange, and the retry tier queues. Turns the broker's terse PRECONDITION_FAILED into an
//! explanation of which argument differs and how to fix it.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::queue::{Queue, QueueType};
use crate::retry;
use crate::Error;

/// The direct exchange every handler's dead-letters go through, routed by queue name.
pub const DEAD_LETTER_EXCHANGE: &str = "cottontail.dlx";

/// Declares everything `queue` needs. Each declaration uses its own channel attempt so a
/// mismatch can be explained precisely.
pub(crate) async fn declare(connection: &Connection, queue: &Queue) -> Result<(), Error> {
    let channel = connection.create_channel().await.map_err(Error::broker)?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
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
            DEAD_LETTER_EXCHANGE.into(),
            queue.name.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::broker)?;

    declare_queue(&channel, &queue.name, work_args(queue), queue).await?;
    let channel = reopen(connection, channel).await?;

    for tier in queue.delay_tiers() {
        let mut args = quorum_args(queue.expires);
        args.insert("x-message-ttl".into(), long(tier.as_millis()));
        args.insert("x-dead-letter-exchange".into(), string(""));
        args.insert("x-dead-letter-routing-key".into(), string(&queue.name));
        declare_queue(&channel, &retry::tier_queue(&queue.name, tier), args, queue).await?;
    }
    if let Some(ordering) = &queue.ordering {
        let mut partition = queue.clone();
        partition.ordering = None;
        // One active consumer per partition, enforced by the broker.
        partition.singleton = true;
        for n in 0..ordering.partitions {
            let name = crate::ordering::partition_queue(&queue.name, n);
            declare_queue(&channel, &name, work_args(&partition), queue).await?;
        }
        let members = crate::ordering::members_queue(&queue.name);
        declare_queue(&channel, &members, quorum_args(queue.expires), queue).await?;
    }
    if let Some(bands) = &queue.bands {
        let mut band = queue.clone();
        band.bands = None;
        for n in 0..bands.len() {
            let name = crate::queue::band_queue(&queue.name, n);
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
        string(DEAD_LETTER_EXCHANGE),
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
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let short = ShortString::try_new(name)
        .map_err(|_| Error::Config(format!("queue name too long: {name}")))?;
    match channel.queue_declare(short, options, args).await {
        Ok(_) => Ok(()),
        Err(error) => {
            let text = error.to_string();
            match explain_mismatch(&text, name, queue) {
                Some(explained) => Err(Error::QueueMismatch(explained)),
                None => Err(Error::broker(error)),
            }
        }
    }
}

/// Explains a PRECONDITION_FAILED "inequivalent arg" reply, or `None` for other errors.
pub(crate) fn explain_mismatch(broker_text: &str, name: &str, queue: &Queue) -> Option<String> {
    let rest = broker_text.split("inequivalent arg '").nth(1)?;
    let (arg, rest) = rest.split_once('\'')?;
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
}
