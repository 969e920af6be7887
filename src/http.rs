//! The small HTTP surface: `/metrics`, `/health/live`, `/health/ready`, `/jobs/{message_id}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::status::{self, RecentDeadLetters};

#[derive(Clone)]
pub(crate) struct HttpState {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub jobs: Arc<dyn JobStore>,
    pub recent: RecentDeadLetters,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Html(status::PAGE) }))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "live" }))
        .route("/health/ready", get(ready))
        .route("/jobs/{message_id}", get(job))
        .with_state(state)
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address (port 0 picks
/// a free one).
pub(crate) async fn serve(
    addr: SocketAddr,
    state: HttpState,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "http listening");
    tokio::spawn(async move {
        let result = axum::serve(listener, router(state))
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
    let body = serde_json::json!({
        "ready": state.health.is_ready(),
        "connected": state.health.is_connected(),
        "handlers": handlers,
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
