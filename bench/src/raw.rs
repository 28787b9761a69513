//! The broker ceiling: what RabbitMQ allows for ingest's publish, with the same payload,
//! measured in the same run (the database ceiling is in `raw_db.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use lapin::options::ConfirmSelectOptions;
use serde::Serialize;
use shared::broker::{AmqpUrls, publish_confirmed};
use shared::contract::EventMessage;
use tokio::task::JoinSet;

use crate::Options;
use crate::catalog::Event;
use crate::histogram::{Latencies, Summary};
use crate::world::World;

#[derive(Debug, Clone, Serialize)]
pub struct RawBroker {
    pub messages: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub in_flight: u32,
    pub channels: u32,
    pub elapsed_s: f64,
    /// Confirmed messages per second.
    pub rate: f64,
    /// Publish → confirm latency.
    pub latency: Summary,
}

/// Publishes `events` as ingest does (topic exchange → quorum work queue declared with the
/// processor's arguments; persistent, mandatory, the contract's properties), `in_flight`
/// publishes awaiting their confirm at any time, spread over `raw_channels` channels of one
/// connection. Nobody consumes the queue, as in the ingest phases; it is deleted after.
pub async fn broker(
    world: &mut World,
    options: &Options,
    events: &[Event],
) -> anyhow::Result<RawBroker> {
    let prefix = format!("{}.raw", world.prefix);
    let topology = world.declare(&prefix).await?;
    let urls = AmqpUrls::parse(world.amqp_url())?;
    let (connection, _) = urls.connect(0, "bench raw-broker").await?;
    let mut channels = Vec::new();
    for _ in 0..options.raw_channels {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }

    let messages: Arc<Vec<(Vec<u8>, lapin::BasicProperties)>> = Arc::new(
        events
            .iter()
            .map(|event| {
                let message = EventMessage {
                    event_id: event.event_id.clone(),
                    event_type: "checkout.session.completed".into(),
                    endpoint: "booking".into(),
                    received_at: Utc::now(),
                    attempt: 1,
                    body: event.body.to_vec(),
                };
                let properties = message.properties()?;
                Ok((message.body, properties))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let exchange = Arc::new(topology.exchange.clone());

    let start = Instant::now();
    let mut set = JoinSet::new();
    for worker in 0..options.in_flight as usize {
        let channel = channels[worker % channels.len()].clone();
        let (messages, next, failed, exchange) = (
            Arc::clone(&messages),
            Arc::clone(&next),
            Arc::clone(&failed),
            Arc::clone(&exchange),
        );
        set.spawn(async move {
            let mut latencies = Latencies::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, properties)) = messages.get(i) else {
                    break;
                };
                let sent = Instant::now();
                match publish_confirmed(
                    &channel,
                    &exchange,
                    "checkout.session.completed",
                    body,
                    properties.clone(),
                )
                .await
                {
                    Ok(()) => latencies.record(sent.elapsed()),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        });
    }
    let mut latencies = Latencies::new();
    while let Some(joined) = set.join_next().await {
        latencies.add(&joined.context("a publisher panicked")?);
    }
    let elapsed = start.elapsed();
    let _ = connection.close(200, "raw-broker done".into()).await;
    // Its messages would otherwise weigh on the broker while the next phases publish.
    world.delete_topology(&topology).await;

    let failed = failed.load(Ordering::Relaxed);
    let confirmed = latencies.summary().count;
    Ok(RawBroker {
        messages: events.len() as u64,
        confirmed,
        failed,
        in_flight: options.in_flight,
        channels: options.raw_channels,
        elapsed_s: elapsed.as_secs_f64(),
        rate: confirmed as f64 / elapsed.as_secs_f64(),
        latency: latencies.summary(),
    })
}
