//! `/jobs/{id}`: a replay or purge in progress, then its final count. The page polls
//! `/jobs/{id}/status` (JSON) while the job runs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use maud::html;
use uuid::Uuid;

use super::{Nav, layout, when};
use crate::console::AppState;
use crate::console::auth::Caller;

pub async fn show(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> Response {
    let Some(job) = console.jobs.get(id) else {
        return super::error(
            StatusCode::NOT_FOUND,
            "No such job in this console (it may have run in another one): see the audit page.",
        );
    };
    let status = job.status();
    let content = html! {
        div #job data-status-url={ "/jobs/" (id) "/status" } {
            p { (job.action.as_str()) " of " code { (serde_json::to_string(&job.filter).unwrap_or_default()) } }
            p { "Started " (when(job.started_at)) " by " (job.token_name) "; the dry run counted " strong { (job.expected) } "." }
            progress #progress max=(status.total.max(1)) value=(status.done) {}
            p #progress-text { (status.done) " of " (status.total) }
            p #outcome class=[status.outcome.as_ref().map(|o| if o.ok { "ok" } else { "error" })] {
                @if let Some(outcome) = &status.outcome { (outcome.summary) } @else { "Running…" }
            }
            p { a href="/dead-letters" { "Dead letters" } " · " a href="/audit" { "Audit" } }
        }
    };
    layout(
        &format!("{} job", job.action.as_str()),
        Nav::DeadLetters,
        Some(&caller),
        None,
        content,
    )
    .into_response()
}

pub async fn status(State(console): State<AppState>, Path(id): Path<Uuid>) -> Response {
    match console.jobs.get(id) {
        Some(job) => Json(job.status()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such job"})),
        )
            .into_response(),
    }
}
