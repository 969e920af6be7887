//! Runtime configuration, from the environment (the demo service's contract) or by hand.

use std::net::SocketAddr;
use std::time::Duration;

use crate::connection::DEFAULT_AMQP_URL;
use crate::Error;

/// Where to connect, where to serve HTTP, how long to drain.
#[derive(Clone)]
pub struct Config {
    /// One AMQP URL or several comma-separated (cluster failover).
    pub amqp_url: String,
    /// `/metrics`, `/health/*`, `/jobs/*`; `None` disables HTTP.
    pub http_addr: Option<SocketAddr>,
    /// How long in-flight work may take to finish after a shutdown request.
    pub shutdown_timeout: Duration,
    /// The connection name shown in the management UI.
    pub connection_name: String,
    /// PEM file of a private CA to trust for `amqps://` (`AMQP_TLS_CA_FILE`).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Bearer token required by `/jobs/*`, `/api/*` and `/status.json`
    /// (`COTTONTAIL_API_TOKEN`). Without one they are served on a loopback address only.
    pub api_token: Option<String>,
    /// The broker's `consumer_timeout`: how long it lets a consumer hold a delivery before it
    /// closes the channel (`COTTONTAIL_CONSUMER_TIMEOUT`, seconds; `0` = the broker has none).
    /// Default 30 minutes, RabbitMQ's default. A handler whose run may last longer is refused
    /// at start (see [`Queue::timeout`](crate::Queue::timeout)).
    pub consumer_timeout: Option<Duration>,
}

/// RabbitMQ's default `consumer_timeout`.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Config {
    /// Connects to `amqp_url`, no HTTP, 30 s shutdown timeout.
    pub fn new(amqp_url: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            http_addr: None,
            shutdown_timeout: Duration::from_secs(30),
            connection_name: default_name(),
            tls_ca_file: None,
            api_token: None,
            consumer_timeout: Some(DEFAULT_CONSUMER_TIMEOUT),
        }
    }

    /// Reads `AMQP_URL`, `COTTONTAIL_HTTP_ADDR` (default `127.0.0.1:9090`; empty disables),
    /// `COTTONTAIL_SHUTDOWN_TIMEOUT` (seconds, default 30), `AMQP_TLS_CA_FILE`,
    /// `COTTONTAIL_CONNECTION_NAME`, `COTTONTAIL_API_TOKEN` (empty = unset) and
    /// `COTTONTAIL_CONSUMER_TIMEOUT` (seconds, default 1800; `0` = the broker has none).
    pub fn from_env() -> Result<Self, Error> {
        let mut config =
            Self::new(std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned()));
        let http =
            std::env::var("COTTONTAIL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:9090".into());
        config.http_addr = if http.trim().is_empty() {
            None
        } else {
            Some(http.trim().parse().map_err(|e| {
                Error::Config(format!(
                    "COTTONTAIL_HTTP_ADDR '{http}' is not host:port: {e}"
                ))
            })?)
        };
        if let Ok(secs) = std::env::var("COTTONTAIL_SHUTDOWN_TIMEOUT") {
            let secs: f64 = secs
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "COTTONTAIL_SHUTDOWN_TIMEOUT '{secs}' must be a number of seconds"
                    ))
                })?;
            config.shutdown_timeout = Duration::from_secs_f64(secs);
        }
        if let Ok(path) = std::env::var("AMQP_TLS_CA_FILE") {
            if !path.trim().is_empty() {
                config.tls_ca_file = Some(path.trim().into());
            }
        }
        if let Ok(name) = std::env::var("COTTONTAIL_CONNECTION_NAME") {
            config.connection_name = name;
        }
        if let Ok(secs) = std::env::var("COTTONTAIL_CONSUMER_TIMEOUT") {
            let secs: f64 = secs
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "COTTONTAIL_CONSUMER_TIMEOUT '{secs}' must be a number of seconds (0 = none)"
                    ))
                })?;
            config.consumer_timeout = if secs > 0.0 {
                Some(Duration::from_secs_f64(secs))
            } else {
                None
            };
        }
        if let Ok(token) = std::env::var("COTTONTAIL_API_TOKEN") {
            if !token.trim().is_empty() {
                config.api_token = Some(token.trim().to_owned());
            }
        }
        Ok(config)
    }

    /// Sets the HTTP address.
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.http_addr = Some(addr);
        self
    }

    /// Sets the shutdown timeout.
    pub fn shutdown_timeout(mut self, limit: Duration) -> Self {
        self.shutdown_timeout = limit;
        self
    }

    /// Trusts the CA in this PEM file for `amqps://`.
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Builds the [`Connector`](crate::connection::Connector) this configuration describes.
    pub fn connector(&self) -> Result<crate::connection::Connector, Error> {
        let connector =
            crate::connection::Connector::new(&self.amqp_url, self.connection_name.clone())?;
        match &self.tls_ca_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("cannot read TLS CA file {}: {e}", path.display()))
                })?;
                Ok(connector.with_tls_ca(pem))
            }
            None => Ok(connector),
        }
    }

    /// Requires `Authorization: Bearer <token>` on `/jobs/*`, `/api/*` and `/status.json`.
    pub fn api_token(mut self, token: impl Into<String>) -> Self {
        self.api_token = Some(token.into());
        self
    }

    /// The broker's `consumer_timeout` (`None`: the broker has none); see
    /// [`Config::consumer_timeout`](Self#structfield.consumer_timeout).
    pub fn consumer_timeout(mut self, limit: Option<Duration>) -> Self {
        self.consumer_timeout = limit;
        self
    }

    /// Sets the connection name (tests use it to close only their own connection).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }
}

impl std::fmt::Debug for Config {
    // By hand: the URLs hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("amqp_url", &crate::connection::redact(&self.amqp_url))
            .field("http_addr", &self.http_addr)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("connection_name", &self.connection_name)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("consumer_timeout", &self.consumer_timeout)
            .finish()
    }
}

fn default_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("cottontail@{host}:{}", std::process::id())
}
