//! Sends the planned requests to ingest over concurrent HTTP clients, like Stripe: each send
//! signed afresh, and resent with backoff after a 5xx or a connection error until it is
//! answered 200 (bounded).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::signature::WebhookSecret;
use tokio::sync::Semaphore;

use crate::rng::Rng;
use crate::traffic::{Send, Traffic};

#[derive(Debug, Default)]
pub struct SendStats {
    /// HTTP requests made (first tries and resends).
    pub requests: AtomicU64,
    /// Requests answered 200.
    pub accepted: AtomicU64,
    /// Requests answered 5xx.
    pub server_errors: AtomicU64,
    /// Requests that got no answer (refused, reset, timed out).
    pub connection_errors: AtomicU64,
    /// Sends still waiting for their 200.
    pub pending: AtomicU64,
    pub by_status: Mutex<BTreeMap<u16, u64>>,
    /// Event index → number of its sends answered 200.
    pub accepted_by_event: Mutex<HashMap<usize, u32>>,
    /// Event index → number of requests made for it.
    pub requests_by_event: Mutex<HashMap<usize, u32>>,
    /// (event index, status, body) of answers other than 200 and 5xx: never expected.
    pub unexpected: Mutex<Vec<(usize, u16, String)>>,
    /// Sends that were never answered 200 within the bound: (event index, tries, last error).
    pub gave_up: Mutex<Vec<(usize, u32, String)>>,
}

pub struct Sender {
    pub url: String,
    pub secret: String,
    pub concurrency: usize,
    /// Tries per send before giving up.
    pub max_tries: u32,
    /// No new try after this instant.
    pub deadline: Instant,
}

fn backoff(try_no: u32, rng: &mut Rng) -> Duration {
    let base = 0.25 * 2f64.powi(i32::try_from(try_no.min(6)).unwrap_or(6));
    let capped = base.min(8.0);
    Duration::from_secs_f64(capped * (0.5 + rng.unit()))
}

impl Sender {
    /// Runs the whole plan, starting now; returns when every send is answered 200 or given up.
    pub async fn run(
        &self,
        traffic: Arc<Traffic>,
        plan: Vec<Send>,
        stats: Arc<SendStats>,
        seed: u64,
    ) -> anyhow::Result<()> {
        let secret = WebhookSecret::parse(&self.secret, 1)
            .map_err(|e| anyhow::anyhow!("webhook secret: {e}"))?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(self.concurrency)
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let start = tokio::time::Instant::now();
        stats.pending.store(plan.len() as u64, Ordering::Relaxed);
        let mut tasks = tokio::task::JoinSet::new();
        for (k, send) in plan.into_iter().enumerate() {
            tokio::time::sleep_until(start + send.at).await;
            // Keep the number of idle tasks bounded: wait for a permit before spawning.
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let (client, secret, traffic, stats, permits) = (
                client.clone(),
                secret.clone(),
                Arc::clone(&traffic),
                Arc::clone(&stats),
                Arc::clone(&permits),
            );
            let url = self.url.clone();
            let (max_tries, deadline) = (self.max_tries, self.deadline);
            let mut rng = Rng::new(seed ^ (k as u64).wrapping_mul(0x9E37_79B9));
            tasks.spawn(async move {
                let event = &traffic.events[send.event];
                let mut permit = Some(permit);
                let mut last_error;
                let mut tries = 0;
                loop {
                    if permit.is_none() {
                        permit = Arc::clone(&permits).acquire_owned().await.ok();
                    }
                    tries += 1;
                    let outcome = post(&client, &url, &secret, &event.body).await;
                    drop(permit.take());
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    *stats
                        .requests_by_event
                        .lock()
                        .unwrap()
                        .entry(send.event)
                        .or_default() += 1;
                    match outcome {
                        Ok((200, _)) => {
                            stats.accepted.fetch_add(1, Ordering::Relaxed);
                            *stats
                                .accepted_by_event
                                .lock()
                                .unwrap()
                                .entry(send.event)
                                .or_default() += 1;
                            *stats.by_status.lock().unwrap().entry(200).or_default() += 1;
                            break;
                        }
                        Ok((status, body)) => {
                            *stats.by_status.lock().unwrap().entry(status).or_default() += 1;
                            if status < 500 {
                                stats
                                    .unexpected
                                    .lock()
                                    .unwrap()
                                    .push((send.event, status, body));
                                break;
                            }
                            stats.server_errors.fetch_add(1, Ordering::Relaxed);
                            last_error = format!("HTTP {status}: {body}");
                        }
                        Err(error) => {
                            stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                            last_error = error;
                        }
                    }
                    if tries >= max_tries || Instant::now() >= deadline {
                        stats
                            .gave_up
                            .lock()
                            .unwrap()
                            .push((send.event, tries, last_error));
                        break;
                    }
                    tokio::time::sleep(backoff(tries, &mut rng)).await;
                }
                stats.pending.fetch_sub(1, Ordering::Relaxed);
            });
            // Reap finished tasks as we go.
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &WebhookSecret,
    body: &[u8],
) -> Result<(u16, String), String> {
    let header = secret.sign(chrono::Utc::now().timestamp(), body);
    let response = client
        .post(url)
        .header("Stripe-Signature", header)
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| format!("{e:?}").chars().take(300).collect::<String>())?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    Ok((status, text.chars().take(300).collect()))
}
