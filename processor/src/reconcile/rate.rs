//! The request pacer for Stripe's API: at most `STRIPE_API_RATE` requests in any one-second
//! window, never a burst above it.
//!
//! Requests are spaced evenly, one every `1 s / rate`, so any `rate + 1` consecutive requests
//! span at least a second. Not `governor`: its `Quota::per_second(n)` lets a full bucket of
//! `n` through at once and refills while they run, so close to `2n - 1` can land in one
//! second; with `allow_burst(1)` it would do what this does, but it sleeps on its own clock,
//! which tokio's paused test clock cannot drive, and the guarantee deserves an exact test.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    /// The earliest moment the next request may go.
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn per_second(rate: NonZeroU32) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate.get(),
            next: Mutex::new(None),
        }
    }

    /// Waits for this request's turn. Callers queue on the lock, so turns are taken in
    /// order and none is skipped.
    pub async fn wait(&self) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        let at = next.map_or(now, |next| next.max(now));
        tokio::time::sleep_until(at).await;
        *next = Some(at + self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Whether at most `rate` of `times` fall in any window [t, t + 1 s).
    fn at_most_per_second(times: &[Instant], rate: usize) -> bool {
        times
            .windows(rate + 1)
            .all(|w| w[rate] - w[0] >= Duration::from_secs(1))
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_rate_in_any_second_even_after_idling() {
        let pacer = Pacer::per_second(NonZeroU32::new(20).unwrap());
        let mut times = Vec::new();
        for _ in 0..45 {
            pacer.wait().await;
            times.push(Instant::now());
        }
        // An idle pause must not save up a burst.
        tokio::time::sleep(Duration::from_secs(5)).await;
        for _ in 0..45 {
            pacer.wait().await;
            times.push(Instant::now());
        }
        assert!(at_most_per_second(&times, 20));
        // And it is not slower than it must be: 45 requests take 44 intervals.
        assert_eq!(times[44] - times[0], Duration::from_millis(50 * 44));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_rate() {
        let pacer = Arc::new(Pacer::per_second(NonZeroU32::new(5).unwrap()));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let pacer = Arc::clone(&pacer);
                tokio::spawn(async move {
                    let mut times = Vec::new();
                    for _ in 0..6 {
                        pacer.wait().await;
                        times.push(Instant::now());
                    }
                    times
                })
            })
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.extend(task.await.unwrap());
        }
        times.sort();
        assert_eq!(times.len(), 24);
        assert!(at_most_per_second(&times, 5));
    }
}
