//! A local stand-in for the part of Stripe's Events API that `processor reconcile` uses, as
//! Stripe documents it: `GET /v1/events` answering a list object (`object: "list"`, `data`,
//! `has_more`, `url: "/v1/events"`), newest first, filtered by `created[gte]`,
//! `created[lte]`, `types[]` and `delivery_success`, paged by `limit` and `starting_after`,
//! authenticated by a Bearer key, and failing in Stripe's error shape
//! `{"error": {"type", "message"}}` (401 for a bad key, 400 for bad parameters, and 429 with
//! `Retry-After` or 500 when a test scripts them). It records every request, so tests can
//! check what the client asked and how fast.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// One event the fake holds: its JSON exactly as it will be served, and what it is filtered
/// on.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    /// Stripe's delivery state for `delivery_success`: whether a webhook delivery succeeded.
    pub delivered: bool,
    pub json: String,
}

impl StoredEvent {
    /// From an event body (its `id`, `type` and `created` are read from it).
    pub fn new(body: &[u8], delivered: bool) -> Self {
        let value: Value = serde_json::from_slice(body).unwrap();
        Self {
            id: value["id"].as_str().unwrap().to_owned(),
            event_type: value["type"].as_str().unwrap().to_owned(),
            created: value["created"].as_i64().unwrap(),
            delivered,
            // As an element of the list's `data`: without the file's trailing newline.
            json: std::str::from_utf8(body).unwrap().trim().to_owned(),
        }
    }
}

/// A failure the fake answers with instead of a page.
#[derive(Debug, Clone, Copy)]
pub enum Failure {
    TooManyRequests { retry_after_secs: u64 },
    ServerError,
}

/// What the fake saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub query: Vec<(String, String)>,
    pub status: u16,
}

impl Recorded {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Inner {
    key: String,
    events: Vec<StoredEvent>,
    /// Scripted failures by request number (0-based, counting every request).
    failures: VecDeque<(usize, Failure)>,
    /// At most this many events a page, whatever `limit` asks (Stripe may return fewer).
    max_page: usize,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
pub struct FakeStripe {
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeStripe {
    pub async fn start(key: &str, events: Vec<StoredEvent>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            events,
            failures: VecDeque::new(),
            max_page: 100,
            requests: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/events", get(list_events))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, inner }
    }

    /// Answers request number `n` (0-based) with `failure`.
    pub fn fail_request(&self, n: usize, failure: Failure) {
        self.lock().failures.push_back((n, failure));
    }

    pub fn set_max_page(&self, max: usize) {
        self.lock().max_page = max;
    }

    pub fn add(&self, event: StoredEvent) {
        self.lock().events.push(event);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("request-id", "req_fake")],
        axum::Json(json!({ "error": { "type": kind, "message": message } })),
    )
        .into_response()
}

async fn list_events(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut inner = inner.lock().unwrap();
    let number = inner.requests.len();
    let response = answer(&mut inner, number, &headers, &query);
    inner.requests.push(Recorded {
        at: Instant::now(),
        query,
        status: response.status().as_u16(),
    });
    response
}

fn answer(
    inner: &mut Inner,
    number: usize,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Response {
    let expected = format!("Bearer {}", inner.key);
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if authorization != expected {
        // Stripe masks all but the last four characters of a key it names.
        let given = authorization.trim_start_matches("Bearer ");
        let tail: String = given
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            &format!("Invalid API Key provided: sk_test_*********{tail}"),
        );
    }
    if inner.failures.front().is_some_and(|(n, _)| *n == number) {
        let (_, failure) = inner.failures.pop_front().unwrap();
        return match failure {
            Failure::TooManyRequests { retry_after_secs } => {
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "Too many requests hit the API too quickly.",
                );
                response
                    .headers_mut()
                    .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
                response
            }
            Failure::ServerError => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "An unknown error occurred.",
            ),
        };
    }

    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let number_param = |name: &str| -> Result<Option<i64>, String> {
        param(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("Invalid integer: {v} ({name})"))
            })
            .transpose()
    };
    let (gte, lte, limit) = match (
        number_param("created[gte]"),
        number_param("created[lte]"),
        number_param("limit"),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c.unwrap_or(10)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e);
        }
    };
    if !(1..=100).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "This value must be between 1 and 100 (limit)",
        );
    }
    let types: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    let undelivered_only = match param("delivery_success") {
        None => None,
        Some("false") => Some(false),
        Some("true") => Some(true),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("Invalid boolean: {other} (delivery_success)"),
            );
        }
    };

    let mut matching: Vec<&StoredEvent> = inner
        .events
        .iter()
        .filter(|e| gte.is_none_or(|t| e.created >= t) && lte.is_none_or(|t| e.created <= t))
        .filter(|e| types.is_empty() || types.iter().any(|t| type_matches(t, &e.event_type)))
        .filter(|e| undelivered_only.is_none_or(|d| e.delivered == d))
        .collect();
    // Newest first; ties in the same second keep one fixed order (by id), as Stripe's do.
    matching.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    let start = match param("starting_after") {
        None => 0,
        Some(after) => match inner.events.iter().find(|e| e.id == after) {
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("No such event: '{after}'"),
                );
            }
            Some(cursor) => {
                let key = (cursor.created, cursor.id.clone());
                // Everything after the cursor in the list's order, whether or not the cursor
                // itself still matches.
                matching
                    .iter()
                    .position(|e| (e.created, e.id.clone()) < key)
                    .unwrap_or(matching.len())
            }
        },
    };
    let take = usize::try_from(limit).unwrap().min(inner.max_page);
    let page: Vec<&RawValue> = matching[start..]
        .iter()
        .take(take)
        .map(|e| serde_json::from_str::<&RawValue>(&e.json).unwrap())
        .collect();
    let has_more = matching.len() > start + page.len();
    // Serialized from a struct, not `json!`: a `Value` would re-order each event's keys.
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        url: &'static str,
        has_more: bool,
        data: Vec<&'a RawValue>,
    }
    let body = serde_json::to_string(&List {
        object: "list",
        url: "/v1/events",
        has_more,
        data: page,
    })
    .unwrap();
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("request-id", "req_fake"),
        ],
        body,
    )
        .into_response()
}

/// `charge.*` matches `charge.refunded`; anything else must be equal.
fn type_matches(filter: &str, event_type: &str) -> bool {
    match filter.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => filter == event_type,
    }
}
