//! Settings both binaries share. Every setting is a flag with an environment fallback and
//! is validated when parsed, so a bad value stops start-up with a message naming it.

use crate::broker::AmqpUrls;
use crate::topology::{DEFAULT_PREFIX, Topology};

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or a comma-separated list of cluster nodes tried in order.
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = parse_amqp_urls
    )]
    pub amqp_url: AmqpUrls,

    /// Prefix of every exchange and queue name (lets several deployments share a broker).
    #[arg(long = "amqp-prefix", env = "AMQP_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub amqp_prefix: String,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(&self.amqp_prefix)
    }
}

fn parse_amqp_urls(raw: &str) -> Result<AmqpUrls, String> {
    AmqpUrls::parse(raw).map_err(|e| e.to_string())
}

fn parse_prefix(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 200
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("AMQP_PREFIX must be 1-200 characters of letters, digits, `.`, `_` or `-`".into())
    }
}

/// Parses a duration such as `5s`, `250ms` or `2m` (humantime syntax).
pub fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| format!("`{raw}` is not a duration: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr. The level comes from RUST_LOG (default `info`).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
