//! `/`: the pipeline at a glance. Queue depths, the oldest dead letter and the oldest event
//! waiting for a retry, events per minute over the last hour, dead letters grouped by
//! class, type, endpoint and error. Reloads itself every 15 seconds.
//!
//! The per-minute counts come from the event log, not from the processors' counters, so
//! they cover every processor and survive restarts: processed = events whose processing
//! finished in that minute; retried and dead-lettered = events whose latest failure, in
//! that minute, sent them to a delay queue or to the dead-letter queue (an event that
//! failed several times counts once, at its latest failure).

use std::fmt::Write as _;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, PreEscaped, html};
use sqlx::PgPool;

use super::{Nav, age, layout, when};
use crate::console::auth::Caller;
use crate::console::{AppState, Console, index};
use crate::dlq;

/// One queue's line.
struct QueueDepth {
    name: String,
    role: &'static str,
    messages: Option<u32>,
    consumers: Option<u32>,
}

async fn queue_depths(console: &Console) -> anyhow::Result<Vec<QueueDepth>> {
    let connection = console.connect("overview").await?;
    let channel = connection.create_channel().await?;
    let mut queues = vec![(console.topology.work_queue.clone(), "work")];
    queues.extend(
        console
            .retry_delays
            .iter()
            .map(|d| (console.topology.retry_queue(*d), "delay")),
    );
    queues.push((console.topology.dead_queue.clone(), "dead letters"));
    let mut depths = Vec::new();
    for (name, role) in queues {
        // A passive declare of a missing queue closes the channel: open a new one then.
        let channel = if channel.status().connected() {
            channel.clone()
        } else {
            connection.create_channel().await?
        };
        let depth = dlq::depth(&channel, &name).await;
        depths.push(QueueDepth {
            name,
            role,
            messages: depth.map(|d| d.0),
            consumers: depth.map(|d| d.1),
        });
    }
    let _ = connection.close(200, "overview".into()).await;
    Ok(depths)
}

/// Events per minute over the last hour: (minute, processed, retried, dead-lettered).
type Minute = (DateTime<Utc>, i64, i64, i64);

async fn per_minute(pool: &PgPool) -> Result<Vec<Minute>, sqlx::Error> {
    sqlx::query_as(
        "WITH minutes AS (
             SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                                    date_trunc('minute', now()), interval '1 minute') AS minute
         ), done AS (
             SELECT date_trunc('minute', processed_at) AS minute, count(*) AS n
               FROM stripe_events
              WHERE processed_at IS NOT NULL
                AND processed_at >= date_trunc('minute', now()) - interval '59 minutes'
              GROUP BY 1
         ), failed AS (
             SELECT date_trunc('minute', updated_at) AS minute,
                    count(*) FILTER (WHERE status = 'retrying') AS retried,
                    count(*) FILTER (WHERE status = 'dead') AS dead
               FROM stripe_events
              WHERE status IN ('retrying', 'dead')
                AND updated_at >= date_trunc('minute', now()) - interval '59 minutes'
              GROUP BY 1
         )
         SELECT m.minute, coalesce(d.n, 0), coalesce(f.retried, 0), coalesce(f.dead, 0)
           FROM minutes m
           LEFT JOIN done d USING (minute)
           LEFT JOIN failed f USING (minute)
          ORDER BY m.minute",
    )
    .fetch_all(pool)
    .await
}

/// The oldest event waiting in a delay queue for its next attempt (by when it came in).
async fn oldest_retrying(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(received_at) FROM stripe_events WHERE status = 'retrying'")
        .fetch_one(pool)
        .await
}

const SERIES: [(&str, &str); 3] = [
    ("processed", "#2f855a"),
    ("retried", "#b7791f"),
    ("dead-lettered", "#c53030"),
];

/// The per-minute chart, drawn here as SVG.
fn chart(minutes: &[Minute]) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 180.0;
    const LEFT: f64 = 44.0;
    const BOTTOM: f64 = 22.0;
    let max = minutes
        .iter()
        .map(|m| m.1.max(m.2).max(m.3))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let step = (W - LEFT - 8.0) / (minutes.len().max(2) - 1) as f64;
    let point = |i: usize, v: i64| {
        (
            LEFT + i as f64 * step,
            8.0 + (H - BOTTOM - 8.0) * (1.0 - v as f64 / max),
        )
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="events per minute, last hour">"##
    );
    // Integer ticks only: 0 and the maximum, and the middle when it is a whole number.
    let ticks: &[f64] = if max >= 2.0 && max % 2.0 == 0.0 {
        &[0.0, 0.5, 1.0]
    } else {
        &[0.0, 1.0]
    };
    for &frac in ticks {
        let y = 8.0 + (H - BOTTOM - 8.0) * (1.0 - frac);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"##,
            W - 8.0,
            LEFT - 4.0,
            y + 3.0,
            max * frac
        );
    }
    for (i, label) in [(0, "-60m"), (30, "-30m"), (59, "now")] {
        let (x, _) = point(i.min(minutes.len().saturating_sub(1)), 0);
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{}" font-size="10" text-anchor="middle">{label}</text>"##,
            H - 6.0
        );
    }
    for (series, (_, color)) in SERIES.iter().enumerate() {
        let points: Vec<String> = minutes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let v = [m.1, m.2, m.3][series];
                let (x, y) = point(i, v);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
    }
    svg.push_str("</svg>");
    let totals = minutes
        .iter()
        .fold((0, 0, 0), |t, m| (t.0 + m.1, t.1 + m.2, t.2 + m.3));
    html! {
        figure {
            (PreEscaped(svg))
            figcaption {
                @for (i, (name, color)) in SERIES.iter().enumerate() {
                    span.legend {
                        svg width="12" height="12" { rect width="12" height="12" fill=(color) {} }
                        " " (name) ": " strong { ([totals.0, totals.1, totals.2][i]) } " in the last hour"
                    }
                }
            }
        }
    }
}

fn groups(title: &str, param: &str, rows: &[(String, i64)]) -> Markup {
    html! {
        section.group {
            h3 { (title) }
            @if rows.is_empty() { p.muted { "none" } }
            @else {
                table {
                    @for (key, n) in rows {
                        tr {
                            td.num { (n) }
                            td {
                                @if param.is_empty() { (crate::console::mask::mask_text(key)) }
                                @else {
                                    a href={ "/dead-letters?" (param) "=" (urlencode(key)) } { (key) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Percent-encodes a query value.
pub fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn show(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let pool = &console.pool;
    let depths = match queue_depths(&console).await {
        Ok(d) => Some(d),
        Err(error) => {
            tracing::warn!(%error, "overview: could not read queue depths");
            None
        }
    };
    let data = async {
        Ok::<_, sqlx::Error>((
            per_minute(pool).await?,
            oldest_retrying(pool).await?,
            index::state(pool).await?,
            index::grouped(pool, "class").await?,
            index::grouped(pool, "event_type").await?,
            index::grouped(pool, "endpoint").await?,
            index::grouped(pool, "error_kind").await?,
        ))
    }
    .await;
    let (minutes, retrying, state, by_class, by_type, by_endpoint, by_error) = match data {
        Ok(d) => d,
        Err(error) => return super::failure("read the event log", &error),
    };
    let content = html! {
        section.cards {
            div.card {
                h2 { "Dead letters" }
                p.big { (state.depth.unwrap_or(0)) }
                p { "oldest: " @if let Some(oldest) = state.oldest { strong { (age(oldest)) } " old" } @else { "none" } }
                p.muted { "index read " @if let Some(at) = state.rebuilt_at { (age(at)) " ago" } @else { "not yet" } }
            }
            div.card {
                h2 { "Waiting for a retry" }
                p { "oldest event: " @if let Some(at) = retrying { strong { "received " (age(at)) " ago" } } @else { "none" } }
            }
        }
        section {
            h2 { "Queues" }
            @match &depths {
                None => p.error { "RabbitMQ could not be reached: queue depths unknown." },
                Some(depths) => table {
                    thead { tr { th { "queue" } th { "role" } th.num { "messages" } th.num { "consumers" } } }
                    tbody {
                        @for q in depths {
                            tr {
                                td { code { (q.name) } }
                                td { (q.role) }
                                td.num { @if let Some(m) = q.messages { (m) } @else { "missing" } }
                                td.num { @if let Some(c) = q.consumers { (c) } @else { "-" } }
                            }
                        }
                    }
                },
            }
        }
        section {
            h2 { "Events per minute, last hour" }
            (chart(&minutes))
        }
        section {
            h2 { "Dead letters by" }
            div.groups {
                (groups("failure class", "class", &by_class))
                (groups("event type", "type", &by_type))
                (groups("endpoint", "endpoint", &by_endpoint))
                (groups("error", "", &by_error))
            }
        }
        p.muted { "Updated " (when(Utc::now())) "; reloads every 15 s." }
    };
    layout("Overview", Nav::Overview, Some(&caller), Some(15), content).into_response()
}
