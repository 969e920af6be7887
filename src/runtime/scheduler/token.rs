//! The leadership token: queuing up for it, waiting for it, and renewing it so that it never
//! runs out of deliveries nor outlives the broker's consumer timeout.

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use super::state::declare_one_slot;
use super::{Recovery, Scheduler, Step, STANDBY_AFTER, TOKEN_BACK};
use crate::Error;

impl Scheduler {
    /// Waits for the token (another instance leads meanwhile); `None` when stopped.
    pub(super) async fn await_token(
        &self,
        consumer: &mut lapin::Consumer,
        recovery: &mut Recovery,
        stop: &CancellationToken,
    ) -> Result<Option<Delivery>, (Step, Error)> {
        let standby = tokio::time::sleep(STANDBY_AFTER);
        tokio::pin!(standby);
        let mut standing = false;
        loop {
            tokio::select! {
                token = consumer.next() => {
                    return token_or_lost(token).map(Some).map_err(|e| (Step::Leading, e));
                }
                () = &mut standby, if !standing => {
                    standing = true;
                    self.reach(recovery, Step::Standby);
                }
                _ = stop.cancelled() => return Ok(None),
            }
        }
    }

    /// Swaps a token delivered before for a fresh one; `None` when stopped.
    ///
    /// Every requeue of a quorum queue message counts toward its delivery limit (RabbitMQ
    /// 4.0–4.2 drop a message after 20 unless told otherwise; the count survives in
    /// `x-delivery-count`), and the token is requeued at each leader change. Left alone it
    /// would vanish after so many changes, and the standbys would wait for it forever. So a
    /// new leader holding a spent token renews it (see [`Scheduler::swap`]); a spare that
    /// comes instead and was spent too is renewed in turn.
    pub(super) async fn fresh_token(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        mut token: Delivery,
        stop: &CancellationToken,
    ) -> Result<Option<Delivery>, Error> {
        while delivered_before(token.redelivered, token.properties.headers().as_ref()) {
            match self.swap(channel, consumer, token, stop).await? {
                Swap::Got(next) => token = next,
                Swap::Kept(spent) => return Ok(Some(spent)),
                Swap::Stopped => return Ok(None),
            }
        }
        Ok(Some(token))
    }

    /// Swaps the token held for another one however fresh it is; `None` when stopped. A
    /// leader does so every [`RENEW_EVERY`] so that it never holds one delivery long enough
    /// for the broker's consumer timeout (30 min by default), which would close its channel
    /// (or, from 4.3, cancel its consumer) and hand the token over.
    pub(super) async fn renewed(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        token: Delivery,
        stop: &CancellationToken,
    ) -> Result<Option<Delivery>, Error> {
        match self.swap(channel, consumer, token, stop).await? {
            Swap::Got(next) => self.fresh_token(channel, consumer, next, stop).await,
            Swap::Kept(token) => Ok(Some(token)),
            Swap::Stopped => Ok(None),
        }
    }

    /// Lets `token` go for the next one, once another one is in the queue: it puts a fresh
    /// token there (confirmed) unless one is ready, then acks `token`. Being the active
    /// consumer with a free prefetch slot, this instance gets the next token itself, so
    /// leadership does not move. If the fresh token cannot be published it keeps `token`:
    /// a token is never let go before another one is in the queue.
    async fn swap(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        token: Delivery,
        stop: &CancellationToken,
    ) -> Result<Swap, Error> {
        if let Some(error) = self.add_token_unless_ready(channel).await? {
            tracing::warn!(schedule = %self.schedule.name(), %error, "could not renew the leadership token; keeping the one held");
            return Ok(Swap::Kept(token));
        }
        token
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(Error::broker)?;
        tokio::select! {
            next = tokio::time::timeout(TOKEN_BACK, consumer.next()) => match next {
                Ok(next) => token_or_lost(next).map(Swap::Got),
                Err(_) => Err(Error::Broker(format!(
                    "the leadership token did not come back within {TOKEN_BACK:?}"
                ))),
            },
            _ = stop.cancelled() => Ok(Swap::Stopped),
        }
    }

    /// Declares the leader queue and publishes a token (confirmed) unless one is ready there;
    /// the publish's own failure, if any, comes apart from the declaration's.
    pub(super) async fn add_token_unless_ready(
        &self,
        channel: &Channel,
    ) -> Result<Option<crate::client::PublishError>, Error> {
        let leader_queue = self.schedule.leader_queue();
        if declare_one_slot(channel, &leader_queue, leader_queue_args()).await? > 0 {
            return Ok(None);
        }
        let published = self
            .publisher
            .publish_json(&leader_queue, b"{}", BasicProperties::default())
            .await;
        Ok(published.err())
    }

    /// Declares the leader queue, adds a token if none is ready, and consumes it.
    pub(super) async fn queue_up(&self, channel: &Channel) -> Result<lapin::Consumer, Error> {
        channel
            .basic_qos(1, BasicQosOptions { global: false })
            .await
            .map_err(Error::broker)?;
        // A publish refused because a spare token is there after all is fine.
        let _refused = self.add_token_unless_ready(channel).await?;
        let leader_queue = self.schedule.leader_queue();
        channel
            .basic_consume(
                leader_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker)
    }
}

/// The leader queue's own arguments (besides those of [`declare_one_slot`]): one consumer
/// gets the token, and a spare token is refused rather than replacing one.
fn leader_queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    args
}

/// How a token swap ended.
enum Swap {
    /// The next token (fresh, or a spare that was ready).
    Got(Delivery),
    /// No fresh token could be published: still the one held.
    Kept(Delivery),
    /// Stopped while waiting for the next token.
    Stopped,
}

/// Why a leader's consumer yielded something while it held the token: leadership is lost.
pub(super) fn token_lost(event: Option<Result<Delivery, lapin::Error>>) -> Error {
    let why = match event {
        Some(Ok(_)) => "a second one arrived".to_owned(),
        Some(Err(e)) => crate::connection::redact(&e.to_string()),
        None => "consumer cancelled".to_owned(),
    };
    Error::Broker(format!("lost the leadership token: {why}"))
}

/// The token (or the end of the consumer: leadership lost or never had).
fn token_or_lost(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, Error> {
    match next {
        Some(Ok(token)) => Ok(token),
        Some(Err(e)) => Err(Error::broker(e)),
        None => Err(Error::Broker("leader queue consumer cancelled".into())),
    }
}

/// Whether a message was delivered before, and so has spent some of its delivery budget:
/// `x-delivery-count` above 0 (3.10 puts a 0 on a first `basic.get`, later versions leave
/// the header off), or at least the redelivered flag.
fn delivered_before(redelivered: bool, headers: Option<&FieldTable>) -> bool {
    redelivered || crate::headers::get_u64(headers, "x-delivery-count").is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn a_message_delivered_before_shows_by_its_count_or_its_flag() {
        let count = |n: i64| {
            let mut headers = FieldTable::default();
            headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(n));
            headers
        };
        assert!(!delivered_before(false, None), "a first delivery");
        assert!(
            !delivered_before(false, Some(&count(0))),
            "3.10 puts a 0 on a first basic.get"
        );
        assert!(delivered_before(false, Some(&count(1))));
        assert!(delivered_before(true, None), "only the flag");
        assert!(delivered_before(true, Some(&count(0))));
    }
}
