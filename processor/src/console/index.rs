//! The console's index of the dead-letter queue, in PostgreSQL (`ops_dead_letters`).
//!
//! RabbitMQ cannot page through a queue: reading it means taking every message and holding
//! it. So the console reads the queue into a table now and then, and the dead-letter pages
//! query the table with keyset pagination (`(dead_at, seq) < cursor`, one index per filter
//! column), which stays fast with 100,000 rows. The index is re-read when the queue's depth
//! or head message changed (checked every `OPS_CONSOLE_INDEX_INTERVAL`), at least every ten
//! minutes, and right after each replay or purge. Replay and purge never trust the index:
//! they act on a fresh snapshot of the queue, with the same filter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, FromRow, PgPool, Postgres, QueryBuilder};

use crate::dlq::{self, DeadLetter, Snapshot, error_kind};
use crate::ops::MAX_HELD;

use super::Console;

/// Longest time the index goes without a re-read, even when the queue looks unchanged.
const MAX_INDEX_AGE: Duration = Duration::from_secs(600);

/// An advisory-lock key: console replicas rebuild the index one at a time.
const REBUILD_LOCK: i64 = 0x006f_7073_5f64_6c71;

/// Rows inserted per statement.
const CHUNK: usize = 5_000;

#[derive(Debug, Clone, FromRow)]
pub struct Row {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub class: String,
    pub endpoint: Option<String>,
    pub attempts: i32,
    pub last_error: String,
    pub dead_at: DateTime<Utc>,
}

/// What the list can be filtered by (the same criteria replay and purge use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub event_type: Option<String>,
    pub class: Option<String>,
    pub endpoint: Option<String>,
    pub older_than: Option<Duration>,
}

impl ListFilter {
    pub fn to_filter(&self, event_ids: Vec<String>) -> dlq::Filter {
        dlq::Filter {
            all: false,
            event_ids,
            event_type: self.event_type.clone(),
            class: self.class.clone(),
            endpoint: self.endpoint.clone(),
            older_than: self.older_than,
        }
    }

    fn push_where(&self, query: &mut QueryBuilder<Postgres>, now: DateTime<Utc>) {
        query.push(" WHERE true");
        if let Some(t) = &self.event_type {
            query.push(" AND event_type = ").push_bind(t.clone());
        }
        if let Some(c) = &self.class {
            query.push(" AND class = ").push_bind(c.clone());
        }
        if let Some(e) = &self.endpoint {
            query.push(" AND endpoint = ").push_bind(e.clone());
        }
        if let Some(age) = self.older_than {
            let cutoff = now - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            query.push(" AND dead_at <= ").push_bind(cutoff);
        }
    }
}

/// A keyset cursor: the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub dead_at: DateTime<Utc>,
    pub seq: i64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.dead_at.timestamp_micros(), self.seq)
    }

    pub fn decode(raw: &str) -> Option<Self> {
        let (micros, seq) = raw.split_once('.')?;
        Some(Self {
            dead_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            seq: seq.parse().ok()?,
        })
    }
}

fn page_query(
    prefix: &str,
    filter: &ListFilter,
    after: Option<Cursor>,
    limit: usize,
) -> QueryBuilder<Postgres> {
    let mut query = QueryBuilder::new(prefix);
    query.push(
        "SELECT seq, event_id, event_type, class, endpoint, attempts, last_error, dead_at
           FROM ops_dead_letters",
    );
    filter.push_where(&mut query, Utc::now());
    if let Some(cursor) = after {
        query
            .push(" AND (dead_at, seq) < (")
            .push_bind(cursor.dead_at)
            .push(", ")
            .push_bind(cursor.seq)
            .push(")");
    }
    query
        .push(" ORDER BY dead_at DESC, seq DESC LIMIT ")
        .push_bind(i64::try_from(limit + 1).unwrap_or(i64::MAX));
    query
}

/// One page of dead letters, newest first, and the cursor of the next page if any.
pub async fn page(
    pool: &PgPool,
    filter: &ListFilter,
    after: Option<Cursor>,
    limit: usize,
) -> Result<(Vec<Row>, Option<Cursor>), sqlx::Error> {
    let mut query = page_query("", filter, after, limit);
    let mut rows: Vec<Row> = query.build_query_as().fetch_all(pool).await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| Cursor {
            dead_at: r.dead_at,
            seq: r.seq,
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// PostgreSQL's plan for [`page`] (for the tests: a page must be an index scan, whatever
/// the filter and however deep).
#[doc(hidden)]
pub async fn explain_page(
    pool: &PgPool,
    filter: &ListFilter,
    after: Option<Cursor>,
    limit: usize,
) -> Result<String, sqlx::Error> {
    let mut query = page_query("EXPLAIN ", filter, after, limit);
    let lines: Vec<String> = query.build_query_scalar().fetch_all(pool).await?;
    Ok(lines.join("\n"))
}

/// How many indexed letters match.
pub async fn count(pool: &PgPool, filter: &ListFilter) -> Result<i64, sqlx::Error> {
    let mut query = QueryBuilder::new("SELECT count(*) FROM ops_dead_letters");
    filter.push_where(&mut query, Utc::now());
    query.build_query_scalar().fetch_one(pool).await
}

/// Counts grouped by one column (`class`, `event_type`, `endpoint`, `error_kind`), largest
/// first.
pub async fn grouped(pool: &PgPool, column: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let column = match column {
        "class" => "class",
        "event_type" => "event_type",
        "endpoint" => "coalesce(endpoint, '(none)')",
        _ => "error_kind",
    };
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {column}, count(*) FROM ops_dead_letters GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
    )))
    .fetch_all(pool)
    .await
}

/// The index's own state: letters, oldest, when it was read.
#[derive(Debug, Clone, Default, FromRow)]
pub struct State {
    pub depth: Option<i32>,
    pub rebuilt_at: Option<DateTime<Utc>>,
    pub oldest: Option<DateTime<Utc>>,
}

pub async fn state(pool: &PgPool) -> Result<State, sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT depth FROM ops_dead_letter_index) AS depth,
                (SELECT rebuilt_at FROM ops_dead_letter_index) AS rebuilt_at,
                (SELECT min(dead_at) FROM ops_dead_letters) AS oldest",
    )
    .fetch_one(pool)
    .await
}

/// The indexed copy of one event's dead letters.
pub async fn for_event(pool: &PgPool, event_id: &str) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, event_id, event_type, class, endpoint, attempts, last_error, dead_at
           FROM ops_dead_letters WHERE event_id = $1 ORDER BY seq",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
}

fn dead_at(letter: &DeadLetter) -> DateTime<Utc> {
    letter
        .last_failure_at
        .or(letter.received_at)
        .unwrap_or_else(Utc::now)
}

/// Whether the queue looks different from what was indexed: another depth or head, or an
/// index older than [`MAX_INDEX_AGE`].
async fn stale(console: &Console, connection: &lapin::Connection) -> anyhow::Result<bool> {
    let indexed: Option<(i32, Option<String>, DateTime<Utc>)> =
        sqlx::query_as("SELECT depth, head, rebuilt_at FROM ops_dead_letter_index")
            .fetch_optional(&console.pool)
            .await?;
    let Some((depth, head, rebuilt_at)) = indexed else {
        return Ok(true);
    };
    if (Utc::now() - rebuilt_at).to_std().unwrap_or_default() > MAX_INDEX_AGE {
        return Ok(true);
    }
    let channel = connection.create_channel().await?;
    let live = dlq::depth(&channel, &console.topology.dead_queue).await;
    let _ = channel.close(200, "depth read".into()).await;
    let Some((live_depth, _)) = live else {
        return Ok(false);
    };
    if i64::from(live_depth) != i64::from(depth) {
        return Ok(true);
    }
    let peek = Snapshot::take(connection, &console.topology, 1).await?;
    let live_head = peek.letters.first().map(|l| l.event_id.clone());
    peek.release().await?;
    Ok(live_head != head)
}

/// Re-reads the queue into the index if it changed (or always, with `force`). Returns how
/// long the re-read took, if there was one.
pub async fn refresh(console: &Console, force: bool) -> anyhow::Result<Option<Duration>> {
    let _queue = console.queue_lock.lock().await;
    let connection = console.connect("index").await?;
    let result = async {
        if !force && !stale(console, &connection).await? {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let snapshot = Snapshot::take(&connection, &console.topology, MAX_HELD).await?;
        // Summaries without the bodies, then the messages go back at once: the index needs
        // no more, and the queue is whole again sooner.
        let letters: Vec<DeadLetter> = snapshot
            .letters
            .iter()
            .map(|l| DeadLetter {
                body: Vec::new(),
                properties: lapin::BasicProperties::default(),
                ..l.clone()
            })
            .collect();
        snapshot.release().await?;
        write(&console.pool, &letters).await?;
        tracing::debug!(letters = letters.len(), "dead-letter index rebuilt");
        Ok(Some(started.elapsed()))
    }
    .await;
    let _ = connection.close(200, "indexed".into()).await;
    result
}

async fn write(pool: &PgPool, letters: &[DeadLetter]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REBUILD_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM ops_dead_letters")
        .execute(&mut *tx)
        .await?;
    for (chunk_no, chunk) in letters.chunks(CHUNK).enumerate() {
        let offset = chunk_no * CHUNK;
        let seq: Vec<i64> = (0..chunk.len())
            .map(|i| i64::try_from(offset + i).unwrap_or(i64::MAX))
            .collect();
        let ids: Vec<&str> = chunk.iter().map(|l| l.event_id.as_str()).collect();
        let types: Vec<&str> = chunk.iter().map(|l| l.event_type.as_str()).collect();
        let classes: Vec<&str> = chunk.iter().map(|l| l.class.as_str()).collect();
        let endpoints: Vec<Option<&str>> = chunk.iter().map(|l| l.endpoint.as_deref()).collect();
        let attempts: Vec<i32> = chunk
            .iter()
            .map(|l| i32::try_from(l.attempts).unwrap_or(i32::MAX))
            .collect();
        let errors: Vec<&str> = chunk.iter().map(|l| l.last_error.as_str()).collect();
        let kinds: Vec<String> = chunk.iter().map(|l| error_kind(&l.last_error)).collect();
        let dead: Vec<DateTime<Utc>> = chunk.iter().map(dead_at).collect();
        let received: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|l| l.received_at).collect();
        sqlx::query(
            "INSERT INTO ops_dead_letters
                 (seq, event_id, event_type, class, endpoint, attempts, last_error, error_kind, dead_at, received_at)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::int[], $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[])",
        )
        .bind(&seq)
        .bind(&ids)
        .bind(&types)
        .bind(&classes)
        .bind(&endpoints)
        .bind(&attempts)
        .bind(&errors)
        .bind(&kinds)
        .bind(&dead)
        .bind(&received)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO ops_dead_letter_index (singleton, depth, head, rebuilt_at)
         VALUES (true, $1, $2, now())
         ON CONFLICT (singleton) DO UPDATE
            SET depth = EXCLUDED.depth, head = EXCLUDED.head, rebuilt_at = EXCLUDED.rebuilt_at",
    )
    .bind(i32::try_from(letters.len()).unwrap_or(i32::MAX))
    .bind(letters.first().map(|l| l.event_id.as_str()))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_a_round_trip() {
        let cursor = Cursor {
            dead_at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            seq: 42,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("nonsense"), None);
        assert_eq!(Cursor::decode("1.x"), None);
    }
}
