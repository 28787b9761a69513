//! The `ops_audit` table: every replay and purge, who started it, on what, and how it ended.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

use crate::dlq::DeadLetter;

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
    /// The dead letters it replayed or purged.
    pub letters: &'a [DeadLetter],
}

fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub async fn finish(pool: &PgPool, id: Uuid, end: Finish<'_>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE ops_audit
            SET matched = $2, count = $3, failed = $4, outcome = $5, finished_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(int(end.matched))
    .bind(int(end.count))
    .bind(int(end.failed))
    .bind(end.outcome)
    .execute(&mut *tx)
    .await?;
    for chunk in end.letters.chunks(5_000) {
        let ids: Vec<&str> = chunk.iter().map(|l| l.event_id.as_str()).collect();
        let classes: Vec<&str> = chunk.iter().map(|l| l.class.as_str()).collect();
        let attempts: Vec<i32> = chunk.iter().map(|l| int(l.attempts as usize)).collect();
        let errors: Vec<&str> = chunk.iter().map(|l| l.last_error.as_str()).collect();
        let dead: Vec<Option<DateTime<Utc>>> = chunk
            .iter()
            .map(|l| l.last_failure_at.or(l.received_at))
            .collect();
        sqlx::query(
            "INSERT INTO ops_audit_events (audit_id, event_id, class, attempts, last_error, dead_at)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::int[], $5::text[], $6::timestamptz[])
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&ids)
        .bind(&classes)
        .bind(&attempts)
        .bind(&errors)
        .bind(&dead)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
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

/// An action that touched one event, with the dead letter as it was then.
#[derive(Debug, Clone, FromRow)]
pub struct EventAction {
    pub action: String,
    pub token_name: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub class: String,
    pub attempts: i32,
    pub last_error: String,
    pub dead_at: Option<DateTime<Utc>>,
}

/// The actions that touched one event, oldest first.
pub async fn for_event(pool: &PgPool, event_id: &str) -> Result<Vec<EventAction>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.action, a.token_name, a.started_at, a.finished_at, a.outcome,
                e.class, e.attempts, e.last_error, e.dead_at
           FROM ops_audit_events e JOIN ops_audit a ON a.id = e.audit_id
          WHERE e.event_id = $1
          ORDER BY a.started_at",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
}

/// The events an action touched (for the audit page), at most `limit`.
pub async fn events_of(pool: &PgPool, id: Uuid, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT event_id FROM ops_audit_events WHERE audit_id = $1 ORDER BY event_id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await
}
