//! `ingest`: receives Stripe webhooks and hands them to RabbitMQ. See the crate docs.

use anyhow::Context;
use clap::Parser;
use ingest::config::Config;
use ingest::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _logs = shared::telemetry::init(config.log.log_format);
    tracing::info!(?config, "starting ingest");
    let app = Application::build(&config)
        .await
        .context("ingest cannot start")?;
    tracing::info!(addr = %app.local_addr()?, "listening");
    app.run_until(shared::shutdown::signal()).await;
    Ok(())
}
