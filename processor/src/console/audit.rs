//! The `ops_audit` table: every replay and purge, who started it, on what, and how it ended.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct AuditRow {
    pub id: Uuid,
    pub token_name: String,
    pub action: String,
    pub filter: Value,
    pub matched: Option<i32>,
    pub count: Option<i32>,
    pub failed: Option<i32>,
    pub outcome: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Records the start of an action; [`finish`] completes the row.
pub async fn start(
    pool: &PgPool,
    token_name: &str,
    action: &str,
    filter: &Value,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO ops_audit (id, token_name, action, filter) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(token_name)
        .bind(action)
        .bind(filter)
        .execute(pool)
        .await?;
    Ok(id)
}

/// How an action ended.
pub struct Finish<'a> {
    pub matched: usize,
    pub count: usize,
    pub failed: usize,
    pub outcome: &'a str,
    pub event_ids: &'a [String],
}

fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub async fn finish(pool: &PgPool, id: Uuid, end: Finish<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE ops_audit
            SET matched = $2, count = $3, failed = $4, outcome = $5, event_ids = $6,
                finished_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(int(end.matched))
    .bind(int(end.count))
    .bind(int(end.failed))
    .bind(end.outcome)
    .bind(end.event_ids)
    .execute(pool)
    .await
    .map(|_| ())
}

const COLUMNS: &str =
    "id, token_name, action, filter, matched, count, failed, outcome, started_at, finished_at";

/// The most recent actions, newest first, before the keyset cursor `(started_at, id)`.
pub async fn recent(
    pool: &PgPool,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    match before {
        Some((at, id)) => {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM ops_audit WHERE (started_at, id) < ($1, $2)
                  ORDER BY started_at DESC, id DESC LIMIT $3"
            )))
            .bind(at)
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await
        }
        None => {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM ops_audit ORDER BY started_at DESC, id DESC LIMIT $1"
            )))
            .bind(limit)
            .fetch_all(pool)
            .await
        }
    }
}

/// The actions that touched one event.
pub async fn for_event(pool: &PgPool, event_id: &str) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM ops_audit WHERE event_ids @> ARRAY[$1]::text[] ORDER BY started_at"
    )))
    .bind(event_id)
    .fetch_all(pool)
    .await
}
