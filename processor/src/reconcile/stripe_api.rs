//! A small client for the one Stripe endpoint reconcile needs: `GET /v1/events`, a list
//! object paged newest first with `starting_after`.
//!
//! It behaves as Stripe asks of a client: requests paced by [`Pacer`], `Retry-After`
//! honoured on 429, growing delays (backon) on 5xx and network errors, and no retry on
//! another 4xx, which would fail the same way again. The key travels only in the
//! `Authorization` header (marked sensitive); it is in no log line, `Debug` output or error.

use std::num::NonZeroU32;
use std::time::Duration;

use backon::BackoffBuilder;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use super::rate::Pacer;
use super::window::Window;

/// Events per page: Stripe's largest `limit`.
pub const PAGE_SIZE: u32 = 100;
/// Most event types one request may filter on (Stripe's limit for `types[]`).
pub const MAX_TYPES: usize = 20;
/// A `Retry-After` longer than this is not waited out: the run fails and says so.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct ApiSettings {
    /// `STRIPE_API_BASE`, e.g. `https://api.stripe.com`.
    pub base: Url,
    pub key: SecretString,
    /// Requests per second, at most.
    pub rate: NonZeroU32,
    pub retry: RetryPolicy,
    /// Longest wait for one response.
    pub timeout: Duration,
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("base", &self.base.as_str())
            .field("key", &"[redacted]")
            .field("rate", &self.rate)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Delays between attempts after a 429 without `Retry-After`, a 5xx or a network error.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Retries after the first attempt, per request.
    pub max_retries: usize,
}

impl Default for RetryPolicy {
    /// 0.5 s doubling to 30 s, eight retries: about two minutes of patience per page.
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retries: 8,
        }
    }
}

/// What to list besides the window: Stripe's `types[]` and `delivery_success=false`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub types: Vec<String>,
    pub only_undelivered: bool,
}

/// One page: the events as Stripe sent them (newest first), and whether more follow.
#[derive(Debug)]
pub struct Page {
    pub events: Vec<Box<RawValue>>,
    pub has_more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "Stripe refused STRIPE_API_KEY (HTTP {status}{request}): {message}. Check the key, \
         its mode (sk_live_/rk_live_ for live events), and that a restricted key may read events"
    )]
    Auth {
        status: u16,
        message: String,
        request: RequestId,
    },
    #[error("Stripe refused the request (HTTP {status}{request}): {message}")]
    Refused {
        status: u16,
        message: String,
        request: RequestId,
    },
    #[error("Stripe kept failing: gave up after {attempts} attempts; last: {last}")]
    GaveUp {
        attempts: usize,
        last: Box<ApiError>,
    },
    #[error("Stripe answered HTTP {status}{request}: {message}")]
    Unavailable {
        status: u16,
        message: String,
        request: RequestId,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach Stripe's API: {0}")]
    Network(#[source] reqwest::Error),
    #[error("Stripe's answer is not an event list{request}: {problem}")]
    Decode { problem: String, request: RequestId },
    #[error("the HTTP client cannot be built: {0}")]
    Client(#[source] reqwest::Error),
}

impl ApiError {
    /// For the `reconcile_api_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Auth { .. } => "auth",
            Self::Refused { .. } => "refused",
            Self::GaveUp { last, .. } => last.kind(),
            Self::Unavailable { status: 429, .. } => "rate_limited",
            Self::Unavailable { .. } => "server",
            Self::Network(_) => "network",
            Self::Decode { .. } => "decode",
            Self::Client(_) => "client",
        }
    }

    /// Whether Stripe refused the key (401, 403): the run cannot succeed until it changes.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::Auth { .. })
    }
}

/// Stripe's `Request-Id`, shown in errors so Stripe's support can find the request.
#[derive(Debug, Clone, Default)]
pub struct RequestId(Option<String>);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(id) => write!(f, ", request {id}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
pub struct StripeApi {
    client: reqwest::Client,
    events: Url,
    key: SecretString,
    pacer: Pacer,
    retry: RetryPolicy,
}

impl StripeApi {
    pub fn new(settings: &ApiSettings) -> Result<Self, ApiError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!(
                "stripe-purchases-reconcile/",
                env!("CARGO_PKG_VERSION")
            ))
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(ApiError::Client)?;
        Ok(Self {
            client,
            events: events_url(&settings.base),
            key: settings.key.clone(),
            pacer: Pacer::per_second(settings.rate),
            retry: settings.retry,
        })
    }

    /// The request URL for one page: the window and filters are repeated on every page, as
    /// Stripe requires of a cursor (`starting_after`) to keep the same list.
    pub fn page_url(&self, window: &Window, filter: &ListFilter, after: Option<&str>) -> Url {
        let mut url = self.events.clone();
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("created[gte]", &window.gte().to_string())
                .append_pair("created[lte]", &window.lte().to_string())
                .append_pair("limit", &PAGE_SIZE.to_string());
            for event_type in &filter.types {
                query.append_pair("types[]", event_type);
            }
            if filter.only_undelivered {
                query.append_pair("delivery_success", "false");
            }
            if let Some(after) = after {
                query.append_pair("starting_after", after);
            }
        }
        url
    }

    /// Lists one page, retrying what may pass on a later try.
    pub async fn list_events(
        &self,
        window: &Window,
        filter: &ListFilter,
        after: Option<&str>,
    ) -> Result<Page, ApiError> {
        let url = self.page_url(window, filter, after);
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_retries)
            .with_jitter()
            .build();
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.pacer.wait().await;
            let error = match self.fetch(&url).await {
                Ok(page) => return Ok(page),
                Err(error) => error,
            };
            metrics::counter!("reconcile_api_errors_total", "kind" => error.kind()).increment(1);
            let retry_after = match &error {
                ApiError::Unavailable { retry_after, .. } => *retry_after,
                ApiError::Network(_) => None,
                _ => return Err(error),
            };
            let Some(backoff) = delays.next() else {
                return Err(ApiError::GaveUp {
                    attempts,
                    last: Box::new(error),
                });
            };
            let delay = match retry_after {
                Some(after) if after > LONGEST_RETRY_AFTER => {
                    return Err(ApiError::GaveUp {
                        attempts,
                        last: Box::new(error),
                    });
                }
                Some(after) => after,
                None => backoff,
            };
            tracing::warn!(%error, retry_in = ?delay, attempt = attempts, "Stripe API request failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn fetch(&self, url: &Url) -> Result<Page, ApiError> {
        let response = self
            .client
            .get(url.clone())
            .bearer_auth(self.key.expose_secret())
            .send()
            .await
            .map_err(|e| ApiError::Network(e.without_url()))?;
        let status = response.status();
        let request = RequestId(
            response
                .headers()
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        let retry_after = retry_after(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(|e| ApiError::Network(e.without_url()))?;
        if status.is_success() {
            return parse_page(&body).map_err(|problem| ApiError::Decode { problem, request });
        }
        let message = self.error_message(&body);
        let status_code = status.as_u16();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ApiError::Auth {
                status: status_code,
                message,
                request,
            },
            StatusCode::TOO_MANY_REQUESTS => ApiError::Unavailable {
                status: status_code,
                message,
                request,
                retry_after,
            },
            s if s.is_server_error() => ApiError::Unavailable {
                status: status_code,
                message,
                request,
                retry_after: None,
            },
            _ => ApiError::Refused {
                status: status_code,
                message,
                request,
            },
        })
    }

    /// The message of Stripe's error shape `{"error": {"type", "message"}}`, or the start
    /// of whatever came instead. Stripe masks keys in its messages; any echo of ours is
    /// blanked all the same.
    fn error_message(&self, body: &[u8]) -> String {
        #[derive(Deserialize)]
        struct Shape {
            error: Detail,
        }
        #[derive(Deserialize)]
        struct Detail {
            #[serde(rename = "type")]
            kind: Option<String>,
            message: Option<String>,
        }
        let text = match serde_json::from_slice::<Shape>(body) {
            Ok(Shape { error }) => match (error.kind, error.message) {
                (Some(kind), Some(message)) => format!("{message} ({kind})"),
                (None, Some(message)) => message,
                (Some(kind), None) => kind,
                (None, None) => "no message".to_owned(),
            },
            Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
        };
        let key = self.key.expose_secret();
        if key.is_empty() {
            text
        } else {
            text.replace(key, "[redacted]")
        }
    }
}

/// `{base}/v1/events`, keeping a path prefix the base may have (a proxy, a test server).
fn events_url(base: &Url) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    let path = format!("{}/v1/events", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

/// `Retry-After` in seconds (what Stripe sends); an HTTP date is not expected and ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or_else(|| {
            value
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
        })
}

fn parse_page(body: &[u8]) -> Result<Page, String> {
    #[derive(Deserialize)]
    struct ListObject {
        object: String,
        data: Vec<Box<RawValue>>,
        has_more: bool,
    }
    let list: ListObject = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if list.object != "list" {
        return Err(format!("`object` is {:?}, not \"list\"", list.object));
    }
    Ok(Page {
        events: list.data,
        has_more: list.has_more,
    })
}

/// Checks `STRIPE_API_BASE`: an http(s) URL with a host and no credentials.
pub fn parse_base(raw: &str) -> Result<Url, String> {
    let url =
        Url::parse(raw.trim()).map_err(|e| format!("STRIPE_API_BASE `{raw}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(format!(
            "STRIPE_API_BASE `{raw}` must be an http(s) URL with a host, e.g. https://api.stripe.com"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: it holds a credential.
        return Err(
            "STRIPE_API_BASE must not hold credentials (the key goes in STRIPE_API_KEY)".into(),
        );
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(base: &str, key: &str) -> StripeApi {
        StripeApi::new(&ApiSettings {
            base: parse_base(base).unwrap(),
            key: SecretString::from(key.to_owned()),
            rate: NonZeroU32::new(20).unwrap(),
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn page_url_repeats_the_window_and_filters() {
        let api = api("https://api.stripe.com", "sk_test_x");
        let window = Window {
            from: chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap(),
            to: chrono::DateTime::from_timestamp(1_764_086_400, 0).unwrap(),
        };
        let filter = ListFilter {
            types: vec![
                "checkout.session.completed".into(),
                "charge.refunded".into(),
            ],
            only_undelivered: true,
        };
        let url = api.page_url(&window, &filter, Some("evt_9"));
        assert_eq!(
            url.as_str(),
            "https://api.stripe.com/v1/events?created%5Bgte%5D=1764000000&created%5Blte%5D=1764086400\
             &limit=100&types%5B%5D=checkout.session.completed&types%5B%5D=charge.refunded\
             &delivery_success=false&starting_after=evt_9"
        );
    }

    #[test]
    fn base_keeps_its_path_and_must_be_http() {
        assert_eq!(
            events_url(&parse_base("http://127.0.0.1:1234/stripe/").unwrap()).as_str(),
            "http://127.0.0.1:1234/stripe/v1/events"
        );
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("not a url").is_err());
        let err = parse_base("https://user:hunter2@api.stripe.com").unwrap_err();
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn error_messages_never_carry_the_key() {
        let api = api("https://api.stripe.com", "sk_test_secret123");
        let message = api.error_message(
            br#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_secret123"}}"#,
        );
        assert_eq!(
            message,
            "Invalid API Key provided: [redacted] (invalid_request_error)"
        );
        let debug = format!("{api:?}");
        assert!(!debug.contains("sk_test_secret123"), "{debug}");
    }

    #[test]
    fn pages_keep_each_event_byte_for_byte() {
        let body = br#"{"object":"list","url":"/v1/events","has_more":true,"data":[{"id":"evt_1", "b":1,"a":2}]}"#;
        let page = parse_page(body).unwrap();
        assert!(page.has_more);
        assert_eq!(page.events[0].get(), r#"{"id":"evt_1", "b":1,"a":2}"#);
        assert!(parse_page(br#"{"object":"event","data":[],"has_more":false}"#).is_err());
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
