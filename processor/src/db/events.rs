//! The `stripe_events` log: one row per Stripe event id, whatever happened to it.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use shared::contract::EventMessage;

/// Event statuses, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    Received,
    Processed,
    Ignored,
    Failed,
    Retrying,
    Dead,
    Purged,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Processed => "processed",
            Self::Ignored => "ignored",
            Self::Failed => "failed",
            Self::Retrying => "retrying",
            Self::Dead => "dead",
            Self::Purged => "purged",
        }
    }

    /// Whether an event in this status has had its whole effect already.
    pub fn is_done(status: &str) -> bool {
        status == Self::Processed.as_str() || status == Self::Ignored.as_str()
    }
}

/// The body as JSON for the `payload` column; a body that is not JSON (it cannot come from
/// ingest, but a hand-published message could be anything) is kept as a JSON string.
pub fn payload_json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// Records a delivery of the event and locks its row until the transaction ends. Returns
/// the status it had before: a second processor handling the same event waits here for
/// the first one's commit, then sees `processed`.
pub async fn claim(
    conn: &mut PgConnection,
    message: &EventMessage,
    livemode: bool,
    payload: &Value,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, received_at)
         VALUES ($1, $2, $3, $4, $5, 'received', 1, $6)
         ON CONFLICT (id) DO UPDATE
            SET attempts = stripe_events.attempts + 1, updated_at = now()
         RETURNING status",
    )
    .bind(&message.event_id)
    .bind(&message.event_type)
    .bind(&message.endpoint)
    .bind(livemode)
    .bind(payload)
    .bind(message.received_at)
    .fetch_one(conn)
    .await
}

/// Marks the event done, in the transaction that did its work.
pub async fn finish(
    conn: &mut PgConnection,
    event_id: &str,
    status: EventStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE stripe_events
            SET status = $2, last_error = NULL, processed_at = now(), updated_at = now()
          WHERE id = $1",
    )
    .bind(event_id)
    .bind(status.as_str())
    .execute(conn)
    .await
    .map(|_| ())
}

/// The status of an event, if it is in the log.
pub async fn status(pool: &PgPool, event_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM stripe_events WHERE id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await
}

/// Records a failed attempt outside the (rolled back) processing transaction, and counts it:
/// the claim's own `attempts + 1` was rolled back with the rest. Never moves an event that
/// is already done back to a failure status.
pub async fn record_failure(
    pool: &PgPool,
    message: &EventMessage,
    status: EventStatus,
    error: &str,
) -> Result<(), sqlx::Error> {
    const QUERY: &str =
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, last_error, received_at)
         VALUES ($1, $2, $3, $8, $5, $4, 1, $6, $7)
         ON CONFLICT (id) DO UPDATE
            SET status = EXCLUDED.status, last_error = EXCLUDED.last_error,
                attempts = stripe_events.attempts + 1, updated_at = now()
          WHERE stripe_events.status NOT IN ('processed', 'ignored')";
    let payload = payload_json(&message.body);
    let livemode = payload
        .get("livemode")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    sqlx::query(QUERY)
        .bind(&message.event_id)
        .bind(&message.event_type)
        .bind(&message.endpoint)
        .bind(status.as_str())
        .bind(&payload)
        .bind(error)
        .bind(message.received_at)
        .bind(livemode)
        .execute(pool)
        .await
        .map(|_| ())
}
