//! Latency histograms (hdrhistogram, microseconds) and their summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies from 1 µs to 10 minutes, 3 significant digits; larger values are clamped.
pub struct Latencies(Histogram<u64>);

const HIGHEST_US: u64 = 600_000_000;

impl Latencies {
    pub fn new() -> Self {
        // These bounds are valid, so this cannot fail; fall back to an auto-resizing one.
        Self(
            Histogram::new_with_bounds(1, HIGHEST_US, 3).unwrap_or_else(|_| {
                let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 digits is valid"));
                h.auto(true);
                h
            }),
        )
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_us(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, HIGHEST_US));
    }

    pub fn add(&mut self, other: &Latencies) {
        // Same bounds on both sides: cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Summary {
        let ms = |us: u64| us as f64 / 1_000.0;
        let empty = self.0.is_empty();
        let at = |q: f64| {
            if empty {
                0.0
            } else {
                ms(self.0.value_at_quantile(q))
            }
        };
        Summary {
            count: self.0.len(),
            mean_ms: if empty { 0.0 } else { self.0.mean() / 1_000.0 },
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: if empty { 0.0 } else { ms(self.0.max()) },
        }
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_in_milliseconds() {
        let mut h = Latencies::new();
        for us in 1..=1000 {
            h.record_us(us * 10);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.01, "{s:?}");
        assert_eq!(Latencies::new().summary().max_ms, 0.0);
    }
}
