//! `processor`: turns queued Stripe events into purchases. See the crate docs.

use anyhow::Context;
use clap::Parser;
use processor::config::{Cli, Command};
use processor::db;
use processor::worker::{Worker, WorkerSettings};
use tokio_util::sync::CancellationToken;

/// How long start-up waits for an unreachable database before giving up.
const MIGRATION_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    shared::telemetry::init(cli.log.log_format);
    match cli.command {
        Command::Migrate { database } => {
            tracing::info!(?database, "applying migrations");
            let pool = db::pool(&database).context("invalid DATABASE_URL")?;
            db::migrate(&pool, MIGRATION_PATIENCE)
                .await
                .context("migrations failed")?;
            tracing::info!("migrations applied");
        }
        Command::Run { database, worker } => {
            tracing::info!(?database, ?worker, "starting processor");
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
                retry_delays: worker.retry_delays.0.clone(),
                max_attempts: worker.max_attempts(),
                shutdown_timeout: worker.shutdown_timeout,
            };
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                shared::shutdown::signal().await;
                trigger.cancel();
            });
            Worker::new(pool.clone(), settings).run(shutdown).await;
            pool.close().await;
            tracing::info!("processor stopped");
        }
    }
    Ok(())
}
