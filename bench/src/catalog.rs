//! The catalog the bench seeds, and the events it sends.
//!
//! Every id is derived from a number, the same way in SQL and in Rust, so that seeding is
//! one `generate_series` per table: `kkkkkkkk-0000-4000-8000-nnnnnnnnnnnn` with `k` the
//! kind (creator, customer, content, agreement) and `n` the number.
//!
//! Each event buys a distinct (customer, content) pair: pair `p` is customer `p / CONTENTS`
//! and content `p % CONTENTS`, so no event ever takes the double-payment path. Pairs are
//! handed out in order; the customers they need are inserted on demand.

use anyhow::Context;
use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// The fixture every event is made from (Stripe's shape of a paid checkout session).
const FIXTURE: &str = include_str!("../../fixtures/stripe/events/checkout.session.completed.json");

/// A query built with `format!` from the constants and id expressions of this module only
/// (never from input), so it is safe to send as it is.
macro_rules! sql {
    ($($arg:tt)*) => {
        sqlx::AssertSqlSafe(format!($($arg)*))
    };
}

pub const KIND_CREATOR: u32 = 1;
pub const KIND_CUSTOMER: u32 = 2;
pub const KIND_CONTENT: u32 = 3;
pub const KIND_CREATOR_AGREEMENT: u32 = 4;
pub const KIND_ORGANIZATION: u32 = 5;
pub const KIND_PLATFORM_AGREEMENT: u32 = 6;

/// Pieces of content in the catalog (pairs per customer).
pub const CONTENTS: u64 = 1_000;
/// Creators; content `c` is by creator `c % CREATORS`.
pub const CREATORS: u64 = 50;
pub const AMOUNT_CENTS: i64 = 1_999;
pub const PLATFORM_BPS: i32 = 800;
pub const ORGANIZATION_BPS: i32 = 1_500;

pub fn id(kind: u32, n: u64) -> Uuid {
    Uuid::from_u128(
        (u128::from(kind) << 96)
            | (0x4000_u128 << 64)
            | (0x8000_u128 << 48)
            | u128::from(n & 0xffff_ffff_ffff),
    )
}

/// The same id in SQL, `n` a bigint expression.
pub fn id_sql(kind: u32, n: &str) -> String {
    format!(
        "format('%s-0000-4000-8000-%s', lpad(to_hex({kind}), 8, '0'), lpad(to_hex({n}), 12, '0'))::uuid"
    )
}

pub fn organization() -> Uuid {
    id(KIND_ORGANIZATION, 0)
}

pub fn platform_agreement() -> Uuid {
    id(KIND_PLATFORM_AGREEMENT, 0)
}

/// The organization agreement of the creator of `content` (content `c` is by creator
/// `c % CREATORS`, whose agreement has the same number).
pub fn creator_agreement_of(content: Uuid) -> Uuid {
    let n = u64::try_from(content.as_u128() & 0xffff_ffff_ffff).unwrap_or(0);
    id(KIND_CREATOR_AGREEMENT, n % CREATORS)
}

/// The revenue split of `processor/src/split.rs` (rounding half up).
pub fn split(amount: i64, platform_bps: i32, organization_bps: i32) -> (i64, i64, i64) {
    let share = |amount: i64, bps: i32| (amount * i64::from(bps) + 5_000) / 10_000;
    let platform = share(amount, platform_bps);
    let organization = share(amount - platform, organization_bps);
    (platform, organization, amount - platform - organization)
}

/// One event to send: its body and the ids the bench looks it up by.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: String,
    pub payment_intent: String,
    pub session_id: String,
    pub customer: Uuid,
    pub content: Uuid,
    pub body: bytes::Bytes,
}

/// Hands out (customer, content) pairs and makes events for them.
#[derive(Debug)]
pub struct Catalog {
    tag: String,
    template: Value,
    next_pair: u64,
    customers: u64,
}

impl Catalog {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let template: Value =
            serde_json::from_str(FIXTURE).context("the checkout fixture is not JSON")?;
        Ok(Self {
            tag: tag.to_owned(),
            template,
            next_pair: 0,
            customers: 0,
        })
    }

    /// The catalog: one organization with a platform agreement, creators with their
    /// organization agreements, content, and enough customers for `pairs` purchases.
    pub async fn seed(&mut self, pool: &PgPool, pairs: u64) -> anyhow::Result<()> {
        let org = organization();
        sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, 'Bench Org')")
            .bind(org)
            .execute(pool)
            .await?;
        sqlx::query(
            "INSERT INTO organization_platform_agreements (id, organization_id, platform_fee_bps, effective_from)
             VALUES ($1, $2, $3, 'epoch')",
        )
        .bind(id(KIND_PLATFORM_AGREEMENT, 0))
        .bind(org)
        .bind(PLATFORM_BPS)
        .execute(pool)
        .await?;
        sqlx::query(sql!(
            "INSERT INTO users (id, email)
             SELECT {}, 'creator' || g || '@bench.example' FROM generate_series(0, $1 - 1) g",
            id_sql(KIND_CREATOR, "g")
        ))
        .bind(i64_of(CREATORS))
        .execute(pool)
        .await?;
        sqlx::query(sql!(
            "INSERT INTO creator_organization_agreements (id, creator_id, organization_id, organization_fee_bps, effective_from)
             SELECT {}, {}, $1, $2, 'epoch' FROM generate_series(0, $3 - 1) g",
            id_sql(KIND_CREATOR_AGREEMENT, "g"),
            id_sql(KIND_CREATOR, "g")
        ))
        .bind(org)
        .bind(ORGANIZATION_BPS)
        .bind(i64_of(CREATORS))
        .execute(pool)
        .await?;
        sqlx::query(sql!(
            "INSERT INTO content (id, organization_id, creator_id, title, price_cents)
             SELECT {}, $1, {}, 'Bench content ' || g, $2 FROM generate_series(0, $3 - 1) g",
            id_sql(KIND_CONTENT, "g"),
            id_sql(KIND_CREATOR, &format!("g % {CREATORS}"))
        ))
        .bind(org)
        .bind(i32::try_from(AMOUNT_CENTS)?)
        .bind(i64_of(CONTENTS))
        .execute(pool)
        .await?;
        self.ensure_customers(pool, pairs).await
    }

    /// Makes sure the customers of pairs `0..pairs` exist.
    async fn ensure_customers(&mut self, pool: &PgPool, pairs: u64) -> anyhow::Result<()> {
        let needed = pairs.div_ceil(CONTENTS).max(1);
        if needed > self.customers {
            sqlx::query(sql!(
                "INSERT INTO users (id, email)
                 SELECT {}, 'customer' || g || '@bench.example' FROM generate_series($1, $2 - 1) g",
                id_sql(KIND_CUSTOMER, "g")
            ))
            .bind(i64_of(self.customers))
            .bind(i64_of(needed))
            .execute(pool)
            .await?;
            self.customers = needed;
        }
        Ok(())
    }

    /// Takes `count` pairs; returns the first.
    pub async fn reserve(&mut self, pool: &PgPool, count: u64) -> anyhow::Result<u64> {
        let first = self.next_pair;
        self.ensure_customers(pool, first + count).await?;
        self.next_pair += count;
        Ok(first)
    }

    pub fn pair(pair: u64) -> (Uuid, Uuid) {
        (
            id(KIND_CUSTOMER, pair / CONTENTS),
            id(KIND_CONTENT, pair % CONTENTS),
        )
    }

    /// The fixture with the ids of one event, as Stripe would send it (pretty-printed).
    pub fn body(&self, event_id: &str, payment_intent: &str, session_id: &str, pair: u64) -> Value {
        let (customer, content) = Self::pair(pair);
        let mut event = self.template.clone();
        event["id"] = json!(event_id);
        event["created"] = json!(Utc::now().timestamp());
        let session = &mut event["data"]["object"];
        session["id"] = json!(session_id);
        session["payment_intent"] = json!(payment_intent);
        session["amount_total"] = json!(AMOUNT_CENTS);
        session["amount_subtotal"] = json!(AMOUNT_CENTS);
        session["metadata"] = json!({
            "customerId": customer.to_string(),
            "contentId": content.to_string(),
            "organizationId": organization().to_string(),
            "amountPaidCents": AMOUNT_CENTS.to_string(),
            "currency": "usd",
        });
        event
    }

    /// `count` new events (unique ids, payment intents, sessions and pairs), made before
    /// anything is timed. `phase` keeps the ids of different phases apart.
    pub async fn events(
        &mut self,
        phase: &str,
        count: u64,
        pool: &PgPool,
    ) -> anyhow::Result<Vec<Event>> {
        let first = self.reserve(pool, count).await?;
        (0..count)
            .map(|i| {
                let pair = first + i;
                let event_id = format!("evt_{}_{phase}_{i:08}", self.tag);
                let payment_intent = format!("pi_{}_{phase}_{i:08}", self.tag);
                let session_id = format!("cs_{}_{phase}_{i:08}", self.tag);
                let body = self.body(&event_id, &payment_intent, &session_id, pair);
                let (customer, content) = Self::pair(pair);
                Ok(Event {
                    body: serde_json::to_vec_pretty(&body)?.into(),
                    event_id,
                    payment_intent,
                    session_id,
                    customer,
                    content,
                })
            })
            .collect()
    }

    /// Stores `count` completed purchases with their processed events and access grants,
    /// as the processor would have, in chunks of 100,000 (pairs `0..count`, taken first).
    pub async fn seed_purchases(&mut self, pool: &PgPool, count: u64) -> anyhow::Result<()> {
        let first = self.reserve(pool, count).await?;
        let template = self.body("evt_seed", "pi_seed", "cs_seed", 0);
        let (platform_fee, organization_fee, creator_payout) =
            split(AMOUNT_CENTS, PLATFORM_BPS, ORGANIZATION_BPS);
        const CHUNK: u64 = 100_000;
        let mut done = 0;
        while done < count {
            let n = CHUNK.min(count - done);
            let (from, to) = (i64_of(first + done), i64_of(first + done + n));
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, received_at, processed_at)
                 SELECT 'evt_seed_' || g, 'checkout.session.completed', 'booking', false,
                        jsonb_set(jsonb_set(jsonb_set($1::jsonb, '{id}', to_jsonb('evt_seed_' || g)),
                                            '{data,object,payment_intent}', to_jsonb('pi_seed_' || g)),
                                  '{data,object,id}', to_jsonb('cs_seed_' || g)),
                        'processed', 1, now(), now()
                   FROM generate_series($2::bigint, $3::bigint - 1) g",
            )
            .bind(&template)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await
            .context("seeding stripe_events")?;
            sqlx::query(sql!(
                "WITH p AS (
                    INSERT INTO purchases (
                        id, customer_id, content_id, organization_id, amount_paid_cents, currency, status,
                        stripe_payment_intent_id, stripe_checkout_session_id,
                        platform_fee_cents, organization_fee_cents, creator_payout_cents,
                        platform_agreement_id, creator_org_agreement_id, platform_fee_bps, organization_fee_bps,
                        stripe_event_id, purchased_at)
                    SELECT gen_random_uuid(), {customer}, {content}, $1, $2, 'usd', 'completed',
                           'pi_seed_' || g, 'cs_seed_' || g, $3, $4, $5, $6, {agreement}, $7, $8,
                           'evt_seed_' || g, now()
                      FROM generate_series($9::bigint, $10::bigint - 1) g
                    RETURNING id, customer_id, content_id)
                 INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
                 SELECT gen_random_uuid(), customer_id, content_id, id, 'purchase' FROM p",
                customer = id_sql(KIND_CUSTOMER, &format!("g / {CONTENTS}")),
                content = id_sql(KIND_CONTENT, &format!("g % {CONTENTS}")),
                agreement = id_sql(KIND_CREATOR_AGREEMENT, &format!("(g % {CONTENTS}) % {CREATORS}")),
            ))
            .bind(organization())
            .bind(i32::try_from(AMOUNT_CENTS)?)
            .bind(i32::try_from(platform_fee)?)
            .bind(i32::try_from(organization_fee)?)
            .bind(i32::try_from(creator_payout)?)
            .bind(id(KIND_PLATFORM_AGREEMENT, 0))
            .bind(PLATFORM_BPS)
            .bind(ORGANIZATION_BPS)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await
            .context("seeding purchases and content_access")?;
            tx.commit().await?;
            done += n;
            crate::progress(&format!("seeded {done} of {count} purchases"));
        }
        Ok(())
    }
}

pub fn mean_len(events: &[Event]) -> u64 {
    let total: usize = events.iter().map(|e| e.body.len()).sum();
    u64::try_from(total / events.len().max(1)).unwrap_or(u64::MAX)
}

/// Counts here stay far below i64::MAX.
pub fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        assert_eq!(
            id(KIND_CUSTOMER, 0x1234).to_string(),
            "00000002-0000-4000-8000-000000001234"
        );
    }

    #[test]
    fn split_matches_the_processor() {
        // 1999 cents, 8 % platform, 15 % organization: 160 / 276 / 1563.
        assert_eq!(split(1999, 800, 1500), (160, 276, 1563));
        assert_eq!(split(1999, 1000, 0), (200, 0, 1799));
    }

    #[test]
    fn events_are_distinct_pairs() {
        let (a, b) = (Catalog::pair(0), Catalog::pair(1));
        assert_ne!(a, b);
        assert_eq!(Catalog::pair(CONTENTS).1, Catalog::pair(0).1);
        assert_ne!(Catalog::pair(CONTENTS).0, Catalog::pair(0).0);
    }

    #[test]
    fn content_leads_to_its_creators_agreement() {
        let content = id(KIND_CONTENT, 123);
        assert_eq!(
            creator_agreement_of(content),
            id(KIND_CREATOR_AGREEMENT, 123 % CREATORS)
        );
    }
}
