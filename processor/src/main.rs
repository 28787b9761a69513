//! `processor`: turns queued Stripe events into purchases, and the operator commands that
//! watch and repair the pipeline. See the crate docs.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use processor::config::{
    AccessCommand, Cli, Command, ConsoleArgs, DatabaseArgs, DlqCommand, EventsCommand, RetryDelays,
    WorkerArgs,
};
use processor::console::{self, ConsoleSettings};
use processor::ops::{access, dead_letters, event_log, watch};
use processor::worker::{BatchLimits, Worker, WorkerSettings};
use processor::{db, http};
use shared::config::BrokerArgs;
use tokio_util::sync::CancellationToken;

/// How long start-up waits for an unreachable database before giving up.
const MIGRATION_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let _logs = shared::telemetry::init(cli.log.log_format);
    match cli.command {
        Command::Migrate { database } => {
            tracing::info!(?database, "applying migrations");
            let pool = db::pool(&database).context("invalid DATABASE_URL")?;
            db::migrate(&pool, MIGRATION_PATIENCE)
                .await
                .context("migrations failed")?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            database,
            worker,
            console,
        } => run(database, worker, console).await,
        Command::Console {
            database,
            broker,
            console,
            retry_delays,
        } => serve_console(database, broker, console, retry_delays).await,
        Command::Dlq { command } => match command {
            DlqCommand::Stats { broker, json } => dead_letters::stats(&broker, json).await,
            DlqCommand::List {
                broker,
                event_type,
                class,
                limit,
                json,
            } => dead_letters::list(&broker, event_type, class, limit, json).await,
            DlqCommand::Show {
                broker,
                event_id,
                json,
            } => dead_letters::show(&broker, &event_id, json).await,
            DlqCommand::Replay {
                broker,
                selector,
                dry_run,
                limit,
            } => dead_letters::replay(&broker, &selector, dry_run, limit).await,
            DlqCommand::Purge {
                broker,
                database,
                event_ids,
                all,
                yes,
            } => dead_letters::purge(&broker, &database, event_ids, all, yes).await,
        },
        Command::Events { command } => match command {
            EventsCommand::Show {
                database,
                event_id,
                json,
            } => event_log::show(&database, &event_id, json).await,
            EventsCommand::Replay {
                database,
                broker,
                event_ids,
            } => event_log::replay(&database, &broker, &event_ids).await,
        },
        Command::Watch(args) => watch::run(&args).await,
        Command::Reconcile(args) => processor::reconcile::run(*args).await,
        Command::Access {
            command:
                AccessCommand::Check {
                    database,
                    user,
                    content,
                },
        } => access::check(&database, user, content).await,
    }
}

async fn run(
    database: DatabaseArgs,
    worker: WorkerArgs,
    console_args: ConsoleArgs,
) -> anyhow::Result<ExitCode> {
    tracing::info!(?database, ?worker, ?console_args, "starting processor");
    if worker.partial_batches > worker.concurrency {
        anyhow::bail!(
            "PROCESSOR_PARTIAL_BATCHES ({}) must not exceed PROCESSOR_CONCURRENCY ({}): \
             partial batches are some of the concurrent ones",
            worker.partial_batches,
            worker.concurrency
        );
    }
    // Validated before anything starts: a bad console setting is a start-up error.
    let console_settings = console_args
        .enabled()
        .then(|| {
            ConsoleSettings::new(
                &console_args,
                worker.broker.amqp_url.clone(),
                worker.broker.topology(),
                worker.retry_delays.0.clone(),
            )
        })
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let pool = db::pool(&database).context("invalid DATABASE_URL")?;
    db::migrate(&pool, MIGRATION_PATIENCE)
        .await
        .context("migrations failed")?;
    let settings = WorkerSettings {
        urls: worker.broker.amqp_url.clone(),
        topology: worker.broker.topology(),
        prefetch: worker.prefetch,
        concurrency: usize::from(worker.concurrency),
        delivery_limit: worker.delivery_limit,
        crash_limit: worker.crash_limit,
        modes: worker.modes.modes(),
        retry_delays: worker.retry_delays.0.clone(),
        max_attempts: worker.max_attempts(),
        shutdown_timeout: worker.shutdown_timeout,
        #[cfg(feature = "test-hooks")]
        test_hook: worker.test_hook.clone(),
        batch: BatchLimits {
            size: usize::from(worker.batch_size),
            wait: worker.batch_wait,
            partial: usize::from(worker.partial_batches),
        },
    };
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::shutdown::signal().await;
        trigger.cancel();
    });

    let consumer = Worker::new(pool.clone(), settings.clone());
    let server = tokio::spawn(http::serve(
        worker.metrics_addr,
        consumer.ready_flag(),
        shutdown.clone(),
    ));
    tokio::spawn(http::sample_queues(
        settings.urls.clone(),
        settings.topology.clone(),
        settings.retry_delays.clone(),
        worker.queue_sample_interval,
        shutdown.clone(),
    ));
    if let Some(settings) = console_settings {
        let (pool, shutdown) = (pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = console::serve(pool, settings, shutdown).await {
                tracing::error!(%error, "ops console failed");
            }
        });
    }
    consumer.run(shutdown.clone()).await;
    shutdown.cancel();
    pool.close().await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "metrics server failed"),
        Err(error) => tracing::error!(%error, "metrics server task failed"),
    }
    tracing::info!("processor stopped");
    Ok(ExitCode::SUCCESS)
}

async fn serve_console(
    database: DatabaseArgs,
    broker: BrokerArgs,
    console_args: ConsoleArgs,
    retry_delays: RetryDelays,
) -> anyhow::Result<ExitCode> {
    tracing::info!(
        ?database,
        ?broker,
        ?console_args,
        "starting the ops console"
    );
    let settings = ConsoleSettings::new(
        &console_args,
        broker.amqp_url.clone(),
        broker.topology(),
        retry_delays.0,
    )
    .map_err(anyhow::Error::msg)?;
    let pool = db::pool(&database).context("invalid DATABASE_URL")?;
    db::migrate(&pool, MIGRATION_PATIENCE)
        .await
        .context("migrations failed")?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::shutdown::signal().await;
        trigger.cancel();
    });
    console::serve(pool.clone(), settings, shutdown)
        .await
        .context("ops console failed")?;
    pool.close().await;
    tracing::info!("ops console stopped");
    Ok(ExitCode::SUCCESS)
}
