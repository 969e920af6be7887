//! Connecting to the broker: several URLs tried in turn (cluster failover), a connection
//! name operators can find in the management UI, and passwords kept out of every message.

pub(crate) mod frame_guard;
pub(crate) mod guarded_stream;

pub use crate::redact::redact;

/// The broker URL used when none is configured (`AMQP_URL` unset).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Connection, ConnectionProperties};

/// Broker addresses and the connection name.
#[derive(Clone)]
pub struct Connector {
    urls: Arc<Vec<String>>,
    name: String,
    next: Arc<AtomicUsize>,
    tls_ca_pem: Option<Arc<String>>,
}

impl std::fmt::Debug for Connector {
    // By hand: the URLs hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("Connector")
            .field("urls", &urls)
            .field("name", &self.name)
            .field("tls_ca", &self.tls_ca_pem.is_some())
            .finish()
    }
}

impl Connector {
    /// `urls` is one AMQP URL or several separated by commas (`amqp://` or `amqps://`).
    pub fn new(urls: &str, name: impl Into<String>) -> Result<Self, crate::Error> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(crate::Error::Config("no AMQP URL given".into()));
        }
        for url in &urls {
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                return Err(crate::Error::Config(format!(
                    "invalid AMQP URL '{}': {e}",
                    redact(url)
                )));
            }
        }
        Ok(Self {
            urls: Arc::new(urls),
            name: name.into(),
            next: Arc::new(AtomicUsize::new(0)),
            tls_ca_pem: None,
        })
    }

    /// Trusts the CA certificates in `pem` (PEM text) for `amqps://` URLs, in addition to the
    /// system's roots: for brokers with certificates from a private CA.
    pub fn with_tls_ca(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(Arc::new(pem.into()));
        self
    }

    /// The connection name shown by `rabbitmqctl list_connections client_properties`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One connection attempt per URL, starting after the last one that worked.
    pub async fn connect_once(&self) -> Result<Connection, crate::Error> {
        let mut last = None;
        for _ in 0..self.urls.len() {
            let index = self.next.load(Ordering::Relaxed) % self.urls.len();
            let url = &self.urls[index];
            let properties =
                ConnectionProperties::default().with_connection_name(self.name.clone().into());
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: self.tls_ca_pem.as_ref().map(|pem| pem.as_str().to_owned()),
            };
            // Every connection reads through the frame guard: a message with invalid UTF-8 in
            // its properties must not take the connection down (see `frame_guard`).
            let attempt = match url.parse::<lapin::uri::AMQPUri>() {
                Ok(uri) => crate::connection::guarded_stream::connect(uri, properties, tls).await,
                Err(e) => Err(std::io::Error::other(e).into()),
            };
            match attempt {
                Ok(conn) => {
                    tracing::info!(url = %redact(url), name = %self.name, "connected to broker");
                    return Ok(conn);
                }
                Err(e) => {
                    tracing::warn!(url = %redact(url), error = %redact(&e.to_string()), "connect failed");
                    self.next.fetch_add(1, Ordering::Relaxed);
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(e) => crate::Error::broker(e),
            None => crate::Error::Broker("no URL".into()),
        })
    }

    /// Connects, retrying with exponential backoff (100 ms up to 5 s) until it works or
    /// `give_up` resolves.
    pub async fn connect(
        &self,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Option<Connection> {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        tokio::pin!(give_up);
        loop {
            if let Ok(conn) = self.connect_once().await {
                return Some(conn);
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut give_up => return None,
            }
        }
    }
}

/// Awaits `f` for at most `limit`: for cleanup on a connection that may already be dead,
/// where a close handshake can wait forever for an answer that never comes.
pub(crate) async fn bounded<F: std::future::Future>(limit: Duration, f: F) -> Option<F::Output> {
    tokio::time::timeout(limit, f).await.ok()
}

/// The limit for one cleanup step (close, cancel, flush) on a possibly dead connection.
pub(crate) const CLEANUP: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_password() {
        let s = "a amqp://u:p@h1/%2f,amqps://v:q@h2:5671 b";
        assert_eq!(
            redact("amqp://u:p@h1,amqp://v:q@h2"),
            "amqp://u:***@h1,amqp://v:***@h2"
        );
        assert_eq!(redact(s), "a amqp://u:***@h1/%2f,amqps://v:***@h2:5671 b");
        assert_eq!(redact("amqp://h/x"), "amqp://h/x");
        assert_eq!(redact("no urls"), "no urls");
    }

    #[test]
    fn rejects_bad_urls_without_echoing_the_password() {
        let err = Connector::new("http://u:secret@h", "t")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(Connector::new(" , ", "t").is_err());
        assert!(Connector::new("amqp://a/%2f, amqp://b/%2f", "t").is_ok());
    }
}
