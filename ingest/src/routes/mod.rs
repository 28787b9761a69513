//! HTTP handlers: the webhook receiver, health probes and the JSON fallbacks.

mod health;
mod webhook;

pub use health::{healthz, readyz};
pub use webhook::receive;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::json_error;

/// Any path we do not serve.
pub async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such route")
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
    response.into_response()
}
