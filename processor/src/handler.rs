//! What each event does to the database, in one transaction per event.
//!
//! The transaction first claims the event's row in `stripe_events` (which serialises
//! concurrent deliveries of one event), skips events already done, applies the effect, and
//! marks the event done. Nothing is acknowledged to RabbitMQ before it commits.

use chrono::{DateTime, TimeZone, Utc};
use shared::contract::EventMessage;
use shared::envelope::EventEnvelope;
use sqlx::PgPool;
use uuid::Uuid;

use crate::checkout::{CheckoutSession, PurchaseRequest};
use crate::db::events::{self, EventStatus};
use crate::db::purchases::{self, Completion};
use crate::error::ProcessError;

pub const CHECKOUT_COMPLETED: &str = "checkout.session.completed";

/// What handling an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new completed purchase with its access grant.
    Purchased(Uuid),
    /// A second payment for content the customer owns: stored for a refund.
    RequiresRefund(Uuid),
    /// The event, or another event for the same payment, was handled before.
    Duplicate,
    /// Recorded in the event log; nothing else to do.
    Ignored(&'static str),
}

impl Outcome {
    /// Short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Purchased(_) => "processed",
            Self::RequiresRefund(_) => "requires_refund",
            Self::Duplicate => "duplicate",
            Self::Ignored(_) => "ignored",
        }
    }

    fn event_status(&self) -> EventStatus {
        match self {
            Self::Ignored(_) => EventStatus::Ignored,
            _ => EventStatus::Processed,
        }
    }
}

/// The effect an event should have, decided from the payload alone.
enum Plan {
    CompletePurchase {
        request: PurchaseRequest,
        at: DateTime<Utc>,
    },
    Ignore(&'static str),
}

fn plan(envelope: &EventEnvelope) -> Result<Plan, ProcessError> {
    match envelope.event_type.as_str() {
        CHECKOUT_COMPLETED => {
            let object = envelope.object().ok_or_else(|| ProcessError::NoObject {
                event_id: envelope.id.clone(),
            })?;
            let session =
                CheckoutSession::from_object(object).map_err(ProcessError::NotASession)?;
            if !session.is_paid() {
                return Ok(Plan::Ignore("checkout session is not paid"));
            }
            let request = PurchaseRequest::from_session(&session)?;
            let at = envelope
                .created
                .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
                .unwrap_or_else(Utc::now);
            Ok(Plan::CompletePurchase { request, at })
        }
        _ => Ok(Plan::Ignore("event type is not handled")),
    }
}

/// Handles one event. Safe to call any number of times for the same event, also
/// concurrently: the effect happens once.
pub async fn handle(pool: &PgPool, message: &EventMessage) -> Result<Outcome, ProcessError> {
    let envelope = EventEnvelope::parse(&message.body)?;
    if envelope.id != message.event_id {
        return Err(ProcessError::IdMismatch {
            message_id: message.event_id.clone(),
            body_id: envelope.id,
        });
    }
    let plan = plan(&envelope)?;
    let payload = events::payload_json(&message.body);

    let mut tx = pool.begin().await?;
    let prior = events::claim(&mut tx, message, envelope.livemode, &payload).await?;
    if EventStatus::is_done(&prior) {
        tx.commit().await?;
        return Ok(Outcome::Duplicate);
    }
    let outcome = match plan {
        Plan::Ignore(reason) => Outcome::Ignored(reason),
        Plan::CompletePurchase { request, at } => {
            match purchases::complete(&mut tx, &request, at, &message.event_id).await? {
                Completion::Completed(id) => Outcome::Purchased(id),
                Completion::RequiresRefund(id) => {
                    tracing::warn!(
                        event_id = message.event_id,
                        purchase_id = %id,
                        customer_id = %request.customer_id,
                        content_id = %request.content_id,
                        payment_intent = request.payment_intent_id,
                        "customer paid again for content they own; purchase stored as requires_refund"
                    );
                    Outcome::RequiresRefund(id)
                }
                Completion::AlreadyRecorded => Outcome::Duplicate,
            }
        }
    };
    events::finish(&mut tx, &message.event_id, outcome.event_status()).await?;
    tx.commit().await?;
    Ok(outcome)
}
