//! Control messages broadcast to every running instance on the
//! [`CONTROL_EXCHANGE`](crate::names::CONTROL_EXCHANGE): today, cancels.
//!
//! Wire format (not part of the contract): body `{"cancel": "<message_id>"}`,
//! `content_type: application/json`, transient (a cancel only matters to instances running
//! now; those that start later find it in the shared store, if there is one).

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};

use super::{PublishError, Publisher};
use crate::names::CONTROL_EXCHANGE;

/// Declares the control exchange (durable fanout; idempotent).
pub(crate) async fn declare(channel: &Channel) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            CONTROL_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Broadcasts a cancel of `message_id`, confirmed by the broker (not `mandatory`: with no
/// instance running, nobody needs to hear it).
pub(crate) async fn send_cancel(
    publisher: &Publisher,
    message_id: &str,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(&serde_json::json!({ "cancel": message_id })).unwrap_or_default();
    let properties = BasicProperties::default().with_content_type("application/json".into());
    publisher
        .publish(CONTROL_EXCHANGE, "", &body, properties, false)
        .await
}

/// The message id a control message cancels, if it is a cancel.
pub(crate) fn parse_cancel(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Cancel {
        cancel: String,
    }
    serde_json::from_slice::<Cancel>(body)
        .ok()
        .map(|c| c.cancel)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_are_read_without_trusting_them() {
        assert_eq!(parse_cancel(br#"{"cancel":"m-1"}"#), Some("m-1".into()));
        assert_eq!(parse_cancel(br#"{"cancel":""}"#), None);
        assert_eq!(parse_cancel(br#"{"cancel":1}"#), None);
        assert_eq!(parse_cancel(b"\xff"), None);
        assert_eq!(parse_cancel(br#"{"other":"m"}"#), None);
    }
}
