//! Handling a batch of deliveries in one transaction.
//!
//! Committing once per event caps throughput at the database's commit rate; committing
//! several events together lifts it. Each event runs under its own savepoint, so one that
//! fails is rolled back alone and never fails its neighbours. Every delivery is settled only
//! after the commit that holds its effect. If the transaction as a whole fails (connection
//! lost, deadlock with another batch, failed commit), each event is run again on its own,
//! so a bad neighbour or an unlucky lock order never costs the others a retry delay.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use shared::contract::EventMessage;
use sqlx::PgPool;
use tracing::Instrument;

use super::Context;
#[cfg(feature = "test-hooks")]
use super::hooks::{TestHook, crash};
use super::settle::{ack, already_dead_lettered, conclude, dead_letter_malformed};
use crate::error::{FailureClass, ProcessError};
use crate::handler::{self, Outcome};

/// One delivery ready for the database.
struct Work {
    delivery: Delivery,
    message: EventMessage,
}

/// Handles and settles a batch. If it panics, the deliveries not settled yet are run again
/// one by one, so that only the one that panics goes back to the broker (which counts it
/// toward the delivery limit) and its neighbours are not held hostage.
pub(super) async fn run(context: &Context, deliveries: Vec<Delivery>) {
    let copies: Vec<Delivery> = deliveries.iter().map(copy).collect();
    if !survives(handle_batch(context, deliveries)).await {
        tracing::error!(
            size = copies.len(),
            "a batch panicked; handling its events one by one"
        );
        for delivery in copies.into_iter().filter(|d| d.acker.usable()) {
            let acker = delivery.acker.clone();
            if !survives(handle_batch(context, vec![delivery])).await {
                tracing::error!("an event's handler panicked; returning it to the queue");
                metrics::counter!("processor_messages_total", "outcome" => "panicked").increment(1);
                let _ = acker.reject(BasicRejectOptions { requeue: true }).await;
            }
        }
    }
}

async fn survives(work: impl std::future::Future<Output = ()>) -> bool {
    futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work))
        .await
        .is_ok()
}

/// The same delivery (sharing its acker: whichever copy settles it, the other cannot).
fn copy(delivery: &Delivery) -> Delivery {
    Delivery {
        delivery_tag: delivery.delivery_tag,
        exchange: delivery.exchange.clone(),
        routing_key: delivery.routing_key.clone(),
        redelivered: delivery.redelivered,
        properties: delivery.properties.clone(),
        data: delivery.data.clone(),
        acker: delivery.acker.clone(),
    }
}

async fn handle_batch(context: &Context, deliveries: Vec<Delivery>) {
    let mut ready = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        if let Some(work) = admit(context, delivery).await {
            ready.push(work);
        }
    }
    if ready.is_empty() {
        return;
    }
    let started = Instant::now();
    let messages: Vec<&EventMessage> = ready.iter().map(|w| &w.message).collect();
    let results = match in_one_transaction(&context.pool, &messages).await {
        Ok(results) => results,
        Err(error) if ready.len() > 1 => {
            tracing::warn!(%error, size = ready.len(), "batch transaction failed; handling its events one by one");
            metrics::counter!("processor_batches_split_total").increment(1);
            let mut results = Vec::with_capacity(ready.len());
            for message in &messages {
                results.push(handler::handle(&context.pool, message).await);
            }
            results
        }
        Err(error) => vec![Err(error)],
    };
    // Everything in the batch waited for the same commit.
    let elapsed = started.elapsed();
    metrics::histogram!("processor_batch_size").record(ready.len() as f64);
    for (work, result) in ready.into_iter().zip(results) {
        let span = span_of(&work.message);
        conclude(context, &work.delivery, work.message, result, elapsed)
            .instrument(span)
            .await;
    }
}

fn span_of(message: &EventMessage) -> tracing::Span {
    tracing::info_span!(
        "event",
        event_id = message.event_id,
        event_type = message.event_type,
        attempt = message.attempt,
    )
}

/// Reads a delivery and decides whether it goes to the database at all.
async fn admit(context: &Context, delivery: Delivery) -> Option<Work> {
    let message = match EventMessage::from_delivery(
        delivery.routing_key.as_str(),
        &delivery.properties,
        delivery.data.clone(),
    ) {
        Ok(message) => message,
        Err(error) => {
            dead_letter_malformed(context, &delivery, &error.to_string()).await;
            return None;
        }
    };
    #[cfg(feature = "test-hooks")]
    match &context.settings.test_hook {
        Some(TestHook::CrashOnEvent(id)) if *id == message.event_id => crash("crash-on-event"),
        Some(TestHook::PanicOnEvent(id)) if *id == message.event_id => {
            panic!("test hook: panic-on-event")
        }
        _ => {}
    }
    if delivery.redelivered && already_dead_lettered(&context.pool, &delivery, &message).await {
        // We died after moving it to the dead-letter queue but before the ack: the copy is
        // there, so this one goes.
        tracing::info!(
            event_id = message.event_id,
            "redelivered after its dead-lettering; acking the leftover"
        );
        metrics::counter!("processor_messages_total", "outcome" => "leftover").increment(1);
        ack(&delivery).await;
        return None;
    }
    Some(Work { delivery, message })
}

/// Runs every message under its own savepoint in one transaction. `Err` means the
/// transaction itself failed and nothing of it was committed.
///
/// One round trip of savepoint bookkeeping per event, not two: the release of one event's
/// savepoint and the next one's go together, and after a rollback the savepoint stays in
/// place for the next event. The last event's savepoint is left to the commit. A batch of
/// one needs none: a failed event rolls back the transaction. (Savepoints are released, not
/// left to nest: 32 nested subtransactions made PostgreSQL four times slower per event.)
async fn in_one_transaction(
    pool: &PgPool,
    messages: &[&EventMessage],
) -> Result<Vec<Result<Outcome, ProcessError>>, ProcessError> {
    let mut tx = pool.begin().await?;
    let alone = messages.len() == 1;
    if !alone {
        sqlx::query("SAVEPOINT event").execute(&mut *tx).await?;
    }
    let mut results = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let more = index + 1 < messages.len();
        match handler::handle_in(&mut tx, message).await {
            Ok(outcome) => {
                if more {
                    // Both in one round trip (simple query protocol).
                    sqlx::raw_sql("RELEASE SAVEPOINT event; SAVEPOINT event")
                        .execute(&mut *tx)
                        .await?;
                }
                results.push(Ok(outcome));
            }
            // A database failure that may concern the whole transaction (connection,
            // deadlock, serialization): give up on the batch.
            Err(error @ ProcessError::Database(_)) if error.class() == FailureClass::Transient => {
                return Err(error);
            }
            Err(error) if alone => {
                tx.rollback().await?;
                return Ok(vec![Err(error)]);
            }
            Err(error) => {
                sqlx::query("ROLLBACK TO SAVEPOINT event")
                    .execute(&mut *tx)
                    .await?;
                results.push(Err(error));
            }
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Batches are bounded in size and in how long the first delivery waits for company.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub size: usize,
    pub wait: Duration,
}
