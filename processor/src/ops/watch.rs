//! `processor watch`: a live view of the queues and of what the processors do.
//!
//! Queue depths come from the broker (passive declares, which touch no message); the age of
//! the oldest dead letter from a look at the dead-letter queue's head; rates from the
//! processors' own `/metrics` counters (summed over every URL given), as deltas between
//! refreshes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::Utc;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Style, Stylize};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use shared::topology::Topology;

use crate::config::WatchArgs;
use crate::dlq::{self, Snapshot, format_age};
use crate::ops::connect;

/// The outcomes shown as rates, as counted in `processor_messages_total`.
const OUTCOMES: [&str; 5] = [
    "processed",
    "duplicate",
    "ignored",
    "retried",
    "dead_lettered",
];

struct Sample {
    at: Instant,
    queues: Vec<(String, Option<(u32, u32)>)>,
    oldest_dead: Option<Duration>,
    counters: BTreeMap<String, f64>,
    unreachable: Vec<String>,
}

struct View {
    sample: Sample,
    rates: BTreeMap<String, f64>,
}

pub async fn run(args: &WatchArgs) -> anyhow::Result<ExitCode> {
    let topology = args.broker.topology();
    let connection = connect(&args.broker, "watch").await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut queues = vec![topology.work_queue.clone()];
    queues.extend(
        shared::topology::distinct_delays(&args.retry_delays.0)
            .into_iter()
            .map(|d| topology.retry_queue(d)),
    );
    queues.push(topology.dead_queue.clone());

    let mut previous = sample(&connection, &topology, &queues, &http, &args.metrics_urls).await?;
    if args.once {
        tokio::time::sleep(args.interval).await;
        let current = sample(&connection, &topology, &queues, &http, &args.metrics_urls).await?;
        let view = View {
            rates: rates(&previous, &current),
            sample: current,
        };
        say_raw!("{}", plain(&view));
        return Ok(ExitCode::SUCCESS);
    }

    let mut terminal = ratatui::init();
    let result = async {
        loop {
            let current =
                sample(&connection, &topology, &queues, &http, &args.metrics_urls).await?;
            let view = View {
                rates: rates(&previous, &current),
                sample: current,
            };
            terminal.draw(|frame| draw(frame, &view))?;
            previous = view.sample;
            // Wait for the next refresh, leaving early on q, Esc or Ctrl-C.
            if tokio::task::block_in_place(|| quit_requested(args.interval))? {
                return anyhow::Ok(());
            }
        }
    }
    .await;
    ratatui::restore();
    result?;
    Ok(ExitCode::SUCCESS)
}

fn quit_requested(wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if event::poll(left)?
            && let Event::Key(key) = event::read()?
        {
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

async fn sample(
    connection: &lapin::Connection,
    topology: &Topology,
    queues: &[String],
    http: &reqwest::Client,
    urls: &[String],
) -> anyhow::Result<Sample> {
    let mut depths = Vec::new();
    for queue in queues {
        let channel = connection.create_channel().await?;
        let depth = dlq::depth(&channel, queue).await;
        if depth.is_some() {
            let _ = channel.close(200, "sampled".into()).await;
        }
        depths.push((queue.clone(), depth));
    }
    let head = Snapshot::take(connection, topology, 1).await?;
    let oldest_dead = head.letters.first().map(|l| l.age(Utc::now()));
    head.release().await?;

    let mut counters = BTreeMap::new();
    let mut unreachable = Vec::new();
    for url in urls {
        match scrape(http, url).await {
            Ok(values) => {
                for (outcome, value) in values {
                    *counters.entry(outcome).or_insert(0.0) += value;
                }
            }
            Err(_) => unreachable.push(url.clone()),
        }
    }
    Ok(Sample {
        at: Instant::now(),
        queues: depths,
        oldest_dead,
        counters,
        unreachable,
    })
}

/// `processor_messages_total{outcome="…"}` values from one Prometheus text page.
async fn scrape(http: &reqwest::Client, url: &str) -> Result<Vec<(String, f64)>, reqwest::Error> {
    let text = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_counters(&text))
}

fn parse_counters(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("processor_messages_total{")?;
            let (labels, value) = rest.split_once('}')?;
            let outcome = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("outcome=\""))?
                .trim_end_matches('"');
            Some((outcome.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn rates(previous: &Sample, current: &Sample) -> BTreeMap<String, f64> {
    let seconds = current
        .at
        .duration_since(previous.at)
        .as_secs_f64()
        .max(0.001);
    OUTCOMES
        .iter()
        .map(|outcome| {
            let now = current.counters.get(*outcome).copied().unwrap_or(0.0);
            let before = previous.counters.get(*outcome).copied().unwrap_or(0.0);
            // A restarted processor resets its counters: never show a negative rate.
            ((*outcome).to_owned(), ((now - before) / seconds).max(0.0))
        })
        .collect()
}

fn depth_text(depth: Option<(u32, u32)>) -> (String, String) {
    match depth {
        Some((messages, consumers)) => (messages.to_string(), consumers.to_string()),
        None => ("missing".into(), "-".into()),
    }
}

fn plain(view: &View) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<44} {:>9} {:>9}\n",
        "queue", "messages", "consumers"
    ));
    for (queue, depth) in &view.sample.queues {
        let (m, c) = depth_text(*depth);
        out.push_str(&format!("{queue:<44} {m:>9} {c:>9}\n"));
    }
    out.push_str(&format!(
        "oldest dead letter: {}\n",
        view.sample.oldest_dead.map_or("none".into(), format_age)
    ));
    for (outcome, rate) in &view.rates {
        out.push_str(&format!("{outcome:<14} {rate:>8.1}/s\n"));
    }
    for url in &view.sample.unreachable {
        out.push_str(&format!("metrics unreachable: {url}\n"));
    }
    out
}

fn draw(frame: &mut ratatui::Frame, view: &View) {
    let [top, middle, bottom] = Layout::vertical([
        Constraint::Length(view.sample.queues.len() as u16 + 3),
        Constraint::Length(OUTCOMES.len() as u16 + 2),
        Constraint::Min(3),
    ])
    .areas(frame.area());

    let rows = view.sample.queues.iter().map(|(queue, depth)| {
        let (m, c) = depth_text(*depth);
        let row = Row::new(vec![queue.clone(), m, c]);
        if queue.ends_with(".dead") && depth.is_some_and(|(n, _)| n > 0) {
            row.style(Style::new().red())
        } else {
            row
        }
    });
    let table = Table::new(
        rows,
        [
            Constraint::Min(40),
            Constraint::Length(10),
            Constraint::Length(10),
        ],
    )
    .header(Row::new(vec!["queue", "messages", "consumers"]).bold())
    .block(Block::bordered().title(" queues "));
    frame.render_widget(table, top);

    let lines: Vec<String> = view
        .rates
        .iter()
        .map(|(outcome, rate)| format!("{outcome:<14} {rate:>8.1}/s"))
        .collect();
    frame.render_widget(
        Paragraph::new(lines.join("\n"))
            .block(Block::bordered().title(" processors (all instances) ")),
        middle,
    );

    let mut status = format!(
        "oldest dead letter: {}",
        view.sample.oldest_dead.map_or("none".into(), format_age)
    );
    for url in &view.sample.unreachable {
        status.push_str(&format!("\nmetrics unreachable: {url}"));
    }
    status.push_str("\nq, Esc or Ctrl-C to quit");
    frame.render_widget(Paragraph::new(status).block(Block::bordered()), bottom);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_outcome_counters() {
        let text = "# TYPE processor_messages_total counter\n\
                    processor_messages_total{outcome=\"processed\"} 12\n\
                    processor_messages_total{outcome=\"retried\"} 3\n\
                    processor_handle_seconds_count{outcome=\"processed\"} 12\n";
        assert_eq!(
            parse_counters(text),
            vec![("processed".to_owned(), 12.0), ("retried".to_owned(), 3.0)]
        );
    }
}
