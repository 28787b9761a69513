//! The summary of a run: the figures, each beside the reference or ceiling it is
//! compared with, the ratio, its target and whether it is met; then context lines.

use serde::Serialize;

use crate::drain::EndToEnd;
use crate::report::{Report, number};
use crate::resources::PhaseCost;

/// One line of the summary table.
#[derive(Debug, Serialize)]
pub struct Target {
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
    /// The ceiling or reference it is compared with, if any (`ceiling_what` says which, with
    /// its value and unit).
    pub ceiling: Option<f64>,
    pub ceiling_what: Option<String>,
    /// value ÷ ceiling.
    pub ratio: Option<f64>,
    /// The target, in words (`-` for a figure reported without one).
    pub target: String,
    /// `None` for a figure reported without a target.
    pub met: Option<bool>,
}

impl Target {
    fn info(figure: String, value: f64, unit: &'static str) -> Self {
        Self {
            figure,
            value,
            unit,
            ceiling: None,
            ceiling_what: None,
            ratio: None,
            target: "-".to_owned(),
            met: None,
        }
    }

    fn against(mut self, ceiling: f64, what: String) -> Self {
        self.ceiling = Some(ceiling);
        self.ratio = (ceiling > 0.0).then(|| self.value / ceiling);
        self.ceiling_what = Some(what);
        self
    }

    fn target(mut self, target: &str, met: bool) -> Self {
        target.clone_into(&mut self.target);
        self.met = Some(met);
        self
    }
}

/// The figures first, in its order, then context lines without a target.
pub fn figures(report: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let reference = report.reference.as_ref().map(|r| &r.load);
    let reference_ok = reference.is_some_and(|r| r.failed == 0);
    if let Some(closed) = &report.ingest_closed {
        let n = closed.in_flight.unwrap_or(0);
        let figure = Target::info(
            format!("ingest, {n} in flight, processor stopped"),
            closed.rate,
            "req/s",
        );
        out.push(match reference {
            Some(r) => {
                let ratio = closed.rate / r.rate.max(f64::MIN_POSITIVE);
                figure
                    .against(
                        r.rate,
                        format!("minimal reference, same load: {}/s", number(r.rate)),
                    )
                    .target(
                        "≥ 90 % of reference",
                        ratio >= 0.90 && closed.failed == 0 && reference_ok,
                    )
            }
            None => figure.target("≥ 90 % of reference (ref-ingest did not run)", false),
        });
    }
    if let Some(drain) = &report.drain {
        let figure = Target::info(
            "processor draining a backlog of new purchases".to_owned(),
            drain.rate,
            "ev/s",
        );
        out.push(match report.raw_db.as_ref().map(|db| &db.three_insert) {
            Some(ceiling) => {
                let ratio = drain.rate / ceiling.best_rate.max(f64::MIN_POSITIVE);
                figure
                    .against(
                        ceiling.best_rate,
                        format!(
                            "raw PostgreSQL 3-insert transaction, best ({} clients): {}/s",
                            ceiling.best_clients,
                            number(ceiling.best_rate)
                        ),
                    )
                    .target(
                        "≥ 100 %, aim 200 %",
                        ratio >= 1.0 && drain.committed == drain.expected,
                    )
            }
            None => figure.target("≥ 100 % of raw 3-insert (raw-db did not run)", false),
        });
    }
    if let Some(e2e) = &report.e2e {
        let rate = e2e.load.target_rate.unwrap_or(0.0);
        let complete = e2e.committed == e2e.expected && e2e.load.failed == 0;
        let reference = report.ref_e2e.as_ref();
        let ceiling = |figure: Target, value: &dyn Fn(&EndToEnd) -> f64, what: &str| match reference
        {
            Some(r) => {
                let v = value(r);
                figure.against(v, format!("{what}: {} ms", number(v)))
            }
            None => figure,
        };
        out.push(
            ceiling(
                Target::info(
                    format!(
                        "POST → purchase committed p99, open loop {rate:.0} ev/s, from each event's scheduled send"
                    ),
                    e2e.visible.p99_ms,
                    "ms",
                ),
                &|r| r.visible.p99_ms,
                "reference pipeline, same load",
            )
            .target("≤ 50 ms", e2e.visible.p99_ms <= 50.0 && complete),
        );
        out.push(ceiling(
            Target::info(
                "ingest answer p50 in that e2e run, from scheduled send".to_owned(),
                e2e.load.latency.p50_ms,
                "ms",
            ),
            &|r| r.load.latency.p50_ms,
            "reference receiver in the reference pipeline",
        ));
        out.push(
            ceiling(
                Target::info(
                    "ingest answer p99 in that e2e run, from scheduled send".to_owned(),
                    e2e.load.latency.p99_ms,
                    "ms",
                ),
                &|r| r.load.latency.p99_ms,
                "reference receiver in the reference pipeline",
            )
            .target(
                "≤ 10 ms",
                e2e.load.latency.p99_ms <= 10.0 && e2e.load.failed == 0,
            ),
        );
    }
    if let Some(open) = &report.ingest_open {
        let rate = open.target_rate.unwrap_or(0.0);
        let mut figure = Target::info(
            format!("ingest alone p99, open loop {rate:.0} req/s, from scheduled send"),
            open.latency.p99_ms,
            "ms",
        );
        match report.reference.as_ref().and_then(|r| r.open.as_ref()) {
            Some(r) => {
                figure = figure.against(
                    r.latency.p99_ms,
                    format!(
                        "minimal reference, same open loop: {} ms",
                        number(r.latency.p99_ms)
                    ),
                );
            }
            None => {
                if let Some(r) = reference {
                    figure.ceiling_what = Some(format!(
                        "sent at {} of the reference's {}/s",
                        if (rate - r.rate / 2.0).abs() < 1.0 {
                            "half"
                        } else {
                            "--open-rate, not half"
                        },
                        number(r.rate)
                    ));
                }
            }
        }
        out.push(figure.target("≤ 10 ms", open.latency.p99_ms <= 10.0 && open.failed == 0));
    }
    if let Some(mb) = phase_peak(report, "ingest closed loop", |c| c.ingest_peak_rss_mb) {
        out.push(
            Target::info("ingest peak RSS in the closed loop".to_owned(), mb, "MB")
                .target("≤ 40 MB", mb <= 40.0),
        );
    }
    if let Some(mb) = report.rss.as_ref().and_then(|r| r.processor_mb) {
        out.push(
            Target::info("processor peak RSS (whole run)".to_owned(), mb, "MB")
                .target("≤ 60 MB", mb <= 60.0),
        );
    }

    // Context: the other ceilings, kept so that each comparison can be checked.
    if let Some(r) = reference {
        let figure = Target::info(
            "minimal reference, same load as ingest".to_owned(),
            r.rate,
            "req/s",
        );
        out.push(match &report.raw_broker {
            Some(raw) => figure.against(
                raw.rate,
                format!("raw publish-with-confirm: {}/s", number(raw.rate)),
            ),
            None => figure,
        });
    }
    if let (Some(closed), Some(raw)) = (&report.ingest_closed, &report.raw_broker) {
        out.push(
            Target::info("ingest closed loop".to_owned(), closed.rate, "req/s").against(
                raw.rate,
                format!("raw publish-with-confirm: {}/s", number(raw.rate)),
            ),
        );
    }
    if let (Some(drain), Some(db)) = (&report.drain, &report.raw_db) {
        out.push(
            Target::info("processor drain".to_owned(), drain.rate, "ev/s").against(
                db.processor.best_rate,
                format!(
                    "raw db, the processor's own transaction, best ({} clients): {}/s",
                    db.processor.best_clients,
                    number(db.processor.best_rate)
                ),
            ),
        );
    }
    if let Some(mb) = report.rss.as_ref().and_then(|r| r.ingest_mb) {
        out.push(Target::info(
            "ingest peak RSS (whole run, overload included)".to_owned(),
            mb,
            "MB",
        ));
    }
    out
}

/// The peak RSS a service reached during the phase named `phase`.
fn phase_peak(
    report: &Report,
    phase: &str,
    rss: impl Fn(&PhaseCost) -> Option<f64>,
) -> Option<f64> {
    report.costs.iter().find(|c| c.phase == phase).and_then(rss)
}
