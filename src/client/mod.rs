//! The producer side: publish jobs and call handlers (RPC) from front-ends and scripts.
//!
//! Replies come back over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`), so a caller
//! declares no queue and leaves nothing behind on the broker. One reply consumer serves every
//! outstanding call of a [`Client`]; replies are routed to their call by `correlation_id`.
//!
//! Requests are published `mandatory` but without publisher confirms: the reply itself proves
//! the broker took the request, so a confirm per call would be broker work that tells the
//! caller nothing more. An unroutable request (no such queue) still fails fast: the broker
//! returns it, and the reply consumer's task fails the call when it sees the return.

pub(crate) mod control;
mod publisher;
pub(crate) mod recorder;
pub mod reply;
mod rpc;

pub use publisher::{republish_properties, PublishError, Publisher};
pub use rpc::Call;
use rpc::{Entry, Inner};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::connection::{redact, Connector};
use crate::headers;
use crate::Error;

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Default limit of calls waiting for their reply at once on one [`Client`].
pub const DEFAULT_MAX_OUTSTANDING: usize = 10_000;

/// How long connecting (TCP, TLS, AMQP handshake) and a graceful close may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the reply task looks for returned (unroutable) requests while calls wait. lapin
/// has no callback for returns on a channel without confirms, so they are collected.
pub(crate) const RETURN_CHECK: Duration = Duration::from_millis(5);

/// Default number of unread progress updates buffered per call.
pub const DEFAULT_PROGRESS_BUFFER: usize = 256;

/// Properties of a published message (beyond the fixed JSON content type and persistence).
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// Priority, for queues declared with priority levels.
    pub priority: Option<u8>,
    /// Idempotency key for handlers with a dedup store.
    pub message_id: Option<String>,
    /// String headers (e.g. `x-sequence-key`; numeric strings are read as integers). A W3C
    /// `traceparent` here continues your trace in the handler; without one the handler starts
    /// a trace.
    pub headers: Vec<(String, String)>,
    /// Echoed on the handler's replies.
    pub correlation_id: Option<String>,
    /// Where the handler replies (a queue you consume yourself).
    pub reply_to: Option<String>,
}

/// Settings of one RPC call.
#[derive(Clone, Debug)]
pub struct RequestOptions {
    /// How long to wait for the final reply (default 30 s), counted from the call's start.
    pub timeout: Duration,
    /// Priority, for queues declared with priority levels.
    pub priority: Option<u8>,
    /// Idempotency key for handlers with a dedup store.
    pub message_id: Option<String>,
    /// String headers. A W3C `traceparent` here continues your trace in the handler and its
    /// replies; without one the handler starts a trace.
    pub headers: Vec<(String, String)>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            priority: None,
            message_id: None,
            headers: Vec::new(),
        }
    }
}

impl RequestOptions {
    /// Default options with `timeout`.
    pub fn timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }
}

/// Why a call returned no `ok` reply.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No final reply within the call's timeout (a later reply is discarded).
    #[error("timed out waiting for the reply")]
    Timeout,
    /// The handler answered with an `error` reply.
    #[error("{kind}: {message}")]
    Remote {
        /// Machine-readable kind (`invalid_input`, …; `malformed_reply` for unreadable replies).
        kind: String,
        /// Human-readable message.
        message: String,
    },
    /// The request could not be published (unroutable queue, nack, connection).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The broker connection failed or was lost while the call waited.
    #[error("connection: {0}")]
    Connection(String),
    /// Already `max_outstanding` calls wait for replies; back off and try again.
    #[error("too many outstanding calls (limit {0})")]
    Busy(usize),
    /// The request value could not be serialized to JSON.
    #[error("request is not serializable to JSON: {0}")]
    Encode(String),
}

/// A connection to the broker for publishing and calling handlers. Cheap to clone; clones
/// share the connection and the reply consumer.
///
/// A lost connection is replaced on the next publish or call; calls waiting on the lost one
/// fail with [`RpcError::Connection`] instead of hanging until their timeout.
///
/// ```no_run
/// use std::time::Duration;
/// use cottontail::client::{Client, PublishOptions, RequestOptions, RpcError};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "web-frontend").await?;
///
/// // Fire and forget (but confirmed by the broker; a missing queue is an error).
/// client.publish_json("orders", &serde_json::json!({"order_id": "o-1", "event": "created"}),
///     PublishOptions::default()).await?;
///
/// // Request/reply, with progress updates.
/// let body = br#"{"image": "...", "max_side": 64}"#;
/// let mut call = client
///     .request_with_progress("thumbnails", body, RequestOptions::timeout(Duration::from_secs(10)))
///     .await?;
/// while let Some(update) = call.next_progress().await {
///     println!("progress: {update}");
/// }
/// match call.result().await {
///     Ok(reply) => println!("{}", String::from_utf8_lossy(&reply)),
///     Err(RpcError::Remote { kind, message }) => eprintln!("{kind}: {message}"),
///     Err(other) => eprintln!("{other}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    // By hand: the connector holds URLs with passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connection_name", &self.inner.connector.name())
            .field("outstanding", &self.outstanding())
            .field("discarded_replies", &self.discarded_replies())
            .finish()
    }
}

/// Builds a [`Client`] with non-default limits.
#[derive(Clone)]
pub struct ClientBuilder {
    urls: String,
    name: String,
    connector: Option<Connector>,
    max_outstanding: usize,
    progress_buffer: usize,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("urls", &redact(&self.urls))
            .field("name", &self.name)
            .field("max_outstanding", &self.max_outstanding)
            .field("progress_buffer", &self.progress_buffer)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Connects with `connector` (URLs, name, TLS settings, e.g. from
    /// [`Config::connector`](crate::Config::connector)) instead of the builder's URLs and name.
    pub fn connector(mut self, connector: Connector) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Calls allowed to wait for replies at once; beyond it calls fail fast with
    /// [`RpcError::Busy`], so a stalled handler cannot grow the client's memory without bound.
    pub fn max_outstanding(mut self, n: usize) -> Self {
        self.max_outstanding = n.max(1);
        self
    }

    /// Unread progress updates kept per call; further ones are dropped (and counted in
    /// [`Client::discarded_replies`]) so a caller that ignores progress cannot exhaust memory.
    pub fn progress_buffer(mut self, n: usize) -> Self {
        self.progress_buffer = n.max(1);
        self
    }

    /// Connects now, so a wrong URL or password fails here rather than on the first call.
    pub async fn connect(self) -> Result<Client, Error> {
        let connector = match self.connector {
            Some(connector) => connector,
            None => Connector::new(&self.urls, self.name)?,
        };
        let inner = Arc::new(Inner {
            connector,
            session: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            permits: Arc::new(Semaphore::new(self.max_outstanding)),
            max_outstanding: self.max_outstanding,
            progress_buffer: self.progress_buffer,
            discarded: Arc::new(AtomicU64::new(0)),
            next_id: AtomicU64::new(0),
            id_prefix: format!("{:016x}", fastrand::u64(..)),
        });
        inner.session().await?;
        Ok(Client { inner })
    }
}

impl Client {
    /// Connects to `urls` (one AMQP URL or several comma-separated) with `connection_name`.
    pub async fn connect(urls: &str, connection_name: impl Into<String>) -> Result<Self, Error> {
        Self::builder(urls)
            .connection_name(connection_name)
            .connect()
            .await
    }

    /// A builder for non-default limits.
    pub fn builder(urls: &str) -> ClientBuilder {
        ClientBuilder {
            urls: urls.to_owned(),
            name: format!("cottontail-client:{}", std::process::id()),
            connector: None,
            max_outstanding: DEFAULT_MAX_OUTSTANDING,
            progress_buffer: DEFAULT_PROGRESS_BUFFER,
        }
    }

    /// Publishes a JSON `body` to `queue` through the default exchange, persistent, and returns
    /// once the broker confirmed it. A queue that does not exist is an error
    /// ([`PublishError::Unroutable`]), not a silent drop.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        options: PublishOptions,
    ) -> Result<(), Error> {
        let session = self.inner.session().await?;
        let mut properties =
            base_properties(options.priority, options.message_id, &options.headers);
        if let Some(id) = options.correlation_id {
            properties = properties.with_correlation_id(id.into());
        }
        if let Some(reply_to) = options.reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let result = session
            .publisher
            .publish("", queue, body, properties, true)
            .await;
        if let Err(PublishError::Connection(_)) = &result {
            self.inner.forget(&session).await;
        }
        result.map_err(Error::from)
    }

    /// Serializes `body` to JSON and [publishes](Self::publish) it.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        body: &T,
        options: PublishOptions,
    ) -> Result<(), Error> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| Error::Encode(format!("message body is not serializable to JSON: {e}")))?;
        self.publish(queue, &bytes, options).await
    }

    /// Calls the handler on `queue` with a JSON `body` and waits for its final reply: the `ok`
    /// body, or why there is none. Progress updates are ignored. A queue that does not exist
    /// fails the call with [`PublishError::Unroutable`] within milliseconds. The request is not
    /// confirmed on its own (its reply is the proof), so one the broker accepts and then drops
    /// (a full queue with `x-overflow: reject-publish`) ends in [`RpcError::Timeout`].
    pub async fn request(
        &self,
        queue: &str,
        body: &[u8],
        options: RequestOptions,
    ) -> Result<Vec<u8>, RpcError> {
        self.start_call(queue, body, options, false)
            .await?
            .result()
            .await
    }

    /// Serializes `body` to JSON and [calls](Self::request) the handler.
    pub async fn request_json<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        body: &T,
        options: RequestOptions,
    ) -> Result<Vec<u8>, RpcError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RpcError::Encode(e.to_string()))?;
        self.request(queue, &bytes, options).await
    }

    /// Calls the handler on `queue` and returns once the request is sent; read progress with
    /// [`Call::next_progress`] and the final reply (or why there is none, e.g. an unroutable
    /// request) with [`Call::result`].
    pub async fn request_with_progress(
        &self,
        queue: &str,
        body: &[u8],
        options: RequestOptions,
    ) -> Result<Call, RpcError> {
        self.start_call(queue, body, options, true).await
    }

    /// Cancels the job `message_id`: broadcast to every running instance of every service on
    /// this broker (over the [`CONTROL_EXCHANGE`](crate::names::CONTROL_EXCHANGE)), so the one
    /// running it stops within a second and a queued one is skipped when it is delivered. Its
    /// caller gets an `error` reply of kind `cancelled`. Returns once the broker confirmed the
    /// broadcast; it does not wait for the job to stop, and cancelling an unknown or finished
    /// id does nothing.
    pub async fn cancel(&self, message_id: &str) -> Result<(), Error> {
        let session = self.inner.session().await?;
        if let Some(channel) = session.publisher.channel() {
            control::declare(channel).await.map_err(Error::broker)?;
        }
        let result = control::send_cancel(&session.publisher, message_id).await;
        if let Err(PublishError::Connection(_)) = &result {
            self.inner.forget(&session).await;
        }
        result.map_err(Error::from)
    }

    /// Replies that arrived for no waiting call (late after a timeout, unknown correlation
    /// id) or progress updates dropped because the call's buffer was full.
    pub fn discarded_replies(&self) -> u64 {
        self.inner.discarded.load(Ordering::Relaxed)
    }

    /// Calls currently waiting for their final reply.
    pub fn outstanding(&self) -> usize {
        self.inner.max_outstanding - self.inner.permits.available_permits()
    }

    /// Closes the connection; waiting calls fail with [`RpcError::Connection`]. Later
    /// publishes and calls reconnect.
    pub async fn close(&self) {
        let session = self.inner.session.lock().await.take();
        self.inner.set_current(None);
        if let Some(session) = session {
            session.pending.close("client closed".into());
            // Bounded: a broker that stopped answering must not hang the caller's shutdown.
            let close = session.connection.close(200, "client closed".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        }
    }

    async fn start_call(
        &self,
        queue: &str,
        body: &[u8],
        options: RequestOptions,
        with_progress: bool,
    ) -> Result<Call, RpcError> {
        let deadline = Instant::now() + options.timeout;
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_owned()
            .map_err(|_| RpcError::Busy(self.inner.max_outstanding))?;
        let session = match self.inner.live() {
            Some(session) => session,
            None => match tokio::time::timeout_at(deadline, self.inner.session()).await {
                Ok(Ok(session)) => session,
                Ok(Err(e)) => return Err(RpcError::Connection(e.to_string())),
                Err(_) => return Err(RpcError::Timeout),
            },
        };

        let id = format!(
            "{}-{}",
            self.inner.id_prefix,
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let (done_tx, done_rx) = oneshot::channel();
        let (progress_tx, progress_rx) = if with_progress {
            let (tx, rx) = mpsc::channel(self.inner.progress_buffer);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let mut state = session.pending.lock();
            if let Some(reason) = &state.closed {
                return Err(RpcError::Connection(reason.clone()));
            }
            state.calls.insert(
                id.clone(),
                Entry {
                    progress: progress_tx,
                    done: done_tx,
                },
            );
        }
        session.pending.started.notify_one();
        // From here on, dropping `call` (error, timeout, caller gives up) unregisters it.
        let call = Call {
            id,
            pending: Arc::clone(&session.pending),
            progress: progress_rx,
            done: done_rx,
            deadline,
            _permit: permit,
        };

        let key = ShortString::try_new(queue)
            .map_err(|_| RpcError::Publish(PublishError::InvalidName(queue.to_owned())))?;
        let properties = base_properties(options.priority, options.message_id, &options.headers)
            .with_correlation_id(call.id.as_str().into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Without confirm mode this resolves once the frames are handed to the connection.
        let publish = session
            .rpc
            .basic_publish("".into(), key, options, body, properties);
        match tokio::time::timeout_at(deadline, publish).await {
            Ok(Ok(_not_requested)) => Ok(call),
            Ok(Err(e)) => {
                self.inner.forget(&session).await;
                Err(RpcError::Publish(PublishError::Connection(redact(
                    &e.to_string(),
                ))))
            }
            Err(_) => Err(RpcError::Timeout),
        }
    }
}

fn base_properties(
    priority: Option<u8>,
    message_id: Option<String>,
    extra: &[(String, String)],
) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        properties = properties.with_timestamp(now.as_secs());
    }
    if let Some(p) = priority {
        properties = properties.with_priority(p);
    }
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    // A `traceparent` in `extra` continues the caller's trace; without one the handler
    // starts the trace (a root made up here would tie to nothing the caller can see, and its
    // 55 bytes per message cost the broker ~8 % of its RPC throughput).
    if !extra.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in extra {
            headers::set_string(&mut table, k, v.as_str());
        }
        properties = properties.with_headers(table);
    }
    properties
}

/// The `x-sequence-key` / `x-sequence` headers of message `number` of `key` (stamp numbers
/// with a [`SequenceStamper`](crate::stores::SequenceStamper)).
pub fn sequence_headers(key: &str, number: u64) -> FieldTable {
    let mut table = FieldTable::default();
    headers::set_string(&mut table, headers::SEQUENCE_KEY, key);
    headers::set_int(&mut table, headers::SEQUENCE, number);
    table
}
