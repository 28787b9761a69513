//! Purchases: their creation with the revenue-split snapshot, and every move of the
//! lifecycle ([`crate::lifecycle`]) with the access and money adjustments that go with it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::access;
use super::adjustments::{self, Adjustment, Kind};
use super::new_purchase::{self, NewPurchase};
use super::terms::{self, Lookup};
use crate::checkout::PurchaseRequest;
use crate::error::ProcessError;
use crate::lifecycle::{self, Signal, Status};

/// What an event did to the payment's purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new purchase row, in this status.
    Created { id: Uuid, status: Status },
    /// An existing purchase moved from one status to another.
    Moved { id: Uuid, from: Status, to: Status },
    /// Amounts or dispute status changed, the status did not.
    Updated { id: Uuid },
    /// Nothing to change: a repeat, or a stale event.
    Unchanged,
}

/// The purchase of one payment, locked for the rest of the transaction.
struct Locked {
    id: Uuid,
    status: Status,
    customer_id: Uuid,
    content_id: Uuid,
    amount_paid_cents: i32,
    refunded_amount_cents: i32,
    dispute_status: Option<String>,
    dispute_updated_at: Option<DateTime<Utc>>,
}

/// The purchase of a payment, by payment intent or checkout session, locked.
///
/// Not `WHERE pi = $1 OR session = $2`: sqlx prepares statements, and PostgreSQL's generic
/// plan for that OR, made while the table is small, is a sequential scan that the connection
/// then keeps as the table grows (the drain rate fell from 2,100 to 600 events/s over 50,000
/// purchases). Each arm here has its own unique index, whatever the plan.
pub const LOCK_SQL: &str =
    "SELECT p.id, p.status, p.customer_id, p.content_id, p.amount_paid_cents,
                p.refunded_amount_cents, p.dispute_status, p.dispute_updated_at
           FROM (SELECT id FROM purchases WHERE stripe_payment_intent_id = $1
                 UNION
                 SELECT id FROM purchases WHERE stripe_checkout_session_id = $2) matching
           JOIN purchases p ON p.id = matching.id
          FOR UPDATE OF p";

/// Whether a payment is recorded at all. Two EXISTS, not one with OR: see [`LOCK_SQL`].
pub const PAYMENT_RECORDED_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM purchases WHERE stripe_payment_intent_id = $1)
             OR EXISTS (SELECT 1 FROM purchases WHERE stripe_checkout_session_id = $2)";

async fn lock(
    conn: &mut PgConnection,
    payment_intent: Option<&str>,
    session: Option<&str>,
) -> Result<Option<Locked>, ProcessError> {
    let row = sqlx::query(LOCK_SQL)
        .bind(payment_intent)
        .bind(session)
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status")?;
    Ok(Some(Locked {
        id: row.try_get("id")?,
        status: Status::parse(&status).ok_or(ProcessError::UnknownStatus(status))?,
        customer_id: row.try_get("customer_id")?,
        content_id: row.try_get("content_id")?,
        amount_paid_cents: row.try_get("amount_paid_cents")?,
        refunded_amount_cents: row.try_get("refunded_amount_cents")?,
        dispute_status: row.try_get("dispute_status")?,
        dispute_updated_at: row.try_get("dispute_updated_at")?,
    }))
}

/// Applies a checkout-session event (paid, unpaid, payment failed) in the caller's
/// transaction, following [`lifecycle::next`]. A new purchase gets the revenue split of the
/// agreements in force at `at`, when Stripe says the payment happened, so a retry days later
/// uses the terms of the moment of payment.
pub async fn apply_session(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
    signal: Signal,
    at: DateTime<Utc>,
    event_id: &str,
) -> Result<Change, ProcessError> {
    access::lock_ownership(conn, request.customer_id, request.content_id).await?;
    // Twice at most: if another transaction records this payment between our look and our
    // insert, the second round finds its row and applies this event to it.
    for _ in 0..2 {
        let existing = lock(
            conn,
            request.payment_intent_id.as_deref(),
            Some(&request.checkout_session_id),
        )
        .await?;
        if let Some(purchase) = existing {
            return transition(conn, purchase, signal, at).await;
        }
        let Some(target) = lifecycle::next(None, signal) else {
            return Ok(Change::Unchanged);
        };
        if let Some(change) = create(conn, request, target, at, event_id).await? {
            return Ok(change);
        }
    }
    Err(ProcessError::Concurrent)
}

/// Inserts the purchase. `None` when another transaction recorded the same payment first.
async fn create(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
    target: Status,
    purchased_at: DateTime<Utc>,
    event_id: &str,
) -> Result<Option<Change>, ProcessError> {
    let lookup = Lookup {
        content_id: request.content_id,
        customer_id: request.customer_id,
        at: purchased_at,
        payment_intent_id: request.payment_intent_id.clone(),
        checkout_session_id: request.checkout_session_id.clone(),
    };
    let terms = terms::load(conn, std::slice::from_ref(&lookup))
        .await?
        .pop()
        .flatten()
        .ok_or(ProcessError::UnknownContent(request.content_id))?;
    let mut row = NewPurchase::build(request, target, &terms, purchased_at, event_id)?;

    // Any unique index can refuse the row; the access comes with it (see
    // `new_purchase::insert`).
    if let Some(id) = new_purchase::insert(conn, std::slice::from_ref(&row))
        .await?
        .pop()
    {
        return Ok(Some(Change::Created { id, status: target }));
    }
    if target == Status::Completed && !payment_recorded(conn, request).await? {
        row.status = Status::RequiresRefund;
        if let Some(id) = new_purchase::insert(conn, std::slice::from_ref(&row))
            .await?
            .pop()
        {
            return Ok(Some(Change::Created {
                id,
                status: Status::RequiresRefund,
            }));
        }
    }
    Ok(None)
}

/// Moves an existing purchase as the lifecycle table says, or leaves it.
async fn transition(
    conn: &mut PgConnection,
    purchase: Locked,
    signal: Signal,
    at: DateTime<Utc>,
) -> Result<Change, ProcessError> {
    let Some(mut to) = lifecycle::next(Some(purchase.status), signal) else {
        return Ok(Change::Unchanged);
    };
    if to == Status::Completed
        && access::owned_elsewhere(conn, purchase.customer_id, purchase.content_id, purchase.id)
            .await?
    {
        to = Status::RequiresRefund;
    }
    move_to(conn, &purchase, to, at).await
}

/// Sets a new status and the access that goes with it. When the purchase that gave access
/// leaves `completed`, a paid twin takes over (lifecycle note ⁵); the caller holds the
/// ownership lock.
async fn move_to(
    conn: &mut PgConnection,
    purchase: &Locked,
    to: Status,
    at: DateTime<Utc>,
) -> Result<Change, ProcessError> {
    set_status(conn, purchase.id, to, at).await?;
    let (customer, content) = (purchase.customer_id, purchase.content_id);
    let twin = if purchase.status == Status::Completed && to != Status::Completed {
        access::twin_for(conn, customer, content, purchase.id).await?
    } else {
        None
    };
    match twin {
        Some(twin) => {
            set_status(conn, twin, Status::Completed, at).await?;
            access::transfer(conn, customer, content, twin).await?;
            tracing::info!(
                purchase_id = %purchase.id,
                twin_id = %twin,
                customer_id = %customer,
                content_id = %content,
                "the purchase giving access left `completed`; its paid twin takes over"
            );
        }
        None => {
            let grants = lifecycle::grants_access(to);
            access::sync(conn, purchase.id, customer, content, grants).await?;
        }
    }
    Ok(Change::Moved {
        id: purchase.id,
        from: purchase.status,
        to,
    })
}

async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    to: Status,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE purchases
            SET status = $2,
                refunded_at = CASE WHEN $2 = 'refunded' THEN COALESCE(refunded_at, $3) ELSE refunded_at END,
                charged_back_at = CASE WHEN $2 = 'charged_back' THEN COALESCE(charged_back_at, $3) ELSE charged_back_at END,
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(to.as_str())
    .bind(at)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The purchase a refund or dispute is about, locked after its ownership lock. Its absence
/// is transient: events come in any order, and the purchase may still arrive.
async fn lock_required(
    conn: &mut PgConnection,
    payment_intent: &str,
    event: &'static str,
) -> Result<Locked, ProcessError> {
    let not_yet = || ProcessError::PurchaseNotYet {
        payment_intent: payment_intent.to_owned(),
        event,
    };
    // Customer and content never change, so they can be read before any lock.
    let owner: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT customer_id, content_id FROM purchases WHERE stripe_payment_intent_id = $1",
    )
    .bind(payment_intent)
    .fetch_optional(&mut *conn)
    .await?;
    let (customer, content) = owner.ok_or_else(not_yet)?;
    access::lock_ownership(conn, customer, content).await?;
    lock(conn, Some(payment_intent), None)
        .await?
        .ok_or_else(not_yet)
}

/// Applies a `charge.refunded`: the refunded amount (cumulative at Stripe, so the largest
/// seen wins, and only what it adds is recorded), and for a full refund the move to
/// `refunded`, which takes access away.
pub async fn apply_refund(
    conn: &mut PgConnection,
    payment_intent: &str,
    amount_refunded: i64,
    full: bool,
    at: DateTime<Utc>,
    event_id: &str,
) -> Result<Change, ProcessError> {
    let purchase = lock_required(conn, payment_intent, "refund").await?;
    let paid = i64::from(purchase.amount_paid_cents);
    // A full refund returns everything, whatever amount the event spells out.
    let amount = if full {
        paid
    } else {
        amount_refunded.clamp(0, paid)
    };
    let amount = i32::try_from(amount).unwrap_or(purchase.amount_paid_cents);
    let grows = amount > purchase.refunded_amount_cents;
    let to = if full {
        lifecycle::next(Some(purchase.status), Signal::FullRefund)
    } else {
        None
    };
    if !grows && to.is_none() {
        return Ok(Change::Unchanged);
    }
    if grows {
        let adjustment = Adjustment {
            purchase_id: purchase.id,
            kind: Kind::Refund,
            amount_cents: amount - purchase.refunded_amount_cents,
            stripe_event_id: event_id,
            occurred_at: at,
        };
        adjustments::record_refund(conn, adjustment, amount).await?;
    }
    let Some(to) = to else {
        return Ok(Change::Updated { id: purchase.id });
    };
    move_to(conn, &purchase, to, at).await
}

/// Applies a `charge.dispute.*`: records Stripe's dispute status (closed statuses are final;
/// among open ones the latest event wins). A lost dispute is a chargeback: its disputed
/// amount is recorded once, and the purchase moves to `charged_back`.
pub async fn apply_dispute(
    conn: &mut PgConnection,
    payment_intent: &str,
    dispute_status: &str,
    disputed_amount: Option<i64>,
    at: DateTime<Utc>,
    event_id: &str,
) -> Result<Change, ProcessError> {
    let purchase = lock_required(conn, payment_intent, "dispute").await?;
    let stored = purchase
        .dispute_status
        .as_deref()
        .zip(purchase.dispute_updated_at);
    if purchase.dispute_status.as_deref() == Some(dispute_status)
        || !lifecycle::dispute_replaces(stored, dispute_status, at)
    {
        return Ok(Change::Unchanged);
    }
    sqlx::query("UPDATE purchases SET dispute_status = $2, dispute_updated_at = $3, updated_at = now() WHERE id = $1")
        .bind(purchase.id)
        .bind(dispute_status)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    if dispute_status != lifecycle::DISPUTE_LOST {
        return Ok(Change::Updated { id: purchase.id });
    }
    let paid = i64::from(purchase.amount_paid_cents);
    let amount = disputed_amount.unwrap_or(paid).clamp(0, paid);
    let adjustment = Adjustment {
        purchase_id: purchase.id,
        kind: Kind::Chargeback,
        amount_cents: i32::try_from(amount).unwrap_or(purchase.amount_paid_cents),
        stripe_event_id: event_id,
        occurred_at: at,
    };
    adjustments::record_chargeback(conn, adjustment).await?;
    match lifecycle::next(Some(purchase.status), Signal::DisputeLost) {
        Some(to) => move_to(conn, &purchase, to, at).await,
        None => Ok(Change::Updated { id: purchase.id }),
    }
}

async fn payment_recorded(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(PAYMENT_RECORDED_SQL)
        .bind(&request.payment_intent_id)
        .bind(&request.checkout_session_id)
        .fetch_one(conn)
        .await
}
