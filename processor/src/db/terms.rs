//! The catalog facts and agreements in force when a payment happened, for one purchase or
//! a batch of them in one round trip.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::access;

/// What a new purchase is looked up by.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub content_id: Uuid,
    pub customer_id: Uuid,
    /// When the payment happened: the agreements in force then apply.
    pub at: DateTime<Utc>,
    pub payment_intent_id: Option<String>,
    pub checkout_session_id: String,
}

/// The answer for one [`Lookup`] whose content exists.
#[derive(Debug, Clone)]
pub struct Terms {
    pub customer_exists: bool,
    pub organization_id: Uuid,
    pub platform_agreement_id: Option<Uuid>,
    pub platform_bps: Option<i32>,
    pub creator_org_agreement_id: Option<Uuid>,
    pub organization_bps: Option<i32>,
    /// A purchase for this payment intent or checkout session exists already.
    pub payment_recorded: bool,
    /// The customer has a completed purchase of this content already.
    pub owned: bool,
}

/// An agreement is active at `at` when `effective_from ≤ at < effective_until`; when several
/// are, the one that started last wins.
///
/// The existence checks are `LATERAL … LIMIT 1`, not `EXISTS` in the select list: for a
/// batch of lookups PostgreSQL turns such an `EXISTS` into a hashed subplan that reads every
/// completed purchase (or every user) once per statement, which grows with the table; a
/// lateral probe is one index lookup per row whatever the size. The payment is probed by
/// intent and by session separately: see [`super::purchases::LOCK_SQL`].
const TERMS_SQL: &str = "
SELECT r.ord,
       locks.taken,
       c.organization_id,
       cu.found IS NOT NULL                                        AS customer_exists,
       opa.id                                                      AS platform_agreement_id,
       COALESCE(opa.platform_fee_bps, pfc.fee_bps)                 AS platform_bps,
       coa.id                                                      AS creator_org_agreement_id,
       coa.organization_fee_bps                                    AS organization_bps,
       (by_intent.found IS NOT NULL OR by_session.found IS NOT NULL) AS payment_recorded,
       owned.found IS NOT NULL                                     AS owned
  FROM {locks}
 CROSS JOIN unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[])
       WITH ORDINALITY AS r(content_id, customer_id, at, payment_intent, session, ord)
  JOIN content c ON c.id = r.content_id
  LEFT JOIN LATERAL (
        SELECT true AS found FROM users WHERE id = r.customer_id LIMIT 1) cu ON true
  LEFT JOIN LATERAL (
        SELECT true AS found FROM purchases
         WHERE stripe_payment_intent_id = r.payment_intent LIMIT 1) by_intent ON true
  LEFT JOIN LATERAL (
        SELECT true AS found FROM purchases
         WHERE stripe_checkout_session_id = r.session LIMIT 1) by_session ON true
  LEFT JOIN LATERAL (
        SELECT true AS found FROM purchases
         WHERE customer_id = r.customer_id AND content_id = r.content_id
           AND status = 'completed' LIMIT 1) owned ON true
  LEFT JOIN LATERAL (
        SELECT id, platform_fee_bps FROM organization_platform_agreements
         WHERE organization_id = c.organization_id
           AND effective_from <= r.at AND (effective_until IS NULL OR effective_until > r.at)
         ORDER BY effective_from DESC LIMIT 1) opa ON true
  LEFT JOIN LATERAL (
        SELECT fee_bps FROM platform_fee_config
         WHERE effective_from <= r.at AND (effective_until IS NULL OR effective_until > r.at)
         ORDER BY effective_from DESC LIMIT 1) pfc ON true
  LEFT JOIN LATERAL (
        SELECT id, organization_fee_bps FROM creator_organization_agreements
         WHERE creator_id = c.creator_id AND organization_id = c.organization_id
           AND effective_from <= r.at AND (effective_until IS NULL OR effective_until > r.at)
         ORDER BY effective_from DESC LIMIT 1) coa ON true";

/// The terms of each lookup, in order; `None` where the content does not exist.
///
/// It takes the ownership lock of each lookup's (customer, content) pair in the same round
/// trip ([`access::ownership_locks`]). What it reads may then predate a lock it waited
/// for: a payment recorded, or content bought, by the transaction that held it. That is
/// safe because a new purchase is only ever written through the unique indexes, which
/// refuse it then (see [`super::new_purchase::insert`]).
pub async fn load(
    conn: &mut PgConnection,
    lookups: &[Lookup],
) -> Result<Vec<Option<Terms>>, sqlx::Error> {
    // Built once, from constants only.
    static SQL: LazyLock<String> =
        LazyLock::new(|| TERMS_SQL.replace("{locks}", &access::ownership_locks("$2", "$1")));
    let rows = sqlx::query(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(lookups.iter().map(|l| l.content_id).collect::<Vec<_>>())
        .bind(lookups.iter().map(|l| l.customer_id).collect::<Vec<_>>())
        .bind(lookups.iter().map(|l| l.at).collect::<Vec<_>>())
        .bind(
            lookups
                .iter()
                .map(|l| l.payment_intent_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            lookups
                .iter()
                .map(|l| l.checkout_session_id.clone())
                .collect::<Vec<_>>(),
        )
        .fetch_all(conn)
        .await?;
    let mut terms = vec![None; lookups.len()];
    for row in rows {
        let ordinal: i64 = row.try_get("ord")?;
        let Some(slot) = usize::try_from(ordinal - 1)
            .ok()
            .and_then(|index| terms.get_mut(index))
        else {
            continue;
        };
        *slot = Some(Terms {
            customer_exists: row.try_get("customer_exists")?,
            organization_id: row.try_get("organization_id")?,
            platform_agreement_id: row.try_get("platform_agreement_id")?,
            platform_bps: row.try_get("platform_bps")?,
            creator_org_agreement_id: row.try_get("creator_org_agreement_id")?,
            organization_bps: row.try_get("organization_bps")?,
            payment_recorded: row.try_get("payment_recorded")?,
            owned: row.try_get("owned")?,
        });
    }
    Ok(terms)
}
