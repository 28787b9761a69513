//! The console's pages, one module each, and what they share: the layout, error pages,
//! the stylesheet and the script.

pub mod audit;
pub mod dead_letters;
pub mod event;
pub mod jobs;
pub mod login;
pub mod lookup;
pub mod overview;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::auth::Caller;
use crate::dlq::format_age;

const STYLESHEET: &str = include_str!("../static/console.css");
const SCRIPT: &str = include_str!("../static/console.js");

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}

pub async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// Which navigation entry is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    DeadLetters,
    Lookup,
    Audit,
    None,
}

/// The page around every page's content. `refresh`: reload every that many seconds.
pub fn layout(
    title: &str,
    nav: Nav,
    caller: Option<&Caller>,
    refresh: Option<u32>,
    content: Markup,
) -> Markup {
    let link = |href: &str, label: &str, this: Nav| {
        html! { a href=(href) class=[(nav == this).then_some("current")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · ops console" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    strong { "ops console" }
                    nav {
                        (link("/", "Overview", Nav::Overview))
                        (link("/dead-letters", "Dead letters", Nav::DeadLetters))
                        (link("/lookup", "Lookup", Nav::Lookup))
                        (link("/audit", "Audit", Nav::Audit))
                    }
                    @if let Some(caller) = caller {
                        span.who {
                            (caller.name)
                            @if !caller.may_act() { " · read-only" }
                        }
                        form method="post" action="/logout" class="inline" {
                            button type="submit" class="link" { "Log out" }
                        }
                    }
                }
                main { h1 { (title) } (content) }
            }
        }
    }
}

/// A page that says what went wrong.
pub fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        layout(
            status.canonical_reason().unwrap_or("Error"),
            Nav::None,
            None,
            None,
            html! { p.error { (message) } p { a href="/" { "Back to the overview" } } },
        ),
    )
        .into_response()
}

/// A 500 page for a failure reading the database or the broker; the details go to the log.
pub fn failure(what: &str, cause: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %cause, "ops console: could not {what}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!(
            "Could not {what}: {}",
            super::mask::mask_text(&cause.to_string())
        ),
    )
}

pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "No such page.")
}

/// `2026-12-03 08:15:02 UTC`.
pub fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago, e.g. `5m2s`.
pub fn age(at: DateTime<Utc>) -> String {
    format_age((Utc::now() - at).to_std().unwrap_or_default())
}

/// Cents as `12.34 USD`.
pub fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!(
        "{sign}{}.{:02} {}",
        cents / 100,
        cents % 100,
        currency.to_uppercase()
    )
}

/// Treats an empty form or query field as absent.
pub fn present(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}
