//! `/login` and `/logout`.

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Nav, layout};
use crate::console::AppState;
use crate::console::auth::{COOKIE, same_origin};

/// The login form, with an optional notice above it.
pub fn form(notice: Option<&str>) -> Markup {
    layout(
        "Log in",
        Nav::None,
        None,
        None,
        html! {
            @if let Some(notice) = notice { p.notice { (notice) } }
            form method="post" action="/login" class="login" {
                label for="token" { "Ops token" }
                input type="password" id="token" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
            p.hint {
                "OPS_TOKEN may look and act; OPS_READONLY_TOKEN may only look. Scripts can send "
                code { "Authorization: Bearer <token>" } " instead."
            }
        },
    )
}

pub async fn show() -> Markup {
    form(None)
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

pub async fn submit(
    State(console): State<AppState>,
    headers: HeaderMap,
    Form(login): Form<Login>,
) -> Response {
    // A foreign page must not log a browser in with the foreign page's token either.
    if !same_origin(&headers, false) {
        return super::error(
            StatusCode::FORBIDDEN,
            "Refused: this login did not come from the console's own page.",
        );
    }
    let Some(cookie) = console.tokens.session_cookie(login.token.trim()) else {
        tracing::warn!("ops console login with an unknown token");
        return (
            StatusCode::UNAUTHORIZED,
            form(Some("That token is not valid. Try again.")),
        )
            .into_response();
    };
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes() == b"https");
    let set = format!(
        "{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, set)], Redirect::to("/")).into_response()
}

pub async fn logout() -> Response {
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}
