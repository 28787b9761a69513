//! HTTP handlers: the webhook receiver, health probes and the JSON fallbacks.

mod health;
mod webhook;

pub use health::{healthz, metrics, readyz};
pub use webhook::receive;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::json_error;
use crate::rate_limit::Refused;

/// Counts webhook requests by endpoint and status (`ingest_requests_total`). Unknown
/// endpoints share one label, so that random paths cannot grow the metric without bound.
pub async fn count_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = request
        .uri()
        .path()
        .strip_prefix("/webhooks/stripe/")
        .and_then(|name| crate::config::ENDPOINTS.into_iter().find(|e| *e == name))
        .unwrap_or("unknown");
    let response = next.run(request).await;
    metrics::counter!(
        "ingest_requests_total",
        "endpoint" => endpoint,
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    response
}

/// Any path we do not serve. Counts against the sender's rate limit, like any request that
/// names no endpoint.
pub async fn not_found() -> Response {
    let mut response = json_error(StatusCode::NOT_FOUND, "no such route");
    response.extensions_mut().insert(Refused);
    response
}

/// Any method other than POST on the webhook route.
pub async fn method_not_allowed() -> Response {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: webhooks are POSTed",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response.extensions_mut().insert(Refused);
    response.into_response()
}
