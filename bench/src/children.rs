//! The binaries under test, run as child processes: start, wait for `/readyz`, read their
//! peak RSS, stop with SIGTERM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

pub struct Service {
    pub name: &'static str,
    child: Child,
    pid: u32,
    pub log: PathBuf,
    /// The largest VmHWM read, kB (VmHWM is reset at each phase's start).
    pub peak_rss_kb: Option<u64>,
}

impl Service {
    /// Starts `bin args…` with `env` added to the bench's own environment; its output goes
    /// to `log`. The process is killed if the bench drops it without stopping it.
    pub fn start(
        name: &'static str,
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} (build it first)", bin.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Self {
            name,
            child,
            pid,
            log,
            peak_rss_kb: None,
        })
    }

    /// Waits until `url` answers 200, failing early if the process exits.
    pub async fn wait_ready(&mut self, url: &str, patience: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {:?} ({url}); its log:\n{}",
                    self.name,
                    patience,
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Peak resident set size (VmHWM) since it was last reset, kB. The largest value read
    /// is remembered in `peak_rss_kb`, also for after the stop.
    pub fn read_peak_rss(&mut self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())?;
        self.peak_rss_kb = Some(self.peak_rss_kb.map_or(kb, |peak| peak.max(kb)));
        Some(kb)
    }

    /// SIGTERM, then up to `patience` for a clean exit, then SIGKILL.
    pub async fn stop(&mut self, patience: Duration) -> anyhow::Result<()> {
        self.read_peak_rss();
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    crate::progress(&format!("{} exited with {status}", self.name));
                }
            }
            Err(_) => {
                crate::progress(&format!(
                    "{} did not stop within {patience:?}: killing it",
                    self.name
                ));
                self.child.kill().await?;
            }
        }
        Ok(())
    }

    /// Lines of the log that are warnings or errors (RUST_LOG=warn, so every line is).
    pub fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (free when asked; the child binds it a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Runs `bin args…` to completion with `env`; fails with its output when it fails.
pub async fn run_to_end(bin: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let output = Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {} (build it first)", bin.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}):\n{}",
            bin.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
