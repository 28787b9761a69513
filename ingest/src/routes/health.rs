use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::startup::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to accept webhooks: the broker connection is up.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.publisher.is_ready() {
        Json(json!({ "status": "ready", "broker": "connected" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not_ready",
                "broker": "disconnected",
                "error": "not connected to RabbitMQ",
            })),
        )
            .into_response()
    }
}

/// Prometheus text.
pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}
