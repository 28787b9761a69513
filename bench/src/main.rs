//! `bench`: measures the pipeline against what the broker and the database allow.
//!
//! It builds its own world (a fresh database `bench_<unix time>_<hex>`, a seeded catalog, an
//! AMQP prefix `bench.<tag>`), starts `target/release/ingest` and `target/release/processor
//! run` as child processes, drives them with unique signed `checkout.session.completed`
//! events, and measures the raw ceilings with the same payload in the same run:
//!
//! - `raw-broker`: persistent publish-with-confirm to a fresh quorum queue, many in flight;
//! - `raw-db`: the processor's per-event transaction run directly with sqlx, 1..16 clients;
//! - `ingest`: closed loop (N in flight) and open loop (fixed rate, latency from the
//!   scheduled send time) against ingest, no processor running;
//! - `drain`: the processor started on the backlog the ingest phases left; drain rate;
//! - `e2e`: open loop at a fixed rate with the processor running; POST→commit latency.
//!
//! Everything it made is removed at the end (database unless `--keep`, queues, exchanges,
//! child processes). Progress goes to stderr, the report to stdout (markdown, or `--json`).

mod catalog;
mod children;
mod drain;
mod histogram;
mod load;
mod raw;
mod report;
mod resources;
mod world;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::report::Report;
use crate::world::World;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmark of ingest and processor against the raw broker and database ceilings"
)]
struct Cli {
    #[command(subcommand)]
    command: Phase,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum Phase {
    /// Everything below, in this order: raw-broker, raw-db, ingest, drain, e2e.
    All,
    /// Persistent publish-with-confirm of the event bodies to a fresh quorum queue.
    RawBroker,
    /// The processor's per-event transaction run directly against PostgreSQL.
    RawDb,
    /// Ingest alone (no processor): closed loop, then open loop at half the raw publish rate
    /// (raw-broker runs first unless --open-rate is given).
    Ingest,
    /// A closed-loop backlog through ingest, then the processor drains it.
    Drain,
    /// Open loop at --e2e-rate with the processor running; POST→commit latency.
    E2e,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::RawBroker => "raw-broker",
            Self::RawDb => "raw-db",
            Self::Ingest => "ingest",
            Self::Drain => "drain",
            Self::E2e => "e2e",
        }
    }
}

/// Sizes and settings of a run. Every option works with every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Messages in raw-broker, requests in the closed-loop ingest phase (and so the backlog
    /// the processor drains).
    #[arg(long, global = true, default_value_t = 50_000)]
    pub events: u64,

    /// Length of each open-loop phase (ingest open loop, e2e).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Transactions per client count in raw-db.
    #[arg(long, global = true, default_value_t = 2_000)]
    pub db_events: u64,

    /// Client counts tried in raw-db (comma-separated).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "1,2,4,8,16"
    )]
    pub db_clients: Vec<u32>,

    /// Requests in flight in the closed loop, and publishes in flight in raw-broker.
    #[arg(long, global = true, default_value_t = 256)]
    pub in_flight: u32,

    /// AMQP channels raw-broker spreads its publishes over (ingest's default is 4).
    #[arg(long, global = true, default_value_t = 4)]
    pub raw_channels: u32,

    /// Rate of the open-loop ingest phase, events/s; default: half the raw publish rate.
    #[arg(long, global = true)]
    pub open_rate: Option<f64>,

    /// Rate of the e2e phase, events/s.
    #[arg(long, global = true, default_value_t = 1_000.0)]
    pub e2e_rate: f64,

    /// Most requests an open loop keeps in flight before it stops starting new ones (their
    /// latency still counts from the scheduled time).
    #[arg(long, global = true, default_value_t = 8_192)]
    pub open_max_in_flight: u32,

    /// How often e2e looks for newly committed purchases (POST→visible latency resolution).
    #[arg(long, global = true, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Give up waiting for commits after this long without progress.
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// Completed purchases (with their events and grants) stored before measuring.
    #[arg(long, global = true, default_value_t = 0)]
    pub seed_purchases: u64,

    /// Keep the database at the end (queues and exchanges are always deleted).
    #[arg(long, global = true)]
    pub keep: bool,

    /// Print the report as JSON instead of markdown.
    #[arg(long, global = true)]
    pub json: bool,

    /// Where the ingest and processor binaries are.
    #[arg(long, global = true, default_value = "target/release")]
    pub bin_dir: std::path::PathBuf,

    /// A PostgreSQL URL the bench database is created from (its database is replaced by
    /// the bench database's name).
    #[arg(
        long,
        global = true,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,

    /// RabbitMQ URL.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
}

impl Options {
    fn check(&self) -> anyhow::Result<()> {
        if self.events == 0 || self.db_events == 0 || self.in_flight == 0 {
            bail!("--events, --db-events and --in-flight must be at least 1");
        }
        if self.raw_channels == 0 || self.open_max_in_flight == 0 {
            bail!("--raw-channels and --open-max-in-flight must be at least 1");
        }
        if self.db_clients.is_empty() || self.db_clients.contains(&0) {
            bail!("--db-clients needs client counts of at least 1");
        }
        let positive = |rate: f64| rate.is_finite() && rate > 0.0;
        if !positive(self.e2e_rate) || self.open_rate.is_some_and(|r| !positive(r)) {
            bail!("--e2e-rate and --open-rate must be positive");
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    cli.options.check()?;
    let options = cli.options;
    let mut world = World::new(&options)?;
    let mut report = Report::new(&world, cli.command.name().to_owned(), &options);
    progress(&format!(
        "run {}: database {}, AMQP prefix {}",
        world.tag, world.db_name, world.prefix
    ));

    let outcome = tokio::select! {
        outcome = phases(cli.command, &options, &mut world, &mut report) => outcome,
        signal = stop_signal() => Err(anyhow::anyhow!("interrupted by {signal}: cleaning up")),
    };
    if report.rss.is_none() {
        report.rss = world.peak_rss();
    }
    world.teardown().await;
    outcome?;

    report.finish();
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?
        );
    } else {
        println!("{}", report.markdown());
    }
    Ok(ExitCode::SUCCESS)
}

async fn phases(
    phase: Phase,
    options: &Options,
    world: &mut World,
    report: &mut Report,
) -> anyhow::Result<()> {
    let wants = |p: Phase| phase == Phase::All || phase == p;
    let needs_raw_broker =
        wants(Phase::RawBroker) || (phase == Phase::Ingest && options.open_rate.is_none());
    let needs_ingest = wants(Phase::Ingest) || wants(Phase::Drain) || wants(Phase::E2e);

    world.setup_database(options).await?;
    report.seeded_purchases = options.seed_purchases;
    if needs_ingest {
        world.declare_topology().await?;
    }

    if needs_raw_broker {
        progress("raw broker: persistent publish-with-confirm to a fresh quorum queue");
        let events = world.events("rb", options.events).await?;
        report.body_bytes = Some(catalog::mean_len(&events));
        let cpu = world.begin_phase();
        let result = raw::broker(world, options, &events).await?;
        report.costs.push(world.end_phase(cpu, "raw-broker"));
        progress(&format!("raw broker: {:.0} messages/s", result.rate));
        report.raw_broker = Some(result);
    }

    if wants(Phase::RawDb) {
        progress("raw db: the processor's per-event transaction, directly with sqlx");
        let cpu = world.begin_phase();
        let result = raw::database(world, options).await?;
        report.costs.push(world.end_phase(cpu, "raw-db"));
        progress(&format!(
            "raw db: best {:.0} transactions/s at {} clients",
            result.best_rate, result.best_clients
        ));
        report.raw_db = Some(result);
    }

    let mut backlog = Vec::new();
    if wants(Phase::Ingest) || wants(Phase::Drain) {
        world.start_ingest().await?;
        progress(&format!(
            "ingest closed loop: {} requests, {} in flight (no processor running)",
            options.events, options.in_flight
        ));
        let events = world.events("ic", options.events).await?;
        report.body_bytes.get_or_insert(catalog::mean_len(&events));
        let cpu = world.begin_phase();
        let result = load::closed_loop(world.webhook_url()?, &events, options.in_flight).await?;
        report
            .costs
            .push(world.end_phase(cpu, "ingest closed loop"));
        progress(&format!(
            "ingest closed loop: {:.0} requests/s answered 200, {} not 200",
            result.rate, result.failed
        ));
        backlog.extend(load::accepted(&events, &result));
        report.ingest_closed = Some(result);
    }

    if wants(Phase::Ingest) {
        let rate = match (options.open_rate, &report.raw_broker) {
            (Some(rate), _) => rate,
            (None, Some(raw)) => (raw.rate / 2.0).max(1.0),
            (None, None) => bail!("--open-rate is needed when raw-broker does not run"),
        };
        let count = open_count(rate, options.duration);
        progress(&format!(
            "ingest open loop: {rate:.0}/s for {} ({count} requests)",
            humantime::format_duration(options.duration)
        ));
        let events = world.events("io", count).await?;
        let cpu = world.begin_phase();
        let result = load::open_loop(
            world.webhook_url()?,
            &events,
            rate,
            options.open_max_in_flight,
            None,
        )
        .await?;
        report.costs.push(world.end_phase(cpu, "ingest open loop"));
        progress(&format!(
            "ingest open loop: p99 {:.2} ms, {} not 200",
            result.latency.p99_ms, result.failed
        ));
        backlog.extend(load::accepted(&events, &result));
        report.ingest_open = Some(result);
    }

    if wants(Phase::Drain) {
        progress(&format!(
            "drain: starting the processor on a backlog of {} events",
            backlog.len()
        ));
        let cpu = world.begin_phase();
        let result = drain::backlog(world, options, &backlog).await?;
        report.costs.push(world.end_phase(cpu, "drain"));
        progress(&format!(
            "drain: {:.0} events/s ({} of {} committed)",
            result.rate, result.committed, result.expected
        ));
        report.drain = Some(result);
    }

    if wants(Phase::E2e) {
        world.start_ingest().await?;
        world.start_processor().await?;
        let count = open_count(options.e2e_rate, options.duration);
        progress(&format!(
            "e2e: open loop {:.0}/s for {} ({count} events), processor running",
            options.e2e_rate,
            humantime::format_duration(options.duration)
        ));
        let events = world.events("ee", count).await?;
        let cpu = world.begin_phase();
        let result = drain::end_to_end(world, options, &events).await?;
        report.costs.push(world.end_phase(cpu, "e2e"));
        progress(&format!(
            "e2e: POST→commit p99 {:.1} ms (visible), {:.1} ms (created_at)",
            result.visible.p99_ms, result.created_at.p99_ms
        ));
        report.e2e = Some(result);
    }

    report.rss = world.peak_rss();
    Ok(())
}

/// Ctrl-C or SIGTERM: the run stops and still cleans up after itself.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn open_count(rate: f64, duration: Duration) -> u64 {
    // Truncation is fine: a count of requests.
    ((rate * duration.as_secs_f64()).round() as u64).max(1)
}

/// Progress lines go to stderr; stdout carries only the report.
pub fn progress(line: &str) {
    eprintln!("[bench] {line}");
}
