//! A new purchase row: its revenue-split snapshot decided from the terms in force, and its
//! insertion, for one purchase or a batch of them in one statement.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::access;
use super::terms::Terms;
use crate::checkout::PurchaseRequest;
use crate::error::ProcessError;
use crate::lifecycle::{self, Status};
use crate::split;

/// Every column of a new `purchases` row.
#[derive(Debug, Clone)]
pub struct NewPurchase {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub content_id: Uuid,
    pub organization_id: Uuid,
    pub amount_paid_cents: i32,
    pub currency: String,
    pub status: Status,
    pub payment_intent_id: Option<String>,
    pub checkout_session_id: String,
    pub platform_fee_cents: i32,
    pub organization_fee_cents: i32,
    pub creator_payout_cents: i32,
    pub platform_agreement_id: Option<Uuid>,
    pub creator_org_agreement_id: Option<Uuid>,
    pub platform_fee_bps: i32,
    pub organization_fee_bps: i32,
    pub stripe_event_id: String,
    pub purchased_at: DateTime<Utc>,
}

impl NewPurchase {
    /// The row for `request` under `terms`, or why there can be none: the customer is
    /// unknown, the content belongs to another organization than the checkout claims, or
    /// no platform fee was in force at `purchased_at`.
    pub fn build(
        request: &PurchaseRequest,
        status: Status,
        terms: &Terms,
        purchased_at: DateTime<Utc>,
        event_id: &str,
    ) -> Result<Self, ProcessError> {
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
        Ok(Self {
            id: Uuid::new_v4(),
            customer_id: request.customer_id,
            content_id: request.content_id,
            organization_id: request.organization_id,
            amount_paid_cents: cents(request.amount_cents),
            currency: request.currency.clone(),
            status,
            payment_intent_id: request.payment_intent_id.clone(),
            checkout_session_id: request.checkout_session_id.clone(),
            platform_fee_cents: cents(split.platform_fee_cents),
            organization_fee_cents: cents(split.organization_fee_cents),
            creator_payout_cents: cents(split.creator_payout_cents),
            platform_agreement_id: terms.platform_agreement_id,
            creator_org_agreement_id: terms.creator_org_agreement_id,
            platform_fee_bps: platform_bps,
            organization_fee_bps: organization_bps,
            stripe_event_id: event_id.to_owned(),
            purchased_at,
        })
    }
}

fn cents(value: i64) -> i32 {
    // Amounts are checked to fit in i32 when the metadata is read; so does their split.
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Inserts the rows that no unique index refuses: the payment intent or session (another
/// transaction recorded the payment first) or, for a completed purchase, one completed
/// purchase per customer and content (a double payment). Each inserted purchase whose
/// status gives access ([`lifecycle::grants_access`]) gets its grant in the same statement
/// (see [`access::GRANT_ON_CONFLICT`]). Returns the ids inserted.
pub async fn insert(
    conn: &mut PgConnection,
    rows: &[NewPurchase],
) -> Result<Vec<Uuid>, sqlx::Error> {
    fn column<T>(rows: &[NewPurchase], get: impl Fn(&NewPurchase) -> T) -> Vec<T> {
        rows.iter().map(get).collect()
    }
    // Built once, from constants only.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH inserted AS (
                INSERT INTO purchases (
                    id, customer_id, content_id, organization_id, amount_paid_cents, currency, status,
                    stripe_payment_intent_id, stripe_checkout_session_id,
                    platform_fee_cents, organization_fee_cents, creator_payout_cents,
                    platform_agreement_id, creator_org_agreement_id, platform_fee_bps, organization_fee_bps,
                    stripe_event_id, purchased_at)
                SELECT * FROM unnest(
                    $1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::int4[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::int4[], $11::int4[], $12::int4[],
                    $13::uuid[], $14::uuid[], $15::int4[], $16::int4[], $17::text[], $18::timestamptz[])
                ON CONFLICT DO NOTHING
                RETURNING id, customer_id, content_id),
             granted AS (
                INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
                SELECT gen_random_uuid(), i.customer_id, i.content_id, i.id, 'purchase'
                  FROM inserted i
                  JOIN unnest($1::uuid[], $19::bool[]) AS g(id, grants) ON g.id = i.id
                 WHERE g.grants
                {})
             SELECT id FROM inserted",
            access::GRANT_ON_CONFLICT
        )
    });
    sqlx::query_scalar(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(column(rows, |r| r.id))
        .bind(column(rows, |r| r.customer_id))
        .bind(column(rows, |r| r.content_id))
        .bind(column(rows, |r| r.organization_id))
        .bind(column(rows, |r| r.amount_paid_cents))
        .bind(column(rows, |r| r.currency.clone()))
        .bind(column(rows, |r| r.status.as_str()))
        .bind(column(rows, |r| r.payment_intent_id.clone()))
        .bind(column(rows, |r| r.checkout_session_id.clone()))
        .bind(column(rows, |r| r.platform_fee_cents))
        .bind(column(rows, |r| r.organization_fee_cents))
        .bind(column(rows, |r| r.creator_payout_cents))
        .bind(column(rows, |r| r.platform_agreement_id))
        .bind(column(rows, |r| r.creator_org_agreement_id))
        .bind(column(rows, |r| r.platform_fee_bps))
        .bind(column(rows, |r| r.organization_fee_bps))
        .bind(column(rows, |r| r.stripe_event_id.clone()))
        .bind(column(rows, |r| r.purchased_at))
        .bind(column(rows, |r| lifecycle::grants_access(r.status)))
        .fetch_all(conn)
        .await
}
