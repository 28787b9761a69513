//! The operator commands (`processor dlq …`, `processor events …`, `processor watch`).
//! Their answer goes to stdout, through [`say!`]; logs go to stderr.

/// `println!` for a command's answer, except that a closed stdout (`processor dlq list |
/// head`) ends the command quietly with success instead of a panic: std's `println!` panics
/// when the reader has gone. What the command did before printing stays done; messages it
/// still held go back to their queue when its connection closes.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::ops::write_answer(format_args!($($arg)*), true)
    };
}

/// [`say!`] without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::ops::write_answer(format_args!($($arg)*), false)
    };
}

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

/// Writes a command's answer to stdout; see [`say!`].
pub fn write_answer(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(error) => {
            eprintln!("error: cannot write the answer to stdout: {error}");
            std::process::exit(1)
        }
    }
}
