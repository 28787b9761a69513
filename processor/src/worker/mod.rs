//! The consumer: takes deliveries from the work queue in batches (bounded in size and in
//! wait), handles several batches at once (bounded), and settles each delivery after the
//! database has committed its effect.
//!
//! - [`batch`]: one transaction per batch, a savepoint per event;
//! - [`settle`]: acks, retries and dead letters; [`hooks`]: test-only crash hooks.
//!
//! How a delivery ends:
//! - handled (or a duplicate, or ignored): ack;
//! - transient failure, attempts left: a copy goes to the delay queue of its tier with the
//!   attempt count raised and its due time, then the original is acked; when it is due,
//!   [`delay`] brings it back to the work queue;
//! - permanent failure, or attempts exhausted: a copy with the failure headers goes to the
//!   dead-letter exchange, then the original is acked;
//! - the copy could not be confirmed: nack with requeue, so nothing is lost (it may run again,
//!   which is harmless: handling is idempotent);
//! - the processor dies holding it: RabbitMQ redelivers it. A redelivered message is
//!   handled alone (one at a time), after counting the start in the database
//!   (`stripe_events.crash_strikes`); past `crash_limit` starts that never ended it is
//!   dead-lettered with class `crash` instead. Only the message being handled is blamed,
//!   never the ones that merely waited in the prefetch buffer. The work queue's delivery
//!   limit stays as the last resort, for when the database cannot count;
//! - the database is unreachable: the batch waits as a whole with growing delays, holding
//!   its messages unacknowledged, and goes back to the queue on shutdown;
//! - redelivered although its dead-letter copy was confirmed (we died before the ack): ack.
//!
//! Publish-with-confirm first, ack second: a crash between the two may duplicate a message,
//! never lose it.

mod batch;
mod delay;
#[cfg(feature = "test-hooks")]
mod hooks;
mod settle;

pub use batch::BatchLimits;
#[cfg(feature = "test-hooks")]
pub use hooks::TestHook;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use shared::broker::{AmqpUrls, BrokerError};
use shared::topology::{QueueSettings, Topology};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub urls: AmqpUrls,
    pub topology: Topology,
    pub prefetch: u16,
    pub concurrency: usize,
    pub delivery_limit: u32,
    /// Starts of handling one event that may end in a crash before it is dead-lettered.
    pub crash_limit: u32,
    /// Which Stripe mode each endpoint accepts.
    pub modes: shared::config::EndpointModes,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub shutdown_timeout: Duration,
    /// Only for the crash tests: see [`TestHook`].
    #[cfg(feature = "test-hooks")]
    pub test_hook: Option<TestHook>,
    pub batch: BatchLimits,
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
    /// Confirm-mode channel for retry and dead-letter copies; replaced when it misbehaves.
    publish: std::sync::Mutex<Channel>,
    connection: Arc<Connection>,
    /// Redelivered messages are handled one at a time: see the module docs.
    suspects: Semaphore,
    shutdown: CancellationToken,
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
        let delays = || shared::broker::reconnect_delays(Duration::from_secs(10));
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
        let connection = Arc::new(connection);
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
            publish: std::sync::Mutex::new(publish),
            connection: Arc::clone(&connection),
            suspects: Semaphore::new(1),
            shutdown: shutdown.clone(),
        });
        let stop_forwarding = CancellationToken::new();
        let mut forwarders = JoinSet::new();
        for delay in shared::topology::distinct_delays(&settings.retry_delays) {
            forwarders.spawn(delay::forward(
                Arc::clone(&context),
                settings.topology.retry_queue(delay),
                delay,
                stop_forwarding.clone(),
            ));
        }
        let permits = Arc::new(Semaphore::new(settings.concurrency));
        let partial = Arc::new(Semaphore::new(
            settings.batch.partial.clamp(1, settings.concurrency.max(1)),
        ));
        let mut tasks = JoinSet::new();
        let mut held = None;
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
            let (batch, partial_permit, end) =
                collect(&mut consumer, &mut held, settings.batch, &partial, shutdown).await;
            if !batch.is_empty() {
                let context = Arc::clone(&context);
                tasks.spawn(async move {
                    batch::run(&context, batch, partial_permit).await;
                    drop(permit);
                });
            }
            if let Some(end) = end {
                break end;
            }
        };

        if matches!(end, SessionEnd::Shutdown) {
            // Stop new deliveries first; prefetched ones we never started go back to the
            // queue when the channel closes.
            let _ = consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            while let Some(done) = tasks.try_join_next() {
                log_panic(done);
            }
            tracing::info!(
                in_flight_batches = tasks.len(),
                "stopped consuming; finishing in-flight messages"
            );
        }
        stop_forwarding.cancel();
        drain(&mut tasks, settings.shutdown_timeout).await;
        drain(&mut forwarders, settings.shutdown_timeout).await;
        close(&connection).await;
        Ok(end)
    }
}

/// Waits for a first delivery, then gathers more until the batch is full or the first one
/// has waited `limits.wait`. A batch that is not full then needs one of the `partial`
/// permits (see [`BatchLimits::partial`]); while it waits for one it goes on gathering, and
/// goes without a permit once full. Returns the batch, its permit and, when consuming must
/// stop, why.
///
/// A redelivered message makes a batch of its own: it may be the one that crashed the
/// processor, and it must not take neighbours down with it again. One met while gathering
/// waits in `held` for the next call.
async fn collect(
    consumer: &mut Consumer,
    held: &mut Option<Delivery>,
    limits: BatchLimits,
    partial: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> (
    Vec<Delivery>,
    Option<OwnedSemaphorePermit>,
    Option<SessionEnd>,
) {
    let mut batch = Vec::with_capacity(limits.size);
    if let Some(suspect) = held.take() {
        batch.push(suspect);
        return (batch, None, None);
    }
    let first = tokio::select! {
        delivery = consumer.next() => delivery,
        () = shutdown.cancelled() => return (batch, None, Some(SessionEnd::Shutdown)),
    };
    match next_delivery(first) {
        Ok(delivery) if delivery.redelivered => {
            batch.push(delivery);
            return (batch, None, None);
        }
        Ok(delivery) => batch.push(delivery),
        Err(end) => return (batch, None, Some(end)),
    }
    let deadline = tokio::time::Instant::now() + limits.wait;
    let mut waiting_for_permit = false;
    while batch.len() < limits.size {
        let delivery = tokio::select! {
            // Deliveries already received come first, also once the wait is over: with a
            // wait of zero, a batch is whatever arrived while the previous ones ran.
            biased;
            delivery = consumer.next() => delivery,
            () = tokio::time::sleep_until(deadline), if !waiting_for_permit => {
                waiting_for_permit = true;
                continue;
            }
            permit = Arc::clone(partial).acquire_owned(), if waiting_for_permit => {
                return (batch, permit.ok(), None);
            }
            // What we hold is handled and settled before stopping.
            () = shutdown.cancelled() => return (batch, None, Some(SessionEnd::Shutdown)),
        };
        match next_delivery(delivery) {
            Ok(delivery) if delivery.redelivered => {
                *held = Some(delivery);
                break;
            }
            Ok(delivery) => batch.push(delivery),
            Err(end) => return (batch, None, Some(end)),
        }
    }
    if batch.len() >= limits.size {
        return (batch, None, None);
    }
    // Cut short by a redelivered message: still one partial batch among the others.
    tokio::select! {
        permit = Arc::clone(partial).acquire_owned() => (batch, permit.ok(), None),
        () = shutdown.cancelled() => (batch, None, Some(SessionEnd::Shutdown)),
    }
}

fn next_delivery(item: Option<lapin::Result<Delivery>>) -> Result<Delivery, SessionEnd> {
    match item {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(error)) => {
            tracing::warn!(%error, "consumer failed");
            Err(SessionEnd::Lost)
        }
        None => {
            tracing::warn!("consumer was cancelled by the broker");
            Err(SessionEnd::Lost)
        }
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
        tracing::error!(%error, "a batch task panicked; its messages will be redelivered");
    }
}
