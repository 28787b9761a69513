//! The pipeline's processes: one `ingest`, two `processor run`, each with its log file, each
//! killable with `kill -9` and restartable with the same settings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// `kill -9` of a whole process group (its leader's pid).
pub fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub struct Managed {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// The URL that answers 200 once the process is ready.
    pub ready_url: String,
    child: Option<Child>,
    pub starts: u32,
}

impl Managed {
    pub fn new(
        name: &str,
        program: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        log_dir: &Path,
        ready_url: String,
    ) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            log: log_dir.join(format!("{name}.log")),
            ready_url,
            child: None,
            starts: 0,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// `kill -9`, and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// `Some(status)` when the process ended without being killed by us.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Waits until `ready_url` answers 200.
    pub async fn wait_ready(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(response) = http
                .get(&self.ready_url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "{} not ready at {} within {timeout:?} (log: {})",
                    self.name,
                    self.ready_url,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of its log, for a report.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
