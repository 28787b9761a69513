//! The database ceiling: one event per transaction run directly with sqlx, the same events
//! and database as the processor, measured in the same run, in two shapes:
//!
//! - `processor`: the processor's own transaction, statement for statement (claim, lookup,
//!   catalog terms, insert, grant, finish) — what the processor could reach with no
//!   overhead of its own;
//! - `3-insert`: the smallest transaction that records a purchase — insert the event (with
//!   its body), the purchase (split computed by the client from the known catalog), the
//!   access grant; no lookup, no update. This is the denominator of the drain ratio: the
//!   processor does more per event, and is asked to beat it by batching.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::Options;
use crate::catalog::{self, split};
use crate::histogram::{Latencies, Summary};
use crate::world::World;

/// The transaction run for each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    Processor,
    ThreeInsert,
}

impl Shape {
    pub fn label(self) -> &'static str {
        match self {
            Self::Processor => "processor's transaction",
            Self::ThreeInsert => "3-insert transaction",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Processor => "dbp",
            Self::ThreeInsert => "db3",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RawDbStep {
    pub clients: u32,
    pub transactions: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub rate: f64,
    pub latency: Summary,
}

/// One shape over every client count.
#[derive(Debug, Clone, Serialize)]
pub struct RawDbShape {
    pub shape: Shape,
    pub steps: Vec<RawDbStep>,
    pub best_rate: f64,
    pub best_clients: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RawDb {
    pub processor: RawDbShape,
    pub three_insert: RawDbShape,
}

/// One event as the database sees it.
struct DbEvent {
    event_id: String,
    payment_intent: String,
    session_id: String,
    customer: Uuid,
    content: Uuid,
    payload: Value,
    created: DateTime<Utc>,
}

/// The processor's transaction for a new paid checkout, statement for statement (see
/// `processor/src/handler.rs` and `processor/src/db/`): claim the event row, look for the
/// payment's purchase (FOR UPDATE), load the catalog facts and agreements, insert the
/// purchase with its split, grant access, mark the event processed; commit.
async fn transaction(pool: &PgPool, event: &DbEvent) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let prior: String = sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, received_at)
         VALUES ($1, $2, $3, $4, $5, 'received', 1, $6)
         ON CONFLICT (id) DO UPDATE
            SET attempts = stripe_events.attempts + 1, updated_at = now()
         RETURNING status",
    )
    .bind(&event.event_id)
    .bind("checkout.session.completed")
    .bind("booking")
    .bind(false)
    .bind(&event.payload)
    .bind(Utc::now())
    .fetch_one(&mut *tx)
    .await?;
    anyhow::ensure!(prior == "received", "event {} seen before", event.event_id);

    let existing = sqlx::query(processor::db::purchases::LOCK_SQL)
        .bind(&event.payment_intent)
        .bind(&event.session_id)
        .fetch_optional(&mut *tx)
        .await?;
    anyhow::ensure!(
        existing.is_none(),
        "payment {} seen before",
        event.payment_intent
    );

    let terms = sqlx::query(TERMS_SQL)
        .bind(event.content)
        .bind(event.customer)
        .bind(event.created)
        .fetch_one(&mut *tx)
        .await?;
    let customer_exists: bool = terms.try_get("customer_exists")?;
    anyhow::ensure!(customer_exists, "unknown customer {}", event.customer);
    let organization_id: Uuid = terms.try_get("organization_id")?;
    let platform_agreement_id: Option<Uuid> = terms.try_get("platform_agreement_id")?;
    let platform_bps: Option<i32> = terms.try_get("platform_bps")?;
    let platform_bps = platform_bps.context("no platform fee")?;
    let creator_org_agreement_id: Option<Uuid> = terms.try_get("creator_org_agreement_id")?;
    let organization_bps: Option<i32> = terms.try_get("organization_bps")?;
    let organization_bps = organization_bps.unwrap_or(0);
    let amount = crate::catalog::AMOUNT_CENTS;
    let (platform, organization, creator) = split(amount, platform_bps, organization_bps);

    let purchase: Option<Uuid> = sqlx::query_scalar(
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
    .bind(event.customer)
    .bind(event.content)
    .bind(organization_id)
    .bind(i32::try_from(amount)?)
    .bind("usd")
    .bind("completed")
    .bind(&event.payment_intent)
    .bind(&event.session_id)
    .bind(i32::try_from(platform)?)
    .bind(i32::try_from(organization)?)
    .bind(i32::try_from(creator)?)
    .bind(platform_agreement_id)
    .bind(creator_org_agreement_id)
    .bind(platform_bps)
    .bind(organization_bps)
    .bind(&event.event_id)
    .bind(event.created)
    .fetch_optional(&mut *tx)
    .await?;
    let purchase = purchase.context("the purchase was not inserted")?;

    sqlx::query(
        "INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
         VALUES ($1, $2, $3, $4, 'purchase')
         ON CONFLICT (user_id, content_id) DO UPDATE
            SET purchase_id = EXCLUDED.purchase_id, granted_at = now(), revoked_at = NULL
          WHERE content_access.revoked_at IS NOT NULL",
    )
    .bind(Uuid::new_v4())
    .bind(event.customer)
    .bind(event.content)
    .bind(purchase)
    .execute(&mut *tx)
    .await?;

    sqlx::query(
        "UPDATE stripe_events
            SET status = $2, last_error = NULL, processed_at = now(), updated_at = now()
          WHERE id = $1",
    )
    .bind(&event.event_id)
    .bind("processed")
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `processor/src/db/purchases.rs`'s query of the catalog facts and agreements.
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

/// The 3-insert shape: the event row with its body (already processed), the purchase with
/// its split, the access grant; one round trip each, one commit. The split and agreements
/// are the catalog's, known to the client, so nothing is looked up.
async fn three_inserts(pool: &PgPool, event: &DbEvent) -> anyhow::Result<()> {
    let amount = catalog::AMOUNT_CENTS;
    let (platform, organization, creator) =
        split(amount, catalog::PLATFORM_BPS, catalog::ORGANIZATION_BPS);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, received_at, processed_at)
         VALUES ($1, 'checkout.session.completed', 'booking', false, $2, 'processed', 1, now(), now())",
    )
    .bind(&event.event_id)
    .bind(&event.payload)
    .execute(&mut *tx)
    .await?;
    let purchase = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO purchases (
            id, customer_id, content_id, organization_id, amount_paid_cents, currency, status,
            stripe_payment_intent_id, stripe_checkout_session_id,
            platform_fee_cents, organization_fee_cents, creator_payout_cents,
            platform_agreement_id, creator_org_agreement_id, platform_fee_bps, organization_fee_bps,
            stripe_event_id, purchased_at)
         VALUES ($1, $2, $3, $4, $5, 'usd', 'completed', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(purchase)
    .bind(event.customer)
    .bind(event.content)
    .bind(catalog::organization())
    .bind(i32::try_from(amount)?)
    .bind(&event.payment_intent)
    .bind(&event.session_id)
    .bind(i32::try_from(platform)?)
    .bind(i32::try_from(organization)?)
    .bind(i32::try_from(creator)?)
    .bind(catalog::platform_agreement())
    .bind(catalog::creator_agreement_of(event.content))
    .bind(catalog::PLATFORM_BPS)
    .bind(catalog::ORGANIZATION_BPS)
    .bind(&event.event_id)
    .bind(event.created)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
         VALUES ($1, $2, $3, $4, 'purchase')",
    )
    .bind(Uuid::new_v4())
    .bind(event.customer)
    .bind(event.content)
    .bind(purchase)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Runs both shapes at each client count of `db_clients`, `db_events` transactions each,
/// alternating shapes so that neither always runs on the fuller tables.
pub async fn database(world: &mut World, options: &Options) -> anyhow::Result<RawDb> {
    let mut processor = Vec::new();
    let mut three_insert = Vec::new();
    for &clients in &options.db_clients {
        processor.push(step(world, options, Shape::Processor, clients).await?);
        three_insert.push(step(world, options, Shape::ThreeInsert, clients).await?);
    }
    Ok(RawDb {
        processor: best(Shape::Processor, processor)?,
        three_insert: best(Shape::ThreeInsert, three_insert)?,
    })
}

fn best(shape: Shape, steps: Vec<RawDbStep>) -> anyhow::Result<RawDbShape> {
    let best = steps
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .context("no raw-db step ran")?;
    Ok(RawDbShape {
        shape,
        best_rate: best.rate,
        best_clients: best.clients,
        steps: steps.clone(),
    })
}

/// `db_events` new purchases through `shape` at `clients` clients, each client on its own
/// connection (opened before timing).
async fn step(
    world: &mut World,
    options: &Options,
    shape: Shape,
    clients: u32,
) -> anyhow::Result<RawDbStep> {
    let phase = format!("{}{clients}", shape.tag());
    let events = world.events(&phase, options.db_events).await?;
    let events: Arc<Vec<DbEvent>> = Arc::new(
        events
            .iter()
            .map(|e| {
                Ok(DbEvent {
                    payload: serde_json::from_slice(&e.body)?,
                    event_id: e.event_id.clone(),
                    payment_intent: e.payment_intent.clone(),
                    session_id: e.session_id.clone(),
                    customer: e.customer,
                    content: e.content,
                    created: Utc::now(),
                })
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let pool = PgPoolOptions::new()
        .max_connections(clients)
        .min_connections(clients)
        .acquire_timeout(Duration::from_secs(30))
        .connect(world.database_url())
        .await
        .context("raw db: cannot connect")?;
    // Open every connection before timing.
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(pool.acquire().await?);
    }
    drop(held);

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (pool, events, next, failed, first_error) = (
            pool.clone(),
            Arc::clone(&events),
            Arc::clone(&next),
            Arc::clone(&failed),
            Arc::clone(&first_error),
        );
        set.spawn(async move {
            let mut latencies = Latencies::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(event) = events.get(i) else { break };
                let began = Instant::now();
                let outcome = match shape {
                    Shape::Processor => transaction(&pool, event).await,
                    Shape::ThreeInsert => three_inserts(&pool, event).await,
                };
                match outcome {
                    Ok(()) => latencies.record(began.elapsed()),
                    Err(error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut first = first_error
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        first.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            latencies
        });
    }
    let mut latencies = Latencies::new();
    while let Some(joined) = set.join_next().await {
        latencies.add(&joined.context("a database client panicked")?);
    }
    let elapsed = start.elapsed();
    pool.close().await;
    let failed = failed.load(Ordering::Relaxed);
    if let Some(error) = first_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
    {
        crate::progress(&format!(
            "raw db, {}: {failed} transaction(s) failed at {clients} clients, first: {error}",
            shape.label()
        ));
    }
    let summary = latencies.summary();
    let step = RawDbStep {
        clients,
        transactions: summary.count,
        failed,
        elapsed_s: elapsed.as_secs_f64(),
        rate: summary.count as f64 / elapsed.as_secs_f64(),
        latency: summary,
    };
    crate::progress(&format!(
        "raw db, {}, {clients} client(s): {:.0} transactions/s, p99 {:.2} ms",
        shape.label(),
        step.rate,
        step.latency.p99_ms
    ));
    Ok(step)
}
