//! Waiting for commits: the processor's drain rate on a backlog, and POST→commit latency.
//!
//! Two measures of "committed", both from the database:
//! - `visible` (the figure): when the answer of the first poll that returned the purchase
//!   arrived; the poller asks every `--poll-interval` which pending payment intents have a
//!   purchase. The commit happened before that query's snapshot, so this never counts
//!   early; it is late by at most one interval plus one poll, as a user who reads the
//!   purchase would be. (Taking the time the query was *sent* could count early: a commit
//!   between sending and the server taking its snapshot would be seen by it.)
//! - `created_at`: `purchases.created_at`, PostgreSQL's `now()`, which is the start of the
//!   processor's transaction, not its commit: early by the transaction's duration.
//!
//! Both are compared with the time the event was due (open loop) on the same clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::Options;
use crate::catalog::Event;
use crate::histogram::{Latencies, Summary};
use crate::load::{self, Accepted, LoadResult, Pending, unix_us};
use crate::world::World;

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// Accepted events in the backlog.
    pub expected: u64,
    /// Of those, committed purchases.
    pub committed: u64,
    /// Those without a purchase, by their status in `stripe_events`.
    pub missing: BTreeMap<String, u64>,
    /// From the first purchase's `created_at` to the last's.
    pub span_s: f64,
    /// Purchases per second over that span.
    pub rate: f64,
    /// From starting the processor until the last commit was seen.
    pub wall_s: f64,
}

/// Starts the processor on the backlog left in the queue and waits for every accepted
/// event to be a committed purchase.
pub async fn backlog(
    world: &mut World,
    options: &Options,
    backlog: &[Accepted],
) -> anyhow::Result<Drain> {
    if backlog.is_empty() {
        bail!("drain: no event was accepted by ingest, nothing to drain");
    }
    let intents: Vec<String> = backlog.iter().map(|a| a.payment_intent.clone()).collect();
    let started = Instant::now();
    world.start_processor().await?;
    let pool = world.pool()?.clone();
    let committed = wait_committed(&pool, &intents, options.stall_timeout).await?;
    let wall_s = started.elapsed().as_secs_f64();

    let (count, first, last): (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(created_at), max(created_at)
               FROM purchases WHERE stripe_payment_intent_id = ANY($1)",
    )
    .bind(&intents)
    .fetch_one(&pool)
    .await?;
    let span_s = match (first, last) {
        (Some(first), Some(last)) => (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => 0.0,
    };
    let rate = if span_s > 0.0 {
        (count - 1).max(0) as f64 / span_s
    } else {
        0.0
    };
    Ok(Drain {
        expected: intents.len() as u64,
        committed,
        missing: missing(&pool, &intents).await?,
        span_s,
        rate,
        wall_s,
    })
}

/// Polls until every payment intent has a purchase, or nothing new committed for `stall`.
/// Returns how many have one.
async fn wait_committed(pool: &PgPool, intents: &[String], stall: Duration) -> anyhow::Result<u64> {
    let total = intents.len() as u64;
    let mut last = 0;
    let mut last_progress = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM purchases WHERE stripe_payment_intent_id = ANY($1)",
        )
        .bind(intents)
        .fetch_one(pool)
        .await?;
        let count = u64::try_from(count).unwrap_or(0);
        if count >= total {
            return Ok(count);
        }
        if count > last {
            last = count;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > stall {
            crate::progress(&format!(
                "no new commit for {stall:?}: giving up with {count} of {total}"
            ));
            return Ok(count);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            crate::progress(&format!("  {count} of {total} committed"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Accepted events without a purchase, by their status in the event log.
async fn missing(pool: &PgPool, intents: &[String]) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(e.status, 'not in stripe_events'), count(*)
           FROM unnest($1::text[]) AS x(pi)
           LEFT JOIN purchases p ON p.stripe_payment_intent_id = x.pi
           LEFT JOIN stripe_events e ON e.id = 'evt_' || substr(x.pi, 4)
          WHERE p.id IS NULL
          GROUP BY 1",
    )
    .bind(intents)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(status, n)| (status, u64::try_from(n).unwrap_or(0)))
        .collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct EndToEnd {
    /// The open loop against ingest, processor running.
    pub load: LoadResult,
    pub expected: u64,
    pub committed: u64,
    pub missing: BTreeMap<String, u64>,
    /// Due time → the answer of the first poll that saw the purchase (an upper bound of
    /// the commit time, by at most one interval plus one poll).
    pub visible: Summary,
    /// Due time → `purchases.created_at` (the transaction's start: a lower bound).
    pub created_at: Summary,
    pub poll_interval_ms: f64,
    /// How long each poll took (its query, and waiting for the bench's own runtime): a
    /// commit is seen at most one interval plus one poll late.
    pub poll_query: Summary,
    /// After the last request was answered, how long until the last commit was seen.
    pub tail_s: f64,
}

/// Most pending payment intents one poll asks about (the oldest first).
const POLL_BATCH: usize = 5_000;

/// Open loop at `--e2e-rate` against `url` (ingest with the processor running, or the
/// reference pipeline); every accepted event is watched until its purchase is committed.
pub async fn end_to_end(
    pool: &PgPool,
    url: String,
    options: &Options,
    events: &[Event],
) -> anyhow::Result<EndToEnd> {
    let pool = pool.clone();
    let pending = Arc::new(Pending::default());
    let sending_done = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll(
        pool.clone(),
        Arc::clone(&pending),
        Arc::clone(&sending_done),
        options.poll_interval,
        options.stall_timeout,
    ));
    let sent = load::open_loop(
        url,
        events,
        options.e2e_rate,
        options.open_max_in_flight,
        Some(Arc::clone(&pending)),
    )
    .await;
    sending_done.store(true, Ordering::Relaxed);
    let answered = Instant::now();
    let (visible, queries) = poller.await.context("the commit poller panicked")??;
    let tail_s = answered.elapsed().as_secs_f64();
    let result = sent?;

    let accepted = load::accepted(events, &result);
    let intents: Vec<String> = accepted.iter().map(|a| a.payment_intent.clone()).collect();
    let due: HashMap<&str, i64> = accepted
        .iter()
        .map(|a| (a.payment_intent.as_str(), a.sent_at_us))
        .collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stripe_payment_intent_id, (extract(epoch FROM created_at) * 1000000)::bigint
           FROM purchases WHERE stripe_payment_intent_id = ANY($1)",
    )
    .bind(&intents)
    .fetch_all(&pool)
    .await?;
    let mut created_at = Latencies::new();
    for (intent, at_us) in &rows {
        if let Some(due) = due.get(intent.as_str()) {
            created_at.record_us(u64::try_from(at_us - due).unwrap_or(0));
        }
    }
    Ok(EndToEnd {
        expected: intents.len() as u64,
        committed: rows.len() as u64,
        missing: missing(&pool, &intents).await?,
        visible: visible.summary(),
        created_at: created_at.summary(),
        poll_interval_ms: options.poll_interval.as_secs_f64() * 1_000.0,
        poll_query: queries.summary(),
        tail_s,
        load: result,
    })
}

/// Every `interval`, asks which pending payment intents have a purchase; records due →
/// seen. Ends when sending is done and nothing is pending, or after `stall` without a new
/// commit once sending is done.
async fn poll(
    pool: PgPool,
    pending: Arc<Pending>,
    sending_done: Arc<AtomicBool>,
    interval: Duration,
    stall: Duration,
) -> anyhow::Result<(Latencies, Latencies)> {
    let mut latencies = Latencies::new();
    let mut queries = Latencies::new();
    let mut last_progress = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let done = sending_done.load(Ordering::Relaxed);
        let batch: Vec<(usize, String)> = pending
            .lock()
            .iter()
            .take(POLL_BATCH)
            .map(|(i, (intent, _))| (*i, intent.clone()))
            .collect();
        if batch.is_empty() {
            if done {
                return Ok((latencies, queries));
            }
            continue;
        }
        let intents: Vec<&str> = batch.iter().map(|(_, intent)| intent.as_str()).collect();
        let asked_at = unix_us(SystemTime::now());
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT stripe_payment_intent_id FROM purchases WHERE stripe_payment_intent_id = ANY($1)",
        )
        .bind(&intents)
        // Planned afresh each time: a prepared statement keeps the plan it got while the
        // table was empty (a sequential scan), and the observer then burns the database's
        // CPU that the processor needs, more with every poll as the table grows.
        .persistent(false)
        .fetch_all(&pool)
        .await?;
        // What the query saw had committed before it answered; when exactly in between is
        // unknown, so the commit is dated late, never early.
        let answered_at = unix_us(SystemTime::now());
        queries.record_us(u64::try_from(answered_at - asked_at).unwrap_or(0));
        if !found.is_empty() {
            last_progress = Instant::now();
            let found: std::collections::HashSet<&str> = found.iter().map(String::as_str).collect();
            let mut waiting = pending.lock();
            for (i, intent) in &batch {
                if found.contains(intent.as_str())
                    && let Some((_, due)) = waiting.remove(i)
                {
                    latencies.record_us(u64::try_from(answered_at - due).unwrap_or(0));
                }
            }
        } else if done && last_progress.elapsed() > stall {
            crate::progress(&format!(
                "e2e: no new commit for {stall:?}: {} event(s) still not committed",
                pending.lock().len()
            ));
            return Ok((latencies, queries));
        }
    }
}
