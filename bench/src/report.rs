//! The report: each figure, its ceiling and ratio, the target and whether it is met.

use std::fmt::Write as _;

use serde::Serialize;

use crate::Options;
use crate::drain::{Drain, EndToEnd};
use crate::figures::Target;
use crate::histogram::Summary;
use crate::load::LoadResult;
use crate::raw::RawBroker;
use crate::raw_db::RawDb;
use crate::reference::Reference;
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
    /// The minimal reference receiver, closed loop like ingest's.
    pub reference: Option<Reference>,
    pub ingest_closed: Option<LoadResult>,
    pub ingest_open: Option<LoadResult>,
    pub drain: Option<Drain>,
    /// The reference pipeline (reference receiver and consumer) at the e2e rate.
    pub ref_e2e: Option<EndToEnd>,
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
    /// Publish channels of the reference receiver (ingest's count).
    pub ref_channels: u16,
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
                ref_channels: options.ref_channels,
            },
            seeded_purchases: 0,
            body_bytes: None,
            raw_broker: None,
            raw_db: None,
            reference: None,
            ingest_closed: None,
            ingest_open: None,
            drain: None,
            ref_e2e: None,
            e2e: None,
            rss: None,
            costs: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Fills in the summary lines from what ran: the figures, each beside its
    /// reference or ceiling and its target, then context lines without a target.
    pub fn finish(&mut self) {
        self.targets = crate::figures::figures(self);
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
            out.push_str(
                "| figure | measured | reference or ceiling | ratio | target | status |\n",
            );
            out.push_str("|---|---:|---|---:|---|---|\n");
            for t in &self.targets {
                let ceiling = t.ceiling_what.clone().unwrap_or_else(|| "-".to_owned());
                let ratio = t
                    .ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.0} %", r * 100.0));
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {} | {} | {} | {} |",
                    t.figure,
                    number(t.value),
                    t.unit,
                    ceiling,
                    ratio,
                    t.target,
                    match t.met {
                        Some(true) => "met",
                        Some(false) => "missed",
                        None => "-",
                    }
                );
            }
            out.push('\n');
        }

        let mut rows: Vec<Row> = Vec::new();
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
            for shape in [&r.processor, &r.three_insert] {
                for step in &shape.steps {
                    rows.push((
                        format!(
                            "raw db, {}, {} client(s)",
                            shape.shape.label(),
                            step.clients
                        ),
                        step.transactions + step.failed,
                        step.failed.to_string(),
                        step.rate,
                        step.latency.clone(),
                    ));
                }
            }
        }
        if let Some(r) = &self.reference {
            rows.push((
                format!(
                    "{} ({} publish channels)",
                    load_name("minimal reference", &r.load),
                    r.channels
                ),
                r.load.requests,
                failures(&r.load),
                r.load.rate,
                r.load.latency.clone(),
            ));
            if let Some(open) = &r.open {
                rows.push((
                    load_name("minimal reference", open),
                    open.requests,
                    failures(open),
                    open.rate,
                    open.latency.clone(),
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
        for (name, receiver, e2e) in [
            ("ref-e2e", "reference receiver", &self.ref_e2e),
            ("e2e", "ingest", &self.e2e),
        ] {
            if let Some(e2e) = e2e {
                end_to_end_rows(&mut rows, name, receiver, e2e);
            }
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
            out.push_str("| phase | wall s | machine busy | bench cores | reference cores | ingest cores | processor cores | other cores (RabbitMQ, PostgreSQL) | reference peak RSS MB | ingest peak RSS MB | processor peak RSS MB |\n");
            out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for c in &self.costs {
                let mb = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    out,
                    "| {} | {:.1} | {:.0} % | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                    c.phase,
                    c.wall_s,
                    c.machine_busy_pct,
                    c.bench_cores,
                    c.reference_cores,
                    c.ingest_cores,
                    c.processor_cores,
                    c.other_cores,
                    mb(c.reference_peak_rss_mb),
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
            // A processor that keeps up commits the last event within a few polls of its
            // answer; a longer tail means a queue grew over the whole phase, and then the
            // POST→commit figure depends on --duration, not only on the pipeline.
            if e.tail_s > BACKLOG_TAIL_S {
                let busy = self
                    .costs
                    .iter()
                    .find(|c| c.phase == "e2e")
                    .map_or_else(String::new, |c| {
                        format!(" (machine {:.0} % busy)", c.machine_busy_pct)
                    });
                let _ = writeln!(
                    out,
                    "E2e: the processor fell behind the offered rate{busy}: a queue grew during the phase, so POST→commit grows with --duration."
                );
            }
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

/// Seconds between the last answer and the last commit beyond which e2e says that the
/// processor did not keep up.
const BACKLOG_TAIL_S: f64 = 0.5;

type Row = (String, u64, String, f64, Summary);

fn end_to_end_rows(rows: &mut Vec<Row>, name: &str, receiver: &str, e2e: &EndToEnd) {
    rows.push((
        format!(
            "{}, answer",
            load_name(&format!("{name}: {receiver}"), &e2e.load)
        ),
        e2e.load.requests,
        failures(&e2e.load),
        e2e.load.rate,
        e2e.load.latency.clone(),
    ));
    rows.push((
        format!(
            "{name}: POST→commit seen by a poll every {:.0} ms",
            e2e.poll_interval_ms
        ),
        e2e.expected,
        missing(e2e.expected, e2e.committed),
        0.0,
        e2e.visible.clone(),
    ));
    rows.push((
        format!("{name}: one poll for commits (resolution of the above)"),
        e2e.poll_query.count,
        "0".to_owned(),
        0.0,
        e2e.poll_query.clone(),
    ));
    rows.push((
        format!("{name}: POST→purchases.created_at (tx start)"),
        e2e.expected,
        missing(e2e.expected, e2e.committed),
        0.0,
        e2e.created_at.clone(),
    ));
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

pub fn number(value: f64) -> String {
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
