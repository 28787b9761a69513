//! The report: each figure, its ceiling and ratio, the target and whether it is met.

use std::fmt::Write as _;

use serde::Serialize;

use crate::Options;
use crate::drain::{Drain, EndToEnd};
use crate::histogram::Summary;
use crate::load::LoadResult;
use crate::raw::{RawBroker, RawDb};
use crate::resources::PhaseCost;
use crate::world::{Rss, World};

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: RunInfo,
    pub seeded_purchases: u64,
    /// Mean size of an event body, bytes.
    pub body_bytes: Option<u64>,
    pub raw_broker: Option<RawBroker>,
    pub raw_db: Option<RawDb>,
    pub ingest_closed: Option<LoadResult>,
    pub ingest_open: Option<LoadResult>,
    pub drain: Option<Drain>,
    pub e2e: Option<EndToEnd>,
    pub rss: Option<Rss>,
    /// CPU and peak RSS of each phase.
    pub costs: Vec<PhaseCost>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub tag: String,
    pub command: String,
    pub started_at: String,
    pub cores: usize,
    pub events: u64,
    pub duration_s: f64,
    pub db_events: u64,
    pub in_flight: u32,
    pub e2e_rate: f64,
}

/// One line of the summary table.
#[derive(Debug, Serialize)]
pub struct Target {
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
    /// The ceiling it is compared with, if any.
    pub ceiling: Option<f64>,
    pub ceiling_what: Option<String>,
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    pub met: bool,
}

impl Report {
    pub fn new(world: &World, command: String, options: &Options) -> Self {
        Self {
            run: RunInfo {
                tag: world.tag.clone(),
                command,
                started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                cores: std::thread::available_parallelism().map_or(0, usize::from),
                events: options.events,
                duration_s: options.duration.as_secs_f64(),
                db_events: options.db_events,
                in_flight: options.in_flight,
                e2e_rate: options.e2e_rate,
            },
            seeded_purchases: 0,
            body_bytes: None,
            raw_broker: None,
            raw_db: None,
            ingest_closed: None,
            ingest_open: None,
            drain: None,
            e2e: None,
            rss: None,
            costs: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Fills in the summary lines from what ran.
    pub fn finish(&mut self) {
        let mut targets = Vec::new();
        if let Some(closed) = &self.ingest_closed {
            let raw = self.raw_broker.as_ref().map(|r| r.rate);
            let ratio = raw.map(|raw| closed.rate / raw);
            targets.push(Target {
                figure: format!(
                    "ingest closed loop, {} in flight",
                    closed.in_flight.unwrap_or(0)
                ),
                value: closed.rate,
                unit: "req/s",
                ceiling: raw,
                ceiling_what: raw.map(|_| "raw publish-with-confirm".to_owned()),
                ratio,
                target: "≥ 0.90 × raw publish".to_owned(),
                met: ratio.is_some_and(|r| r >= 0.90) && closed.failed == 0,
            });
        }
        if let Some(open) = &self.ingest_open {
            let rate = open.target_rate.unwrap_or(0.0);
            targets.push(Target {
                figure: format!("ingest open loop p99 at {rate:.0}/s"),
                value: open.latency.p99_ms,
                unit: "ms",
                ceiling: self.raw_broker.as_ref().map(|r| r.rate),
                ceiling_what: self
                    .raw_broker
                    .as_ref()
                    .map(|_| "sent at half of raw publish-with-confirm".to_owned()),
                ratio: None,
                target: "≤ 10 ms".to_owned(),
                met: open.latency.p99_ms <= 10.0 && open.failed == 0,
            });
        }
        if let Some(drain) = &self.drain {
            let raw = self.raw_db.as_ref();
            let ratio = raw.map(|raw| drain.rate / raw.best_rate);
            targets.push(Target {
                figure: "processor drain rate".to_owned(),
                value: drain.rate,
                unit: "events/s",
                ceiling: raw.map(|r| r.best_rate),
                ceiling_what: raw.map(|r| {
                    format!(
                        "raw db, one event per transaction, {} clients",
                        r.best_clients
                    )
                }),
                ratio,
                target: "≥ 1.0 × raw db".to_owned(),
                met: ratio.is_some_and(|r| r >= 1.0) && drain.committed == drain.expected,
            });
        }
        if let Some(e2e) = &self.e2e {
            let rate = e2e.load.target_rate.unwrap_or(0.0);
            targets.push(Target {
                figure: format!("POST→commit p99 at {rate:.0}/s (visible)"),
                value: e2e.visible.p99_ms,
                unit: "ms",
                ceiling: None,
                ceiling_what: None,
                ratio: None,
                target: "≤ 50 ms".to_owned(),
                met: e2e.visible.p99_ms <= 50.0
                    && e2e.committed == e2e.expected
                    && e2e.load.failed == 0,
            });
        }
        if let Some(rss) = &self.rss {
            for (name, mb, limit) in [
                ("ingest", rss.ingest_mb, 40.0),
                ("processor", rss.processor_mb, 60.0),
            ] {
                if let Some(mb) = mb {
                    targets.push(Target {
                        figure: format!("peak RSS {name}"),
                        value: mb,
                        unit: "MB",
                        ceiling: None,
                        ceiling_what: None,
                        ratio: None,
                        target: format!("≤ {limit:.0} MB"),
                        met: mb <= limit,
                    });
                }
            }
        }
        self.targets = targets;
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let run = &self.run;
        let _ = writeln!(
            out,
            "### bench {} ({}, {} cores, run {})\n",
            run.command, run.started_at, run.cores, run.tag
        );
        let _ = writeln!(
            out,
            "Stored before measuring: {} purchases. Event body: {} bytes on average.\n",
            self.seeded_purchases,
            self.body_bytes
                .map_or_else(|| "-".to_owned(), |b| b.to_string())
        );
        if !self.targets.is_empty() {
            out.push_str("| figure | value | ceiling | ratio | target | status |\n");
            out.push_str("|---|---:|---|---:|---|---|\n");
            for t in &self.targets {
                let ceiling = match (&t.ceiling, &t.ceiling_what) {
                    (Some(c), Some(what)) => format!("{what}: {c:.0}/s"),
                    _ => "-".to_owned(),
                };
                let ratio = t
                    .ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {} | {} | {} | {} |",
                    t.figure,
                    number(t.value),
                    t.unit,
                    ceiling,
                    ratio,
                    t.target,
                    if t.met { "met" } else { "missed" }
                );
            }
            out.push('\n');
        }

        let mut rows = Vec::new();
        if let Some(r) = &self.raw_broker {
            rows.push((
                format!(
                    "raw publish-with-confirm ({} in flight, {} channels)",
                    r.in_flight, r.channels
                ),
                r.messages,
                r.failed.to_string(),
                r.rate,
                r.latency.clone(),
            ));
        }
        if let Some(r) = &self.raw_db {
            for step in &r.steps {
                rows.push((
                    format!("raw db transaction, {} client(s)", step.clients),
                    step.transactions + step.failed,
                    step.failed.to_string(),
                    step.rate,
                    step.latency.clone(),
                ));
            }
        }
        for load in [&self.ingest_closed, &self.ingest_open]
            .into_iter()
            .flatten()
        {
            rows.push((
                load_name("ingest", load),
                load.requests,
                failures(load),
                load.rate,
                load.latency.clone(),
            ));
        }
        if let Some(e2e) = &self.e2e {
            rows.push((
                load_name("e2e: ingest", &e2e.load),
                e2e.load.requests,
                failures(&e2e.load),
                e2e.load.rate,
                e2e.load.latency.clone(),
            ));
            rows.push((
                format!(
                    "e2e: POST→commit visible (poll {:.0} ms)",
                    e2e.poll_interval_ms
                ),
                e2e.expected,
                missing(e2e.expected, e2e.committed),
                0.0,
                e2e.visible.clone(),
            ));
            rows.push((
                "e2e: one poll for commits (resolution of the above)".to_owned(),
                e2e.poll_query.count,
                "0".to_owned(),
                0.0,
                e2e.poll_query.clone(),
            ));
            rows.push((
                "e2e: POST→purchases.created_at (tx start)".to_owned(),
                e2e.expected,
                missing(e2e.expected, e2e.committed),
                0.0,
                e2e.created_at.clone(),
            ));
        }
        if !rows.is_empty() {
            out.push_str(
                "| phase | n | not ok | rate/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n",
            );
            out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
            for (name, n, failed, rate, s) in rows {
                let rate = if rate > 0.0 {
                    number(rate)
                } else {
                    "-".to_owned()
                };
                let _ = writeln!(
                    out,
                    "| {name} | {n} | {failed} | {rate} | {} | {} | {} | {} | {} |",
                    ms(&s, s.p50_ms),
                    ms(&s, s.p90_ms),
                    ms(&s, s.p99_ms),
                    ms(&s, s.p999_ms),
                    ms(&s, s.max_ms)
                );
            }
            out.push('\n');
        }
        if !self.costs.is_empty() {
            out.push_str("| phase | wall s | machine busy | bench cores | ingest cores | processor cores | other cores (RabbitMQ, PostgreSQL) | ingest peak RSS MB | processor peak RSS MB |\n");
            out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for c in &self.costs {
                let mb = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    out,
                    "| {} | {:.1} | {:.0} % | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                    c.phase,
                    c.wall_s,
                    c.machine_busy_pct,
                    c.bench_cores,
                    c.ingest_cores,
                    c.processor_cores,
                    c.other_cores,
                    mb(c.ingest_peak_rss_mb),
                    mb(c.processor_peak_rss_mb)
                );
            }
            out.push('\n');
        }
        if let Some(d) = &self.drain {
            let _ = writeln!(
                out,
                "Drain: {} of {} backlog events committed; {:.0} events/s from the first commit to the last ({:.1} s); {:.1} s from starting the processor.{}",
                d.committed,
                d.expected,
                d.rate,
                d.span_s,
                d.wall_s,
                if d.missing.is_empty() {
                    String::new()
                } else {
                    format!(" Missing by event status: {:?}.", d.missing)
                }
            );
        }
        if let Some(e) = &self.e2e {
            let _ = writeln!(
                out,
                "E2e: {} of {} accepted events committed; the last one {:.1} s after the last answer.{}",
                e.committed,
                e.expected,
                e.tail_s,
                if e.missing.is_empty() {
                    String::new()
                } else {
                    format!(" Missing by event status: {:?}.", e.missing)
                }
            );
        }
        if let Some(open) = &self.ingest_open
            && let Some(lag) = open.max_start_lag_ms
        {
            let _ = writeln!(
                out,
                "Open loop: the generator started a request at most {lag:.1} ms after it was due."
            );
        }
        out
    }
}

fn load_name(what: &str, load: &LoadResult) -> String {
    match (load.in_flight, load.target_rate) {
        (Some(n), _) => format!("{what} closed loop, {n} in flight"),
        (_, Some(rate)) => format!("{what} open loop at {rate:.0}/s"),
        _ => what.to_owned(),
    }
}

fn failures(load: &LoadResult) -> String {
    if load.failures.is_empty() {
        "0".to_owned()
    } else {
        load.failures
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn missing(expected: u64, committed: u64) -> String {
    if committed >= expected {
        "0".to_owned()
    } else {
        format!("{} not committed", expected - committed)
    }
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn ms(summary: &Summary, value: f64) -> String {
    if summary.count == 0 {
        "-".to_owned()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}
