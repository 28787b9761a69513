//! `processor dlq stats | list | show | replay | purge`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use shared::config::BrokerArgs;
use shared::contract::{EventMessage, replayed};

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
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("dead letters: {}", stats.depth);
    if stats.depth == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "oldest:       {}",
        format_age(std::time::Duration::from_secs(stats.oldest_age_secs))
    );
    for (title, counts) in [
        ("by class", &stats.by_class),
        ("by type", &stats.by_type),
        ("by error", &stats.by_error),
    ] {
        println!("{title}:");
        let mut sorted: Vec<_> = counts.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, count) in sorted {
            println!("  {count:>6}  {key}");
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
        all: false,
        event_ids: Vec::new(),
        event_type,
        class,
    };
    let now = Utc::now();
    let shown: Vec<&DeadLetter> = snapshot
        .letters
        .iter()
        .filter(|l| filter.matches(l))
        .take(limit)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        for letter in &shown {
            println!(
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
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        for (i, copy) in found.iter().enumerate() {
            if found.len() > 1 {
                println!("--- copy {} of {}", i + 1, found.len());
            }
            println!(
                "summary: {}",
                serde_json::to_string_pretty(&copy["summary"])?
            );
            println!(
                "headers: {}",
                serde_json::to_string_pretty(&copy["headers"])?
            );
            println!(
                "broker history (x-death): {}",
                serde_json::to_string_pretty(&copy["broker_history"])?
            );
            println!(
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

/// Replays matching dead letters, each event once: extra copies of an event already put
/// back in this run are dropped (handling is idempotent, so they would only repeat it).
pub async fn replay(
    broker: &BrokerArgs,
    selector: &Selector,
    dry_run: bool,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let topology = broker.topology();
    let (connection, snapshot) = snapshot(broker, "dlq replay").await?;
    let filter = Filter::from(selector);
    let matching: Vec<&DeadLetter> = snapshot
        .letters
        .iter()
        .filter(|l| filter.matches(l))
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let total = snapshot.letters.len();
    if dry_run {
        let distinct: HashSet<&str> = matching.iter().map(|l| l.event_id.as_str()).collect();
        println!(
            "dry run: would replay {} message(s) ({} distinct event(s)); {} would stay in {}",
            matching.len(),
            distinct.len(),
            total - matching.len(),
            topology.dead_queue
        );
        drop(distinct);
        drop(matching);
        finish(connection, snapshot).await?;
        return Ok(ExitCode::SUCCESS);
    }

    let publish = confirm_channel(&connection).await?;
    let bar = progress(matching.len());
    let mut seen = HashSet::new();
    let (mut replayed_count, mut dropped, mut failed) = (0usize, 0usize, 0usize);
    for letter in &matching {
        if !seen.insert(letter.event_id.clone()) {
            snapshot.ack(letter).await?;
            dropped += 1;
        } else {
            let properties = replayed(&letter.properties, Utc::now());
            match to_work_queue(&publish, &topology, &letter.body, properties).await {
                Ok(()) => {
                    snapshot.ack(letter).await?;
                    replayed_count += 1;
                }
                Err(error) => {
                    tracing::error!(event_id = letter.event_id, %error, "could not replay; it stays in the dead-letter queue");
                    failed += 1;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let left = total - replayed_count - dropped;
    let matched = matching.len();
    drop(matching);
    finish(connection, snapshot).await?;
    println!(
        "replayed {replayed_count} of {matched} matching message(s); {dropped} duplicate copie(s) dropped; {failed} failed; {left} left in {}",
        topology.dead_queue
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    let (connection, snapshot) = snapshot(broker, "dlq purge").await?;
    let filter = Filter {
        all,
        event_ids,
        ..Filter::default()
    };
    let mut purged = 0usize;
    let mut recorded = HashSet::new();
    for letter in snapshot.letters.iter().filter(|l| filter.matches(l)) {
        // The log first: if that fails, the message stays and the command can be re-run.
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
            db::events::record_failure(&pool, &message, EventStatus::Purged, &note).await?;
        }
        snapshot.ack(letter).await?;
        purged += 1;
    }
    let left = snapshot.letters.len() - purged;
    finish(connection, snapshot).await?;
    println!(
        "purged {purged} message(s) ({} event(s)); {left} left",
        recorded.len()
    );
    Ok(ExitCode::SUCCESS)
}
