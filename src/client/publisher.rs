//! Publishing with publisher confirms: a publish returns only once the broker has the message.

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};

use super::recorder::Recorder;
pub use crate::error::PublishError;

/// A confirm-mode channel shared by all tasks of one connection. Cheap to clone.
///
/// In [`testing`](crate::testing) it records publishes in process instead: the pipeline, the
/// replies and [`Outbox`](crate::Outbox) publish through it unchanged, so a handler is tested
/// through the very code that runs it against a broker.
#[derive(Clone, Debug)]
pub struct Publisher {
    sink: Sink,
    confirm_seconds: Option<prometheus::Histogram>,
}

/// Where publishes go. The broker path pays one branch for the recorder.
#[derive(Clone, Debug)]
enum Sink {
    Broker(Channel),
    Recorder(Recorder),
}

impl Publisher {
    /// Puts `channel` in confirm mode and wraps it.
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            sink: Sink::Broker(channel),
            confirm_seconds: None,
        })
    }

    /// A publisher that records into `recorder` instead of sending.
    pub(crate) fn recording(recorder: Recorder) -> Self {
        Self {
            sink: Sink::Recorder(recorder),
            confirm_seconds: None,
        }
    }

    /// The recorder of an in-process publisher.
    pub(crate) fn recorder(&self) -> Option<&Recorder> {
        match &self.sink {
            Sink::Recorder(recorder) => Some(recorder),
            Sink::Broker(_) => None,
        }
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
        let channel = match &self.sink {
            Sink::Broker(channel) => channel,
            Sink::Recorder(recorder) => {
                return recorder.record(exchange, routing_key, body, properties, mandatory)
            }
        };
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let timer = self.confirm_seconds.as_ref().map(|h| h.start_timer());
        let confirm = channel
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

    /// The underlying channel; `None` for an in-process [`testing`](crate::testing) publisher.
    pub fn channel(&self) -> Option<&Channel> {
        match &self.sink {
            Sink::Broker(channel) => Some(channel),
            Sink::Recorder(_) => None,
        }
    }
}

fn connection_error(error: lapin::Error) -> PublishError {
    PublishError::Connection(crate::connection::redact(&error.to_string()))
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
