//! Admission control on the webhook route: a per-source-IP rate limit (governor's keyed
//! GCRA limiter) and a cap on requests in flight.
//!
//! The key is the TCP peer address. Behind a reverse proxy every request shares the proxy's
//! address: raise the limit or turn it off (0) there, since forwarded headers can be forged.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::json_error;

/// How often idle keys are dropped, so a flood of distinct addresses cannot grow memory.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct IpRateLimit {
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

impl IpRateLimit {
    /// `None` when the limit is off (0 per minute).
    pub fn per_minute(limit: u32) -> Option<Self> {
        let quota = Quota::per_minute(NonZeroU32::new(limit)?);
        let limiter = Arc::new(RateLimiter::keyed(quota));
        let sweeper = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            loop {
                every.tick().await;
                let Some(limiter) = sweeper.upgrade() else {
                    break;
                };
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        });
        Some(Self { limiter })
    }
}

pub async fn enforce(State(limit): State<IpRateLimit>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if let Some(ip) = peer
        && let Err(not_until) = limit.limiter.check_key(&ip)
    {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        tracing::warn!(%ip, retry_after, "rate limited");
        let mut response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests from this address, retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
        return response;
    }
    next.run(request).await
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
