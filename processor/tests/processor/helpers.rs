use chrono::Utc;
use serde_json::{Value, json};
use shared::contract::EventMessage;
use sqlx::PgPool;
use uuid::Uuid;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");

/// The catalog the sample events refer to (see fixtures/stripe).
pub const CUSTOMER: Uuid = Uuid::from_u128(0x3f1c2a6e_8d4b_4c1e_9a57_2b6d0e4f8a10);
pub const CREATOR: Uuid = Uuid::from_u128(0x7a9e4b2c_1d3f_4e5a_8b6c_0f1e2d3c4b5a);
pub const ORGANIZATION: Uuid = Uuid::from_u128(0xc0ffee00_1234_4abc_8def_000000000001);
pub const CONTENT: Uuid = Uuid::from_u128(0x5d2e8f14_6b3a_4c9d_a1e7_93f0b4c2d6e8);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn seed_catalog(pool: &PgPool) {
    sqlx::query("INSERT INTO users (id, email) VALUES ($1, 'buyer@example.com'), ($2, 'creator@example.com')")
        .bind(CUSTOMER)
        .bind(CREATOR)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, 'Sample Org')")
        .bind(ORGANIZATION)
        .execute(pool)
        .await
        .unwrap();
    insert_content(pool, CONTENT).await;
}

pub async fn insert_content(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "INSERT INTO content (id, organization_id, creator_id, title, price_cents) VALUES ($1, $2, $3, 'Sample', 1999)",
    )
    .bind(id)
    .bind(ORGANIZATION)
    .bind(CREATOR)
    .execute(pool)
    .await
    .unwrap();
}

/// The paid-session fixture, with the given event id, payment intent and amount.
pub fn paid_session_body(event_id: &str, payment_intent: &str, amount: i64) -> Vec<u8> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/events/checkout.session.completed.json")).unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["id"] = json!(event_id);
    let session = &mut event["data"]["object"];
    session["id"] = json!(format!("cs_{payment_intent}"));
    session["payment_intent"] = json!(payment_intent);
    session["amount_total"] = json!(amount);
    session["metadata"]["amountPaidCents"] = json!(amount.to_string());
    serde_json::to_vec(&event).unwrap()
}

pub fn message(body: Vec<u8>) -> EventMessage {
    let envelope = shared::envelope::EventEnvelope::parse(&body).unwrap();
    EventMessage {
        event_id: envelope.id,
        event_type: envelope.event_type,
        endpoint: "booking".into(),
        received_at: Utc::now(),
        attempt: 1,
        body,
    }
}

pub fn edit(body: &[u8], change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(body).unwrap();
    change(&mut event);
    serde_json::to_vec(&event).unwrap()
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

pub async fn event_status(pool: &PgPool, id: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, last_error FROM stripe_events WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}
