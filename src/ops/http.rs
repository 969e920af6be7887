//! The small HTTP surface: `/metrics`, `/health/live`, `/health/ready`, `/jobs/{message_id}`,
//! `POST /jobs/{message_id}/cancel`, the status page.
//!
//! Access: job results and the status data name message ids, payloads and error reasons, so
//! they sit in a protected sub-router behind [`guard`] (see [`Access`]); metrics, health and
//! the page shell stay open for probes and scrapers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::status::{self, RecentDeadLetters};
use crate::stores::JobStore;

#[derive(Clone)]
pub(crate) struct HttpState {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub jobs: Arc<dyn JobStore>,
    pub recent: RecentDeadLetters,
    pub control: Arc<dyn CancelRequests>,
}

/// What `POST /jobs/{id}/cancel` asks of the app: broadcast a cancel of `id`, confirmed. A
/// trait here keeps `ops` below the cancellation machinery (no import cycle).
pub(crate) trait CancelRequests: Send + Sync {
    fn request_cancel(self: Arc<Self>, id: String) -> crate::BoxFuture<Result<(), String>>;
}

/// Who may use the protected routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `Authorization: Bearer <token>` with this token (`COTTONTAIL_API_TOKEN`).
    Token(Arc<str>),
    /// No token configured, bound to a loopback address: only local processes can connect.
    Local,
    /// No token configured, reachable from elsewhere: refused.
    Refused,
}

impl Access {
    /// The access rule for a server bound to `addr`.
    pub(crate) fn new(token: Option<&str>, addr: SocketAddr) -> Self {
        // An empty token would admit `Bearer ` alone: it counts as none.
        match token.filter(|t| !t.is_empty()) {
            Some(token) => Access::Token(token.into()),
            None if addr.ip().is_loopback() => Access::Local,
            None => Access::Refused,
        }
    }

    /// `Ok` when a request with these headers may pass, else the status to answer.
    fn check(&self, headers: &HeaderMap) -> Result<(), StatusCode> {
        match self {
            Access::Local => Ok(()),
            Access::Refused => Err(StatusCode::FORBIDDEN),
            Access::Token(token) => {
                let presented = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                    .unwrap_or_default();
                // Constant time: the comparison must not tell how much of a guess was right.
                if bool::from(presented.ct_eq(token.as_bytes())) {
                    Ok(())
                } else {
                    Err(StatusCode::UNAUTHORIZED)
                }
            }
        }
    }
}

/// The middleware of the protected sub-router.
async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    match access.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(StatusCode::UNAUTHORIZED) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({"error": "this endpoint needs Authorization: Bearer <COTTONTAIL_API_TOKEN>"})),
        )
            .into_response(),
        Err(code) => (
            code,
            Json(serde_json::json!({"error": "set COTTONTAIL_API_TOKEN to serve this endpoint on a non-loopback address"})),
        )
            .into_response(),
    }
}

/// Routes that reveal data or change state. Everything added here — `/jobs/*`, `/status.json`
/// and the operations API under `/api` — gets [`guard`] from [`router`].
fn protected() -> Router<HttpState> {
    Router::new()
        .route("/status.json", get(status_json))
        .route("/jobs/{message_id}", get(job))
        .route("/jobs/{message_id}/cancel", post(cancel))
}

pub(crate) fn router(state: HttpState, access: Access) -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Html(status::PAGE) }))
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "live" }))
        .route("/health/ready", get(ready))
        .merge(protected().route_layer(middleware::from_fn_with_state(access, guard)))
        .with_state(state)
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address (port 0 picks
/// a free one).
pub(crate) async fn serve(
    addr: SocketAddr,
    token: Option<&str>,
    state: HttpState,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let access = Access::new(token, bound);
    tracing::info!(%bound, "http listening");
    if access == Access::Refused {
        tracing::warn!(
            %bound,
            "COTTONTAIL_API_TOKEN is not set and HTTP listens beyond loopback: /jobs, /api and \
             /status.json answer 403 (metrics and health stay open)"
        );
    }
    tokio::spawn(async move {
        let result = axum::serve(listener, router(state, access))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "http server stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn status_json(State(state): State<HttpState>) -> impl IntoResponse {
    Json(status::snapshot(
        &state.metrics,
        &state.health,
        &state.recent,
    ))
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    let handlers: serde_json::Map<String, serde_json::Value> = state
        .health
        .handlers()
        .into_iter()
        .map(|(h, up)| (h, serde_json::Value::Bool(up)))
        .collect();
    // Each schedule: `null` while it runs (leading or a healthy standby), else why it cannot.
    let schedules: serde_json::Map<String, serde_json::Value> = state
        .health
        .schedules()
        .into_iter()
        .map(|(s, failure)| (s, failure.into()))
        .collect();
    let body = serde_json::json!({
        "ready": state.health.is_ready(),
        "connected": state.health.is_connected(),
        "handlers": handlers,
        "schedules": schedules,
    });
    let code = if state.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn job(State(state): State<HttpState>, Path(message_id): Path<String>) -> impl IntoResponse {
    match state.jobs.get(&message_id).await {
        Ok(Some(status)) => (StatusCode::OK, Json(serde_json::json!(status))),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "unknown job", "message_id": message_id})),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": format!("job store: {error}")})),
        ),
    }
}

/// Broadcasts the cancel (see `Client::cancel`): 202 once the broker confirmed it, 503 while
/// not connected.
async fn cancel(
    State(state): State<HttpState>,
    Path(message_id): Path<String>,
) -> impl IntoResponse {
    match state
        .control
        .clone()
        .request_cancel(message_id.clone())
        .await
    {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"message_id": message_id, "cancel": "sent"})),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"error": format!("cancel not sent: {error}"), "message_id": message_id}),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_token_admits_only_its_own_bearer_header() {
        let any: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let access = Access::new(Some("s3cret"), any);
        assert_eq!(access.check(&with_auth("Bearer s3cret")), Ok(()));
        for refused in [
            "Bearer s3cre",
            "Bearer s3cretx",
            "bearer s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert_eq!(
                access.check(&with_auth(refused)),
                Err(StatusCode::UNAUTHORIZED),
                "{refused}"
            );
        }
        assert_eq!(
            access.check(&HeaderMap::new()),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn without_a_token_only_a_loopback_bind_serves() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let access = Access::new(None, local.parse().unwrap());
            assert_eq!(access.check(&HeaderMap::new()), Ok(()), "{local}");
        }
        for wide in ["0.0.0.0:0", "[::]:0", "192.0.2.10:9090"] {
            let access = Access::new(None, wide.parse().unwrap());
            assert_eq!(
                access.check(&with_auth("Bearer anything")),
                Err(StatusCode::FORBIDDEN),
                "{wide}"
            );
        }
    }
}
