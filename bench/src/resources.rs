//! What each phase cost the machine: CPU of the whole machine and of the bench, ingest and
//! processor processes (from /proc), and the services' peak RSS during the phase.
//!
//! The peak RSS (VmHWM) of a service is reset at the start of each phase (writing `5` to
//! `/proc/<pid>/clear_refs`), so each phase gets its own peak; the overall peak is the
//! largest of them.

use serde::Serialize;

/// CPU counters at one moment, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    at: Option<std::time::Instant>,
    machine_busy: u64,
    machine_total: u64,
    bench: u64,
    ingest: u64,
    processor: u64,
    reference: u64,
}

/// One phase's cost.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseCost {
    pub phase: String,
    pub wall_s: f64,
    /// Busy share of all cores, 0–100 %.
    pub machine_busy_pct: f64,
    /// Cores used on average by each process (1.0 = one core all the time).
    pub bench_cores: f64,
    pub ingest_cores: f64,
    pub processor_cores: f64,
    /// The reference receiver (`ref-ingest`), and in `ref-e2e` its consumer too: child
    /// processes like ingest and the processor.
    pub reference_cores: f64,
    /// Everything else: mostly RabbitMQ and PostgreSQL.
    pub other_cores: f64,
    pub ingest_peak_rss_mb: Option<f64>,
    pub processor_peak_rss_mb: Option<f64>,
    pub reference_peak_rss_mb: Option<f64>,
}

/// Clock ticks per second of /proc's counters (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// `(busy, total)` ticks of all cores from the first line of /proc/stat.
fn machine() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// utime + stime of a process, ticks.
pub fn process_ticks(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(11) + tick(12)
}

impl CpuSample {
    /// `reference`: the reference's processes (its receiver, and its consumer in `ref-e2e`),
    /// counted together.
    pub fn take(ingest: Option<u32>, processor: Option<u32>, reference: &[u32]) -> Self {
        let (machine_busy, machine_total) = machine();
        Self {
            at: Some(std::time::Instant::now()),
            machine_busy,
            machine_total,
            bench: process_ticks(None),
            ingest: ingest.map_or(0, |pid| process_ticks(Some(pid))),
            processor: processor.map_or(0, |pid| process_ticks(Some(pid))),
            reference: reference.iter().map(|&pid| process_ticks(Some(pid))).sum(),
        }
    }

    /// The cost between `self` (start) and `end`. A service started during the phase
    /// counts from zero, which is right: it used nothing before.
    pub fn cost(&self, end: &CpuSample, phase: &str) -> PhaseCost {
        let wall_s = match (self.at, end.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let cores = |a: u64, b: u64| {
            if wall_s > 0.0 {
                b.saturating_sub(a) as f64 / TICKS / wall_s
            } else {
                0.0
            }
        };
        let busy = end.machine_busy.saturating_sub(self.machine_busy) as f64;
        let total = end.machine_total.saturating_sub(self.machine_total) as f64;
        let machine_cores = cores(self.machine_busy, end.machine_busy);
        let bench_cores = cores(self.bench, end.bench);
        let ingest_cores = cores(self.ingest, end.ingest);
        let processor_cores = cores(self.processor, end.processor);
        let reference_cores = cores(self.reference, end.reference);
        PhaseCost {
            phase: phase.to_owned(),
            wall_s,
            machine_busy_pct: if total > 0.0 {
                busy / total * 100.0
            } else {
                0.0
            },
            bench_cores,
            ingest_cores,
            processor_cores,
            reference_cores,
            other_cores: (machine_cores
                - bench_cores
                - ingest_cores
                - processor_cores
                - reference_cores)
                .max(0.0),
            ingest_peak_rss_mb: None,
            processor_peak_rss_mb: None,
            reference_peak_rss_mb: None,
        }
    }
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_counters() {
        let (busy, total) = machine();
        assert!(total >= busy);
        // Burn a little CPU so that our own counter is not zero.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        assert!(x > 0);
        assert!(process_ticks(None) > 0);
    }
}
