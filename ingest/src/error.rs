//! Every error ingest answers, with its status and a JSON body `{"error": "..."}` that says
//! what was wrong and never contains a secret.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shared::envelope::EnvelopeError;
use shared::signature::SignatureError;

use crate::publisher::PublishError;
use crate::rate_limit::Refused;

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_UNAVAILABLE_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("unknown webhook endpoint `{0}`")]
    UnknownEndpoint(String),
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body was not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("request body could not be read")]
    BodyUnreadable,
    #[error("missing Stripe-Signature header")]
    MissingSignature,
    #[error("Stripe-Signature header is not valid text")]
    SignatureNotText,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("event could not be handed to the queue, retry later: {0}")]
    Publish(#[from] PublishError),
}

impl WebhookError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownEndpoint(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyUnreadable
            | Self::MissingSignature
            | Self::SignatureNotText
            | Self::Envelope(_) => StatusCode::BAD_REQUEST,
            Self::Signature(e) if e.is_malformed() => StatusCode::BAD_REQUEST,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the request was refused before a valid signature was seen, so that it counts
    /// against the sender's rate limit. A validly signed request never does, even when its
    /// body turns out unusable or the broker is down.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::UnknownEndpoint(_)
            | Self::BodyTooLarge { .. }
            | Self::BodyTimeout(_)
            | Self::BodyUnreadable
            | Self::MissingSignature
            | Self::SignatureNotText
            | Self::Signature(_) => true,
            Self::Envelope(_) | Self::Publish(_) => false,
        }
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = json_error(status, &self.to_string());
        if self.is_refusal() {
            response.extensions_mut().insert(Refused);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(RETRY_AFTER_UNAVAILABLE_SECS),
            );
        }
        response
    }
}

/// The one shape of every error body.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
