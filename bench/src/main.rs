//! `bench`: measures the pipeline against what the broker and the database allow.
//!
//! It builds its own world (a fresh database `bench_<unix time>_<hex>`, a seeded catalog, an
//! AMQP prefix `bench.<tag>`), starts `target/release/ingest` and `target/release/processor
//! run` as child processes, drives them with unique signed `checkout.session.completed`
//! events, and measures the raw ceilings with the same payload in the same run:
//!
//! - `raw-broker`: persistent publish-with-confirm to a fresh quorum queue, many in flight;
//! - `raw-db`: one event per transaction run directly with sqlx, 1..16 clients, in two
//!   shapes: the processor's own transaction, and the 3-insert one (event, purchase,
//!   access) that the drain is compared with;
//! - `ref-ingest`: a minimal receiver (axum, HMAC check, confirmed publish; `reference.rs`)
//!   in a child process, driven like ingest's closed loop and open loop: what ingest's
//!   rate and latency are compared with;
//! - `ingest`: closed loop (N in flight) and open loop (fixed rate, half the reference's,
//!   latency from the scheduled send time) against ingest, no processor running;
//! - `drain`: the processor started on the backlog the ingest phases left; drain rate;
//! - `ref-e2e`: the reference receiver and a minimal batch consumer (`ref_consumer.rs`) at
//!   the e2e rate: the POST→commit latency this machine allows a pipeline;
//! - `e2e`: open loop at a fixed rate with the processor running; POST→commit latency.
//!
//! Everything it made is removed at the end (database unless `--keep`, queues, exchanges,
//! child processes). Progress goes to stderr, the report to stdout (markdown, or `--json`).

mod catalog;
mod children;
mod drain;
mod figures;
mod histogram;
mod load;
mod raw;
mod raw_db;
mod ref_consumer;
mod reference;
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

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
enum Phase {
    /// Everything below, in this order: raw-broker, raw-db, ref-ingest, ingest, drain,
    /// ref-e2e, e2e.
    All,
    /// Persistent publish-with-confirm of the event bodies to a fresh quorum queue.
    RawBroker,
    /// One event per transaction directly against PostgreSQL: the processor's transaction
    /// and the 3-insert one (event, purchase, access).
    RawDb,
    /// The minimal reference receiver (axum, HMAC check, confirmed publish) in a child
    /// process, driven by the ingest closed loop's generator and settings.
    RefIngest,
    /// Ingest alone (no processor): ref-ingest, then ingest's closed loop, then its open
    /// loop at half the reference's rate (--open-rate skips nothing, it sets that rate).
    Ingest,
    /// A closed-loop backlog through ingest, then the processor drains it.
    Drain,
    /// The reference receiver and a minimal consumer writing the 3-insert shape in
    /// batches, open loop at --e2e-rate; POST→commit latency.
    RefE2e,
    /// Ref-e2e, then open loop at --e2e-rate with the processor running; POST→commit latency.
    E2e,
    /// The reference receiver itself, started by `ref-ingest` as a child process.
    #[command(hide = true)]
    RefServer(reference::ServerArgs),
    /// The reference consumer itself, started by `ref-e2e` as a child process.
    #[command(hide = true)]
    RefConsumer(ref_consumer::ConsumerArgs),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::RawBroker => "raw-broker",
            Self::RawDb => "raw-db",
            Self::RefIngest => "ref-ingest",
            Self::Ingest => "ingest",
            Self::Drain => "drain",
            Self::RefE2e => "ref-e2e",
            Self::E2e => "e2e",
            Self::RefServer(_) => "ref-server",
            Self::RefConsumer(_) => "ref-consumer",
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

    /// AMQP channels the reference receiver publishes over: ingest's, that is
    /// INGEST_PUBLISH_CHANNELS when set (it is passed on to ingest too), else ingest's
    /// default 4.
    #[arg(long, global = true, env = "INGEST_PUBLISH_CHANNELS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub ref_channels: u16,

    /// Rate of the open-loop ingest phase, events/s; default: half the reference's rate.
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
    // The same runtime as ingest's `#[tokio::main]`: one worker per core.
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
    let child = match &cli.command {
        Phase::RefServer(args) => {
            Some(runtime.block_on(reference::serve(args.clone(), &cli.options.amqp_url)))
        }
        Phase::RefConsumer(args) => {
            Some(runtime.block_on(ref_consumer::run(args.clone(), &cli.options.amqp_url)))
        }
        _ => None,
    };
    if let Some(outcome) = child {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("bench {}: {error:#}", cli.command.name());
                ExitCode::FAILURE
            }
        };
    }
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
        outcome = phases(&cli.command, &options, &mut world, &mut report) => outcome,
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
    phase: &Phase,
    options: &Options,
    world: &mut World,
    report: &mut Report,
) -> anyhow::Result<()> {
    let wants = |p: Phase| *phase == Phase::All || *phase == p;
    let needs_raw_broker = wants(Phase::RawBroker);
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
        progress("raw db: the processor's transaction and the 3-insert one, directly with sqlx");
        let cpu = world.begin_phase();
        let result = raw_db::database(world, options).await?;
        report.costs.push(world.end_phase(cpu, "raw-db"));
        for shape in [&result.processor, &result.three_insert] {
            progress(&format!(
                "raw db, {}: best {:.0} transactions/s at {} clients",
                shape.shape.label(),
                shape.best_rate,
                shape.best_clients
            ));
        }
        report.raw_db = Some(result);
    }

    if wants(Phase::RefIngest) || wants(Phase::Ingest) {
        progress(&format!(
            "reference receiver closed loop: {} requests, {} in flight, {} publish channels",
            options.events, options.in_flight, options.ref_channels
        ));
        let (result, costs) = reference::measure(world, options, wants(Phase::Ingest)).await?;
        report.costs.extend(costs);
        progress(&format!(
            "reference receiver closed loop: {:.0} requests/s answered 200, {} not 200",
            result.load.rate, result.load.failed
        ));
        report.reference = Some(result);
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
        let rate = match &report.reference {
            Some(reference) => open_rate(options, reference.load.rate),
            None => options
                .open_rate
                .context("--open-rate is needed when ref-ingest does not run")?,
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

    if wants(Phase::RefE2e) || wants(Phase::E2e) {
        progress(&format!(
            "reference e2e: reference receiver and consumer, open loop {:.0}/s for {}",
            options.e2e_rate,
            humantime::format_duration(options.duration)
        ));
        let (result, cost) = reference::end_to_end(world, options).await?;
        report.costs.push(cost);
        progress(&format!(
            "reference e2e: POST→commit p99 {:.1} ms (seen), receiver answer p99 {:.1} ms",
            result.visible.p99_ms, result.load.latency.p99_ms
        ));
        report.ref_e2e = Some(result);
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
        let url = world.webhook_url()?;
        let pool = world.pool()?.clone();
        let result = drain::end_to_end(&pool, url, options, &events).await?;
        report.costs.push(world.end_phase(cpu, "e2e"));
        progress(&format!(
            "e2e: POST→commit p99 {:.1} ms (seen), ingest answer p99 {:.1} ms",
            result.visible.p99_ms, result.load.latency.p99_ms
        ));
        report.e2e = Some(result);
    }

    report.rss = world.peak_rss();
    Ok(())
}

/// Ctrl-C or SIGTERM: the run stops and still cleans up after itself.
pub async fn stop_signal() -> &'static str {
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

/// The rate of the open loops of ingest and of the reference: `--open-rate`, or half the
/// reference's closed-loop rate.
fn open_rate(options: &Options, reference_rate: f64) -> f64 {
    options
        .open_rate
        .unwrap_or_else(|| (reference_rate / 2.0).max(1.0))
}

fn open_count(rate: f64, duration: Duration) -> u64 {
    // Truncation is fine: a count of requests.
    ((rate * duration.as_secs_f64()).round() as u64).max(1)
}

/// Progress lines go to stderr; stdout carries only the report.
pub fn progress(line: &str) {
    eprintln!("[bench] {line}");
}
