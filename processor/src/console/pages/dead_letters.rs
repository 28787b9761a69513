//! `/dead-letters`: the list (filters as query parameters, keyset pagination), and the
//! actions on it. Every action goes dry run first: `POST /dead-letters/preview` counts
//! what matches in the queue and asks for confirmation; the confirmation starts the replay
//! or purge as a job. A purge is offered only together with the JSON download of the
//! messages it would discard.

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::Utc;
use maud::{Markup, html};
use serde::Deserialize;

use super::overview::urlencode;
use super::{Nav, age, layout, present};
use crate::console::auth::Caller;
use crate::console::index::{self, Cursor, ListFilter};
use crate::console::jobs::{self, Action};
use crate::console::{AppState, mask};
use crate::ops::dead_letters::{export_matching, replay_matching};

/// Rows per page.
const PAGE: usize = 50;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    class: Option<String>,
    endpoint: Option<String>,
    /// `30m`, `2h`, `1d`: only letters dead for at least this long.
    older_than: Option<String>,
    /// The keyset cursor of the page to show.
    after: Option<String>,
}

/// Why a filter or form was refused (shown on a 400 page).
type Invalid = &'static str;

fn parse_age(raw: Option<String>) -> Result<Option<std::time::Duration>, Invalid> {
    present(raw)
        .map(|raw| {
            shared::config::parse_duration(&raw)
                .map_err(|_| "`older_than` must be a duration such as 30m, 2h or 1d.")
        })
        .transpose()
}

fn bad_request(why: Invalid) -> Response {
    super::error(StatusCode::BAD_REQUEST, why)
}

fn list_filter(
    event_type: Option<String>,
    class: Option<String>,
    endpoint: Option<String>,
    older_than: Option<String>,
) -> Result<ListFilter, Invalid> {
    Ok(ListFilter {
        event_type: present(event_type),
        class: present(class),
        endpoint: present(endpoint),
        older_than: parse_age(older_than)?,
    })
}

/// The filter as a query string (for links to the next page).
fn query_string(filter: &ListFilter) -> String {
    let mut parts = Vec::new();
    for (key, value) in [
        ("type", &filter.event_type),
        ("class", &filter.class),
        ("endpoint", &filter.endpoint),
    ] {
        if let Some(v) = value {
            parts.push(format!("{key}={}", urlencode(v)));
        }
    }
    if let Some(age) = filter.older_than {
        parts.push(format!(
            "older_than={}",
            urlencode(&humantime::format_duration(age).to_string())
        ));
    }
    parts.join("&")
}

fn filter_fields(filter: &ListFilter) -> Markup {
    html! {
        @if let Some(v) = &filter.event_type { input type="hidden" name="type" value=(v); }
        @if let Some(v) = &filter.class { input type="hidden" name="class" value=(v); }
        @if let Some(v) = &filter.endpoint { input type="hidden" name="endpoint" value=(v); }
        @if let Some(v) = filter.older_than {
            input type="hidden" name="older_than" value=(humantime::format_duration(v).to_string());
        }
    }
}

fn describe(filter: &ListFilter, event_ids: &[String]) -> String {
    let mut parts = Vec::new();
    if !event_ids.is_empty() {
        parts.push(format!("events {}", event_ids.join(", ")));
    }
    if let Some(v) = &filter.event_type {
        parts.push(format!("type {v}"));
    }
    if let Some(v) = &filter.class {
        parts.push(format!("class {v}"));
    }
    if let Some(v) = &filter.endpoint {
        parts.push(format!("endpoint {v}"));
    }
    if let Some(v) = filter.older_than {
        parts.push(format!(
            "dead for at least {}",
            humantime::format_duration(v)
        ));
    }
    if parts.is_empty() {
        "every dead letter".into()
    } else {
        parts.join(", ")
    }
}

pub async fn list(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<ListQuery>,
) -> Response {
    let filter = match list_filter(
        query.event_type,
        query.class,
        query.endpoint,
        query.older_than,
    ) {
        Ok(f) => f,
        Err(why) => return bad_request(why),
    };
    let after = present(query.after).and_then(|raw| Cursor::decode(&raw));
    let listed = async {
        let (rows, next) = index::page(&console.pool, &filter, after, PAGE).await?;
        let total = index::count(&console.pool, &filter).await?;
        let state = index::state(&console.pool).await?;
        Ok::<_, sqlx::Error>((rows, next, total, state))
    }
    .await;
    let (rows, next, total, state) = match listed {
        Ok(l) => l,
        Err(error) => return super::failure("read the dead-letter index", &error),
    };
    let age_value = filter
        .older_than
        .map(|a| humantime::format_duration(a).to_string());
    let content = html! {
        form method="get" action="/dead-letters" class="filters" {
            label { "type " input name="type" value=[filter.event_type.as_deref()] placeholder="checkout.session.completed"; }
            label { "class "
                select name="class" {
                    option value="" { "any" }
                    @for class in ["permanent", "transient", "crash"] {
                        option value=(class) selected[filter.class.as_deref() == Some(class)] { (class) }
                    }
                }
            }
            label { "endpoint " input name="endpoint" value=[filter.endpoint.as_deref()] placeholder="booking"; }
            label { "dead for at least " input name="older_than" value=[age_value.as_deref()] placeholder="1h" size="6"; }
            button type="submit" { "Filter" }
            a href="/dead-letters" { "clear" }
        }
        p {
            strong { (total) } " dead letter(s) match " (describe(&filter, &[]))
            span.muted {
                " (index of " (state.depth.unwrap_or(0)) " read "
                @if let Some(at) = state.rebuilt_at { (age(at)) " ago" } @else { "not yet" }
                "; actions count again in the queue itself)"
            }
        }
        form method="post" action="/dead-letters/preview" id="letters" {
            (filter_fields(&filter))
            @if caller.may_act() {
                div.actions {
                    button type="submit" name="op" value="replay:selected" { "Replay selected" }
                    button type="submit" name="op" value="replay:matching" { "Replay everything matching" }
                    button type="submit" name="op" value="purge:selected" class="danger" { "Purge selected" }
                    button type="submit" name="op" value="purge:matching" class="danger" { "Purge everything matching" }
                }
            }
            table.letters {
                thead { tr {
                    th { input type="checkbox" id="select-all" title="select all on this page"; }
                    th { "event" } th { "type" } th { "class" } th { "endpoint" } th.num { "attempts" } th { "age" } th { "error" }
                } }
                tbody {
                    @for row in &rows {
                        tr {
                            td { input type="checkbox" name="event_id" value=(row.event_id) aria-label={ "select " (row.event_id) }; }
                            td { a href={ "/events/" (urlencode(&row.event_id)) } { code { (row.event_id) } } }
                            td { (row.event_type) }
                            td { span class={ "class " (row.class.replace(':', "-")) } { (row.class) } }
                            td { (row.endpoint.as_deref().unwrap_or("-")) }
                            td.num { (row.attempts) }
                            td title=(super::when(row.dead_at)) { (age(row.dead_at)) }
                            td.error { (mask::mask_text(&row.last_error)) }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="8" class="muted" { "No dead letters match." } } }
                }
            }
        }
        nav.pages {
            @if after.is_some() { a href={ "/dead-letters?" (query_string(&filter)) } { "« newest" } " " }
            @if let Some(next) = next {
                a href={ "/dead-letters?" (query_string(&filter)) "&after=" (next.encode()) } rel="next" { "older »" }
            }
        }
    };
    layout(
        "Dead letters",
        Nav::DeadLetters,
        Some(&caller),
        None,
        content,
    )
    .into_response()
}

/// A form of the actions: the filter, the selected events, and what to do.
struct ActionForm {
    filter: ListFilter,
    event_ids: Vec<String>,
    op: Option<String>,
    expected: usize,
    downloaded: bool,
}

fn parse_form(pairs: Vec<(String, String)>) -> Result<ActionForm, Invalid> {
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let filter = list_filter(
        get("type"),
        get("class"),
        get("endpoint"),
        get("older_than"),
    )?;
    let op = get("op");
    let expected = get("expected").and_then(|v| v.parse().ok()).unwrap_or(0);
    let downloaded = get("downloaded").is_some_and(|v| v == "yes");
    let event_ids = pairs
        .into_iter()
        .filter(|(k, v)| k == "event_id" && !v.is_empty())
        .map(|(_, v)| v)
        .collect();
    Ok(ActionForm {
        filter,
        event_ids,
        op,
        expected,
        downloaded,
    })
}

fn id_fields(event_ids: &[String]) -> Markup {
    html! { @for id in event_ids { input type="hidden" name="event_id" value=(id); } }
}

pub async fn preview(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let form = match parse_form(pairs) {
        Ok(f) => f,
        Err(why) => return bad_request(why),
    };
    let (action, scope) = match form.op.as_deref().and_then(|op| op.split_once(':')) {
        Some(("replay", scope)) => (Action::Replay, scope.to_owned()),
        Some(("purge", scope)) => (Action::Purge, scope.to_owned()),
        _ => return super::error(StatusCode::BAD_REQUEST, "Unknown action."),
    };
    let event_ids = if scope == "selected" {
        if form.event_ids.is_empty() {
            return super::error(
                StatusCode::BAD_REQUEST,
                "Select at least one dead letter, or choose “everything matching”.",
            );
        }
        form.event_ids
    } else {
        Vec::new()
    };
    let filter = form.filter.to_filter(event_ids.clone());
    let counted = async {
        let _queue = console.queue_lock.lock().await;
        let connection = console.connect("dry run").await?;
        let outcome = replay_matching(
            &connection,
            &console.topology,
            &filter,
            None,
            true,
            |_, _| {},
        )
        .await;
        let _ = connection.close(200, "dry run".into()).await;
        outcome
    }
    .await;
    let outcome = match counted {
        Ok(o) => o,
        Err(error) => return super::failure("count the dead letters (dry run)", &error),
    };
    let verb = action.as_str();
    let content = html! {
        p { "Selection: " strong { (describe(&form.filter, &event_ids)) } }
        p.dryrun {
            "Dry run: " strong.count { (outcome.matched) } " message(s) in the dead-letter queue match ("
            (outcome.distinct) " distinct event(s)); " (outcome.total - outcome.matched) " would stay."
        }
        @if outcome.matched == 0 {
            p { "Nothing to " (verb) ". " a href="/dead-letters" { "Back to the dead letters" } }
        } @else if action == Action::Replay {
            form method="post" action="/dead-letters/replay" {
                (filter_fields(&form.filter)) (id_fields(&event_ids))
                input type="hidden" name="expected" value=(outcome.matched);
                p { "Each event is put back on the work queue once, with a fresh attempt count (handling is idempotent)." }
                button type="submit" id="confirm" { "Replay " (outcome.matched) " message(s)" }
                " " a href="/dead-letters" { "Cancel" }
            }
        } @else {
            form method="post" action="/dead-letters/export" {
                (filter_fields(&form.filter)) (id_fields(&event_ids))
                p { "Purging discards the messages for good (their events are marked " code { "purged" } " in the event log). Download them first:" }
                button type="submit" id="download" { "Download the " (outcome.matched) " message(s) as JSON" }
            }
            form method="post" action="/dead-letters/purge" id="purge-form" {
                (filter_fields(&form.filter)) (id_fields(&event_ids))
                input type="hidden" name="expected" value=(outcome.matched);
                label { input type="checkbox" name="downloaded" value="yes" id="downloaded" required; " I have the download" }
                " "
                button type="submit" id="confirm" class="danger" disabled { "Purge " (outcome.matched) " message(s)" }
                " " a href="/dead-letters" { "Cancel" }
            }
        }
    };
    let title = format!(
        "{} dead letters?",
        if action == Action::Replay {
            "Replay"
        } else {
            "Purge"
        }
    );
    layout(&title, Nav::DeadLetters, Some(&caller), None, content).into_response()
}

async fn start(console: AppState, caller: &Caller, action: Action, form: ActionForm) -> Response {
    let filter = form.filter.to_filter(form.event_ids);
    match jobs::start(&console, action, &caller.name, filter, form.expected).await {
        Ok(id) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(error) => super::failure("start the action", &error),
    }
}

pub async fn replay(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    match parse_form(pairs) {
        Ok(form) => start(console, &caller, Action::Replay, form).await,
        Err(why) => bad_request(why),
    }
}

pub async fn purge(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    match parse_form(pairs) {
        Ok(form) if !form.downloaded => super::error(
            StatusCode::BAD_REQUEST,
            "A purge needs the confirmation that the messages were downloaded first.",
        ),
        Ok(form) => start(console, &caller, Action::Purge, form).await,
        Err(why) => bad_request(why),
    }
}

/// The matching messages as a JSON download, masked like every page.
pub async fn export(
    State(console): State<AppState>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let form = match parse_form(pairs) {
        Ok(f) => f,
        Err(why) => return bad_request(why),
    };
    let filter = form.filter.to_filter(form.event_ids);
    let exported = async {
        let _queue = console.queue_lock.lock().await;
        let connection = console.connect("export").await?;
        let letters = export_matching(&connection, &console.topology, &filter).await;
        let _ = connection.close(200, "exported".into()).await;
        letters
    }
    .await;
    let letters = match exported {
        Ok(l) => l,
        Err(error) => return super::failure("read the dead letters", &error),
    };
    let masked: Vec<_> = letters.iter().map(mask::mask_json).collect();
    let body = serde_json::to_vec_pretty(&masked).unwrap_or_default();
    let name = format!(
        "attachment; filename=\"dead-letters-{}.json\"",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_DISPOSITION, name),
        ],
        body,
    )
        .into_response()
}
