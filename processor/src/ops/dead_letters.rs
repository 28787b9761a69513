//! `processor dlq stats | list | show | replay | purge`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use shared::config::BrokerArgs;
use shared::contract::{EventMessage, replayed};

use shared::topology::Topology;
use sqlx::PgPool;

use crate::config::{DatabaseArgs, Selector};
use crate::db::{self, events::EventStatus};
use crate::dlq::{DeadLetter, Filter, Snapshot, Stats, format_age};
use crate::ops::{MAX_HELD, confirm_channel, connect, to_work_queue};

async fn snapshot(
    broker: &BrokerArgs,
    purpose: &str,
) -> anyhow::Result<(lapin::Connection, Snapshot)> {
    let connection = connect(broker, purpose).await?;
    let snapshot = Snapshot::take(&connection, &broker.topology(), MAX_HELD).await?;
    Ok((connection, snapshot))
}

async fn finish(connection: lapin::Connection, snapshot: Snapshot) -> anyhow::Result<()> {
    snapshot.release().await?;
    connection.close(200, "done".into()).await?;
    Ok(())
}

pub async fn stats(broker: &BrokerArgs, json: bool) -> anyhow::Result<ExitCode> {
    let (connection, snapshot) = snapshot(broker, "dlq stats").await?;
    let stats = Stats::of(&snapshot.letters, Utc::now());
    finish(connection, snapshot).await?;
    if json {
        say!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("dead letters: {}", stats.depth);
    if stats.depth == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "oldest:       {}",
        format_age(std::time::Duration::from_secs(stats.oldest_age_secs))
    );
    for (title, counts) in [
        ("by class", &stats.by_class),
        ("by type", &stats.by_type),
        ("by error", &stats.by_error),
    ] {
        say!("{title}:");
        let mut sorted: Vec<_> = counts.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, count) in sorted {
            say!("  {count:>6}  {key}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    broker: &BrokerArgs,
    event_type: Option<String>,
    class: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (connection, snapshot) = snapshot(broker, "dlq list").await?;
    let filter = Filter {
        event_type,
        class,
        ..Filter::default()
    };
    let now = Utc::now();
    let shown: Vec<&DeadLetter> = snapshot
        .letters
        .iter()
        .filter(|l| filter.matches(l))
        .take(limit)
        .collect();
    if json {
        say!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        for letter in &shown {
            say!(
                "{}  {}  {}  attempts={}  age={}  {}",
                letter.event_id,
                letter.event_type,
                letter.class,
                letter.attempts,
                format_age(letter.age(now)),
                letter.last_error
            );
        }
    }
    finish(connection, snapshot).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn show(broker: &BrokerArgs, event_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (connection, snapshot) = snapshot(broker, "dlq show").await?;
    let found: Vec<serde_json::Value> = snapshot
        .letters
        .iter()
        .filter(|l| l.event_id == event_id)
        .map(DeadLetter::describe)
        .collect();
    finish(connection, snapshot).await?;
    if found.is_empty() {
        eprintln!("no message for event {event_id} in the dead-letter queue");
        return Ok(ExitCode::FAILURE);
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        for (i, copy) in found.iter().enumerate() {
            if found.len() > 1 {
                say!("--- copy {} of {}", i + 1, found.len());
            }
            say!(
                "summary: {}",
                serde_json::to_string_pretty(&copy["summary"])?
            );
            say!(
                "headers: {}",
                serde_json::to_string_pretty(&copy["headers"])?
            );
            say!(
                "broker history (x-death): {}",
                serde_json::to_string_pretty(&copy["broker_history"])?
            );
            say!(
                "payload: {}",
                serde_json::to_string_pretty(&copy["payload"])?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl From<&Selector> for Filter {
    fn from(selector: &Selector) -> Self {
        Filter {
            all: selector.all,
            event_ids: selector.event_ids.clone(),
            event_type: selector.event_type.clone(),
            class: selector.class.clone(),
            ..Filter::default()
        }
    }
}

fn progress(len: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}

/// What a replay did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayOutcome {
    /// Messages in the dead-letter queue when the replay started.
    pub total: usize,
    /// Messages the filter matched.
    pub matched: usize,
    /// Distinct events among them.
    pub distinct: usize,
    pub replayed: usize,
    /// Extra copies of an event already put back in this run, removed.
    pub dropped: usize,
    /// Messages that could not be published; they stay in the dead-letter queue.
    pub failed: usize,
    /// The dead letters put back on the work queue (one per event).
    #[serde(skip)]
    pub letters: Vec<DeadLetter>,
}

impl ReplayOutcome {
    pub fn left(&self) -> usize {
        self.total - self.replayed - self.dropped
    }
}

/// Replays the dead letters `filter` matches (at most `limit`), each event once: extra
/// copies of an event already put back in this run are dropped (handling is idempotent, so
/// they would only repeat it). With `dry_run`, only counts. `progress` is called after each
/// message with the number done so far. The one replay code path: `processor dlq replay`
/// and the console both call it.
pub async fn replay_matching(
    connection: &lapin::Connection,
    topology: &Topology,
    filter: &Filter,
    limit: Option<usize>,
    dry_run: bool,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<ReplayOutcome> {
    let snapshot = Snapshot::take(connection, topology, MAX_HELD).await?;
    let now = Utc::now();
    let matching: Vec<&DeadLetter> = snapshot
        .letters
        .iter()
        .filter(|l| filter.matches_at(l, now))
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let mut outcome = ReplayOutcome {
        total: snapshot.letters.len(),
        matched: matching.len(),
        distinct: matching
            .iter()
            .map(|l| l.event_id.as_str())
            .collect::<HashSet<_>>()
            .len(),
        ..ReplayOutcome::default()
    };
    if dry_run {
        drop(matching);
        snapshot.release().await?;
        return Ok(outcome);
    }
    let publish = confirm_channel(connection).await?;
    let mut seen = HashSet::new();
    for (done, letter) in matching.iter().enumerate() {
        if !seen.insert(letter.event_id.clone()) {
            snapshot.ack(letter).await?;
            outcome.dropped += 1;
        } else {
            let properties = replayed(&letter.properties, Utc::now());
            match to_work_queue(&publish, topology, &letter.body, properties).await {
                Ok(()) => {
                    snapshot.ack(letter).await?;
                    outcome.replayed += 1;
                    outcome.letters.push(DeadLetter {
                        body: Vec::new(),
                        ..(*letter).clone()
                    });
                }
                Err(error) => {
                    tracing::error!(event_id = letter.event_id, %error, "could not replay; it stays in the dead-letter queue");
                    outcome.failed += 1;
                }
            }
        }
        progress(done + 1, outcome.matched);
    }
    drop(matching);
    snapshot.release().await?;
    let _ = publish.close(200, "replayed".into()).await;
    Ok(outcome)
}

pub async fn replay(
    broker: &BrokerArgs,
    selector: &Selector,
    dry_run: bool,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let topology = broker.topology();
    let connection = connect(broker, "dlq replay").await?;
    let filter = Filter::from(selector);
    let bar = progress(0);
    let outcome = replay_matching(
        &connection,
        &topology,
        &filter,
        limit,
        dry_run,
        |done, of| {
            bar.set_length(of as u64);
            bar.set_position(done as u64);
        },
    )
    .await?;
    bar.finish_and_clear();
    connection.close(200, "done".into()).await?;
    if dry_run {
        say!(
            "dry run: would replay {} message(s) ({} distinct event(s)); {} would stay in {}",
            outcome.matched,
            outcome.distinct,
            outcome.total - outcome.matched,
            topology.dead_queue
        );
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "replayed {} of {} matching message(s); {} duplicate copie(s) dropped; {} failed; {} left in {}",
        outcome.replayed,
        outcome.matched,
        outcome.dropped,
        outcome.failed,
        outcome.left(),
        topology.dead_queue
    );
    Ok(if outcome.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What a purge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PurgeOutcome {
    pub total: usize,
    pub purged: usize,
    /// The purged dead letters, one per event (each marked `purged` in the event log).
    #[serde(skip)]
    pub letters: Vec<DeadLetter>,
}

/// The dead letters `filter` matches, described as `dlq show` does: what an operator
/// downloads before a purge.
pub async fn export_matching(
    connection: &lapin::Connection,
    topology: &Topology,
    filter: &Filter,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let snapshot = Snapshot::take(connection, topology, MAX_HELD).await?;
    let now = Utc::now();
    let described = snapshot
        .letters
        .iter()
        .filter(|l| filter.matches_at(l, now))
        .map(DeadLetter::describe)
        .collect();
    snapshot.release().await?;
    Ok(described)
}

/// Discards the dead letters `filter` matches and marks their events `purged` in the log,
/// the log first: if that fails, the message stays and the purge can be run again. The
/// one purge code path: `processor dlq purge` and the console both call it.
pub async fn purge_matching(
    pool: &PgPool,
    connection: &lapin::Connection,
    topology: &Topology,
    filter: &Filter,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<PurgeOutcome> {
    let snapshot = Snapshot::take(connection, topology, MAX_HELD).await?;
    let now = Utc::now();
    let mut outcome = PurgeOutcome {
        total: snapshot.letters.len(),
        ..PurgeOutcome::default()
    };
    let mut recorded = HashSet::new();
    for letter in snapshot
        .letters
        .iter()
        .filter(|l| filter.matches_at(l, now))
    {
        if recorded.insert(letter.event_id.clone()) {
            let message = EventMessage::from_delivery(
                &letter.event_type,
                &letter.properties,
                letter.body.clone(),
            )
            .unwrap_or_else(|_| EventMessage {
                event_id: letter.event_id.clone(),
                event_type: letter.event_type.clone(),
                endpoint: letter.endpoint.clone().unwrap_or_else(|| "unknown".into()),
                received_at: letter.received_at.unwrap_or_else(Utc::now),
                attempt: letter.attempts,
                body: letter.body.clone(),
            });
            let note = format!(
                "purged from the dead-letter queue by an operator; last error: {}",
                letter.last_error
            );
            db::events::record_failure(pool, &message, EventStatus::Purged, &note, None).await?;
            outcome.letters.push(DeadLetter {
                body: Vec::new(),
                ..letter.clone()
            });
        }
        snapshot.ack(letter).await?;
        outcome.purged += 1;
        progress(outcome.purged);
    }
    snapshot.release().await?;
    Ok(outcome)
}

pub async fn purge(
    broker: &BrokerArgs,
    database: &DatabaseArgs,
    event_ids: Vec<String>,
    all: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    if !yes {
        eprintln!("purging discards messages for good: add --yes to confirm");
        return Ok(ExitCode::from(2));
    }
    let pool = db::pool(database)?;
    let connection = connect(broker, "dlq purge").await?;
    let filter = Filter {
        all,
        event_ids,
        ..Filter::default()
    };
    let outcome = purge_matching(&pool, &connection, &broker.topology(), &filter, |_| {}).await?;
    connection.close(200, "done".into()).await?;
    say!(
        "purged {} message(s) ({} event(s)); {} left",
        outcome.purged,
        outcome.letters.len(),
        outcome.total - outcome.purged
    );
    Ok(ExitCode::SUCCESS)
}
