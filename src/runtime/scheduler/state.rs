//! A schedule's last fired tick, kept in a one-message queue and read without spending its
//! delivery budget.

use chrono::{DateTime, TimeZone, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

use crate::client::Publisher;
use crate::Error;

#[derive(Deserialize, Serialize)]
pub(super) struct State {
    pub(super) last_tick_ms: i64,
}

/// Declares a durable quorum queue of at most one ready message, with `args` besides;
/// returns how many messages are ready.
pub(super) async fn declare_one_slot(
    channel: &Channel,
    name: &str,
    mut args: FieldTable,
) -> Result<u32, Error> {
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|q| q.message_count())
        .map_err(Error::broker)
}

/// Declares the state queue (a leader recreates it if it was lost) and reads the last fired
/// tick, leaving it in place.
///
/// It takes the state and puts a fresh copy back (confirmed) before acking what it took,
/// instead of requeuing it: every requeue counts toward the queue's delivery limit (20 by
/// default on RabbitMQ 4.0–4.2), and a state read at each takeover would be dropped after so
/// many takeovers without a fire. With the taken message unacked the queue has none ready,
/// so the copy does not push anything out (`x-max-length` 1 counts ready messages only). If
/// the copy cannot be published, the error ends the attempt and closing its channel returns
/// what was taken.
pub(super) async fn last_fired(
    channel: &Channel,
    state_queue: &str,
    publisher: &Publisher,
) -> Result<Option<DateTime<Utc>>, Error> {
    declare_one_slot(channel, state_queue, FieldTable::default()).await?;
    let Some(got) = channel
        .basic_get(state_queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(Error::broker)?
    else {
        return Ok(None);
    };
    // Fresh properties: the copy carries no delivery count over.
    publisher
        .publish_json(state_queue, &got.delivery.data, BasicProperties::default())
        .await?;
    got.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(Error::broker)?;
    let state: Option<State> = serde_json::from_slice(&got.delivery.data).ok();
    Ok(state.and_then(|s| Utc.timestamp_millis_opt(s.last_tick_ms).single()))
}
