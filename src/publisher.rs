//! Publishing with publisher confirms: a publish returns only once the broker has the message.

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};

/// Why a publish did not make it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message (negative confirm).
    #[error("the broker nacked the message")]
    Nacked,
    /// `mandatory` was set and no queue was bound for the routing key.
    #[error(
        "unroutable: no queue bound for exchange '{exchange}' and routing key '{routing_key}'"
    )]
    Unroutable {
        /// Target exchange ("" is the default exchange).
        exchange: String,
        /// Routing key (the queue name on the default exchange).
        routing_key: String,
    },
    /// The routing key or exchange name is longer than AMQP allows (255 bytes).
    #[error("name too long for AMQP: {0}")]
    InvalidName(String),
    /// The connection or channel failed before the confirm arrived.
    #[error("connection: {0}")]
    Connection(String),
}

/// A confirm-mode channel shared by all tasks of one connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
    confirm_seconds: Option<prometheus::Histogram>,
}

impl Publisher {
    /// Puts `channel` in confirm mode and wraps it.
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            confirm_seconds: None,
        })
    }

    /// Records publish-to-confirm latency in `histogram`.
    pub(crate) fn with_confirm_histogram(mut self, histogram: prometheus::Histogram) -> Self {
        self.confirm_seconds = Some(histogram);
        self
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, an unroutable message
    /// is an error instead of a silent drop.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let exchange_name = ShortString::try_new(exchange)
            .map_err(|_| PublishError::InvalidName(exchange.to_owned()))?;
        let key = ShortString::try_new(routing_key)
            .map_err(|_| PublishError::InvalidName(routing_key.to_owned()))?;
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let timer = self.confirm_seconds.as_ref().map(|h| h.start_timer());
        let confirm = self
            .channel
            .basic_publish(exchange_name, key, options, body, properties)
            .await
            .map_err(connection_error)?
            .await
            .map_err(connection_error)?;
        if let Some(timer) = timer {
            timer.observe_duration();
        }
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(PublishError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
        }
    }

    /// Publishes a persistent JSON message to a queue through the default exchange
    /// (`mandatory`: a missing queue is an error).
    pub async fn publish_json(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let properties = properties
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publish("", queue, body, properties, true).await
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

fn connection_error(error: lapin::Error) -> PublishError {
    PublishError::Connection(crate::connection::redact(&error.to_string()))
}
