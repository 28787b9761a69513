//! `/events/{id}`: one event's story. The timeline from the event log (received, its
//! deliveries, processed), from `stripe_event_attempts` (each failed attempt with its error,
//! and the due time of the retry it waited for), from the dead-letter queue (class,
//! attempts, first and last failure), and from `ops_audit` (replayed or purged, by which
//! token, when); the purchase and access it produced or changed; the raw body,
//! pretty-printed and masked.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde_json::Value;
use sqlx::FromRow;

use super::lookup::{purchases, purchases_table};
use super::{Nav, layout, when};
use crate::console::auth::Caller;
use crate::console::{AppState, audit, index, mask};

#[derive(Debug, FromRow)]
struct EventRow {
    id: String,
    #[sqlx(rename = "type")]
    event_type: String,
    endpoint: String,
    livemode: bool,
    status: String,
    attempts: i32,
    last_error: Option<String>,
    received_at: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    body: Option<Vec<u8>>,
    payload: String,
    api_version: Option<String>,
}

/// A failed attempt, from `stripe_event_attempts`.
#[derive(Debug, FromRow)]
struct AttemptRow {
    attempt: i32,
    outcome: String,
    error: String,
    retry_due_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
}

/// One line of the timeline.
struct Moment {
    at: DateTime<Utc>,
    what: Markup,
}

/// The Stripe ids in the event's object a purchase may be found by.
fn stripe_ids(payload: &Value) -> Vec<String> {
    let object = &payload["data"]["object"];
    ["id", "payment_intent", "checkout_session"]
        .iter()
        .filter_map(|key| object[*key].as_str().map(str::to_owned))
        .collect()
}

pub async fn show(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(event_id): Path<String>,
) -> Response {
    let pool = &console.pool;
    let loaded = async {
        let event: Option<EventRow> = sqlx::query_as(
            "SELECT id, type, endpoint, livemode, status, attempts, last_error, received_at,
                    processed_at, updated_at, body, payload::text AS payload, api_version
               FROM stripe_events WHERE id = $1",
        )
        .bind(&event_id)
        .fetch_optional(pool)
        .await?;
        let attempts: Vec<AttemptRow> = sqlx::query_as(
            "SELECT attempt, outcome, error, retry_due_at, at FROM stripe_event_attempts
              WHERE event_id = $1 ORDER BY at, id",
        )
        .bind(&event_id)
        .fetch_all(pool)
        .await?;
        let letters = index::for_event(pool, &event_id).await?;
        let actions = audit::for_event(pool, &event_id).await?;
        Ok::<_, sqlx::Error>((event, attempts, letters, actions))
    }
    .await;
    let (event, attempts, letters, actions) = match loaded {
        Ok(l) => l,
        Err(error) => return super::failure("read the event", &error),
    };
    if event.is_none() && letters.is_empty() && actions.is_empty() {
        return super::error(
            StatusCode::NOT_FOUND,
            &format!(
                "No event {} in the event log or the dead-letter queue.",
                mask::mask_text(&event_id)
            ),
        );
    }
    let payload: Value = event
        .as_ref()
        .and_then(|e| serde_json::from_str(&e.payload).ok())
        .unwrap_or(Value::Null);
    let found = match purchases(pool, None, &stripe_ids(&payload), Some(&event_id)).await {
        Ok(f) => f,
        Err(error) => return super::failure("read the purchases", &error),
    };

    let mut timeline = Vec::new();
    if let Some(e) = &event {
        timeline.push(Moment {
            at: e.received_at,
            what: html! { strong { "received" } " on endpoint " code { (e.endpoint) } @if e.livemode { " (live mode)" } },
        });
        if e.attempts > 0 {
            timeline.push(Moment {
                at: e.updated_at,
                what: html! {
                    strong { (e.attempts) " delivery attempt(s)" } "; latest recorded: status " code { (e.status) }
                    @if let Some(error) = &e.last_error { ", error: " span.error { (mask::mask_text(error)) } }
                    @if e.status == "retrying" { " — waiting in a delay queue for its next attempt" }
                },
            });
        }
        for a in &attempts {
            timeline.push(Moment {
                at: a.at,
                what: html! {
                    strong.error { "attempt " (a.attempt) " failed" } ": " span.error { (mask::mask_text(&a.error)) }
                    @if let Some(due) = a.retry_due_at { " — retry due " (when(due)) }
                    @else if a.outcome == "dead" { " — dead-lettered" }
                },
            });
        }
        if let Some(at) = e.processed_at {
            timeline.push(Moment {
                at,
                what: html! { strong.ok { "processed" } " (" (e.status) ")" },
            });
        }
    }
    for letter in &letters {
        timeline.push(Moment {
            at: letter.dead_at,
            what: html! {
                strong.error { "dead-lettered" } " (" span class={ "class " (letter.class.replace(':', "-")) } { (letter.class) } ") after "
                (letter.attempts) " attempt(s): " span.error { (mask::mask_text(&letter.last_error)) }
                " — still in the dead-letter queue"
            },
        });
    }
    for action in &actions {
        // The dead letter as it was when the action took it (it is gone from the queue).
        timeline.push(Moment {
            at: action.dead_at.unwrap_or(action.started_at),
            what: html! {
                strong.error { "dead-lettered" } " (" span class={ "class " (action.class.replace(':', "-")) } { (action.class) } ") after "
                (action.attempts) " attempt(s): " span.error { (mask::mask_text(&action.last_error)) }
            },
        });
        timeline.push(Moment {
            at: action.started_at,
            what: html! {
                strong { (if action.action == "replay" { "replayed" } else { "purged" }) } " by " (action.token_name)
                @if let Some(at) = action.finished_at { " (finished " (when(at)) ")" }
                @if let Some(outcome) = &action.outcome { span.muted { " — " (outcome) } }
            },
        });
    }
    timeline.sort_by_key(|m| m.at);

    let raw = match &event {
        Some(EventRow {
            body: Some(bytes), ..
        }) => Some(("exact bytes as received", mask::pretty_body(bytes))),
        Some(e) => Some((
            "stored JSON (the exact bytes were not kept for this event)",
            mask::pretty_body(e.payload.as_bytes()),
        )),
        None => None,
    };
    let content = html! {
        @if let Some(e) = &event {
            dl.facts {
                dt { "event" } dd { code #event-id { (e.id) } }
                dt { "type" } dd { (e.event_type) }
                dt { "status" } dd { strong #event-status { (e.status) } }
                dt { "endpoint" } dd { (e.endpoint) @if e.livemode { " (live mode)" } }
                @if let Some(v) = &e.api_version { dt { "API version" } dd { (v) } }
            }
        } @else {
            p.notice { "This event is not in the event log (it never reached a processor's transaction)." }
        }
        h2 { "Timeline" }
        ol.timeline {
            @for m in &timeline { li { span.muted { (when(m.at)) } " · " (m.what) } }
        }
        @if !letters.is_empty() && caller.may_act() {
            form method="post" action="/dead-letters/preview" {
                input type="hidden" name="event_id" value=(event_id);
                button type="submit" name="op" value="replay:selected" { "Replay this event" }
            }
        }
        h2 { "Purchase and access" }
        (purchases_table(&found.0, &found.1))
        @if let Some((label, text)) = raw {
            h2 { "Raw body " span.muted { "(" (label) "; secrets, signatures and card-like numbers masked)" } }
            pre #raw-body { (text) }
        }
    };
    layout(
        &format!("Event {event_id}"),
        Nav::None,
        Some(&caller),
        None,
        content,
    )
    .into_response()
}
