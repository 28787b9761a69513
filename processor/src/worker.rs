//! The consumer: takes deliveries from the work queue, handles several at once (bounded),
//! and settles each one after the database has committed.
//!
//! How a delivery ends:
//! - handled (or a duplicate, or ignored): ack;
//! - transient failure, attempts left: a copy goes to the retry queue of its delay tier
//!   with the attempt count raised, then the original is acked;
//! - permanent failure, or attempts exhausted: a copy with the failure headers goes to the
//!   dead-letter exchange, then the original is acked;
//! - the copy could not be confirmed: nack with requeue, so nothing is lost (it may run again,
//!   which is harmless: handling is idempotent);
//! - the processor dies holding it: RabbitMQ redelivers it, and dead-letters it itself once
//!   the work queue's delivery limit is reached (class `crash` for the ops tools);
//! - redelivered although its dead-letter copy was confirmed (we died before the ack): ack.
//!
//! Publish-with-confirm first, ack second: a crash between the two may duplicate a message,
//! never lose it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use shared::broker::{AmqpUrls, BrokerError, publish_confirmed};
use shared::contract::{
    EventMessage, FailureInfo, HEADER_ATTEMPT, HEADER_REPLAYED_AT, with_headers,
};
use shared::topology::{QueueSettings, Topology};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::events::{self, EventStatus};
use crate::error::FailureClass;
use crate::handler;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub urls: AmqpUrls,
    pub topology: Topology,
    pub prefetch: u16,
    pub concurrency: usize,
    pub delivery_limit: u32,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub shutdown_timeout: Duration,
    /// Only for the crash tests: see [`TestHook`].
    pub test_hook: Option<TestHook>,
}

/// Ways to make the processor die on purpose, as `kill -9` would, at the moments the crash
/// tests need. Set with the hidden `PROCESSOR_TEST_HOOK` variable; never in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestHook {
    /// `crash-on-event:<event id>`: die whenever this event is being handled.
    CrashOnEvent(String),
    /// `crash-after-dead-letter`: die after a dead letter is confirmed, before the ack.
    CrashAfterDeadLetter,
    /// `panic-on-event:<event id>`: the handler panics whenever this event is handled.
    PanicOnEvent(String),
}

impl std::str::FromStr for TestHook {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.split_once(':') {
            Some(("crash-on-event", id)) if !id.is_empty() => Ok(Self::CrashOnEvent(id.to_owned())),
            Some(("panic-on-event", id)) if !id.is_empty() => Ok(Self::PanicOnEvent(id.to_owned())),
            None if raw == "crash-after-dead-letter" => Ok(Self::CrashAfterDeadLetter),
            _ => Err(format!("PROCESSOR_TEST_HOOK: unknown hook `{raw}`")),
        }
    }
}

fn crash(reason: &str) -> ! {
    eprintln!("test hook: aborting ({reason})");
    std::process::abort()
}

impl WorkerSettings {
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            delivery_limit: self.delivery_limit,
            retry_delays: self.retry_delays.clone(),
        }
    }

    /// The delay before attempt `attempt + 1`; attempts past the schedule wait its last delay.
    fn delay_after(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.retry_delays
            .get(index)
            .or_else(|| self.retry_delays.last())
            .copied()
    }
}

/// What is shared by every in-flight delivery of one broker session.
struct Context {
    pool: PgPool,
    settings: WorkerSettings,
    publish: Channel,
}

enum SessionEnd {
    Shutdown,
    Lost,
}

pub struct Worker {
    pool: PgPool,
    settings: WorkerSettings,
    ready: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(pool: PgPool, settings: WorkerSettings) -> Self {
        Self {
            pool,
            settings,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True while consuming; what `/readyz` reports.
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }

    /// Consumes until `shutdown` is cancelled, reconnecting (next cluster node first) with
    /// growing delays whenever the broker connection is lost.
    pub async fn run(&self, shutdown: CancellationToken) {
        let delays = || {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut backoff = delays();
        let mut node = 0;
        loop {
            let end = self.session(&mut node, &shutdown).await;
            self.ready.store(false, Ordering::Relaxed);
            match end {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Lost) => {
                    backoff = delays();
                    node += 1;
                }
                Err(error) => tracing::warn!(%error, "RabbitMQ unavailable"),
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn session(
        &self,
        node: &mut usize,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, BrokerError> {
        let settings = &self.settings;
        let (connection, index) = settings.urls.connect(*node, "processor").await?;
        *node = index;
        let setup = |what| move |source| BrokerError::Setup { what, source };
        let consume = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        settings
            .topology
            .declare(&consume, &settings.queue_settings())
            .await
            .map_err(setup("the topology declaration"))?;
        consume
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(setup("basic.qos"))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup("confirm mode"))?;
        let mut consumer = consume
            .basic_consume(
                settings.topology.work_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup("basic.consume"))?;
        tracing::info!(
            node = index,
            queue = settings.topology.work_queue,
            "consuming"
        );
        self.ready.store(true, Ordering::Relaxed);

        let context = Arc::new(Context {
            pool: self.pool.clone(),
            settings: settings.clone(),
            publish,
        });
        let permits = Arc::new(Semaphore::new(settings.concurrency));
        let mut tasks = JoinSet::new();
        let end = loop {
            while let Some(done) = tasks.try_join_next() {
                log_panic(done);
            }
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break SessionEnd::Lost,
                },
                () = shutdown.cancelled() => break SessionEnd::Shutdown,
            };
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                () = shutdown.cancelled() => break SessionEnd::Shutdown,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle_delivery(Arc::clone(&context), delivery, permit));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer failed");
                    break SessionEnd::Lost;
                }
                None => {
                    tracing::warn!("consumer was cancelled by the broker");
                    break SessionEnd::Lost;
                }
            }
        };

        if matches!(end, SessionEnd::Shutdown) {
            // Stop new deliveries first; prefetched ones we never started go back to the
            // queue when the channel closes.
            let _ = consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            tracing::info!(
                in_flight = tasks.len(),
                "stopped consuming; finishing in-flight messages"
            );
        }
        drain(&mut tasks, settings.shutdown_timeout).await;
        close(&connection).await;
        Ok(end)
    }
}

async fn drain(tasks: &mut JoinSet<()>, timeout: Duration) {
    let all_done = async {
        while let Some(done) = tasks.join_next().await {
            log_panic(done);
        }
    };
    if tokio::time::timeout(timeout, all_done).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "in-flight messages did not finish in time; they return to the queue unacked"
        );
        tasks.abort_all();
    }
}

async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = connection.close(200, "processor stopping".into()).await;
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done
        && error.is_panic()
    {
        tracing::error!(%error, "a message handler panicked; the message will be redelivered");
    }
}

/// Handles one delivery and settles it. Every path either acks after the effect (or its
/// copy) is safe, or leaves the message to RabbitMQ.
async fn handle_delivery(
    context: Arc<Context>,
    delivery: Delivery,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    // A panic is a crash of this one message: give it back to the broker, which counts the
    // delivery and dead-letters it at the delivery limit, instead of holding it unacked.
    let work = std::panic::AssertUnwindSafe(settle(&context, &delivery));
    if futures_util::FutureExt::catch_unwind(work).await.is_err() {
        tracing::error!(
            event_id = ?delivery.properties.message_id(),
            "handler panicked; returning the message to the queue"
        );
        metrics::counter!("processor_messages_total", "outcome" => "panicked").increment(1);
        let options = BasicRejectOptions { requeue: true };
        if let Err(error) = delivery.acker.reject(options).await {
            tracing::warn!(%error, "could not reject; the message will be redelivered");
        }
    }
}

async fn settle(context: &Context, delivery: &Delivery) {
    let message = match EventMessage::from_delivery(
        delivery.routing_key.as_str(),
        &delivery.properties,
        delivery.data.clone(),
    ) {
        Ok(message) => message,
        Err(error) => {
            tracing::error!(%error, "message does not follow the contract; dead-lettering it");
            let failure = failure_now(&delivery, "permanent", &error.to_string());
            settle_by_moving(
                &context,
                &delivery,
                Move::DeadLetter(failure),
                None,
                async {},
            )
            .await;
            return;
        }
    };
    let span = tracing::info_span!(
        "event",
        event_id = message.event_id,
        event_type = message.event_type,
        attempt = message.attempt,
    );
    async move {
        if let Some(TestHook::CrashOnEvent(id)) = &context.settings.test_hook
            && *id == message.event_id
        {
            crash("crash-on-event");
        }
        if let Some(TestHook::PanicOnEvent(id)) = &context.settings.test_hook
            && *id == message.event_id
        {
            panic!("test hook: panic-on-event");
        }
        if delivery.redelivered && already_dead_lettered(&context.pool, &delivery, &message).await {
            // We died after moving it to the dead-letter queue but before the ack: the copy
            // is there, so this one goes.
            tracing::info!("redelivered after its dead-lettering; acking the leftover");
            metrics::counter!("processor_messages_total", "outcome" => "leftover").increment(1);
            ack(&delivery).await;
            return;
        }
        let started = Instant::now();
        let result = handler::handle(&context.pool, &message).await;
        let elapsed = started.elapsed();
        let elapsed_ms = elapsed.as_millis() as u64;
        let label = result.as_ref().map_or("failed", |o| o.label());
        metrics::histogram!("processor_handle_seconds", "outcome" => label).record(elapsed.as_secs_f64());
        match result {
            Ok(outcome) => {
                tracing::info!(outcome = outcome.label(), elapsed_ms, "event handled");
                metrics::counter!("processor_messages_total", "outcome" => outcome.label()).increment(1);
                ack(&delivery).await;
            }
            Err(error) => {
                let class = error.class();
                let text = error.to_string();
                let failure = failure_now(&delivery, class.as_str(), &text);
                let settings = &context.settings;
                let action = match class {
                    FailureClass::Transient if message.attempt < settings.max_attempts => {
                        match settings.delay_after(message.attempt) {
                            Some(delay) => Move::Retry(delay, failure.clone()),
                            None => Move::DeadLetter(failure.clone()),
                        }
                    }
                    FailureClass::Transient => Move::DeadLetter(FailureInfo {
                        last_error: format!("retries exhausted after {} attempts: {text}", message.attempt),
                        ..failure.clone()
                    }),
                    FailureClass::Permanent => Move::DeadLetter(failure.clone()),
                };
                let status = match action {
                    Move::Retry(..) => EventStatus::Retrying,
                    Move::DeadLetter(_) => EventStatus::Dead,
                };
                tracing::warn!(class = class.as_str(), error = %text, elapsed_ms, next = status.as_str(), "event failed");
                let last_error = match &action {
                    Move::Retry(_, f) | Move::DeadLetter(f) => f.last_error.clone(),
                };
                let pool = context.pool.clone();
                let attempt = message.attempt;
                let record = async move { record_failure(&pool, &message, status, &last_error).await };
                settle_by_moving(&context, &delivery, action, Some(attempt), record).await;
            }
        }
    }
    .instrument(span)
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
    let published = publish_confirmed(
        &context.publish,
        &exchange,
        &routing_key,
        &delivery.data,
        properties,
    )
    .await;
    match published {
        Ok(()) => {
            record.await;
            metrics::counter!("processor_messages_total", "outcome" => outcome).increment(1);
            let hook = context.settings.test_hook.as_ref();
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

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: RabbitMQ redelivers the message, and handling it again is
        // harmless.
        tracing::warn!(%error, "could not ack; the message will be redelivered");
    }
}

async fn nack_requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.acker.nack(options).await {
        tracing::warn!(%error, "could not nack; the message will be redelivered");
    }
}

/// A redelivered message whose event the log says is dead, and that no operator put back.
async fn already_dead_lettered(pool: &PgPool, delivery: &Delivery, message: &EventMessage) -> bool {
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
async fn record_failure(pool: &PgPool, message: &EventMessage, status: EventStatus, error: &str) {
    let write = events::record_failure(pool, message, status, error);
    match tokio::time::timeout(Duration::from_secs(2), write).await {
        Ok(Ok(())) => {}
        Ok(Err(db_error)) => {
            tracing::warn!(error = %db_error, "could not record the failure in stripe_events")
        }
        Err(_) => tracing::warn!("timed out recording the failure in stripe_events"),
    }
}
