//! Processor settings: flags with environment fallbacks, validated at start-up.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::config::{BrokerArgs, LogArgs, ModeArgs};

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

/// `postgres://user:pass@host/db?sslpassword=x` → `postgres://user:***@host/db?sslpassword=***`.
pub fn redact_url(url: &str) -> String {
    shared::redact::url(url)
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub modes: ModeArgs,

    /// Deliveries RabbitMQ sends ahead of acknowledgements (basic.qos prefetch). Keep it at
    /// least PROCESSOR_BATCH_SIZE × PROCESSOR_CONCURRENCY for full batches.
    #[arg(long, env = "PROCESSOR_PREFETCH", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Batches handled at the same time, each holding one database connection (keep
    /// DATABASE_MAX_CONNECTIONS above it). 8: measured 5 % faster drains than 4 here.
    #[arg(long, env = "PROCESSOR_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Batches not full yet (less than PROCESSOR_BATCH_SIZE events) that may run at the same
    /// time, at most PROCESSOR_CONCURRENCY. One more waits, gathering deliveries, until one
    /// of them ends or it is full: under light traffic a few transactions of several events
    /// cost the database less than many of one or two, so events wait less (measured at
    /// 1,000 events/s: POST→commit p99 a median of 94 ms with 2 against 232 ms with all 8,
    /// in alternated runs; docs/BENCHMARKS.md). A backlog makes full batches, which use the
    /// whole concurrency.
    #[arg(long, env = "PROCESSOR_PARTIAL_BATCHES", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partial_batches: u16,

    /// Most events committed in one transaction (each under its own savepoint).
    #[arg(long, env = "PROCESSOR_BATCH_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,

    /// Longest time the first event of a batch waits for others to join it. The default, 0,
    /// batches naturally: a batch is what arrived while the previous ones ran, so it is one
    /// event when traffic is light and fills up under a backlog (measured: lower latency at
    /// 1,000 events/s and the same drain rate as 5ms; docs/BENCHMARKS.md).
    #[arg(long, env = "PROCESSOR_BATCH_WAIT", default_value = "0s",
          value_parser = shared::config::parse_duration)]
    pub batch_wait: Duration,

    /// Deliveries of one message after which RabbitMQ itself dead-letters it: the last
    /// resort, for when the database cannot count crashes (PROCESSOR_CRASH_LIMIT does that
    /// first). A delivery counts even if the processor died before starting it, and every
    /// crash returns up to PROCESSOR_PREFETCH messages, so this stays well above the number
    /// of restarts a crash loop takes to diagnose. Part of the work queue's arguments:
    /// changing it for an existing queue needs the queue deleted or a policy.
    #[arg(long, env = "PROCESSOR_DELIVERY_LIMIT", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,

    /// Times the processor may die (or panic) while handling one event before that event is
    /// dead-lettered with class `crash`. Counted in the database, and only for the event
    /// being handled: a redelivered message is handled alone before its neighbours, so the
    /// messages merely held in the prefetch buffer at a crash are never blamed.
    #[arg(long, env = "PROCESSOR_CRASH_LIMIT", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub crash_limit: u32,

    /// Delays between attempts after a transient failure, in order; a delay may repeat
    /// (`5s,5s,30s`), and each distinct delay has one delay queue. Attempts beyond the list
    /// wait the last delay.
    #[arg(long, env = "PROCESSOR_RETRY_DELAYS", default_value = "5s,30s,2m,10m,1h,6h",
          value_parser = parse_delays)]
    pub retry_delays: RetryDelays,

    /// Attempts (first try included) before a transiently failing event is dead-lettered.
    /// Default: the number of retry delays + 1.
    #[arg(long, env = "PROCESSOR_MAX_ATTEMPTS", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: Option<u32>,

    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`. Loopback by
    /// default: metrics are for the operator, not the world (Compose sets 0.0.0.0:9090 inside
    /// the container, whose port it does not publish beyond the host).
    #[arg(long, env = "PROCESSOR_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: std::net::SocketAddr,

    /// How often queue depths are sampled for the metrics.
    #[arg(long, env = "PROCESSOR_QUEUE_SAMPLE_INTERVAL", default_value = "10s",
          value_parser = shared::config::parse_duration)]
    pub queue_sample_interval: Duration,

    /// Test-only crash hook (see `worker::TestHook`); only in builds with the `test-hooks`
    /// feature, which release builds do not enable.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "PROCESSOR_TEST_HOOK", hide = true)]
    pub test_hook: Option<crate::worker::TestHook>,

    /// On SIGTERM, how long in-flight messages may take to finish before they are returned
    /// to the queue unacknowledged.
    #[arg(long, env = "PROCESSOR_SHUTDOWN_TIMEOUT", default_value = "30s",
          value_parser = shared::config::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// The retry schedule, parsed from `5s,30s,2m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelays(pub Vec<Duration>);

pub fn parse_delays(raw: &str) -> Result<RetryDelays, String> {
    let mut delays = Vec::new();
    for part in raw.split(',').map(str::trim) {
        let delay = shared::config::parse_duration(part)
            .map_err(|e| format!("PROCESSOR_RETRY_DELAYS: {e}"))?;
        if delay < Duration::from_millis(1) || delay > Duration::from_secs(7 * 24 * 3600) {
            return Err(format!(
                "PROCESSOR_RETRY_DELAYS: `{part}` must be between 1ms and 7 days"
            ));
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
    /// Apply the database migrations, then consume events until SIGTERM. Also serves the
    /// ops console when OPS_TOKEN or OPS_READONLY_TOKEN is set.
    Run {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        console: ConsoleArgs,
    },
    /// Serve the ops console (in the browser) until SIGTERM, without consuming events.
    Console {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        console: ConsoleArgs,
        /// The processors' retry schedule, to know which delay queues to show.
        #[arg(long, env = "PROCESSOR_RETRY_DELAYS", default_value = "5s,30s,2m,10m,1h,6h",
              value_parser = parse_delays)]
        retry_delays: RetryDelays,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Inspect, replay and purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The event log (`stripe_events`): history of one event, re-enqueueing.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Live view of the queues and of what the processors do, refreshed every second.
    Watch(WatchArgs),
    /// List events from Stripe's Events API and publish those the pipeline never received
    /// (docs/RECONCILE.md).
    Reconcile(Box<ReconcileArgs>),
    /// Whether a user may see a piece of content.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum AccessCommand {
    /// Prints `granted` and exits 0, or prints `not granted` and exits 1.
    Check {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The user's id.
        #[arg(long)]
        user: uuid::Uuid,
        /// The content's id.
        #[arg(long)]
        content: uuid::Uuid,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Depth, oldest message age, counts by failure class, error and event type.
    Stats {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print JSON: {"depth", "oldest_age_secs", "by_class", "by_type", "by_error"}.
        #[arg(long)]
        json: bool,
    },
    /// One line per dead message, oldest first; nothing is removed or reordered.
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this failure class (permanent, transient, crash).
        #[arg(long)]
        class: Option<String>,
        /// At most this many lines.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead event: headers, error history, payload.
    Show {
        #[command(flatten)]
        broker: BrokerArgs,
        event_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put matching messages back on the work queue with a fresh attempt count.
    Replay {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        selector: Selector,
        /// Only count what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// Replay at most this many messages.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Discard matching messages for good and mark their events `purged` in the event log.
    Purge {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        database: DatabaseArgs,
        /// These events.
        #[arg(long = "event-id", num_args = 1.., required_unless_present = "all")]
        event_ids: Vec<String>,
        /// Every message in the dead-letter queue.
        #[arg(long, conflicts_with = "event_ids")]
        all: bool,
        /// Confirm: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead messages `dlq replay` takes. `--type` and `--class` may be combined.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = true)]
pub struct Selector {
    /// Every message.
    #[arg(long, conflicts_with_all = ["event_ids", "event_type", "class"])]
    pub all: bool,
    /// These events.
    #[arg(long = "event-id", num_args = 1..)]
    pub event_ids: Vec<String>,
    /// Messages of this event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Messages of this failure class (permanent, transient, crash).
    #[arg(long)]
    pub class: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// The event's history: received, attempts, errors, outcome, and its purchase.
    Show {
        #[command(flatten)]
        database: DatabaseArgs,
        event_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-enqueue stored events from the log onto the work queue (safe: handling is
    /// idempotent).
    Replay {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(required = true)]
        event_ids: Vec<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Processor metrics endpoints to read rates from (comma-separated, one per instance).
    #[arg(
        long,
        env = "WATCH_METRICS_URLS",
        default_value = "http://127.0.0.1:9090/metrics",
        value_delimiter = ','
    )]
    pub metrics_urls: Vec<String>,
    /// The processors' retry schedule, to know which delay queues to show.
    #[arg(long, env = "PROCESSOR_RETRY_DELAYS", default_value = "5s,30s,2m,10m,1h,6h",
          value_parser = parse_delays)]
    pub retry_delays: RetryDelays,
    /// Refresh interval.
    #[arg(long, default_value = "1s", value_parser = shared::config::parse_duration)]
    pub interval: Duration,
    /// Print one plain-text snapshot and exit (for scripts, or without a terminal).
    #[arg(long)]
    pub once: bool,
}

/// The ops console's settings (`processor console`, and `processor run` with a token).
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// Address the ops console listens on. Loopback by default: put it behind your own
    /// access proxy (or an SSH tunnel) rather than on a public interface.
    #[arg(
        long = "ops-console-addr",
        env = "OPS_CONSOLE_ADDR",
        default_value = "127.0.0.1:9092"
    )]
    pub addr: std::net::SocketAddr,

    /// Token that may look and act (replay, purge). At least 16 characters.
    #[arg(long = "ops-token", env = "OPS_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<SecretString>,

    /// Token that may only look. At least 16 characters.
    #[arg(long = "ops-readonly-token", env = "OPS_READONLY_TOKEN", hide_env_values = true,
          value_parser = parse_token)]
    pub readonly_token: Option<SecretString>,

    /// How often the console checks whether the dead-letter queue changed and re-reads it
    /// into its index (also re-read after each replay or purge).
    #[arg(long = "ops-console-index-interval", env = "OPS_CONSOLE_INDEX_INTERVAL", default_value = "15s",
          value_parser = shared::config::parse_duration)]
    pub index_interval: Duration,
}

impl ConsoleArgs {
    /// Whether any token is set (`processor run` serves the console only then).
    pub fn enabled(&self) -> bool {
        self.token.is_some() || self.readonly_token.is_some()
    }

    /// Checks what a parser cannot see alone: at least one token, and two different ones.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.token, &self.readonly_token) {
            (None, None) => Err(
                "the ops console needs OPS_TOKEN (may act) or OPS_READONLY_TOKEN (may only look): \
                 neither is set"
                    .into(),
            ),
            (Some(a), Some(b)) if a.expose_secret() == b.expose_secret() => Err(
                "OPS_TOKEN and OPS_READONLY_TOKEN must differ: with the same value a read-only \
                 user could act"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

fn parse_token(raw: &str) -> Result<SecretString, String> {
    // The value is not echoed: it is a secret.
    if raw.chars().count() < 16 {
        return Err("ops console tokens must be at least 16 characters".into());
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("ops console tokens must not contain spaces or control characters".into());
    }
    Ok(SecretString::from(raw.to_owned()))
}

#[derive(Clone, clap::Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The mode (live or test) of the endpoint the events are published for.
    #[command(flatten)]
    pub modes: shared::config::ModeArgs,

    /// Stripe secret or restricted key that may read events (rk_… with `Events: Read`).
    /// Never logged.
    #[arg(long = "stripe-api-key", env = "STRIPE_API_KEY", hide_env_values = true,
          value_parser = parse_api_key)]
    pub api_key: SecretString,

    /// Base URL of Stripe's API.
    #[arg(long = "stripe-api-base", env = "STRIPE_API_BASE", default_value = "https://api.stripe.com",
          value_parser = crate::reconcile::stripe_api::parse_base)]
    pub api_base: url::Url,

    /// Most requests to Stripe in any one second (Stripe allows 25 per second in test mode,
    /// 100 in live mode, shared with everything else using the key).
    #[arg(long = "stripe-api-rate", env = "STRIPE_API_RATE", default_value = "20",
          value_parser = parse_rate)]
    pub api_rate: std::num::NonZeroU32,

    /// Longest wait for one answer from Stripe's API.
    #[arg(long = "stripe-api-timeout", default_value = "30s",
          value_parser = shared::config::parse_duration)]
    pub api_timeout: Duration,

    /// Reconcile the events created in this last period, e.g. `3d`, `12h` (at most 30 days:
    /// Stripe keeps events that long).
    #[arg(long, value_parser = shared::config::parse_duration,
          conflicts_with_all = ["from", "to"])]
    pub since: Option<Duration>,

    /// Start of the window, RFC 3339 (e.g. 2026-12-01T00:00:00Z); not more than 30 days ago.
    #[arg(long, value_parser = crate::reconcile::window::parse_timestamp)]
    pub from: Option<chrono::DateTime<chrono::Utc>>,

    /// End of the window, RFC 3339. Default: now.
    #[arg(long, requires = "from", value_parser = crate::reconcile::window::parse_timestamp)]
    pub to: Option<chrono::DateTime<chrono::Utc>>,

    /// Only events of this type (repeatable, at most 20; Stripe's `types[]`).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_event_type)]
    pub types: Vec<String>,

    /// Only events whose webhook deliveries have not succeeded (Stripe's
    /// `delivery_success=false`). Faster, but misses an event Stripe delivered and we
    /// dropped (a 2xx answered by a bug).
    #[arg(long)]
    pub only_undelivered: bool,

    /// List and count, publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// The webhook endpoint the events are published for: its mode decides which events
    /// belong (the other mode's are skipped).
    #[arg(long, default_value = "booking", value_parser = parse_endpoint)]
    pub endpoint: String,

    /// Keep running: reconcile the --since window again every period, until SIGTERM.
    #[arg(long, value_parser = parse_every, requires = "since")]
    pub every: Option<Duration>,

    /// Print the summary as JSON (one object per round) instead of text.
    #[arg(long)]
    pub json: bool,

    /// With --every: address of a `/metrics` server (Prometheus). None by default.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// How long RabbitMQ may take to confirm one published event.
    #[arg(long, default_value = "10s",
          value_parser = shared::config::parse_duration)]
    pub confirm_timeout: Duration,
}

impl fmt::Debug for ReconcileArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconcileArgs")
            .field("database", &self.database)
            .field("broker", &self.broker)
            .field("modes", &self.modes)
            .field("api_key", &"[redacted]")
            .field("api_base", &self.api_base.as_str())
            .field("api_rate", &self.api_rate)
            .field("api_timeout", &self.api_timeout)
            .field("since", &self.since)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("types", &self.types)
            .field("only_undelivered", &self.only_undelivered)
            .field("dry_run", &self.dry_run)
            .field("endpoint", &self.endpoint)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

fn parse_api_key(raw: &str) -> Result<SecretString, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("STRIPE_API_KEY is empty".into());
    }
    // The value is not echoed.
    if !(raw.starts_with("sk_") || raw.starts_with("rk_")) {
        return Err(
            "STRIPE_API_KEY must be a secret (sk_…) or restricted (rk_…) key, not a publishable or webhook one"
                .into(),
        );
    }
    Ok(SecretString::from(raw.to_owned()))
}

fn parse_rate(raw: &str) -> Result<std::num::NonZeroU32, String> {
    match raw.trim().parse::<u32>() {
        Ok(rate @ 1..=100) => std::num::NonZeroU32::new(rate).ok_or_else(String::new),
        _ => Err(format!(
            "STRIPE_API_RATE `{raw}` must be a whole number of requests per second, 1-100"
        )),
    }
}

fn parse_event_type(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 255
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '*'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "--type `{raw}` is not a Stripe event type (e.g. checkout.session.completed, charge.*)"
        ))
    }
}

fn parse_endpoint(raw: &str) -> Result<String, String> {
    if shared::config::ENDPOINTS.contains(&raw) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "--endpoint `{raw}` is not one of {}",
            shared::config::ENDPOINTS.join(", ")
        ))
    }
}

fn parse_every(raw: &str) -> Result<Duration, String> {
    let every = shared::config::parse_duration(raw)?;
    if every < Duration::from_secs(60) {
        return Err(format!(
            "--every `{raw}` is too short: at least 1m (each round lists the whole window)"
        ));
    }
    Ok(every)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_schedule_may_repeat_a_delay() {
        let delays = parse_delays("5s, 5s,30s").unwrap();
        assert_eq!(
            delays.0,
            [5, 5, 30].map(Duration::from_secs).to_vec(),
            "three retries, in order"
        );
        assert!(parse_delays("5s,0s").unwrap_err().contains("between 1ms"));
        assert!(
            parse_delays("5s,soon")
                .unwrap_err()
                .contains("PROCESSOR_RETRY_DELAYS")
        );
    }

    #[test]
    fn the_database_url_is_shown_without_any_password() {
        for url in [
            "postgres://app:hunter2@db:5432/purchases",
            "postgres://app@db:5432/purchases?password=hunter2",
            "postgresql://app@db/purchases?sslmode=verify-full&sslpassword=hunter2",
        ] {
            let cli = Cli::try_parse_from(["processor", "migrate", "--database-url", url]).unwrap();
            let shown = format!("{cli:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn the_metrics_listener_is_on_loopback_by_default() {
        let cli = Cli::try_parse_from([
            "processor",
            "run",
            "--database-url",
            "postgres://app@db/purchases",
        ])
        .unwrap();
        let Command::Run { worker, .. } = cli.command else {
            panic!("not run");
        };
        assert!(worker.metrics_addr.ip().is_loopback());
    }
}
