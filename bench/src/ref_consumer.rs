//! `ref-consumer`: the smallest consumer that turns the reference receiver's messages into
//! purchases, so that the end-to-end latency of the pipeline has a reference measured on
//! the same machine in the same run (`ref-e2e`).
//!
//! With the reference receiver in front of it, it is the least a webhook pipeline can do
//! on this machine: verify and publish with a confirm, then consume, write and ack. One
//! consumer, one batch at a time: it waits for a message, takes whatever else the prefetch
//! already holds (up to `--batch`), writes the batch as the raw 3-insert shape does (the
//! event row with its body, the purchase with the catalog's split, the access grant), but
//! in one statement for the whole batch (three data-modifying CTEs over arrays), commits,
//! and acks the batch with one `multiple` ack. It parses only the fields it stores. No
//! claim, lookups, retries, dead letters, logging or metrics: what the processor adds on
//! top of this is what `e2e` ÷ `ref-e2e` measures.
//!
//! It runs as a child process (`bench ref-consumer`, hidden), beside `bench ref-server`,
//! so that its CPU is counted apart from the load generator's.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Deserialize;
use shared::broker::AmqpUrls;
use sqlx::PgPool;
use uuid::Uuid;

use crate::catalog::{self, split};

/// Arguments of the hidden `ref-consumer` subcommand (given by the bench, not by hand).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConsumerArgs {
    /// Queue to consume (the reference receiver's).
    #[arg(long)]
    pub queue: String,
    /// Database to write the purchases to (the bench's).
    #[arg(long)]
    pub database_url: String,
    /// Most messages written in one transaction; also each consumer's prefetch.
    #[arg(long, default_value_t = 100)]
    pub batch: u16,
    /// Consumers, each on its own channel with its own batches (one per core by default).
    #[arg(long, default_value_t = 2)]
    pub consumers: u16,
}

/// The fields of a `checkout.session.completed` body that the 3-insert shape stores.
#[derive(Deserialize)]
struct Body {
    id: String,
    created: i64,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    object: Session,
}

#[derive(Deserialize)]
struct Session {
    id: String,
    payment_intent: String,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(rename = "customerId")]
    customer: Uuid,
    #[serde(rename = "contentId")]
    content: Uuid,
}

/// One batch as column arrays, bound to the statement below.
#[derive(Default)]
struct Columns<'a> {
    event_ids: Vec<String>,
    bodies: Vec<&'a str>,
    purchase_ids: Vec<Uuid>,
    customers: Vec<Uuid>,
    contents: Vec<Uuid>,
    creator_agreements: Vec<Uuid>,
    payment_intents: Vec<String>,
    sessions: Vec<String>,
    created: Vec<i64>,
}

/// The 3-insert shape of `raw_db.rs`, for a whole batch in one round trip.
const INSERT_BATCH: &str = "
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[],
                         $7::text[], $8::text[], $9::bigint[])
        AS b(event_id, body, purchase_id, customer, content, creator_agreement, payment_intent,
             session, created)
), events AS (
    INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, received_at, processed_at)
    SELECT event_id, 'checkout.session.completed', 'booking', false, body::jsonb, 'processed', 1, now(), now()
      FROM batch
), bought AS (
    INSERT INTO purchases (
        id, customer_id, content_id, organization_id, amount_paid_cents, currency, status,
        stripe_payment_intent_id, stripe_checkout_session_id,
        platform_fee_cents, organization_fee_cents, creator_payout_cents,
        platform_agreement_id, creator_org_agreement_id, platform_fee_bps, organization_fee_bps,
        stripe_event_id, purchased_at)
    SELECT purchase_id, customer, content, $10, $11, 'usd', 'completed', payment_intent, session,
           $12, $13, $14, $15, creator_agreement, $16, $17, event_id, to_timestamp(created)
      FROM batch
)
INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
SELECT gen_random_uuid(), customer, content, purchase_id, 'purchase' FROM batch";

/// Consumes until SIGTERM or Ctrl-C.
pub async fn run(args: ConsumerArgs, amqp_url: &str) -> anyhow::Result<()> {
    let pool = PgPool::connect(&args.database_url)
        .await
        .context("cannot connect to the bench database")?;
    let urls = AmqpUrls::parse(amqp_url)?;
    let (connection, _) = urls.connect(0, "bench ref-consumer").await?;
    let mut consumers = tokio::task::JoinSet::new();
    for n in 0..args.consumers.max(1) {
        let channel = connection.create_channel().await?;
        consumers.spawn(consume(channel, pool.clone(), args.clone(), n));
    }
    let outcome = tokio::select! {
        _ = crate::stop_signal() => Ok(()),
        Some(done) = consumers.join_next() => match done {
            Ok(outcome) => outcome,
            Err(error) => Err(error.into()),
        },
    };
    consumers.abort_all();
    let _ = connection.close(200, "ref-consumer done".into()).await;
    pool.close().await;
    outcome
}

/// One consumer: a batch at a time, what the prefetch holds, written then acked.
async fn consume(
    channel: lapin::Channel,
    pool: PgPool,
    args: ConsumerArgs,
    n: u16,
) -> anyhow::Result<()> {
    let batch_size = args.batch.max(1);
    channel
        .basic_qos(batch_size, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            format!("bench-ref-consumer-{n}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(first) = consumer.next().await {
        let mut batch = vec![first?];
        // Whatever the prefetch already holds joins the batch; nothing waits for more.
        while batch.len() < usize::from(batch_size) {
            match futures_util::FutureExt::now_or_never(consumer.next()) {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        write(&pool, &batch).await?;
        if let Some(last) = batch.last() {
            last.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .context("cannot ack a batch")?;
        }
    }
    Ok(())
}

async fn write(pool: &PgPool, batch: &[Delivery]) -> anyhow::Result<()> {
    let mut columns = Columns::default();
    for delivery in batch {
        let body: Body = serde_json::from_slice(&delivery.data)
            .context("a reference message is not a checkout event")?;
        let Ok(text) = std::str::from_utf8(&delivery.data) else {
            bail!("event {} is not UTF-8", body.id);
        };
        let session = body.data.object;
        columns.purchase_ids.push(Uuid::new_v4());
        columns.customers.push(session.metadata.customer);
        columns.contents.push(session.metadata.content);
        columns
            .creator_agreements
            .push(catalog::creator_agreement_of(session.metadata.content));
        columns.payment_intents.push(session.payment_intent);
        columns.sessions.push(session.id);
        columns.created.push(body.created);
        columns.event_ids.push(body.id);
        columns.bodies.push(text);
    }
    let amount = catalog::AMOUNT_CENTS;
    let (platform, organization, creator) =
        split(amount, catalog::PLATFORM_BPS, catalog::ORGANIZATION_BPS);
    // One statement is one transaction: one round trip and one commit per batch.
    sqlx::query(INSERT_BATCH)
        .bind(&columns.event_ids)
        .bind(&columns.bodies)
        .bind(&columns.purchase_ids)
        .bind(&columns.customers)
        .bind(&columns.contents)
        .bind(&columns.creator_agreements)
        .bind(&columns.payment_intents)
        .bind(&columns.sessions)
        .bind(&columns.created)
        .bind(catalog::organization())
        .bind(i32::try_from(amount)?)
        .bind(i32::try_from(platform)?)
        .bind(i32::try_from(organization)?)
        .bind(i32::try_from(creator)?)
        .bind(catalog::platform_agreement())
        .bind(catalog::PLATFORM_BPS)
        .bind(catalog::ORGANIZATION_BPS)
        .execute(pool)
        .await
        .context("the reference batch insert failed")?;
    Ok(())
}
