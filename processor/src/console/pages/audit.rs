//! `/audit`: every replay and purge, newest first.

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use super::{Nav, layout, when};
use crate::console::auth::Caller;
use crate::console::{AppState, audit};

const PAGE: i64 = 100;

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// Keyset cursor: `<started_at micros>.<id>`.
    before: Option<String>,
}

pub async fn show(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<AuditQuery>,
) -> Response {
    let before = query.before.as_deref().and_then(|raw| {
        let (micros, id) = raw.split_once('.')?;
        Some((
            DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            Uuid::parse_str(id).ok()?,
        ))
    });
    let rows = match audit::recent(&console.pool, before, PAGE).await {
        Ok(rows) => rows,
        Err(error) => return super::failure("read ops_audit", &error),
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        match audit::events_of(&console.pool, row.id, 6).await {
            Ok(ids) => events.push(ids),
            Err(error) => return super::failure("read ops_audit_events", &error),
        }
    }
    let next = (rows.len() == PAGE as usize)
        .then(|| {
            rows.last()
                .map(|r| format!("{}.{}", r.started_at.timestamp_micros(), r.id))
        })
        .flatten();
    let content = html! {
        table.audit {
            thead { tr {
                th { "started" } th { "finished" } th { "token" } th { "action" } th { "filter" } th { "events" }
                th.num { "matched" } th.num { "count" } th.num { "failed" } th { "outcome" }
            } }
            tbody {
                @for (row, ids) in rows.iter().zip(&events) {
                    tr {
                        td { (when(row.started_at)) }
                        td { @if let Some(at) = row.finished_at { (when(at)) } @else { "running" } }
                        td { (row.token_name) }
                        td { strong { (row.action) } }
                        td { code { (row.filter.to_string()) } }
                        td {
                            @for (i, id) in ids.iter().enumerate() {
                                @if i == 5 { "…" } @else {
                                    a href={ "/events/" (super::overview::urlencode(id)) } { code { (id) } } " "
                                }
                            }
                        }
                        td.num { (row.matched.map(|n| n.to_string()).unwrap_or_default()) }
                        td.num { (row.count.map(|n| n.to_string()).unwrap_or_default()) }
                        td.num { (row.failed.map(|n| n.to_string()).unwrap_or_default()) }
                        td { (row.outcome.as_deref().unwrap_or("")) }
                    }
                }
                @if rows.is_empty() { tr { td colspan="10" class="muted" { "No action yet." } } }
            }
        }
        @if let Some(next) = next { nav.pages { a href={ "/audit?before=" (next) } { "older »" } } }
    };
    layout("Audit", Nav::Audit, Some(&caller), None, content).into_response()
}
