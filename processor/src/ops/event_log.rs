//! `processor events show | replay`: the `stripe_events` log.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::config::BrokerArgs;
use shared::contract::{EventMessage, replayed};
use sqlx::FromRow;

use crate::config::DatabaseArgs;
use crate::db;
use crate::ops::{confirm_channel, connect, to_work_queue};

#[derive(Debug, Serialize, FromRow)]
struct EventRow {
    id: String,
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    event_type: String,
    endpoint: String,
    livemode: bool,
    api_version: Option<String>,
    status: String,
    attempts: i32,
    last_error: Option<String>,
    received_at: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, FromRow)]
struct PurchaseRow {
    id: uuid::Uuid,
    status: String,
    amount_paid_cents: i32,
    currency: String,
    stripe_payment_intent_id: Option<String>,
}

pub async fn show(database: &DatabaseArgs, event_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let pool = db::pool(database)?;
    let event: Option<EventRow> = sqlx::query_as(
        "SELECT id, type, endpoint, livemode, api_version, status, attempts, last_error, received_at, processed_at, updated_at
           FROM stripe_events WHERE id = $1",
    )
    .bind(event_id)
    .fetch_optional(&pool)
    .await?;
    let Some(event) = event else {
        eprintln!("no event {event_id} in stripe_events");
        return Ok(ExitCode::FAILURE);
    };
    let purchases: Vec<PurchaseRow> = sqlx::query_as(
        "SELECT id, status, amount_paid_cents, currency, stripe_payment_intent_id
           FROM purchases WHERE stripe_event_id = $1",
    )
    .bind(event_id)
    .fetch_all(&pool)
    .await?;
    if json {
        let out = serde_json::json!({ "event": event, "purchases": purchases });
        say!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("event:      {} ({})", event.id, event.event_type);
    say!(
        "endpoint:   {}{}",
        event.endpoint,
        if event.livemode { " (live mode)" } else { "" }
    );
    say!(
        "api version: {}",
        event.api_version.as_deref().unwrap_or("(not recorded)")
    );
    say!("received:   {}", event.received_at);
    say!("attempts:   {} deliveries", event.attempts);
    say!(
        "status:     {} (updated {})",
        event.status,
        event.updated_at
    );
    if let Some(at) = event.processed_at {
        say!("processed:  {at}");
    }
    if let Some(error) = &event.last_error {
        say!("last error: {error}");
    }
    for p in &purchases {
        say!(
            "purchase:   {} {} {} {} (payment intent {})",
            p.id,
            p.status,
            p.amount_paid_cents,
            p.currency,
            p.stripe_payment_intent_id.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(
    database: &DatabaseArgs,
    broker: &BrokerArgs,
    event_ids: &[String],
) -> anyhow::Result<ExitCode> {
    let pool = db::pool(database)?;
    let topology = broker.topology();
    let connection = connect(broker, "events replay").await?;
    let channel = confirm_channel(&connection).await?;
    let mut missing = 0;
    for event_id in event_ids {
        // The bytes Stripe signed. Rows from before they were kept have only the parsed
        // JSON, which the processor reads the same way.
        let row: Option<(String, String, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT type, endpoint, COALESCE(body, convert_to(payload::text, 'UTF8')), received_at
               FROM stripe_events WHERE id = $1",
        )
        .bind(event_id)
        .fetch_optional(&pool)
        .await?;
        let Some((event_type, endpoint, body, received_at)) = row else {
            eprintln!("no event {event_id} in stripe_events");
            missing += 1;
            continue;
        };
        let message = EventMessage {
            event_id: event_id.clone(),
            event_type,
            endpoint,
            received_at,
            attempt: 1,
            body,
        };
        let properties = replayed(&message.properties()?, Utc::now());
        to_work_queue(&channel, &topology, &message.body, properties).await?;
        say!("re-enqueued {event_id}");
    }
    connection.close(200, "done".into()).await?;
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
