//! `POST /webhooks/stripe/{endpoint}`: check, publish, then answer.
//!
//! The order matters: nothing of the body is parsed before its signature is checked, and
//! 200 is answered only once RabbitMQ has confirmed the message.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::Utc;
use serde_json::{Value, json};
use shared::contract::EventMessage;
use shared::envelope::EventHead;
use shared::signature;

use crate::error::WebhookError;
use crate::startup::AppState;

const SIGNATURE_HEADER: &str = "stripe-signature";
/// Longest endpoint name echoed back in a 404.
const MAX_ECHOED_ENDPOINT: usize = 64;

pub async fn receive(
    State(state): State<AppState>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, WebhookError> {
    let Some(secrets) = state.endpoints.get(&endpoint) else {
        let shown: String = endpoint.chars().take(MAX_ECHOED_ENDPOINT).collect();
        return Err(WebhookError::UnknownEndpoint(shown));
    };
    let body = read_body(&state, &headers, body).await?;

    let header = headers
        .get(SIGNATURE_HEADER)
        .ok_or(WebhookError::MissingSignature)?
        .to_str()
        .map_err(|_| WebhookError::SignatureNotText)?;
    if let Err(error) = signature::verify(
        header,
        &body,
        secrets,
        state.tolerance_secs,
        Utc::now().timestamp(),
    ) {
        tracing::warn!(endpoint, %error, "refused a webhook signature");
        return Err(error.into());
    }

    // Only id and type are needed here: the head parse reads the object through without
    // building it, and accepts exactly the bodies the processor's full parse accepts.
    let envelope = EventHead::parse(&body)?;
    let message = EventMessage {
        event_id: envelope.id,
        event_type: envelope.event_type,
        endpoint,
        received_at: Utc::now(),
        attempt: 1,
        body: body.to_vec(),
    };
    let started = std::time::Instant::now();
    match state.publisher.publish(&message).await {
        Ok(()) => {
            tracing::info!(
                event_id = message.event_id,
                event_type = message.event_type,
                endpoint = message.endpoint,
                confirm_ms = started.elapsed().as_millis() as u64,
                "event accepted"
            );
            Ok(Json(json!({ "received": true })))
        }
        Err(error) => {
            tracing::error!(
                event_id = message.event_id,
                event_type = message.event_type,
                endpoint = message.endpoint,
                %error,
                "event not handed over; answering 503 so that Stripe retries"
            );
            Err(error.into())
        }
    }
}

/// Reads the whole body within the size and time limits.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, WebhookError> {
    let limit = state.max_body_bytes;
    let too_large = WebhookError::BodyTooLarge { limit };
    // Refuse early when the client announces a body that is too large.
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(too_large);
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, limit_usize)).await {
        Err(_) => Err(WebhookError::BodyTimeout(state.body_timeout)),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let is_length = std::error::Error::source(&error)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || error.to_string().contains("length limit");
            Err(if is_length {
                too_large
            } else {
                WebhookError::BodyUnreadable
            })
        }
    }
}
