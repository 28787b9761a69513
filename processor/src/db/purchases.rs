//! Purchases, their revenue-split snapshot and the access they grant.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::checkout::PurchaseRequest;
use crate::error::ProcessError;
use crate::split;

/// What completing a paid session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// A new completed purchase and its access grant.
    Completed(Uuid),
    /// The customer already owned the content through another payment: the purchase is
    /// stored as `requires_refund` and grants nothing.
    RequiresRefund(Uuid),
    /// This payment already has its purchase (a second event object for the same payment
    /// intent or checkout session).
    AlreadyRecorded,
}

/// The catalog facts and agreements in force at the time of purchase, in one round trip.
struct Terms {
    customer_exists: bool,
    organization_id: Uuid,
    platform_agreement_id: Option<Uuid>,
    platform_bps: Option<i32>,
    creator_org_agreement_id: Option<Uuid>,
    organization_bps: Option<i32>,
}

/// An agreement is active at `at` when `effective_from ≤ at < effective_until`; when several
/// are, the one that started last wins.
const TERMS_SQL: &str = "
SELECT c.organization_id,
       EXISTS (SELECT 1 FROM users WHERE id = $2)    AS customer_exists,
       opa.id                                        AS platform_agreement_id,
       COALESCE(opa.platform_fee_bps, pfc.fee_bps)   AS platform_bps,
       coa.id                                        AS creator_org_agreement_id,
       coa.organization_fee_bps                      AS organization_bps
  FROM content c
  LEFT JOIN LATERAL (
        SELECT id, platform_fee_bps FROM organization_platform_agreements
         WHERE organization_id = c.organization_id
           AND effective_from <= $3 AND (effective_until IS NULL OR effective_until > $3)
         ORDER BY effective_from DESC LIMIT 1) opa ON true
  LEFT JOIN LATERAL (
        SELECT fee_bps FROM platform_fee_config
         WHERE effective_from <= $3 AND (effective_until IS NULL OR effective_until > $3)
         ORDER BY effective_from DESC LIMIT 1) pfc ON true
  LEFT JOIN LATERAL (
        SELECT id, organization_fee_bps FROM creator_organization_agreements
         WHERE creator_id = c.creator_id AND organization_id = c.organization_id
           AND effective_from <= $3 AND (effective_until IS NULL OR effective_until > $3)
         ORDER BY effective_from DESC LIMIT 1) coa ON true
 WHERE c.id = $1";

async fn load_terms(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
    at: DateTime<Utc>,
) -> Result<Option<Terms>, sqlx::Error> {
    let row = sqlx::query(TERMS_SQL)
        .bind(request.content_id)
        .bind(request.customer_id)
        .bind(at)
        .fetch_optional(conn)
        .await?;
    row.map(|row| {
        Ok(Terms {
            customer_exists: row.try_get("customer_exists")?,
            organization_id: row.try_get("organization_id")?,
            platform_agreement_id: row.try_get("platform_agreement_id")?,
            platform_bps: row.try_get("platform_bps")?,
            creator_org_agreement_id: row.try_get("creator_org_agreement_id")?,
            organization_bps: row.try_get("organization_bps")?,
        })
    })
    .transpose()
}

/// Records the purchase of a paid session, in the caller's transaction. `purchased_at` is
/// when Stripe says the payment happened, so a retry days later uses the agreements that
/// were in force at the time of the payment.
pub async fn complete(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
    purchased_at: DateTime<Utc>,
    event_id: &str,
) -> Result<Completion, ProcessError> {
    let terms = load_terms(conn, request, purchased_at)
        .await?
        .ok_or(ProcessError::UnknownContent(request.content_id))?;
    if !terms.customer_exists {
        return Err(ProcessError::UnknownCustomer(request.customer_id));
    }
    if terms.organization_id != request.organization_id {
        return Err(ProcessError::WrongOrganization {
            content: request.content_id,
            claimed: request.organization_id,
            actual: terms.organization_id,
        });
    }
    let platform_bps = terms
        .platform_bps
        .ok_or(ProcessError::NoPlatformFee(purchased_at))?;
    let organization_bps = terms.organization_bps.unwrap_or(0);
    let split = split::compute(request.amount_cents, platform_bps, organization_bps);

    let insert = |status: &'static str| {
        sqlx::query_scalar::<_, Uuid>(
            "INSERT INTO purchases (
                id, customer_id, content_id, organization_id, amount_paid_cents, currency, status,
                stripe_payment_intent_id, stripe_checkout_session_id,
                platform_fee_cents, organization_fee_cents, creator_payout_cents,
                platform_agreement_id, creator_org_agreement_id, platform_fee_bps, organization_fee_bps,
                stripe_event_id, purchased_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(Uuid::new_v4())
        .bind(request.customer_id)
        .bind(request.content_id)
        .bind(request.organization_id)
        .bind(i32::try_from(request.amount_cents).unwrap_or(i32::MAX))
        .bind(&request.currency)
        .bind(status)
        .bind(&request.payment_intent_id)
        .bind(&request.checkout_session_id)
        .bind(cents(split.platform_fee_cents))
        .bind(cents(split.organization_fee_cents))
        .bind(cents(split.creator_payout_cents))
        .bind(terms.platform_agreement_id)
        .bind(terms.creator_org_agreement_id)
        .bind(platform_bps)
        .bind(organization_bps)
        .bind(event_id)
        .bind(purchased_at)
    };

    // Any unique index can refuse the row: the payment intent or session (this payment is
    // already recorded) or one completed purchase per customer and content (a double
    // payment). The first is a duplicate; the second is kept for a refund.
    if let Some(purchase_id) = insert("completed").fetch_optional(&mut *conn).await? {
        grant_access(conn, request, purchase_id).await?;
        return Ok(Completion::Completed(purchase_id));
    }
    if payment_recorded(conn, request).await? {
        return Ok(Completion::AlreadyRecorded);
    }
    match insert("requires_refund").fetch_optional(&mut *conn).await? {
        Some(purchase_id) => Ok(Completion::RequiresRefund(purchase_id)),
        None => Ok(Completion::AlreadyRecorded),
    }
}

fn cents(value: i64) -> i32 {
    // The split of an i32 amount fits in i32.
    i32::try_from(value).unwrap_or(i32::MAX)
}

async fn payment_recorded(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM purchases
                         WHERE stripe_payment_intent_id = $1 OR stripe_checkout_session_id = $2)",
    )
    .bind(&request.payment_intent_id)
    .bind(&request.checkout_session_id)
    .fetch_one(conn)
    .await
}

/// Grants access, or re-grants it when an earlier grant was revoked.
async fn grant_access(
    conn: &mut PgConnection,
    request: &PurchaseRequest,
    purchase_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
         VALUES ($1, $2, $3, $4, 'purchase')
         ON CONFLICT (user_id, content_id) DO UPDATE
            SET purchase_id = EXCLUDED.purchase_id, granted_at = now(), revoked_at = NULL
          WHERE content_access.revoked_at IS NOT NULL",
    )
    .bind(Uuid::new_v4())
    .bind(request.customer_id)
    .bind(request.content_id)
    .bind(purchase_id)
    .execute(conn)
    .await
    .map(|_| ())
}
