//! The chaos suite (issue 7): one ingest and two processors on a three-node RabbitMQ cluster
//! of its own and a database behind a cuttable proxy, a stream of shuffled, duplicated Stripe
//! events, processes and broker nodes killed with `kill -9`, the database cut; then a check
//! that every event answered 200 is reflected exactly as the lifecycle says, nothing more,
//! and that the dead-letter queue holds exactly the poison events. See docs/RELIABILITY.md.

mod check;
mod cluster;
mod faults;
mod model;
mod procs;
mod proxy;
mod rng;
mod send;
mod traffic;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::faults::{Fault, FaultLog, Faults, Rig};
use crate::procs::{Managed, free_port};
use crate::proxy::Proxy;
use crate::send::{SendStats, Sender};
use crate::traffic::{CREATOR, ORGANIZATION, Traffic};

#[derive(Debug, Parser)]
#[command(
    version,
    args_override_self = true,
    about = "Chaos suite: kills, cuts and duplicates; then checks that nothing acknowledged was lost or doubled."
)]
struct Args {
    /// Distinct events to send (each 1 to 3 times).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// How long the traffic (and the faults) last.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Seed of the traffic and fault choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent HTTP requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds within which one payment's events are all sent (in random order).
    #[arg(long, default_value_t = 15.0)]
    spread: f64,
    /// Seconds between faults: uniform between these two.
    #[arg(long, default_value_t = 3.0)]
    fault_gap_min: f64,
    #[arg(long, default_value_t = 9.0)]
    fault_gap_max: f64,
    /// No faults at all (a baseline run).
    #[arg(long)]
    no_faults: bool,
    /// The kinds of fault, comma-separated: processor, ingest, leader, follower, database.
    #[arg(long, default_value = "processor,ingest,leader,follower,database", value_parser = Fault::parse_list)]
    faults: std::vec::Vec<Fault>,
    /// The machine's PostgreSQL server (a user that may create databases).
    #[arg(
        long,
        env = "CHAOS_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Folder with the release `ingest` and `processor` binaries.
    #[arg(long, env = "CHAOS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// AMQP port of node a (b and c take the next two).
    #[arg(long, default_value_t = 5691)]
    amqp_port: u16,
    /// Erlang distribution port of node a (b and c take the next two).
    #[arg(long, default_value_t = 25691)]
    dist_port: u16,
    /// Distribution port range of our rabbitmqctl calls.
    #[arg(long, default_value_t = 35691)]
    ctl_port_min: u16,
    #[arg(long, default_value_t = 35699)]
    ctl_port_max: u16,
    /// The processors' PROCESSOR_RETRY_DELAYS.
    #[arg(long, default_value = "1s,2s,5s")]
    retry_delays: String,
    /// The processors' PROCESSOR_MAX_ATTEMPTS: enough to outlast a database cut and the
    /// spread of a payment's events (a refund waits for its purchase).
    #[arg(long, default_value_t = 40)]
    max_attempts: u32,
    /// The processors' PROCESSOR_DELIVERY_LIMIT.
    #[arg(long, default_value_t = 10)]
    delivery_limit: u32,
    /// Longest wait for the queues to drain at the end, in seconds.
    #[arg(long, default_value_t = 600)]
    drain_timeout: u64,
    /// Seconds after the traffic within which the work and retry queues must be empty;
    /// draining later is reported as a stall (with the events that waited), draining never
    /// as messages stuck.
    #[arg(long, default_value_t = 60)]
    stall_limit: u64,
    /// Where to copy the logs (processes and broker nodes) when the run fails.
    #[arg(long)]
    logs_out: Option<PathBuf>,
    /// When the run fails, keep everything up this many seconds before tearing down, to
    /// look at it (the environment for rabbitmqctl is printed).
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

/// `postgres://user@host:port/db?params` → (before the db, db, params).
fn split_database_url(url: &str) -> anyhow::Result<(String, String)> {
    let (base, rest) = url
        .rsplit_once('/')
        .filter(|(b, _)| b.contains("://") && b.len() > b.find("://").unwrap_or(0) + 3)
        .context("postgres URL has no /database")?;
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Ok((base.to_owned(), query))
}

/// `postgres://user@host:port` → `host:port`.
fn host_port(base: &str) -> anyhow::Result<String> {
    let authority = base.split_once("://").context("no scheme")?.1;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Ok(if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    })
}

fn with_host(base: &str, hostport: &str) -> String {
    let (scheme, authority) = base.split_once("://").unwrap_or(("postgres", base));
    match authority.rsplit_once('@') {
        Some((user, _)) => format!("{scheme}://{user}@{hostport}"),
        None => format!("{scheme}://{hostport}"),
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn default_bin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("release")
}

/// (queue, messages) pairs.
type Depths = Vec<(String, u64)>;

/// What has to be undone at the end, whatever happened.
#[derive(Default)]
struct Cleanup {
    rig: Option<Arc<Mutex<Rig>>>,
    admin_url: Option<String>,
    database: Option<String>,
    dir: Option<PathBuf>,
    logs_out: Option<PathBuf>,
    keep_logs: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut cleanup = Cleanup {
        logs_out: args.logs_out.clone(),
        ..Cleanup::default()
    };
    let result = tokio::select! {
        result = run(&args, &mut cleanup) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let code = match &result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            cleanup.keep_logs = true;
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("chaos: {error:#}");
            cleanup.keep_logs = true;
            ExitCode::from(2)
        }
    };
    if let Err(error) = tear_down(cleanup).await {
        eprintln!("chaos: cleanup: {error:#}");
        return ExitCode::from(3);
    }
    code
}

async fn run(args: &Args, cleanup: &mut Cleanup) -> anyhow::Result<bool> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() % u128::from(u64::MAX))
                .unwrap_or(7),
        )
        .unwrap_or(7)
    });
    // Names of this run's nodes, queues, database and folder: unique even for a repeated seed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tag = format!(
        "{:06x}",
        (u64::from(nanos) ^ u64::from(std::process::id()) ^ seed) % 0xFF_FFFF
    );
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let (ingest_bin, processor_bin) = (bin_dir.join("ingest"), bin_dir.join("processor"));
    for bin in [&ingest_bin, &processor_bin] {
        if !bin.exists() {
            bail!(
                "{} not found: build first (cargo build --release -p ingest -p processor)",
                bin.display()
            );
        }
    }
    for port in (0..3).flat_map(|i| [args.amqp_port + i, args.dist_port + i]) {
        if !port_free(port) {
            bail!("port {port} is taken: another chaos run? (see --amqp-port / --dist-port)");
        }
    }
    let window = Duration::from_secs_f64(args.minutes * 60.0);
    println!(
        "chaos: seed {seed}, {} events over {:.1} min, run tag {tag}",
        args.events, args.minutes
    );

    // Scratch folder: node data, logs, the cookie.
    let dir = std::env::temp_dir().join(format!("chaos-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs"))?;
    cleanup.dir = Some(dir.clone());

    // The traffic first: the catalog is seeded from it.
    let mut rng = rng::Rng::new(seed);
    let traffic = Arc::new(Traffic::generate(&mut rng, &tag, args.events));
    let plan = traffic.plan(&mut rng, window, Duration::from_secs_f64(args.spread));
    let poison = traffic
        .payments
        .iter()
        .filter(|p| p.poison.is_some())
        .count();
    println!(
        "traffic: {} payments, {} events ({poison} poison), {} sends",
        traffic.payments.len(),
        traffic.events.len(),
        plan.len()
    );

    // Database: a fresh one, migrated directly, reached by the processors through the proxy.
    let (server, query) = split_database_url(&args.postgres_url)?;
    let database = format!("chaos_{tag}");
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.postgres_url)
        .await
        .with_context(|| format!("connecting to {}", args.postgres_url))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    cleanup.admin_url = Some(args.postgres_url.clone());
    cleanup.database = Some(database.clone());
    let direct_url = format!("{server}/{database}{query}");
    let target = tokio::net::lookup_host(host_port(&server)?)
        .await?
        .next()
        .context("PostgreSQL address")?;
    let proxy = Proxy::start(target).await?;
    let proxied_url = format!(
        "{}/{database}{query}",
        with_host(&server, &format!("127.0.0.1:{}", proxy.port))
    );
    let migrate = tokio::process::Command::new(&processor_bin)
        .arg("migrate")
        .env("DATABASE_URL", &direct_url)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    if !migrate.status.success() {
        bail!(
            "processor migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&direct_url)
        .await?;
    seed_catalog(&pool, &traffic).await?;
    println!(
        "database: {database} migrated and seeded; proxy on 127.0.0.1:{}",
        proxy.port
    );

    // The cluster.
    let mut cluster = Cluster::new(
        &dir,
        &tag,
        args.amqp_port,
        args.dist_port,
        (args.ctl_port_min, args.ctl_port_max),
    )?;
    // The rig is registered for cleanup before `formed?`, so a failed start stops the nodes.
    let formed = cluster.form().await;
    let amqp_url = cluster.urls();
    let prefix = format!("chaos.{tag}");
    let secret = format!("whsec_chaos_{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let logs = dir.join("logs");
    let common = vec![
        ("AMQP_URL".to_owned(), amqp_url.clone()),
        ("AMQP_PREFIX".to_owned(), prefix.clone()),
        ("RUST_LOG".to_owned(), "info".to_owned()),
        ("NO_COLOR".to_owned(), "1".to_owned()),
    ];
    let mut processors = Vec::new();
    for k in 1..=2 {
        let port = free_port()?;
        let mut env = common.clone();
        env.extend([
            ("DATABASE_URL".to_owned(), proxied_url.clone()),
            (
                "PROCESSOR_RETRY_DELAYS".to_owned(),
                args.retry_delays.clone(),
            ),
            (
                "PROCESSOR_MAX_ATTEMPTS".to_owned(),
                args.max_attempts.to_string(),
            ),
            (
                "PROCESSOR_DELIVERY_LIMIT".to_owned(),
                args.delivery_limit.to_string(),
            ),
            (
                "PROCESSOR_METRICS_ADDR".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "PROCESSOR_QUEUE_SAMPLE_INTERVAL".to_owned(),
                "5s".to_owned(),
            ),
            ("PROCESSOR_SHUTDOWN_TIMEOUT".to_owned(), "5s".to_owned()),
        ]);
        processors.push(Managed::new(
            &format!("processor-{k}"),
            &processor_bin,
            &["run"],
            env,
            &logs,
            format!("http://127.0.0.1:{port}/readyz"),
        ));
    }
    let ingest_port = free_port()?;
    let ingest_probe_port = free_port()?;
    let mut env = common.clone();
    env.extend([
        ("INGEST_ADDR".to_owned(), format!("127.0.0.1:{ingest_port}")),
        (
            "INGEST_METRICS_ADDR".to_owned(),
            format!("127.0.0.1:{ingest_probe_port}"),
        ),
        ("STRIPE_WEBHOOK_SECRET_BOOKING".to_owned(), secret.clone()),
        ("INGEST_RATE_LIMIT_PER_MINUTE".to_owned(), "0".to_owned()),
        ("INGEST_CONFIRM_TIMEOUT".to_owned(), "3s".to_owned()),
        ("INGEST_SHUTDOWN_TIMEOUT".to_owned(), "5s".to_owned()),
    ]);
    let ingest = Managed::new(
        "ingest",
        &ingest_bin,
        &[],
        env,
        &logs,
        format!("http://127.0.0.1:{ingest_probe_port}/readyz"),
    );
    let rig = Arc::new(Mutex::new(Rig {
        cluster,
        processors,
        ingest,
        proxy,
        work_queue: format!("{prefix}.processor"),
    }));
    cleanup.rig = Some(Arc::clone(&rig));
    let formed = formed?;
    println!(
        "cluster: 3 nodes running on AMQP ports {}-{} after {formed:.1?}",
        args.amqp_port,
        args.amqp_port + 2
    );
    {
        let mut r = rig.lock().await;
        for p in &mut r.processors {
            p.start()?;
        }
        for p in &r.processors {
            p.wait_ready(&http, Duration::from_secs(90)).await?;
        }
        r.ingest.start()?;
        r.ingest.wait_ready(&http, Duration::from_secs(60)).await?;
        let members = r
            .cluster
            .ctl(
                &["list_queues", "-q", "name", "type", "leader", "members"],
                Duration::from_secs(20),
            )
            .await
            .unwrap_or_default();
        println!("queues:\n{}", members.trim_end());
    }
    println!("pipeline: 1 ingest (127.0.0.1:{ingest_port}), 2 processors; traffic starts");

    // Traffic and faults, together.
    let stats = Arc::new(SendStats::default());
    let sender = Sender {
        url: format!("http://127.0.0.1:{ingest_port}/webhooks/stripe/booking"),
        secret,
        concurrency: args.concurrency,
        max_tries: 80,
        deadline: Instant::now() + window + Duration::from_secs(600),
    };
    let traffic_started = Instant::now();
    let send_task = {
        let (traffic, stats) = (Arc::clone(&traffic), Arc::clone(&stats));
        tokio::spawn(async move { sender.run(traffic, plan, stats, seed).await })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Faults {
        rig: Arc::clone(&rig),
        http: http.clone(),
        gap: (args.fault_gap_min, args.fault_gap_max),
        started: traffic_started,
        kinds: args.faults.clone(),
    };
    let fault_task = {
        let stop = Arc::clone(&stop);
        let no_faults = args.no_faults;
        tokio::spawn(async move {
            if no_faults {
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                FaultLog::default()
            } else {
                faults.run(stop, seed ^ 0xFA17).await
            }
        })
    };
    let progress = {
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                println!(
                    "[{:>7.1}s] progress: {} requests, {} accepted, {} 5xx, {} no answer, {} sends pending",
                    traffic_started.elapsed().as_secs_f64(),
                    stats.requests.load(Ordering::Relaxed),
                    stats.accepted.load(Ordering::Relaxed),
                    stats.server_errors.load(Ordering::Relaxed),
                    stats.connection_errors.load(Ordering::Relaxed),
                    stats.pending.load(Ordering::Relaxed),
                );
            }
        })
    };
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::SeqCst);
    let fault_log = fault_task.await?;
    println!(
        "[{:>7.1}s] faults stopped; waiting for the last sends",
        traffic_started.elapsed().as_secs_f64()
    );
    send_task.await??;
    let traffic_time = traffic_started.elapsed();

    // Drain: the work queue and every retry queue empty, three times in a row.
    let drain_started = Instant::now();
    let mut drained = None;
    let mut zeros = 0;
    let mut last_depths: Depths = Vec::new();
    let mut stall: Option<(Depths, Vec<String>)> = None;
    let mut last_print = Instant::now();
    let accepted_now = || stats.accepted_by_event.lock().unwrap().clone();
    while drain_started.elapsed() < Duration::from_secs(args.drain_timeout) {
        if stall.is_none() && drain_started.elapsed() > Duration::from_secs(args.stall_limit) {
            let busy: Vec<(String, u64)> = last_depths
                .iter()
                .filter(|(name, n)| *n > 0 && !name.ends_with(".dead"))
                .cloned()
                .collect();
            let waiting = check::unhandled(&traffic, &accepted_now(), &pool)
                .await
                .unwrap_or_default();
            let names: Vec<String> = busy.iter().map(|(n, _)| n.clone()).collect();
            let r = rig.lock().await;
            println!(
                "[{:>7.1}s] STALL: queues not empty {}s after the traffic: {busy:?}; {} accepted \
                 events not handled yet; broker view:\n{}",
                traffic_started.elapsed().as_secs_f64(),
                args.stall_limit,
                waiting.len(),
                r.cluster.diagnose(&names).await
            );
            stall = Some((busy, waiting));
        }
        if last_print.elapsed() > Duration::from_secs(30) {
            last_print = Instant::now();
            println!(
                "[{:>7.1}s] draining: {last_depths:?}",
                traffic_started.elapsed().as_secs_f64()
            );
        }
        let depths = {
            let mut r = rig.lock().await;
            supervise_quietly(&mut r);
            r.cluster.queue_depths(&prefix).await
        };
        if let Ok(depths) = depths {
            let busy: u64 = depths
                .iter()
                .filter(|(name, _)| !name.ends_with(".dead"))
                .map(|(_, n)| n)
                .sum();
            last_depths = depths;
            zeros = if busy == 0 { zeros + 1 } else { 0 };
            if zeros >= 3 {
                drained = Some(drain_started.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    progress.abort();
    if drained.is_none() {
        let stuck: Vec<String> = last_depths
            .iter()
            .filter(|(name, n)| *n > 0 && !name.ends_with(".dead"))
            .map(|(name, _)| name.clone())
            .collect();
        let r = rig.lock().await;
        println!(
            "queues did not drain; broker view:\n{}",
            r.cluster.diagnose(&stuck).await
        );
    }
    println!(
        "drain: {}; queues: {}",
        drained.map_or_else(
            || format!("NOT drained within {}s", args.drain_timeout),
            |t| format!("drained in {t:.1?}")
        ),
        last_depths
            .iter()
            .map(|(n, m)| format!("{n}={m}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // The dead-letter queue, as an operator reads it.
    let (dead, dead_stats) = {
        let list = dlq(
            &processor_bin,
            &amqp_url,
            &prefix,
            &["list", "--json", "--limit", "1000000"],
        )
        .await?;
        let stats = dlq(&processor_bin, &amqp_url, &prefix, &["stats", "--json"]).await?;
        (list, stats)
    };
    let dead: Vec<check::DeadLetter> =
        serde_json::from_str(&dead).context("processor dlq list --json")?;
    let dead_stats: serde_json::Value =
        serde_json::from_str(&dead_stats).context("processor dlq stats --json")?;

    // Checks.
    let accepted = stats.accepted_by_event.lock().unwrap().clone();
    let (mut violations, summary) = check::check(&traffic, &accepted, &pool, &dead).await?;
    // For the first unexpected dead letters, what the broker says happened to them (x-death).
    for v in violations
        .iter_mut()
        .filter(|v| v.kind == "dead letter that is not a poison event")
        .take(10)
    {
        let id = v.event_ids.first().cloned().unwrap_or_default();
        let history = dlq(&processor_bin, &amqp_url, &prefix, &["show", &id, "--json"])
            .await
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .map(|copies| {
                copies
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|copy| {
                        let deaths: Vec<String> = copy["broker_history"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|d| format!("{}@{} x{}", d["reason"], d["queue"], d["count"]))
                            .collect();
                        if deaths.is_empty() {
                            "none".to_owned()
                        } else {
                            deaths.join(", ")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_else(|| "unknown".to_owned());
        v.detail.push_str(&format!(" || broker x-death: {history}"));
    }
    if let (Some((busy, waiting)), Some(t)) = (&stall, drained) {
        violations.push(check::Violation {
            kind: "retry or work queue stalled (drained late)",
            event_ids: waiting.clone(),
            detail: format!(
                "drained {t:.1?} after the traffic (limit {}s); at the limit: {busy:?}, {} accepted events waiting (ids listed)",
                args.stall_limit,
                waiting.len()
            ),
        });
    }
    if drained.is_none() {
        violations.push(check::Violation {
            kind: "work or retry queue not empty at the end",
            event_ids: Vec::new(),
            detail: format!("{last_depths:?}"),
        });
    }
    if dead_stats["depth"].as_u64() != Some(dead.len() as u64) {
        violations.push(check::Violation {
            kind: "dlq stats and dlq list disagree",
            event_ids: Vec::new(),
            detail: format!(
                "stats depth {} vs {} listed",
                dead_stats["depth"],
                dead.len()
            ),
        });
    }
    for (event, tries, error) in stats.gave_up.lock().unwrap().iter() {
        violations.push(check::Violation {
            kind: "send never accepted (gave up)",
            event_ids: vec![traffic.events[*event].id.clone()],
            detail: format!("{tries} tries; last: {error}"),
        });
    }
    for (event, status, body) in stats.unexpected.lock().unwrap().iter() {
        violations.push(check::Violation {
            kind: "unexpected answer (not 200, not 5xx)",
            event_ids: vec![traffic.events[*event].id.clone()],
            detail: format!("HTTP {status}: {body}"),
        });
    }
    pool.close().await;

    if !violations.is_empty() && args.hold > 0 {
        let r = rig.lock().await;
        println!(
            "holding for {}s: HOME={} RABBITMQ_CONF_ENV_FILE={} RABBITMQ_CTL_DIST_PORT_MIN={} \
             RABBITMQ_CTL_DIST_PORT_MAX={} {}/rabbitmqctl -n {} …; database {direct_url}",
            args.hold,
            dir.join("home").display(),
            dir.join("rabbitmq-env.conf").display(),
            args.ctl_port_min,
            args.ctl_port_max,
            cluster::find_sbin()?.display(),
            r.cluster.nodes[0].name,
        );
        drop(r);
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }

    print_report(Report {
        args,
        seed,
        traffic: &traffic,
        stats: &stats,
        faults: &fault_log,
        summary: &summary,
        violations: &violations,
        traffic_time,
        drain: drained,
        total: started.elapsed(),
        dead_stats: &dead_stats,
    });
    Ok(violations.is_empty())
}

fn supervise_quietly(rig: &mut Rig) {
    for p in rig
        .processors
        .iter_mut()
        .chain(std::iter::once(&mut rig.ingest))
    {
        if let Some(status) = p.exited() {
            println!(
                "UNEXPECTED: {} exited on its own ({status}) while draining; restarted",
                p.name
            );
            let _ = p.start();
        }
    }
}

async fn dlq(bin: &Path, amqp_url: &str, prefix: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(bin)
            .arg("dlq")
            .args(args)
            .env("AMQP_URL", amqp_url)
            .env("AMQP_PREFIX", prefix)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("processor dlq timed out")??;
    if !output.status.success() {
        bail!(
            "processor dlq {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The catalog: one creator, one organization, and each payment's own customer and content
/// (except what a poison event needs missing).
async fn seed_catalog(pool: &sqlx::PgPool, traffic: &Traffic) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO users (id, email) VALUES ($1, 'creator@chaos.example')")
        .bind(CREATOR)
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, 'Chaos Org')")
        .bind(ORGANIZATION)
        .execute(pool)
        .await?;
    let customers: Vec<uuid::Uuid> = traffic
        .payments
        .iter()
        .filter(|p| p.seed_customer)
        .map(|p| p.customer)
        .collect();
    let emails: Vec<String> = customers
        .iter()
        .map(|c| format!("{}@chaos.example", c.simple()))
        .collect();
    sqlx::query("INSERT INTO users (id, email) SELECT * FROM UNNEST($1::uuid[], $2::text[])")
        .bind(&customers)
        .bind(&emails)
        .execute(pool)
        .await?;
    let contents: Vec<uuid::Uuid> = traffic
        .payments
        .iter()
        .filter(|p| p.seed_content)
        .map(|p| p.content)
        .collect();
    let prices: Vec<i32> = traffic
        .payments
        .iter()
        .filter(|p| p.seed_content)
        .map(|p| i32::try_from(p.amount).unwrap_or(0))
        .collect();
    sqlx::query(
        "INSERT INTO content (id, organization_id, creator_id, title, price_cents)
         SELECT id, $3, $4, 'Chaos content', price FROM UNNEST($1::uuid[], $2::int[]) AS t(id, price)",
    )
    .bind(&contents)
    .bind(&prices)
    .bind(ORGANIZATION)
    .bind(CREATOR)
    .execute(pool)
    .await?;
    Ok(())
}

struct Report<'a> {
    args: &'a Args,
    seed: u64,
    traffic: &'a Traffic,
    stats: &'a SendStats,
    faults: &'a FaultLog,
    summary: &'a check::Summary,
    violations: &'a [check::Violation],
    traffic_time: Duration,
    drain: Option<Duration>,
    total: Duration,
    dead_stats: &'a serde_json::Value,
}

fn print_report(r: Report<'_>) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let accepted_events = r.stats.accepted_by_event.lock().unwrap().len();
    let copies: u32 = r.traffic.events.iter().map(|e| e.copies).sum();
    println!();
    println!("==================== chaos report ====================");
    println!(
        "run          : --events {} --minutes {} --seed {}{}",
        r.args.events,
        r.args.minutes,
        r.seed,
        if r.args.no_faults {
            " --no-faults".to_owned()
        } else {
            format!(
                " --faults {}",
                r.args
                    .faults
                    .iter()
                    .map(|f| f.key())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
    );
    println!(
        "traffic      : {} payments, {} distinct events, {} sends planned",
        r.traffic.payments.len(),
        r.traffic.events.len(),
        copies
    );
    println!(
        "requests     : {} sent, {} answered 200, {} answered 5xx, {} without answer",
        load(&r.stats.requests),
        load(&r.stats.accepted),
        load(&r.stats.server_errors),
        load(&r.stats.connection_errors)
    );
    println!(
        "by status    : {}",
        r.stats
            .by_status
            .lock()
            .unwrap()
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "events       : {accepted_events} of {} accepted at least once",
        r.traffic.events.len()
    );
    for fault in Fault::ALL {
        println!(
            "faults       : {:<38} {}",
            fault.label(),
            r.faults.counts.get(&fault).copied().unwrap_or(0)
        );
    }
    println!(
        "unexpected   : {} process exits, {} recovery troubles; slowest node rejoin {}",
        r.faults.unexpected_exits.len(),
        r.faults.troubles.len(),
        if r.faults.slowest_rejoin.is_zero() {
            "n/a".to_owned()
        } else {
            format!("{:.1?}", r.faults.slowest_rejoin)
        }
    );
    for trouble in &r.faults.troubles {
        println!("               trouble: {trouble}");
    }
    println!(
        "database     : {} payments -> {} purchases {:?}, {} events logged",
        r.summary.payments, r.summary.purchases, r.summary.by_status, r.summary.events_logged
    );
    println!(
        "dead letters : {} events in {} messages; by class {}",
        r.summary.dead_letters, r.summary.dead_letter_copies, r.dead_stats["by_class"]
    );
    println!(
        "duration     : traffic {:.1?}, drain {}, total {:.1?}",
        r.traffic_time,
        r.drain
            .map_or_else(|| "timed out".to_owned(), |d| format!("{d:.1?}")),
        r.total
    );
    if r.violations.is_empty() {
        println!(
            "verdict      : PASS (every accepted event reflected, nothing extra, DLQ = poison)"
        );
        return;
    }
    println!("verdict      : FAIL, {} violation(s)", r.violations.len());
    let mut kinds: Vec<&str> = r.violations.iter().map(|v| v.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let of_kind: Vec<&check::Violation> =
            r.violations.iter().filter(|v| v.kind == kind).collect();
        println!("--- {kind}: {}", of_kind.len());
        for v in of_kind.iter().take(25) {
            let shown: Vec<&str> = v.event_ids.iter().take(40).map(String::as_str).collect();
            let more = v.event_ids.len().saturating_sub(shown.len());
            let more = if more > 0 {
                format!(", … {more} more")
            } else {
                String::new()
            };
            println!("    events [{}{more}]", shown.join(", "));
            println!("      {}", v.detail);
        }
        if of_kind.len() > 25 {
            println!("    … and {} more", of_kind.len() - 25);
        }
    }
}

async fn tear_down(cleanup: Cleanup) -> anyhow::Result<()> {
    if let Some(rig) = &cleanup.rig {
        let mut r = rig.lock().await;
        r.ingest.kill().await;
        for p in &mut r.processors {
            p.kill().await;
        }
        r.proxy.cut();
        r.cluster.stop_all().await;
    }
    if let (Some(dir), Some(out), true) = (&cleanup.dir, &cleanup.logs_out, cleanup.keep_logs) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = out.join(name);
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(dir)
            .arg(&dest)
            .status();
        if status.is_ok_and(|s| s.success()) {
            println!("logs kept in {}", dest.display());
        }
    }
    let mut problems = Vec::new();
    if let (Some(admin), Some(database)) = (&cleanup.admin_url, &cleanup.database) {
        match PgPoolOptions::new().max_connections(1).connect(admin).await {
            Ok(pool) => {
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
                )))
                .execute(&pool)
                .await
                {
                    problems.push(format!("dropping {database}: {e}"));
                }
                pool.close().await;
            }
            Err(e) => problems.push(format!("connecting to drop {database}: {e}")),
        }
    }
    if let Some(dir) = &cleanup.dir {
        // Anything of ours still alive has the folder in its command line.
        let pattern = dir.to_string_lossy().into_owned();
        let left = std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in left.split_whitespace() {
            problems.push(format!("process {pid} was still running; killed"));
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
        if let Err(e) = std::fs::remove_dir_all(dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if problems.is_empty() {
        println!("cleanup: nodes and processes stopped, database dropped, temp dir removed");
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        let (server, query) =
            split_database_url("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
        assert_eq!(server, "postgres://postgres@127.0.0.1:5432");
        assert_eq!(query, "");
        assert_eq!(host_port(&server).unwrap(), "127.0.0.1:5432");
        assert_eq!(
            with_host(&server, "127.0.0.1:40000"),
            "postgres://postgres@127.0.0.1:40000"
        );
        let (server, query) = split_database_url("postgresql://u:p@db/x?sslmode=disable").unwrap();
        assert_eq!(host_port(&server).unwrap(), "db:5432");
        assert_eq!(query, "?sslmode=disable");
        assert!(split_database_url("postgres://host").is_err());
    }
}
