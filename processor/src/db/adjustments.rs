//! `purchase_adjustments`: the append-only history of money leaving a purchase (refunds and
//! chargebacks), from which the `purchase_revenue` view computes net revenue.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Kinds of adjustment, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Refund,
    Chargeback,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refund => "refund",
            Self::Chargeback => "chargeback",
        }
    }
}

/// One movement of money, caused by one Stripe event.
#[derive(Debug, Clone, Copy)]
pub struct Adjustment<'a> {
    pub purchase_id: Uuid,
    pub kind: Kind,
    pub amount_cents: i32,
    pub stripe_event_id: &'a str,
    pub occurred_at: DateTime<Utc>,
}

/// Records a refund of `adjustment.amount_cents` more and raises the purchase's cumulative
/// refunded amount to `refunded_total`, in one statement. The caller holds the purchase's
/// lock and has checked that the total grows.
pub async fn record_refund(
    conn: &mut PgConnection,
    adjustment: Adjustment<'_>,
    refunded_total: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH adjustment AS (
            INSERT INTO purchase_adjustments (id, purchase_id, kind, amount_cents, stripe_event_id, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6))
         UPDATE purchases SET refunded_amount_cents = $7, updated_at = now() WHERE id = $2",
    )
    .bind(Uuid::new_v4())
    .bind(adjustment.purchase_id)
    .bind(adjustment.kind.as_str())
    .bind(adjustment.amount_cents)
    .bind(adjustment.stripe_event_id)
    .bind(adjustment.occurred_at)
    .bind(refunded_total)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Records a chargeback. A purchase is charged back at most once (a charge has one
/// dispute): a second record is a no-op.
pub async fn record_chargeback(
    conn: &mut PgConnection,
    adjustment: Adjustment<'_>,
) -> Result<(), sqlx::Error> {
    if adjustment.amount_cents <= 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO purchase_adjustments (id, purchase_id, kind, amount_cents, stripe_event_id, occurred_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (purchase_id) WHERE kind = 'chargeback' DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(adjustment.purchase_id)
    .bind(adjustment.kind.as_str())
    .bind(adjustment.amount_cents)
    .bind(adjustment.stripe_event_id)
    .bind(adjustment.occurred_at)
    .execute(conn)
    .await
    .map(|_| ())
}
