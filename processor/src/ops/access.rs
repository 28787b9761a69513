//! `processor access check`: the question the platform asks before serving content.

use std::process::ExitCode;

use uuid::Uuid;

use crate::config::DatabaseArgs;
use crate::db;

pub async fn check(database: &DatabaseArgs, user: Uuid, content: Uuid) -> anyhow::Result<ExitCode> {
    let pool = db::pool(database)?;
    let granted: bool = sqlx::query_scalar("SELECT has_access($1, $2)")
        .bind(user)
        .bind(content)
        .fetch_one(&pool)
        .await?;
    say!("{}", if granted { "granted" } else { "not granted" });
    Ok(if granted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
