//! Who may use the console, and the checks every request goes through.
//!
//! Two tokens: `OPS_TOKEN` may look and act, `OPS_READONLY_TOKEN` may only look. A browser
//! logs in once (`POST /login`, one field `token`) and then carries an HttpOnly,
//! SameSite=Strict cookie; scripts send `Authorization: Bearer <token>`. The cookie holds a
//! hash of the token, not the token, so it is the same on every console replica and stops
//! working when the token is rotated.
//!
//! Cross-site requests: SameSite=Strict is not enough, because a page on another port of
//! the same host is the same *site* (and gets the cookie) while being another *origin*.
//! Every POST a browser makes therefore has to carry an `Origin` (or, failing that, a
//! `Referer`) equal to the console's own origin; a POST with a bearer token and neither
//! header is a script, which a foreign page cannot make with the token.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AppState, pages};

/// The cookie a login sets.
pub const COOKIE: &str = "ops_console";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May look at every page.
    Look,
    /// May also replay and purge.
    Act,
}

/// The caller of a request, as the pages and the audit log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// `OPS_TOKEN (3f2a9c1e)`: the setting and a short fingerprint of the token, so that the
    /// audit log tells rotated tokens apart without recording them.
    pub name: String,
}

impl Caller {
    pub fn may_act(&self) -> bool {
        self.role == Role::Act
    }
}

struct Entry {
    role: Role,
    name: String,
    token_digest: [u8; 32],
    cookie: String,
}

/// The configured tokens.
pub struct Tokens(Vec<Entry>);

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Tokens {
    pub fn new(act: Option<&SecretString>, look: Option<&SecretString>) -> Self {
        let entry = |role, setting: &str, token: &SecretString| {
            let token = token.expose_secret().as_bytes();
            let token_digest = digest(token);
            let mut session = b"ops-console-session:".to_vec();
            session.extend_from_slice(token);
            Entry {
                role,
                name: format!("{setting} ({})", &hex(&token_digest)[..8]),
                token_digest,
                cookie: hex(&digest(&session)),
            }
        };
        let mut entries = Vec::new();
        if let Some(token) = act {
            entries.push(entry(Role::Act, "OPS_TOKEN", token));
        }
        if let Some(token) = look {
            entries.push(entry(Role::Look, "OPS_READONLY_TOKEN", token));
        }
        Self(entries)
    }

    fn caller(entry: &Entry) -> Caller {
        Caller {
            role: entry.role,
            name: entry.name.clone(),
        }
    }

    /// The caller a token belongs to. Compares digests in constant time, every entry.
    pub fn by_token(&self, token: &str) -> Option<Caller> {
        let given = digest(token.as_bytes());
        let mut found = None;
        for entry in &self.0 {
            if bool::from(given.ct_eq(&entry.token_digest)) {
                found = Some(Self::caller(entry));
            }
        }
        found
    }

    fn by_cookie(&self, value: &str) -> Option<Caller> {
        let mut found = None;
        for entry in &self.0 {
            if bool::from(value.as_bytes().ct_eq(entry.cookie.as_bytes())) {
                found = Some(Self::caller(entry));
            }
        }
        found
    }

    /// The cookie value that logs in as the owner of `token`.
    pub fn session_cookie(&self, token: &str) -> Option<String> {
        let caller = self.by_token(token)?;
        self.0
            .iter()
            .find(|e| e.name == caller.name)
            .map(|e| e.cookie.clone())
    }
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    Bearer,
    Cookie,
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn authenticate(tokens: &Tokens, headers: &HeaderMap) -> Option<(Caller, Proof)> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return tokens.by_token(bearer.trim()).map(|c| (c, Proof::Bearer));
    }
    cookie_value(headers, COOKIE)
        .and_then(|v| tokens.by_cookie(v))
        .map(|c| (c, Proof::Cookie))
}

/// Whether a POST comes from one of the console's own pages. `Origin` must be the
/// console's origin (`http(s)://` + the `Host` the browser sent); without `Origin`, the
/// `Referer` must be on that origin; without either, only a bearer-token script passes.
pub fn same_origin(headers: &HeaderMap, bearer: bool) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let own = [format!("http://{host}"), format!("https://{host}")];
    if let Some(origin) = headers.get(header::ORIGIN) {
        return origin
            .to_str()
            .is_ok_and(|o| own.iter().any(|own| own == o));
    }
    if let Some(referer) = headers.get(header::REFERER) {
        return referer.to_str().is_ok_and(|r| {
            own.iter()
                .any(|own| r == own || r.starts_with(&format!("{own}/")))
        });
    }
    bearer
}

/// The middleware in front of every page but `/login` and the static files: 401 and the
/// login form without a valid token, 403 for a cross-origin POST or a read-only token's
/// action. Puts the [`Caller`] in the request's extensions.
pub async fn require(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some((caller, proof)) = authenticate(&state.tokens, request.headers()) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"ops console\"")],
            pages::login::form(Some("Log in with an ops token to continue.")),
        )
            .into_response();
    };
    if request.method() == Method::POST {
        if !same_origin(request.headers(), proof == Proof::Bearer) {
            tracing::warn!(caller = caller.name, path = %request.uri().path(), "cross-origin POST refused");
            return pages::error(
                StatusCode::FORBIDDEN,
                "Refused: this request did not come from a console page (cross-origin POST).",
            );
        }
        if !caller.may_act() && request.uri().path() != "/logout" {
            return pages::error(
                StatusCode::FORBIDDEN,
                "Refused: this token may only look (OPS_READONLY_TOKEN). Replay and purge need OPS_TOKEN.",
            );
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn tokens() -> Tokens {
        Tokens::new(
            Some(&SecretString::from("act-token-0123456789")),
            Some(&SecretString::from("look-token-0123456789")),
        )
    }

    #[test]
    fn tokens_map_to_their_roles_and_cookies_to_the_same_caller() {
        let tokens = tokens();
        assert_eq!(
            tokens.by_token("act-token-0123456789").unwrap().role,
            Role::Act
        );
        assert_eq!(
            tokens.by_token("look-token-0123456789").unwrap().role,
            Role::Look
        );
        assert!(tokens.by_token("act-token-012345678").is_none());
        let cookie = tokens.session_cookie("look-token-0123456789").unwrap();
        assert!(!cookie.contains("look-token"));
        assert_eq!(tokens.by_cookie(&cookie).unwrap().role, Role::Look);
        assert!(tokens.by_cookie("look-token-0123456789").is_none());
        assert!(
            tokens
                .by_token("act-token-0123456789")
                .unwrap()
                .name
                .starts_with("OPS_TOKEN (")
        );
    }

    #[test]
    fn only_the_consoles_own_origin_may_post() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9092"));
        assert!(
            !same_origin(&headers, false),
            "a browser POST without Origin"
        );
        assert!(same_origin(&headers, true), "a script with a bearer token");
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9092"),
        );
        assert!(same_origin(&headers, false));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9093"),
        );
        assert!(
            !same_origin(&headers, false),
            "another port is another origin"
        );
        assert!(!same_origin(&headers, true));
        headers.remove(header::ORIGIN);
        headers.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:9092/dead-letters"),
        );
        assert!(same_origin(&headers, false));
        headers.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:90921/x"),
        );
        assert!(!same_origin(&headers, false));
    }
}
