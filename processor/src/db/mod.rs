//! PostgreSQL access: the pool, migrations, and the queries, one module per table group.

pub mod access;
pub mod adjustments;
pub mod events;
pub mod new_purchase;
pub mod purchases;
pub mod terms;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseArgs;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A pool that connects lazily: the processor starts even while the database is down, and
/// each attempt that cannot get a connection fails as a transient error.
pub fn pool(args: &DatabaseArgs) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(args.acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy(args.database_url.expose_secret())
}

/// Applies the migrations, waiting for the database while it is unreachable (it may still
/// be starting, e.g. under `docker compose up`) for at most `patience`. Concurrent processors
/// are safe: sqlx serialises migrations with an advisory lock.
pub async fn migrate(pool: &PgPool, patience: Duration) -> Result<(), sqlx::migrate::MigrateError> {
    use backon::{ExponentialBuilder, Retryable};
    let unreachable = |error: &sqlx::migrate::MigrateError| {
        matches!(
            error,
            sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        )
    };
    (|| MIGRATOR.run(pool))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(patience))
                .without_max_times(),
        )
        .when(unreachable)
        .notify(|error, delay| tracing::warn!(%error, retry_in = ?delay, "database unreachable"))
        .await
}
