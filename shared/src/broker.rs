//! Connecting to RabbitMQ: one node, or a cluster given as a comma-separated list of URLs,
//! tried in order. Reconnection policy lives with each binary (ingest's publisher and the
//! processor's consumer loop), since each reacts to a lost connection differently.

use std::fmt;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// The broker URLs. They may hold a password, so `Debug` and `Display` redact it.
#[derive(Clone)]
pub struct AmqpUrls(Vec<SecretString>);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("AMQP_URL is empty")]
    NoUrl,
    #[error("AMQP_URL entry #{position} does not start with amqp:// or amqps://")]
    BadScheme { position: usize },
    #[error("could not connect to any RabbitMQ node: {0}")]
    Unreachable(String),
    #[error("RabbitMQ refused {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
}

impl AmqpUrls {
    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        let urls: Vec<SecretString> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, url)| {
                if url.starts_with("amqp://") || url.starts_with("amqps://") {
                    Ok(SecretString::from(url.to_owned()))
                } else {
                    Err(BrokerError::BadScheme { position: i + 1 })
                }
            })
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(BrokerError::NoUrl);
        }
        Ok(Self(urls))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Connects to the first node that answers, starting at `start` (so that a client
    /// that lost node k tries k+1 first). Returns the connection and the node's index.
    pub async fn connect(
        &self,
        start: usize,
        connection_name: &str,
    ) -> Result<(Connection, usize), BrokerError> {
        let mut failures = Vec::new();
        for offset in 0..self.0.len() {
            let index = (start + offset) % self.0.len();
            let url = self.0[index].expose_secret();
            let properties = ConnectionProperties::default()
                .with_connection_name(connection_name.as_bytes().to_vec().into());
            match Connection::connect(url, properties).await {
                Ok(connection) => return Ok((connection, index)),
                Err(error) => failures.push(format!("{}: {error}", crate::redact::url(url))),
            }
        }
        Err(BrokerError::Unreachable(failures.join("; ")))
    }
}

impl fmt::Debug for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self
            .0
            .iter()
            .map(|u| crate::redact::url(u.expose_secret()))
            .collect();
        f.write_str(&shown.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_redacts() {
        let urls = AmqpUrls::parse("amqp://u:secret@a:5672/%2f, amqp://b:5673").unwrap();
        assert_eq!(urls.len(), 2);
        let shown = format!("{urls:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "amqp://u:***@a:5672/%2f,amqp://b:5673");
    }

    #[test]
    fn rejects_bad_urls_without_echoing_them() {
        let err = AmqpUrls::parse("amqp://a, http://u:pw@b").unwrap_err();
        assert!(matches!(err, BrokerError::BadScheme { position: 2 }));
        assert!(!err.to_string().contains("pw"));
        assert!(matches!(AmqpUrls::parse(" , "), Err(BrokerError::NoUrl)));
    }
}

/// Delays between reconnection attempts: from 200 ms, doubling with jitter up to `max`,
/// for as long as it takes.
pub fn reconnect_delays(max: std::time::Duration) -> impl Iterator<Item = std::time::Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(200))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Why a confirmed publish did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error("RabbitMQ channel failed: {0}")]
    Channel(#[source] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key `{routing_key}` ({reply})")]
    Unroutable { routing_key: String, reply: String },
    #[error("RabbitMQ did not confirm the message: confirms are off on the channel")]
    NotConfirmed,
}

impl ConfirmError {
    /// Whether the channel should be replaced: an unroutable message says nothing bad
    /// about the channel.
    pub fn channel_suspect(&self) -> bool {
        !matches!(self, Self::Unroutable { .. })
    }
}

/// Publishes a persistent, mandatory message on a channel in confirm mode and waits for
/// the broker's answer. `Ok` means a queue has it durably. An unroutable message comes back
/// as an ack carrying the returned message: that is a failure too.
pub async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<(), ConfirmError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            crate::contract::short("routing key", routing_key).map_err(|_| {
                ConfirmError::Unroutable {
                    routing_key: routing_key.chars().take(64).collect(),
                    reply: "routing key longer than 255 bytes".into(),
                }
            })?,
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(ConfirmError::Channel)?;
    match confirm.await.map_err(ConfirmError::Channel)? {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(returned)) => Err(ConfirmError::Unroutable {
            routing_key: routing_key.to_owned(),
            reply: returned.reply_text.to_string(),
        }),
        lapin::Confirmation::Nack(_) => Err(ConfirmError::Nacked),
        lapin::Confirmation::NotRequested => Err(ConfirmError::NotConfirmed),
    }
}
