//! The operator commands (`processor dlq …`, `processor events …`, `processor watch`).
//! Their answer goes to stdout; logs go to stderr.

pub mod access;
pub mod dead_letters;
pub mod event_log;
pub mod watch;

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use shared::broker::{ConfirmError, publish_confirmed};
use shared::config::BrokerArgs;
use shared::topology::Topology;

/// Most dead letters one command holds at once.
pub const MAX_HELD: usize = 100_000;

pub async fn connect(broker: &BrokerArgs, purpose: &str) -> anyhow::Result<Connection> {
    let (connection, _) = broker
        .amqp_url
        .connect(0, &format!("processor {purpose}"))
        .await?;
    Ok(connection)
}

pub async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Puts a message straight on the work queue (default exchange), confirmed. Not through the
/// topic exchange: other queues bound to it must not get a second copy.
pub async fn to_work_queue(
    channel: &Channel,
    topology: &Topology,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), ConfirmError> {
    publish_confirmed(channel, "", &topology.work_queue, body, properties).await
}
