//! Handling a batch of deliveries in one transaction.
//!
//! Committing once per event caps throughput at the database's commit rate; committing
//! several events together lifts it, and handling the common events set-based
//! ([`crate::bulk`]: a few multi-row statements for the whole batch) lifts it again. Every
//! other event runs under its own savepoint, so one that fails is rolled back alone and
//! never fails its neighbours. Every delivery is settled only
//! after the commit that holds its effect. If the transaction as a whole fails (connection
//! lost, deadlock with another batch, failed commit), each event is run again on its own,
//! so a bad neighbour or an unlucky lock order never costs the others a retry delay. If the
//! database cannot be reached at all, running events one by one would only wait out one
//! acquire timeout per event: the batch waits as a whole instead, with growing delays.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use shared::contract::EventMessage;
use sqlx::PgPool;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::Context;
#[cfg(feature = "test-hooks")]
use super::hooks::{TestHook, crash};
use super::settle::{
    ack, already_dead_lettered, conclude, dead_letter_crashed, dead_letter_malformed, nack_requeue,
};
use crate::bulk;
use crate::db::events;
use crate::error::{FailureClass, ProcessError};
use crate::handler::{self, Outcome};

/// One delivery ready for the database.
struct Work {
    delivery: Delivery,
    message: EventMessage,
}

/// Handles and settles a batch. If it panics, the deliveries not settled yet are run again
/// one by one, so that only the one that panics goes back to the broker (redelivered, its
/// starts are counted toward the crash limit) and its neighbours are not held hostage.
///
/// `partial` is the batch's partial-batch permit, if it has one: it is given back as soon
/// as the transaction has ended, before the deliveries are settled, so that the next batch
/// can start its transaction while this one's acks go out.
pub(super) async fn run(
    context: &Context,
    deliveries: Vec<Delivery>,
    partial: Option<OwnedSemaphorePermit>,
) {
    // A redelivered message comes alone (see `collect`), and such messages are handled one
    // at a time, so that a crash while handling one blames that one only.
    let _suspect = match deliveries.as_slice() {
        [only] if only.redelivered => context.suspects.acquire().await.ok(),
        _ => None,
    };
    let copies: Vec<Delivery> = deliveries.iter().map(copy).collect();
    if copies.len() == 1 {
        let acker = copies[0].acker.clone();
        if !survives(handle_batch(context, deliveries, partial)).await {
            reject_panicked(acker).await;
        }
        return;
    }
    if !survives(handle_batch(context, deliveries, partial)).await {
        tracing::error!(
            size = copies.len(),
            "a batch panicked; handling its events one by one"
        );
        for delivery in copies.into_iter().filter(|d| d.acker.usable()) {
            let acker = delivery.acker.clone();
            if !survives(handle_batch(context, vec![delivery], None)).await {
                reject_panicked(acker).await;
            }
        }
    }
}

/// Back to the queue: redelivered, it is handled alone and its crash count grows.
async fn reject_panicked(acker: lapin::Acker) {
    tracing::error!("an event's handler panicked; returning it to the queue");
    metrics::counter!("processor_messages_total", "outcome" => "panicked").increment(1);
    let _ = acker.reject(BasicRejectOptions { requeue: true }).await;
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

async fn handle_batch(
    context: &Context,
    deliveries: Vec<Delivery>,
    partial: Option<OwnedSemaphorePermit>,
) {
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
    let modes = &context.settings.modes;
    let mut waits = shared::broker::reconnect_delays(UNREACHABLE_MAX_WAIT).take(UNREACHABLE_WAITS);
    let results = loop {
        match in_one_transaction(&context.pool, &messages, modes).await {
            Ok(results) => break results,
            Err(error) if error.database_unreachable() => {
                let Some(delay) = waits.next() else {
                    // Still down: every event of the batch takes the retry path together,
                    // none of them trying the database again on its own.
                    let text = error.to_string();
                    break messages
                        .iter()
                        .map(|_| Err(ProcessError::DatabaseUnreachable(text.clone())))
                        .collect();
                };
                tracing::warn!(%error, size = ready.len(), retry_in = ?delay, "database unreachable; the batch waits as a whole");
                metrics::counter!("processor_batch_waits_total", "reason" => "database_unreachable")
                    .increment(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = context.shutdown.cancelled() => {
                        // Nothing of it was committed: back to the queue, for whoever runs next.
                        for work in &ready {
                            nack_requeue(&work.delivery).await;
                        }
                        return;
                    }
                }
            }
            Err(error) if ready.len() > 1 => {
                tracing::warn!(%error, size = ready.len(), "batch transaction failed; handling its events one by one");
                metrics::counter!("processor_batches_split_total").increment(1);
                let mut results = Vec::with_capacity(ready.len());
                for message in &messages {
                    results.push(handler::handle(&context.pool, message, modes).await);
                }
                break results;
            }
            Err(error) => break vec![Err(error)],
        }
    };
    drop(partial);
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

/// How a batch waits while the database is unreachable: a few growing delays (200 ms,
/// then about 0.4, 0.8, 1.6 s), then its events go to their retry tier together, so an
/// outage costs each event one attempt, not one acquire timeout per event and per try.
const UNREACHABLE_WAITS: usize = 4;
const UNREACHABLE_MAX_WAIT: Duration = Duration::from_secs(2);

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
    if delivery.redelivered {
        if already_dead_lettered(&context.pool, &delivery, &message).await {
            // We died after moving it to the dead-letter queue but before the ack: the copy
            // is there, so this one goes.
            tracing::info!(
                event_id = message.event_id,
                "redelivered after its dead-lettering; acking the leftover"
            );
            metrics::counter!("processor_messages_total", "outcome" => "leftover").increment(1);
            ack(&delivery).await;
            return None;
        }
        if let Some(strikes) = count_start(context, &message).await
            && strikes > context.settings.crash_limit
        {
            dead_letter_crashed(context, &delivery, message, strikes - 1).await;
            return None;
        }
    }
    #[cfg(feature = "test-hooks")]
    match &context.settings.test_hook {
        Some(TestHook::CrashOnEvent(id)) if *id == message.event_id => crash("crash-on-event"),
        Some(TestHook::PanicOnEvent(id)) if *id == message.event_id => {
            panic!("test hook: panic-on-event")
        }
        _ => {}
    }
    Some(Work { delivery, message })
}

/// Counts this start of handling a redelivered message (see `events::strike`). `None`
/// when it cannot be counted (database down: the broker's delivery limit is the backstop)
/// or needs no counting (the event is done already).
async fn count_start(context: &Context, message: &EventMessage) -> Option<u32> {
    let strike = tokio::time::timeout(
        Duration::from_secs(2),
        events::strike(&context.pool, message),
    )
    .await;
    match strike {
        Ok(Ok(strikes)) => strikes.and_then(|s| u32::try_from(s).ok()),
        Ok(Err(error)) => {
            tracing::warn!(%error, event_id = message.event_id, "could not count the start of a redelivered event");
            None
        }
        Err(_) => {
            tracing::warn!(
                event_id = message.event_id,
                "timed out counting the start of a redelivered event"
            );
            None
        }
    }
}

/// Runs the messages in one transaction: first the set-based path ([`bulk`]) for the
/// common events, then every other message under its own savepoint. `Err` means the
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
    modes: &shared::config::EndpointModes,
) -> Result<Vec<Result<Outcome, ProcessError>>, ProcessError> {
    let candidates = if messages.len() > 1 {
        bulk::candidates(messages, modes)
    } else {
        Vec::new()
    };
    let mut tx = pool.begin().await?;
    let mut results: Vec<Option<Result<Outcome, ProcessError>>> = if messages.len() > 1 {
        bulk::handle(&mut tx, messages, candidates)
            .await?
            .into_iter()
            .map(|outcome| outcome.map(Ok))
            .collect()
    } else {
        vec![None]
    };
    let rest: Vec<usize> = (0..messages.len())
        .filter(|&index| results[index].is_none())
        .collect();
    let alone = messages.len() == 1;
    if !alone && !rest.is_empty() {
        sqlx::query("SAVEPOINT event").execute(&mut *tx).await?;
    }
    for (position, &index) in rest.iter().enumerate() {
        let message = messages[index];
        let more = position + 1 < rest.len();
        match handler::handle_in(&mut tx, message, modes).await {
            Ok(outcome) => {
                if more {
                    // Both in one round trip (simple query protocol).
                    sqlx::raw_sql("RELEASE SAVEPOINT event; SAVEPOINT event")
                        .execute(&mut *tx)
                        .await?;
                }
                results[index] = Some(Ok(outcome));
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
                results[index] = Some(Err(error));
            }
        }
    }
    tx.commit().await?;
    // Every message has its result: from the set-based path or from the loop above.
    Ok(results
        .into_iter()
        .map(|result| result.unwrap_or(Err(ProcessError::Concurrent)))
        .collect())
}

/// Batches are bounded in size and in how long the first delivery waits for company, and
/// how many batches that are not full may run at once (`partial`).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub size: usize,
    pub wait: Duration,
    /// Batches smaller than `size` that may run at the same time. One more waits, still
    /// gathering deliveries, until one of them ends or it is full itself: under light
    /// traffic a few transactions of several events cost the database less than many of
    /// one or two (fewer commits, fewer round trips, fewer concurrent foreign-key locks on
    /// the same catalog rows), so events wait less; a backlog makes full batches, which
    /// use the whole `concurrency`.
    pub partial: usize,
}
