//! The delay forwarder: brings retried messages back to the work queue when they are due.
//!
//! A retried message waits in the delay queue of its tier (`<prefix>.delay.<d>`, a plain
//! quorum queue) with its due time in `x-retry-due-at-ms`. One forwarder per tier, in every
//! processor, takes the head with `basic.get`:
//! - due: publish a copy to the work queue (confirmed, on a fresh channel if need be), then
//!   ack the original; a copy that cannot be confirmed sends the original back to the head;
//! - not due yet: send it back to the head (`nack` with requeue; quorum queues deliver
//!   returned messages first) and sleep until it is due. Every message of a tier waits the
//!   same delay, so the head is always the one due first. Each return counts as a delivery:
//!   the delay queues are declared with an unreachable delivery limit (RabbitMQ 4 would
//!   otherwise drop a message returned 20 times);
//! - empty: sleep a little (at most the tier's delay: nothing can come due sooner).
//!
//! Why not the broker's TTL dead-lettering: on RabbitMQ 3.10 it stalled for minutes after a
//! quorum leader change (docs/RELIABILITY.md, finding 3). Why `basic.get` and not a consumer
//! that holds messages until due: RabbitMQ closes a channel that holds a delivery unacked
//! longer than its consumer timeout (30 minutes by default), and tiers wait up to hours.
//!
//! Nothing is lost in any of the failures: a message is acked only after its copy is
//! confirmed, and one taken by a processor that dies goes back to the delay queue.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use shared::contract::{HEADER_RETRY_DUE_AT, header_i64};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::settle::{ack, nack_requeue, publish_with_retries};

/// Copies in flight to the work queue at once, per tier: a backlog that comes due together
/// (after an outage) drains at the broker's confirm rate, not one round trip at a time.
const IN_FLIGHT: usize = 32;
/// Longest nap on an empty queue.
const EMPTY_NAP: Duration = Duration::from_secs(5);
/// Pause after the channel failed, before opening another.
const CHANNEL_PAUSE: Duration = Duration::from_secs(1);

/// Forwards the tier `queue` (delay `delay`) until `stop` is cancelled or the connection is
/// gone. Copies already on their way are finished first.
pub(super) async fn forward(
    context: Arc<Context>,
    queue: String,
    delay: Duration,
    stop: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    while !stop.is_cancelled() && context.connection.status().connected() {
        let channel = match context.connection.create_channel().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, queue, "delay forwarder: no channel");
                nap(CHANNEL_PAUSE, &stop).await;
                continue;
            }
        };
        if let Err(error) = forward_on(
            &context, &channel, &queue, delay, &permits, &mut tasks, &stop,
        )
        .await
        {
            tracing::warn!(%error, queue, "delay forwarder: channel failed; opening another");
            nap(CHANNEL_PAUSE, &stop).await;
        }
        // Our acks and nacks need this channel: close it only when they are done.
        while tasks.join_next().await.is_some() {}
        let _ = channel.close(200, "delay forwarder stopping".into()).await;
    }
}

async fn forward_on(
    context: &Arc<Context>,
    channel: &lapin::Channel,
    queue: &str,
    delay: Duration,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> lapin::Result<()> {
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = Arc::clone(permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
            () = stop.cancelled() => return Ok(()),
        };
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?;
        let Some(message) = got else {
            drop(permit);
            nap(delay.min(EMPTY_NAP), stop).await;
            if stop.is_cancelled() {
                return Ok(());
            }
            continue;
        };
        let wait = not_due_for(&message);
        if !wait.is_zero() {
            drop(permit);
            message
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
            // Sleep until it is due, so that a message is returned about once per forwarder
            // (each return counts as a delivery). Never longer than the tier's delay: a due
            // time further off can only come from a clock ahead of ours.
            nap(wait.min(delay), stop).await;
            continue;
        }
        let context = Arc::clone(context);
        tasks.spawn(async move {
            bring_back(&context, message).await;
            drop(permit);
        });
    }
}

/// How long until the message is due; zero when it is, or when it carries no due time.
fn not_due_for(message: &BasicGetMessage) -> Duration {
    let due = message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| header_i64(headers, HEADER_RETRY_DUE_AT));
    let Some(due) = due else {
        return Duration::ZERO;
    };
    u64::try_from(due - Utc::now().timestamp_millis()).map_or(Duration::ZERO, Duration::from_millis)
}

async fn bring_back(context: &Context, message: BasicGetMessage) {
    let delivery = &message.delivery;
    let work_queue = &context.settings.topology.work_queue;
    let event_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
    // Through the default exchange, straight into the work queue: the topic exchange may
    // have other consumers bound, which must not see the event twice.
    let published = publish_with_retries(
        context,
        "",
        work_queue,
        &delivery.data,
        delivery.properties.clone(),
    )
    .await;
    match published {
        Ok(()) => {
            tracing::debug!(event_id, "retry is due; back on the work queue");
            metrics::counter!("processor_retries_forwarded_total").increment(1);
            ack(delivery).await;
        }
        Err(error) => {
            tracing::warn!(%error, event_id, "could not bring a due retry back; it stays in its delay queue");
            nack_requeue(delivery).await;
        }
    }
}

async fn nap(duration: Duration, stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = stop.cancelled() => {}
    }
}
