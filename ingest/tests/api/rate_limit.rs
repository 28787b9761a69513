//! The per-address limit at the volumes it is there for: a burst of real events from one
//! address (Stripe, or the load balancer in front of ingest) goes through whole; a flood of
//! forgeries from one address is cut off at the limit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::helpers::*;

/// INGEST_RATE_LIMIT_PER_MINUTE's default.
const DEFAULT_LIMIT: usize = 1000;
const CONCURRENCY: usize = 64;

/// Posts `n` events to the booking endpoint, `CONCURRENCY` at a time, signed by `signer`;
/// returns the count of each status.
async fn burst(app: &TestApp, n: usize, signer: fn(&[u8]) -> String) -> Vec<(u16, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    let mut requests = futures_util::stream::iter(0..n)
        .map(|_| {
            let (_, body) = event("checkout.session.completed");
            let signature = signer(&body);
            app.post("booking", body, Some(signature))
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(response) = requests.next().await {
        *counts.entry(response.status().as_u16()).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

#[tokio::test]
async fn five_thousand_signed_events_from_one_address_are_all_accepted() {
    let app = spawn_app().await;
    let started = Instant::now();
    let counts = burst(&app, 5000, sign).await;
    let elapsed = started.elapsed();
    assert_eq!(counts, [(200, 5000)], "in {elapsed:?}");
    // A limit that counted these would have let at most DEFAULT_LIMIT through, plus what
    // refilled meanwhile (DEFAULT_LIMIT a minute): the test proves something only if that
    // stays under 5,000.
    assert!(
        elapsed < Duration::from_secs(60),
        "5,000 events took {elapsed:?}; the test wants them within a minute"
    );
    assert_eq!(app.queued().await.len(), 5000);
}

#[tokio::test]
async fn two_thousand_forged_events_from_one_address_get_429_past_the_limit() {
    let app = spawn_app().await;
    let started = Instant::now();
    let counts = burst(&app, 2000, sign_wrongly).await;
    let elapsed = started.elapsed();
    let count = |status| {
        counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(count(401) + count(429), 2000, "{counts:?}");
    // The allowance, plus what refilled while the burst ran (one every 60 ms).
    let refilled = (elapsed.as_millis() as usize * DEFAULT_LIMIT).div_ceil(60_000) + 1;
    assert!(
        (DEFAULT_LIMIT..=DEFAULT_LIMIT + refilled).contains(&count(401)),
        "{counts:?} in {elapsed:?}"
    );
    assert!(count(429) >= 2000 - DEFAULT_LIMIT - refilled, "{counts:?}");
    assert!(app.queued().await.is_empty());
}
