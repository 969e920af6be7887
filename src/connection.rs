//! Connecting to the broker: several URLs tried in turn (cluster failover), a connection
//! name operators can find in the management UI, and passwords kept out of every message.

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
            let attempt = match &self.tls_ca_pem {
                Some(pem) => match lapin::runtime::default_runtime() {
                    Ok(runtime) => {
                        let tls = lapin::tcp::OwnedTLSConfig {
                            identity: None,
                            cert_chain: Some(pem.as_str().to_owned()),
                        };
                        Connection::connect_with_config(url, properties, tls, runtime).await
                    }
                    Err(e) => Err(e),
                },
                None => Connection::connect(url, properties).await,
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

/// Replaces the password of every `scheme://user:password@` in `text` with `***`.
///
/// ```
/// assert_eq!(
///     cottontail::redact("amqp://guest:secret@host:5672/%2f"),
///     "amqp://guest:***@host:5672/%2f"
/// );
/// ```
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The URL runs to the next whitespace or the next URL of a list (`…,amqps://…`).
        // Quotes, commas and slashes may be part of an unencoded password, so the userinfo
        // ends at the URL's *last* `@` (over-redacting a path or query that holds an `@`).
        let mut end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        if let Some(next) = tail[..end].find("://") {
            end = tail[..next]
                .trim_end_matches(|c: char| c.is_ascii_alphanumeric() || "+-.".contains(c))
                .len();
        }
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => {
                let userinfo = &url[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
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
