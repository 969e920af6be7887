//! [`TestMessage`]: a delivery built in process, with the properties and headers a publisher
//! (or the broker) would have set.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde::Serialize;

use crate::headers;

/// A message to run a handler on, as a publisher would send it.
///
/// ```
/// use cottontail::testing::TestMessage;
///
/// let msg = TestMessage::json(&serde_json::json!({"width": 64}))
///     .reply_to("replies")
///     .correlation_id("c-1")
///     .message_id("m-1")
///     .attempt(3) // the pipeline sees the third attempt
///     .header("x-tenant", "acme");
/// # let _ = msg;
/// ```
#[derive(Clone, Debug)]
pub struct TestMessage {
    pub(super) body: Vec<u8>,
    pub(super) properties: BasicProperties,
    pub(super) redelivered: bool,
}

impl TestMessage {
    /// A JSON body (`content_type: application/json`, persistent), as
    /// [`Client::publish`](crate::client::Client::publish) sends it.
    ///
    /// # Panics
    ///
    /// When `value` does not serialize to JSON.
    #[track_caller]
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        let body = serde_json::to_vec(value)
            .unwrap_or_else(|e| panic!("test message body does not serialize to JSON: {e}"));
        Self::bytes(body).content_type("application/json")
    }

    /// Any body, e.g. bytes that are not JSON, as a careless publisher may send them.
    pub fn bytes(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            properties: BasicProperties::default().with_delivery_mode(2),
            redelivered: false,
        }
    }

    /// Sets `content_type`.
    pub fn content_type(self, value: &str) -> Self {
        self.properties(|p| p.with_content_type(value.into()))
    }

    /// Sets `reply_to`: replies (`ok`, `error`, `progress`) go there.
    pub fn reply_to(self, queue: &str) -> Self {
        self.properties(|p| p.with_reply_to(queue.into()))
    }

    /// Sets `correlation_id`, echoed on replies.
    pub fn correlation_id(self, id: &str) -> Self {
        self.properties(|p| p.with_correlation_id(id.into()))
    }

    /// Sets `message_id`, the dedup key.
    pub fn message_id(self, id: &str) -> Self {
        self.properties(|p| p.with_message_id(id.into()))
    }

    /// Sets `priority`.
    pub fn priority(self, priority: u8) -> Self {
        self.properties(|p| p.with_priority(priority))
    }

    /// Makes this attempt number `n` (1 is the first delivery): sets `x-attempts` to `n - 1`,
    /// as a retry copy carries it. The last attempt of the retry policy dead-letters on a
    /// transient failure.
    pub fn attempt(self, n: u32) -> Self {
        self.header(headers::ATTEMPTS, u64::from(n.max(1) - 1))
    }

    /// Sets `x-sequence-key` and `x-sequence`, read by the [`Sequence`](crate::Sequence)
    /// extractor. (The ordering itself, partitions and resequencing, needs a broker.)
    pub fn sequence(self, key: &str, number: u64) -> Self {
        self.header(headers::SEQUENCE_KEY, key)
            .header(headers::SEQUENCE, number)
    }

    /// Sets the broker's `redelivered` flag: an earlier delivery was not settled.
    pub fn redelivered(mut self) -> Self {
        self.redelivered = true;
        self
    }

    /// Sets a header (text, integer, boolean or any AMQP value).
    pub fn header(self, name: &str, value: impl Into<HeaderValue>) -> Self {
        let value = value.into().0;
        self.properties(|p| {
            let mut table = p.headers().clone().unwrap_or_else(FieldTable::default);
            table.insert(ShortString::from(name), value);
            p.with_headers(table)
        })
    }

    /// Any other property, e.g. `timestamp` or `type`.
    pub fn properties(mut self, f: impl FnOnce(BasicProperties) -> BasicProperties) -> Self {
        self.properties = f(self.properties);
        self
    }
}

/// A header value for [`TestMessage::header`]: text, an integer, a boolean or an
/// [`AMQPValue`].
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderValue(AMQPValue);

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        Self(AMQPValue::LongString(LongString::from(value)))
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        Self(AMQPValue::LongString(LongString::from(value)))
    }
}

impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        Self(AMQPValue::Boolean(value))
    }
}

impl From<AMQPValue> for HeaderValue {
    fn from(value: AMQPValue) -> Self {
        Self(value)
    }
}

macro_rules! integer_headers {
    ($($t:ty),*) => {$(
        impl From<$t> for HeaderValue {
            /// As a signed 64-bit integer, which every client library reads.
            fn from(value: $t) -> Self {
                Self(AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX)))
            }
        }
    )*};
}

integer_headers!(i8, i16, i32, i64, u8, u16, u32, u64, usize);
