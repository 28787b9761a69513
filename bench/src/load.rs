//! The load generator: signed webhook POSTs to ingest, closed loop or open loop.
//!
//! Closed loop: `in_flight` workers, each sends its next request when the previous one is
//! answered; latency is from send to answer. Open loop: request `i` is due at
//! `start + i / rate` whatever happened before; its latency counts from that scheduled time,
//! so a stall of the server (or of the generator) shows as latency instead of being hidden
//! by sending less (coordinated omission).
//!
//! Only answers 200 go into the latency histogram; every other answer and every transport
//! error is counted by its status or kind and reported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use reqwest::Client;
use serde::Serialize;
use shared::signature::WebhookSecret;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::catalog::Event;
use crate::histogram::{Latencies, Summary};

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// `closed` or `open`.
    pub mode: &'static str,
    pub requests: u64,
    /// Answered 200.
    pub ok: u64,
    /// Everything else.
    pub failed: u64,
    /// Non-200 answers by status, transport errors by kind.
    pub failures: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// 200 answers per second over the phase.
    pub rate: f64,
    /// Closed loop: requests in flight.
    pub in_flight: Option<u32>,
    /// Open loop: the rate asked for.
    pub target_rate: Option<f64>,
    /// Open loop: how late the generator started a request, at worst (it should stay
    /// near 0; otherwise the generator, not only the server, was the bottleneck).
    pub max_start_lag_ms: Option<f64>,
    /// Latency of the 200 answers (open loop: from the scheduled send time).
    pub latency: Summary,
    /// Per event: answered 200.
    #[serde(skip)]
    pub accepted: Vec<bool>,
    /// Per event: when it was due (open loop) or sent (closed loop), unix µs.
    #[serde(skip)]
    pub sent_at_us: Vec<i64>,
}

/// An accepted event: its payment intent and when it was sent (or due), unix µs.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub payment_intent: String,
    pub sent_at_us: i64,
}

pub fn accepted(events: &[Event], result: &LoadResult) -> Vec<Accepted> {
    events
        .iter()
        .zip(result.accepted.iter().zip(&result.sent_at_us))
        .filter(|(_, (ok, _))| **ok)
        .map(|(event, (_, at))| Accepted {
            payment_intent: event.payment_intent.clone(),
            sent_at_us: *at,
        })
        .collect()
}

pub fn unix_us(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn client(connections: usize) -> anyhow::Result<Client> {
    Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")
}

fn secret() -> anyhow::Result<WebhookSecret> {
    WebhookSecret::parse(crate::world::SECRET, 1).context("the bench secret is invalid")
}

/// Opens up to `connections` connections before timing (a GET, answered 404 at once by the
/// webhook listener, which keeps the connection), so that the timed requests do not pay
/// for TCP set-up.
async fn warm_up(client: &Client, webhook_url: &str, connections: usize) {
    let health = webhook_url
        .split("/webhooks/")
        .next()
        .map(|base| format!("{base}/healthz"))
        .unwrap_or_default();
    let mut set = JoinSet::new();
    for _ in 0..connections {
        let (client, url) = (client.clone(), health.clone());
        set.spawn(async move {
            if let Ok(response) = client.get(&url).send().await {
                let _ = response.bytes().await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// One signed POST; the status, or the kind of transport error.
async fn post(
    client: &Client,
    url: &str,
    secret: &WebhookSecret,
    body: &Bytes,
) -> Result<u16, String> {
    let timestamp = chrono::Utc::now().timestamp();
    let response = client
        .post(url)
        .header("Stripe-Signature", secret.sign(timestamp, body))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.clone())
        .send()
        .await
        .map_err(|error| {
            if error.is_timeout() {
                "timeout".to_owned()
            } else if error.is_connect() {
                "connect error".to_owned()
            } else {
                "request error".to_owned()
            }
        })?;
    let status = response.status().as_u16();
    // Read the (small) answer so that the connection goes back to the pool.
    let _ = response.bytes().await;
    Ok(status)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the workers of one phase share.
struct Tally {
    latencies: Mutex<Latencies>,
    failures: Mutex<BTreeMap<String, u64>>,
    accepted: Vec<AtomicU64>,
    sent_at_us: Vec<AtomicU64>,
}

impl Tally {
    fn new(n: usize) -> Self {
        Self {
            latencies: Mutex::new(Latencies::new()),
            failures: Mutex::new(BTreeMap::new()),
            accepted: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sent_at_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, i: usize, outcome: &Result<u16, String>, latency: Duration) -> bool {
        match outcome {
            Ok(200) => {
                lock(&self.latencies).record(latency);
                if let Some(flag) = self.accepted.get(i) {
                    flag.store(1, Ordering::Relaxed);
                }
                true
            }
            Ok(status) => {
                *lock(&self.failures).entry(status.to_string()).or_default() += 1;
                false
            }
            Err(kind) => {
                *lock(&self.failures).entry(kind.clone()).or_default() += 1;
                false
            }
        }
    }

    fn set_sent_at(&self, i: usize, us: i64) {
        if let Some(slot) = self.sent_at_us.get(i) {
            slot.store(u64::try_from(us).unwrap_or(0), Ordering::Relaxed);
        }
    }

    fn result(&self, mode: &'static str, elapsed: Duration) -> LoadResult {
        let latency = lock(&self.latencies).summary();
        let failures = lock(&self.failures).clone();
        let failed = failures.values().sum();
        let accepted: Vec<bool> = self
            .accepted
            .iter()
            .map(|a| a.load(Ordering::Relaxed) == 1)
            .collect();
        let ok = accepted.iter().filter(|a| **a).count() as u64;
        let elapsed_s = elapsed.as_secs_f64();
        LoadResult {
            mode,
            requests: ok + failed,
            ok,
            failed,
            failures,
            elapsed_s,
            rate: if elapsed_s > 0.0 {
                ok as f64 / elapsed_s
            } else {
                0.0
            },
            in_flight: None,
            target_rate: None,
            max_start_lag_ms: None,
            latency,
            accepted,
            sent_at_us: self
                .sent_at_us
                .iter()
                .map(|s| i64::try_from(s.load(Ordering::Relaxed)).unwrap_or(0))
                .collect(),
        }
    }
}

/// `in_flight` workers send `events` as fast as ingest answers.
pub async fn closed_loop(
    url: String,
    events: &[Event],
    in_flight: u32,
) -> anyhow::Result<LoadResult> {
    let workers = usize::try_from(in_flight)?.min(events.len().max(1));
    let client = client(workers)?;
    warm_up(&client, &url, workers).await;
    let secret = Arc::new(secret()?);
    let bodies: Arc<Vec<Bytes>> = Arc::new(events.iter().map(|e| e.body.clone()).collect());
    let tally = Arc::new(Tally::new(bodies.len()));
    let next = Arc::new(AtomicUsize::new(0));
    let url = Arc::new(url);

    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (client, secret, bodies, tally, next, url) = (
            client.clone(),
            Arc::clone(&secret),
            Arc::clone(&bodies),
            Arc::clone(&tally),
            Arc::clone(&next),
            Arc::clone(&url),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                tally.set_sent_at(i, unix_us(SystemTime::now()));
                let sent = Instant::now();
                let outcome = post(&client, &url, &secret, body).await;
                tally.record(i, &outcome, sent.elapsed());
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        joined.context("a load worker panicked")?;
    }
    let mut result = tally.result("closed", start.elapsed());
    result.in_flight = Some(in_flight);
    Ok(result)
}

/// Events sent in an open loop that are not yet seen committed: what the e2e phase polls.
#[derive(Default)]
pub struct Pending {
    /// Event index → (payment intent, when it was due, unix µs).
    pub waiting: Mutex<BTreeMap<usize, (String, i64)>>,
}

impl Pending {
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<usize, (String, i64)>> {
        lock(&self.waiting)
    }
}

/// Sends event `i` at `start + i / rate`; latency from that time.
pub async fn open_loop(
    url: String,
    events: &[Event],
    rate: f64,
    max_in_flight: u32,
    pending: Option<Arc<Pending>>,
) -> anyhow::Result<LoadResult> {
    let max_in_flight = usize::try_from(max_in_flight)?;
    let client = client(max_in_flight)?;
    // Enough connections for ~20 ms of requests at this rate, at least 16.
    let warm = ((rate / 50.0).ceil() as usize).clamp(16, max_in_flight.max(16));
    warm_up(&client, &url, warm).await;
    let secret = Arc::new(secret()?);
    let tally = Arc::new(Tally::new(events.len()));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let url = Arc::new(url);
    let period = Duration::from_secs_f64(1.0 / rate);

    let start = Instant::now();
    let start_unix = unix_us(SystemTime::now());
    let mut max_lag = Duration::ZERO;
    let mut set = JoinSet::new();
    for (i, event) in events.iter().enumerate() {
        let offset = period.mul_f64(i as f64);
        let due = start + offset;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .context("the in-flight limit closed")?;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
        let due_unix = start_unix + i64::try_from(offset.as_micros()).unwrap_or(i64::MAX);
        tally.set_sent_at(i, due_unix);
        if let Some(pending) = &pending {
            pending
                .lock()
                .insert(i, (event.payment_intent.clone(), due_unix));
        }
        let (client, secret, tally, url, body, pending) = (
            client.clone(),
            Arc::clone(&secret),
            Arc::clone(&tally),
            Arc::clone(&url),
            event.body.clone(),
            pending.clone(),
        );
        set.spawn(async move {
            let outcome = post(&client, &url, &secret, &body).await;
            if !tally.record(i, &outcome, due.elapsed())
                && let Some(pending) = pending
            {
                pending.lock().remove(&i);
            }
            drop(permit);
        });
        while let Some(joined) = set.try_join_next() {
            joined.context("a load task panicked")?;
        }
    }
    while let Some(joined) = set.join_next().await {
        joined.context("a load task panicked")?;
    }
    let mut result = tally.result("open", start.elapsed());
    result.target_rate = Some(rate);
    result.max_start_lag_ms = Some(max_lag.as_secs_f64() * 1_000.0);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes `delay` per request, one at a time for the client below.
    async fn slow_server(delay: Duration) -> anyhow::Result<String> {
        let app = axum::Router::new().route(
            "/webhooks/stripe/{endpoint}",
            axum::routing::post(move || async move {
                tokio::time::sleep(delay).await;
                "{}"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(format!("http://{addr}/webhooks/stripe/booking"))
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                event_id: format!("evt_{i}"),
                payment_intent: format!("pi_{i}"),
                session_id: format!("cs_{i}"),
                customer: uuid::Uuid::nil(),
                content: uuid::Uuid::nil(),
                body: Bytes::from_static(b"{}"),
            })
            .collect()
    }

    /// Requests that start late (here: one in flight, the server slower than the rate)
    /// count from when they were due, not from when they went out: request i is due at
    /// 10·i ms but answered at about 40·(i+1) ms, so the last of 10 waits ~310 ms.
    #[tokio::test]
    async fn late_requests_count_from_their_scheduled_time() -> anyhow::Result<()> {
        let url = slow_server(Duration::from_millis(40)).await?;
        let result = open_loop(url, &events(10), 100.0, 1, None).await?;
        assert_eq!(result.ok, 10, "{result:?}");
        assert!(result.latency.max_ms >= 250.0, "{:?}", result.latency);
        assert!(
            result.max_start_lag_ms.unwrap_or(0.0) >= 200.0,
            "{result:?}"
        );
        // Scheduled times are 10 ms apart whatever the actual sends were.
        let gaps: Vec<i64> = result.sent_at_us.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| (9_990..=10_010).contains(g)),
            "{gaps:?}"
        );
        Ok(())
    }
}
