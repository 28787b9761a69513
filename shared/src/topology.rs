//! Broker topology: names and declarations, in one place.
//!
//! ```text
//! ingest ──publish──▶ [stripe.events] (topic) ──#──▶ (stripe.events.processor)  quorum work queue
//!                                                     │  reject / delivery limit
//!                                                     ▼
//!                       [stripe.events.dead] (fanout) ──▶ (stripe.events.dead)   dead letters
//! processor ──retry──▶ (stripe.events.delay.30s) ──due──▶ processor forwards ──▶ work queue
//! ```
//!
//! The delay queues are plain quorum queues: no TTL, no dead-lettering. The processor's
//! delay forwarder takes a message off when its `x-retry-due-at-ms` has come and publishes it
//! back to the work queue (confirm first, ack second). Broker-side TTL dead-lettering was
//! tried first and stalled for minutes after a quorum leader change on RabbitMQ 3.10
//! (docs/RELIABILITY.md, finding 3); a publish and an ack are the two operations whose
//! failure modes we already handle everywhere else.
//!
//! Every name derives from one prefix (`stripe.events` by default) so that tests and
//! parallel deployments each get their own set. The processor owns the queues and declares
//! them; ingest declares only the exchange it publishes to. Until a processor has declared
//! the work queue, ingest's mandatory publishes come back unroutable and it answers 503, so
//! Stripe retries instead of an event being dropped.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

/// Delivery limit of the delay and dead-letter queues: never reached, on purpose (see
/// [`Topology::declare`]).
pub const UNREACHABLE_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Default prefix of every exchange and queue name.
pub const DEFAULT_PREFIX: &str = "stripe.events";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange ingest publishes to, routing key = event type.
    pub exchange: String,
    /// Quorum queue the processor consumes, bound to `exchange` with `#`.
    pub work_queue: String,
    /// Fanout exchange that dead letters go through.
    pub dead_exchange: String,
    /// Where dead letters wait for an operator.
    pub dead_queue: String,
    prefix: String,
}

/// Queue arguments that come from the processor's configuration.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Deliveries after which the broker dead-letters a message that keeps crashing its
    /// consumer (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// The retry schedule; one delay queue per distinct delay in it.
    pub retry_delays: Vec<Duration>,
}

/// The delays of a retry schedule with repeats removed, in first-seen order: `5s,5s,30s`
/// retries twice after 5 s and once after 30 s, through two delay queues.
pub fn distinct_delays(schedule: &[Duration]) -> Vec<Duration> {
    let mut distinct: Vec<Duration> = Vec::with_capacity(schedule.len());
    for delay in schedule {
        if !distinct.contains(delay) {
            distinct.push(*delay);
        }
    }
    distinct
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Self {
            exchange: prefix.to_owned(),
            work_queue: format!("{prefix}.processor"),
            dead_exchange: format!("{prefix}.dead"),
            dead_queue: format!("{prefix}.dead"),
            prefix: prefix.to_owned(),
        }
    }

    /// Name of the delay queue for one retry tier, e.g. `stripe.events.delay.30s`. (Not
    /// `retry.30s`: those were TTL queues, and RabbitMQ refuses to redeclare a queue with
    /// other arguments.)
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!(
            "{}.delay.{}",
            self.prefix,
            humantime::format_duration(delay)
        )
    }

    /// What ingest needs: the durable topic exchange.
    pub async fn declare_exchange(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
    }

    /// Everything: exchanges, the work queue, the dead-letter queue and the retry tiers.
    /// Declaring is idempotent as long as the arguments do not change; RabbitMQ refuses a
    /// redeclaration with other arguments (PRECONDITION_FAILED), which then names the queue.
    pub async fn declare(&self, channel: &Channel, settings: &QueueSettings) -> lapin::Result<()> {
        self.declare_exchange(channel).await?;
        channel
            .exchange_declare(
                self.dead_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;

        let mut dead_args = quorum_args();
        dead_args.insert("x-overflow".into(), text("reject-publish"));
        // `dlq list` and `dlq show` read dead letters and give them back, which counts as a
        // delivery: on RabbitMQ 4 (default limit 20) they would be dropped after 20 reads.
        dead_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(UNREACHABLE_DELIVERY_LIMIT),
        );
        declare_queue(channel, &self.dead_queue, dead_args).await?;
        bind(channel, &self.dead_queue, &self.dead_exchange, "").await?;

        let mut work_args = at_least_once_dead_lettering(&self.dead_exchange);
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(settings.delivery_limit.into()),
        );
        declare_queue(channel, &self.work_queue, work_args).await?;
        bind(channel, &self.work_queue, &self.exchange, "#").await?;

        for delay in distinct_delays(&settings.retry_delays) {
            // The delay forwarder returns a message that is not due yet (`nack` with
            // requeue), which counts as a delivery. RabbitMQ 4 gives quorum queues a default
            // delivery limit of 20 and, with no dead-letter exchange, drops a message past
            // it: an explicit, unreachable limit keeps every version from doing that.
            let mut args = quorum_args();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(UNREACHABLE_DELIVERY_LIMIT),
            );
            declare_queue(channel, &self.retry_queue(delay), args).await?;
        }
        Ok(())
    }

    /// Removes everything [`Topology::declare`] made. For tests and teardown only.
    pub async fn delete(&self, channel: &Channel, retry_delays: &[Duration]) -> lapin::Result<()> {
        let mut queues = vec![self.work_queue.clone(), self.dead_queue.clone()];
        queues.extend(
            distinct_delays(retry_delays)
                .into_iter()
                .map(|d| self.retry_queue(d)),
        );
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [&self.exchange, &self.dead_exchange] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args
}

/// Quorum queues dead-letter at-least-once only with `reject-publish` overflow; with the
/// default overflow they silently fall back to at-most-once.
fn at_least_once_dead_lettering(dead_letter_exchange: &str) -> FieldTable {
    let mut args = quorum_args();
    args.insert("x-dead-letter-exchange".into(), text(dead_letter_exchange));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
