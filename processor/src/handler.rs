//! What each event does to the database, in one transaction per event.
//!
//! The transaction first claims the event's row in `stripe_events` (which serialises
//! concurrent deliveries of one event), skips events already done, applies the effect, and
//! marks the event done. Nothing is acknowledged to RabbitMQ before it commits. The rules
//! that make any order of events converge are in [`crate::lifecycle`].

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value;
use shared::config::EndpointModes;
use shared::contract::EventMessage;
use shared::envelope::EventEnvelope;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::checkout::{CheckoutSession, PurchaseRequest};
use crate::db::events::{self, EventStatus};
use crate::db::purchases::{self, Change};
use crate::error::ProcessError;
use crate::lifecycle::{Signal, Status};

pub const CHECKOUT_COMPLETED: &str = "checkout.session.completed";
pub const ASYNC_SUCCEEDED: &str = "checkout.session.async_payment_succeeded";
pub const ASYNC_FAILED: &str = "checkout.session.async_payment_failed";
pub const CHECKOUT_EXPIRED: &str = "checkout.session.expired";
pub const CHARGE_REFUNDED: &str = "charge.refunded";
pub const DISPUTE_EVENTS: [&str; 3] = [
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
];

/// What handling an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new completed purchase with its access grant.
    Purchased(Uuid),
    /// A second payment for content the customer owns: stored for a refund.
    RequiresRefund(Uuid),
    /// A purchase was created in, or moved to, another status, or its refund or dispute
    /// changed.
    Updated(Uuid),
    /// Nothing changed: the event, or another one for the same payment, was handled before,
    /// or it is stale (a late event the purchase has moved past).
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
            Self::Updated(_) => "updated",
            Self::Duplicate => "duplicate",
            Self::Ignored(_) => "ignored",
        }
    }

    pub(crate) fn event_status(&self) -> EventStatus {
        match self {
            Self::Ignored(_) => EventStatus::Ignored,
            _ => EventStatus::Processed,
        }
    }

    pub(crate) fn of(change: Change) -> Self {
        match change {
            Change::Created {
                id,
                status: Status::Completed,
            } => Self::Purchased(id),
            Change::Created {
                id,
                status: Status::RequiresRefund,
            }
            | Change::Moved {
                id,
                to: Status::RequiresRefund,
                ..
            } => Self::RequiresRefund(id),
            Change::Created { id, .. } | Change::Moved { id, .. } | Change::Updated { id } => {
                Self::Updated(id)
            }
            Change::Unchanged => Self::Duplicate,
        }
    }
}

/// The effect an event should have, decided from the payload alone.
pub(crate) enum Plan {
    Session {
        request: PurchaseRequest,
        signal: Signal,
    },
    Refund {
        payment_intent: String,
        amount_refunded: i64,
        full: bool,
    },
    Dispute {
        payment_intent: String,
        status: String,
        amount: Option<i64>,
    },
    Ignore(&'static str),
}

/// An id, or the expanded object carrying it.
fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(id) => Some(id.clone()),
        Value::Object(object) => object.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Charge {
    #[serde(default)]
    payment_intent: Option<Value>,
    #[serde(default)]
    amount_refunded: i64,
    #[serde(default)]
    refunded: bool,
}

#[derive(Deserialize)]
struct Dispute {
    #[serde(default)]
    payment_intent: Option<Value>,
    status: String,
    /// The disputed amount, in cents: what a lost dispute takes back.
    #[serde(default)]
    amount: Option<i64>,
}

fn object(envelope: &EventEnvelope) -> Result<&Value, ProcessError> {
    envelope.object().ok_or_else(|| ProcessError::NoObject {
        event_id: envelope.id.clone(),
    })
}

fn parse<T: serde::de::DeserializeOwned>(
    envelope: &EventEnvelope,
    kind: &'static str,
) -> Result<T, ProcessError> {
    T::deserialize(object(envelope)?).map_err(|source| ProcessError::BadObject { kind, source })
}

fn plan(envelope: &EventEnvelope) -> Result<Plan, ProcessError> {
    let event_type = envelope.event_type.as_str();
    match event_type {
        CHECKOUT_COMPLETED | ASYNC_SUCCEEDED | ASYNC_FAILED => {
            let session = CheckoutSession::from_object(object(envelope)?)
                .map_err(ProcessError::NotASession)?;
            if session.mode.as_deref().is_some_and(|m| m != "payment") {
                return Ok(Plan::Ignore("checkout session is not a one-time payment"));
            }
            let signal = match event_type {
                ASYNC_SUCCEEDED => Signal::Paid,
                ASYNC_FAILED => Signal::PaymentFailed,
                _ if session.is_paid() || session.is_free() => Signal::Paid,
                _ if session.payment_status.as_deref() == Some("unpaid") => Signal::Unpaid,
                _ => return Ok(Plan::Ignore("checkout session needs no payment")),
            };
            let request = PurchaseRequest::from_session(&session)?;
            Ok(Plan::Session { request, signal })
        }
        CHARGE_REFUNDED => {
            let charge: Charge = parse(envelope, "charge")?;
            let payment_intent = id_of(charge.payment_intent.as_ref())
                .ok_or(ProcessError::NoPaymentIntent("charge"))?;
            Ok(Plan::Refund {
                payment_intent,
                amount_refunded: charge.amount_refunded,
                full: charge.refunded,
            })
        }
        _ if DISPUTE_EVENTS.contains(&event_type) => {
            let dispute: Dispute = parse(envelope, "dispute")?;
            let payment_intent = id_of(dispute.payment_intent.as_ref())
                .ok_or(ProcessError::NoPaymentIntent("dispute"))?;
            Ok(Plan::Dispute {
                payment_intent,
                status: dispute.status,
                amount: dispute.amount,
            })
        }
        CHECKOUT_EXPIRED => Ok(Plan::Ignore("checkout session expired unpaid")),
        // The checkout session events carry the purchase metadata and the same payment
        // outcome; the payment intent events would only repeat them without the metadata.
        "payment_intent.succeeded" | "payment_intent.payment_failed" => Ok(Plan::Ignore(
            "payment intent events repeat the checkout session events",
        )),
        _ => Ok(Plan::Ignore("event type is not handled")),
    }
}

/// When Stripe created the event: the time the purchase, refund or dispute happened.
fn created_at(envelope: &EventEnvelope) -> DateTime<Utc> {
    envelope
        .created
        .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
        .unwrap_or_else(Utc::now)
}

/// Handles one event in its own transaction. Safe to call any number of times for the same
/// event, also concurrently: the effect happens once.
pub async fn handle(
    pool: &PgPool,
    message: &EventMessage,
    modes: &EndpointModes,
) -> Result<Outcome, ProcessError> {
    let mut tx = pool.begin().await?;
    let outcome = handle_in(&mut tx, message, modes).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// What an event is, read from its body alone, before the database is touched.
pub(crate) struct Prepared {
    pub plan: Plan,
    /// When Stripe created the event.
    pub at: DateTime<Utc>,
    pub livemode: bool,
    pub api_version: Option<String>,
    /// The body as the JSON text of the queryable `payload` column.
    pub payload: String,
}

/// Parses the body and decides the event's effect. An event of the other mode than its
/// endpoint's (`modes`) is to be ignored, with the mismatch as its note.
pub(crate) fn prepare(
    message: &EventMessage,
    modes: &EndpointModes,
) -> Result<Prepared, ProcessError> {
    let envelope = EventEnvelope::parse(&message.body)?;
    if envelope.id != message.event_id {
        return Err(ProcessError::IdMismatch {
            message_id: message.event_id.clone(),
            body_id: envelope.id,
        });
    }
    let plan = match modes.mismatch(&message.endpoint, envelope.livemode) {
        Some(mismatch) => Plan::Ignore(mismatch),
        None => plan(&envelope)?,
    };
    Ok(Prepared {
        plan,
        at: created_at(&envelope),
        livemode: envelope.livemode,
        api_version: envelope.api_version,
        payload: events::payload_text(&message.body).into_owned(),
    })
}

/// Handles one event inside the caller's transaction (the worker runs several events in one
/// transaction, each under a savepoint). Nothing is final until the caller commits.
///
/// An event of the other mode than its endpoint's (`modes`) is recorded as ignored, with
/// the mismatch as its note, and changes nothing else.
pub async fn handle_in(
    conn: &mut PgConnection,
    message: &EventMessage,
    modes: &EndpointModes,
) -> Result<Outcome, ProcessError> {
    let Prepared {
        plan,
        at,
        livemode,
        api_version,
        payload,
    } = prepare(message, modes)?;
    let received = events::Received {
        livemode,
        api_version: api_version.as_deref(),
        payload: &payload,
    };

    let prior = events::claim(conn, message, received).await?;
    if EventStatus::is_done(&prior) {
        return Ok(Outcome::Duplicate);
    }
    let outcome = match &plan {
        Plan::Ignore(reason) => Outcome::Ignored(reason),
        Plan::Session { request, signal } => {
            let change =
                purchases::apply_session(conn, request, *signal, at, &message.event_id).await?;
            let outcome = Outcome::of(change);
            if let Outcome::RequiresRefund(id) = outcome {
                tracing::warn!(
                    purchase_id = %id,
                    customer_id = %request.customer_id,
                    content_id = %request.content_id,
                    payment_intent = request.payment_intent_id.as_deref().unwrap_or("-"),
                    "customer paid again for content they own; purchase stored as requires_refund"
                );
            }
            outcome
        }
        Plan::Refund {
            payment_intent,
            amount_refunded,
            full,
        } => {
            let change = purchases::apply_refund(
                conn,
                payment_intent,
                *amount_refunded,
                *full,
                at,
                &message.event_id,
            )
            .await?;
            Outcome::of(change)
        }
        Plan::Dispute {
            payment_intent,
            status,
            amount,
        } => {
            let change = purchases::apply_dispute(
                conn,
                payment_intent,
                status,
                *amount,
                at,
                &message.event_id,
            )
            .await?;
            Outcome::of(change)
        }
    };
    let note = match outcome {
        Outcome::Ignored(reason) => Some(reason),
        _ => None,
    };
    events::finish(conn, &message.event_id, outcome.event_status(), note).await?;
    Ok(outcome)
}
