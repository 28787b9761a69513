//! Processor settings: flags with environment fallbacks, validated at start-up.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::config::{BrokerArgs, LogArgs};

#[derive(Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true, value_parser = parse_database_url)]
    pub database_url: SecretString,

    /// Largest number of database connections the processor opens.
    #[arg(long = "database-max-connections", env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,

    /// How long to wait for a free database connection before the attempt counts as failed.
    #[arg(long = "database-acquire-timeout", env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s",
          value_parser = shared::config::parse_duration)]
    pub acquire_timeout: Duration,
}

impl fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field(
                "database_url",
                &redact_url(self.database_url.expose_secret()),
            )
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

fn parse_database_url(raw: &str) -> Result<SecretString, String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Ok(SecretString::from(raw.to_owned()))
    } else {
        // The value is not echoed: it may hold a password.
        Err("DATABASE_URL must start with postgres:// or postgresql://".into())
    }
}

/// `postgres://user:pass@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    shared::broker::redact(url)
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Deliveries RabbitMQ sends ahead of acknowledgements (basic.qos prefetch).
    #[arg(long, env = "PROCESSOR_PREFETCH", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Messages handled at the same time.
    #[arg(long, env = "PROCESSOR_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Deliveries of one message after which RabbitMQ dead-letters it (a message that keeps
    /// crashing the processor). Part of the work queue's arguments: changing it for an
    /// existing queue needs the queue deleted or a policy.
    #[arg(long, env = "PROCESSOR_DELIVERY_LIMIT", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,

    /// Delays between attempts after a transient failure, one retry queue each. Attempts
    /// beyond the list wait the last delay.
    #[arg(long, env = "PROCESSOR_RETRY_DELAYS", default_value = "5s,30s,2m,10m,1h,6h",
          value_parser = parse_delays)]
    pub retry_delays: RetryDelays,

    /// Attempts (first try included) before a transiently failing event is dead-lettered.
    /// Default: the number of retry delays + 1.
    #[arg(long, env = "PROCESSOR_MAX_ATTEMPTS", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: Option<u32>,

    /// On SIGTERM, how long in-flight messages may take to finish before they are returned
    /// to the queue unacknowledged.
    #[arg(long, env = "PROCESSOR_SHUTDOWN_TIMEOUT", default_value = "30s",
          value_parser = shared::config::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// The retry schedule, parsed from `5s,30s,2m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelays(pub Vec<Duration>);

fn parse_delays(raw: &str) -> Result<RetryDelays, String> {
    let mut delays = Vec::new();
    for part in raw.split(',').map(str::trim) {
        let delay = shared::config::parse_duration(part)
            .map_err(|e| format!("PROCESSOR_RETRY_DELAYS: {e}"))?;
        if delay < Duration::from_millis(1) || delay > Duration::from_secs(7 * 24 * 3600) {
            return Err(format!(
                "PROCESSOR_RETRY_DELAYS: `{part}` must be between 1ms and 7 days"
            ));
        }
        if delays.contains(&delay) {
            return Err(format!("PROCESSOR_RETRY_DELAYS: `{part}` appears twice"));
        }
        delays.push(delay);
    }
    Ok(RetryDelays(delays))
}

impl WorkerArgs {
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or_else(|| {
            u32::try_from(self.retry_delays.0.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1)
        })
    }
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "processor",
    version,
    about = "Turns Stripe events into purchases, exactly once"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Apply the database migrations, then consume events until SIGTERM.
    Run {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}
