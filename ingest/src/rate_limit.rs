//! Admission control: a per-source-IP limit on refused requests (governor's keyed GCRA
//! limiter) and a cap on webhook requests in flight.
//!
//! Only refused requests count against the limit: a failed signature check, a missing or
//! unreadable signature or body, a path that names no endpoint (marked [`Refused`] by the
//! handlers). Validly signed requests never count, since Stripe sends from a handful of
//! addresses, often through one load balancer, and a burst of real events must not be
//! throttled; they are bounded by the in-flight cap instead. An address that used up its
//! allowance is answered 429 at once, before its body is read, until the allowance refills.
//!
//! The key is the TCP peer address. Behind a reverse proxy every request shares the proxy's
//! address, so junk sent through it can hold Stripe back too: raise the limit or turn it off
//! (0) there, since forwarded headers can be forged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::json_error;

/// How often idle keys are dropped, so a flood of distinct addresses cannot grow memory.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Response extension set on an answer that counts against the sender's limit.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

#[derive(Clone)]
pub struct IpRateLimit {
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    /// Addresses over their limit, and until when. Only these are refused up front.
    blocked: Arc<Mutex<HashMap<IpAddr, Instant>>>,
}

impl IpRateLimit {
    /// `None` when the limit is off (0 per minute).
    pub fn per_minute(limit: u32) -> Option<Self> {
        let quota = Quota::per_minute(NonZeroU32::new(limit)?);
        let limit = Self {
            limiter: Arc::new(RateLimiter::keyed(quota)),
            blocked: Arc::new(Mutex::new(HashMap::new())),
        };
        let limiter = Arc::downgrade(&limit.limiter);
        let blocked = Arc::downgrade(&limit.blocked);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            loop {
                every.tick().await;
                let (Some(limiter), Some(blocked)) = (limiter.upgrade(), blocked.upgrade()) else {
                    break;
                };
                limiter.retain_recent();
                limiter.shrink_to_fit();
                let now = Instant::now();
                let mut blocked = blocked.lock().unwrap_or_else(|e| e.into_inner());
                blocked.retain(|_, until| *until > now);
                blocked.shrink_to_fit();
            }
        });
        Some(limit)
    }

    /// How long `ip` is still refused, if it is.
    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(&ip)?;
        let left = until.checked_duration_since(Instant::now());
        if left.is_none() {
            blocked.remove(&ip);
        }
        left
    }

    /// Counts one refused request from `ip`; `Err` with the wait when it is over its limit.
    fn count_refusal(&self, ip: IpAddr) -> Result<(), Duration> {
        let Err(not_until) = self.limiter.check_key(&ip) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.insert(ip, Instant::now() + wait).is_none() {
            // Once per episode, not once per request of a flood.
            tracing::warn!(%ip, wait_ms = wait.as_millis() as u64, "address over its limit of refused requests; answering 429");
        }
        Err(wait)
    }
}

/// Refuses an address over its limit up front; counts each refused answer against it.
pub async fn enforce(State(limit): State<IpRateLimit>, request: Request, next: Next) -> Response {
    let Some(ip) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
    else {
        return next.run(request).await;
    };
    if let Some(wait) = limit.blocked_for(ip) {
        return too_many_requests(wait);
    }
    let response = next.run(request).await;
    if response.extensions().get::<Refused>().is_none() {
        return response;
    }
    match limit.count_refusal(ip) {
        Ok(()) => response,
        Err(wait) => too_many_requests(wait),
    }
}

fn too_many_requests(wait: Duration) -> Response {
    metrics::counter!("ingest_rate_limited_total").increment(1);
    let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many refused requests from this address, retry later",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
    response
}

/// A cap on webhook requests in flight. A request over the cap is answered 503 with
/// `Retry-After` at once: Stripe retries, and ingest's memory stays bounded under a burst.
#[derive(Clone)]
pub struct InFlightLimit {
    permits: Arc<tokio::sync::Semaphore>,
}

impl InFlightLimit {
    pub fn new(max: u32) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(max as usize)),
        }
    }
}

pub async fn shed(State(limit): State<InFlightLimit>, request: Request, next: Next) -> Response {
    let Ok(_permit) = limit.permits.try_acquire() else {
        metrics::counter!("ingest_shed_total").increment(1);
        let mut response = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight, retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        return response;
    };
    next.run(request).await
}
