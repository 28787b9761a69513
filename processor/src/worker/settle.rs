//! Settling one delivery once its outcome is known: ack, or move it (retry tier or
//! dead-letter queue) with a confirm first and the ack second.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use shared::broker::publish_confirmed;
use shared::contract::{
    EventMessage, FailureInfo, HEADER_ATTEMPT, HEADER_REPLAYED_AT, HEADER_RETRY_DUE_AT,
    with_headers,
};
use sqlx::PgPool;

use super::Context;
#[cfg(feature = "test-hooks")]
use super::hooks::{TestHook, crash};
use crate::db::events::{self, EventStatus};
use crate::error::{FailureClass, ProcessError};
use crate::handler::Outcome;

/// Logs, counts and settles one handled delivery. `elapsed` is the time its handling took.
pub(super) async fn conclude(
    context: &Context,
    delivery: &Delivery,
    message: EventMessage,
    result: Result<Outcome, ProcessError>,
    elapsed: Duration,
) {
    let elapsed_ms = elapsed.as_millis() as u64;
    let label = result.as_ref().map_or("failed", |o| o.label());
    metrics::histogram!("processor_handle_seconds", "outcome" => label)
        .record(elapsed.as_secs_f64());
    match result {
        Ok(outcome) => {
            tracing::info!(outcome = outcome.label(), elapsed_ms, "event handled");
            metrics::counter!("processor_messages_total", "outcome" => outcome.label())
                .increment(1);
            ack(delivery).await;
        }
        Err(error) => {
            let class = error.class();
            let text = error.to_string();
            let failure = failure_now(delivery, class.as_str(), &text);
            let settings = &context.settings;
            let action = match class {
                FailureClass::Transient if message.attempt < settings.max_attempts => {
                    match settings.delay_after(message.attempt) {
                        Some(delay) => Move::Retry(delay, failure),
                        None => Move::DeadLetter(failure),
                    }
                }
                FailureClass::Transient => Move::DeadLetter(FailureInfo {
                    last_error: format!(
                        "retries exhausted after {} attempts: {text}",
                        message.attempt
                    ),
                    ..failure
                }),
                FailureClass::Permanent => Move::DeadLetter(failure),
            };
            let status = match action {
                Move::Retry(..) => EventStatus::Retrying,
                Move::DeadLetter(_) => EventStatus::Dead,
            };
            tracing::warn!(class = class.as_str(), error = %text, elapsed_ms, next = status.as_str(), "event failed");
            let last_error = match &action {
                Move::Retry(_, f) | Move::DeadLetter(f) => f.last_error.clone(),
            };
            let due = match &action {
                Move::Retry(delay, _) => {
                    Some(Utc::now() + chrono::Duration::from_std(*delay).unwrap_or_default())
                }
                Move::DeadLetter(_) => None,
            };
            let pool = context.pool.clone();
            let attempt = message.attempt;
            // The event log is best effort; when the database was just found unreachable,
            // trying it once per event would only wait out one timeout per event.
            let reachable = !error.database_unreachable();
            let record = async move {
                if reachable {
                    record_failure(&pool, &message, status, &last_error, due).await
                }
            };
            settle_by_moving(context, delivery, action, Some(attempt), record).await;
        }
    }
}

/// A delivery that does not follow the message contract: straight to the dead letters.
pub(super) async fn dead_letter_malformed(context: &Context, delivery: &Delivery, error: &str) {
    tracing::error!(%error, "message does not follow the contract; dead-lettering it");
    let failure = failure_now(delivery, "permanent", error);
    settle_by_moving(context, delivery, Move::DeadLetter(failure), None, async {}).await;
}

/// A redelivered message whose handling was started `crashes` times without ever ending
/// (the processor died or panicked each time): straight to the dead letters, class `crash`.
pub(super) async fn dead_letter_crashed(
    context: &Context,
    delivery: &Delivery,
    message: EventMessage,
    crashes: u32,
) {
    let text =
        format!("the processor died {crashes} times while handling this event; not trying again");
    tracing::error!(
        event_id = message.event_id,
        crashes,
        "dead-lettering an event that keeps crashing the processor"
    );
    let failure = failure_now(delivery, "crash", &text);
    let pool = context.pool.clone();
    let attempt = message.attempt;
    let record =
        async move { record_failure(&pool, &message, EventStatus::Dead, &text, None).await };
    settle_by_moving(
        context,
        delivery,
        Move::DeadLetter(failure),
        Some(attempt),
        record,
    )
    .await;
}

/// Where a failed message goes next.
enum Move {
    /// To the delay queue of this tier, then back to the work queue.
    Retry(Duration, FailureInfo),
    DeadLetter(FailureInfo),
}

fn failure_now(delivery: &Delivery, class: &str, error: &str) -> FailureInfo {
    let now = Utc::now();
    let earlier = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(FailureInfo::read);
    FailureInfo {
        class: class.to_owned(),
        last_error: error.to_owned(),
        first_failure_at: earlier.as_ref().map_or(now, |e| e.first_failure_at),
        last_failure_at: now,
        original_routing_key: earlier
            .map(|e| e.original_routing_key)
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| delivery.routing_key.to_string()),
    }
}

/// Publishes the copy (confirmed), records the failure (`record`), then acks the original.
/// If the copy is not confirmed, the original goes back to the queue instead. The record
/// comes after the confirm: a `dead` status then always means the copy is in the queue,
/// which is what lets a redelivered leftover be recognised.
async fn settle_by_moving(
    context: &Context,
    delivery: &Delivery,
    action: Move,
    attempt: Option<u32>,
    record: impl std::future::Future<Output = ()>,
) {
    let topology = &context.settings.topology;
    let (exchange, routing_key, properties) = match &action {
        Move::Retry(delay, failure) => {
            let next_attempt = attempt.unwrap_or(1).saturating_add(1);
            let properties = with_headers(&delivery.properties, |headers| {
                failure.write(headers);
                headers.insert(
                    HEADER_ATTEMPT.into(),
                    AMQPValue::LongLongInt(next_attempt.into()),
                );
                let due = Utc::now() + chrono::Duration::from_std(*delay).unwrap_or_default();
                headers.insert(
                    HEADER_RETRY_DUE_AT.into(),
                    AMQPValue::LongLongInt(due.timestamp_millis()),
                );
            });
            // Through the default exchange, straight into the delay queue.
            (String::new(), topology.retry_queue(*delay), properties)
        }
        Move::DeadLetter(failure) => {
            let properties = with_headers(&delivery.properties, |headers| {
                failure.write(headers);
                if let Some(attempt) = attempt {
                    headers.insert(
                        HEADER_ATTEMPT.into(),
                        AMQPValue::LongLongInt(attempt.into()),
                    );
                }
            });
            (
                topology.dead_exchange.clone(),
                failure.original_routing_key.clone(),
                properties,
            )
        }
    };
    let outcome = match action {
        Move::Retry(..) => "retried",
        Move::DeadLetter(_) => "dead_lettered",
    };
    let published =
        publish_with_retries(context, &exchange, &routing_key, &delivery.data, properties).await;
    match published {
        Ok(()) => {
            record.await;
            metrics::counter!("processor_messages_total", "outcome" => outcome).increment(1);
            #[cfg(feature = "test-hooks")]
            let hook = context.settings.test_hook.as_ref();
            #[cfg(feature = "test-hooks")]
            if outcome == "dead_lettered" && hook == Some(&TestHook::CrashAfterDeadLetter) {
                crash("crash-after-dead-letter");
            }
            ack(delivery).await
        }
        Err(error) => {
            metrics::counter!("processor_messages_total", "outcome" => "requeued").increment(1);
            tracing::error!(%error, target = routing_key, "could not move the message; returning it to the queue");
            nack_requeue(delivery).await;
        }
    }
}

/// Publishes a copy with a confirm, retrying a few times on a fresh channel: after a quorum
/// leader election RabbitMQ 3.10 can nack every publish on a channel until it is replaced,
/// and returning the original to the queue at once would only spin it toward the delivery
/// limit. Bounded: a few hundred milliseconds in all, never minutes while holding a message.
pub(super) async fn publish_with_retries(
    context: &Context,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<(), shared::broker::ConfirmError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        let channel = context
            .publish
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let result = match tokio::time::timeout(
            Duration::from_secs(5),
            publish_confirmed(&channel, exchange, routing_key, body, properties.clone()),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(shared::broker::ConfirmError::NotConfirmed),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(error) if !error.channel_suspect() || attempt >= 3 => return Err(error),
            Err(error) => {
                attempt += 1;
                tracing::warn!(%error, attempt, "copy not confirmed; retrying on a fresh channel");
                if let Ok(fresh) = context.connection.create_channel().await
                    && fresh
                        .confirm_select(lapin::options::ConfirmSelectOptions::default())
                        .await
                        .is_ok()
                {
                    let mut current = context
                        .publish
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if current.id() == channel.id() {
                        *current = fresh;
                    }
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

pub(super) async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: RabbitMQ redelivers the message, and handling it again is
        // harmless.
        tracing::warn!(%error, "could not ack; the message will be redelivered");
    }
}

pub(super) async fn nack_requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.acker.nack(options).await {
        tracing::warn!(%error, "could not nack; the message will be redelivered");
    }
}

/// A redelivered message whose event the log says is dead, and that no operator put back.
pub(super) async fn already_dead_lettered(
    pool: &PgPool,
    delivery: &Delivery,
    message: &EventMessage,
) -> bool {
    let replayed = delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(HEADER_REPLAYED_AT));
    if replayed {
        return false;
    }
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        events::status(pool, &message.event_id),
    )
    .await;
    matches!(status, Ok(Ok(Some(s))) if s == EventStatus::Dead.as_str())
}

/// Best effort: the event log is for people; the broker holds the truth about the message.
/// Bounded in time, since the database may be the very thing that is down.
async fn record_failure(
    pool: &PgPool,
    message: &EventMessage,
    status: EventStatus,
    error: &str,
    retry_due_at: Option<chrono::DateTime<Utc>>,
) {
    let write = events::record_failure(pool, message, status, error, retry_due_at);
    match tokio::time::timeout(Duration::from_secs(2), write).await {
        Ok(Ok(())) => {}
        Ok(Err(db_error)) => {
            tracing::warn!(error = %db_error, "could not record the failure in stripe_events")
        }
        Err(_) => tracing::warn!("timed out recording the failure in stripe_events"),
    }
}
