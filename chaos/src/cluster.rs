//! A three-node RabbitMQ cluster of our own, beside the machine's default broker
//! (`../shared/rabbitmq/CLUSTER.md`): own node names, AMQP and distribution ports, data and log
//! folders, config, env and enabled-plugins files (`[].`), a `HOME` with a fresh Erlang
//! cookie, and a distribution port range for our `rabbitmqctl` calls. It runs the real
//! RabbitMQ scripts, not Debian's wrappers (which re-run themselves as user `rabbitmq`, with
//! the default node's cookie). Each node runs in a process group of its own, so `kill -9`
//! takes the whole VM with it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::procs::kill_group;

pub struct Node {
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

pub struct Cluster {
    sbin: PathBuf,
    dir: PathBuf,
    home: PathBuf,
    ctl_ports: (u16, u16),
    pub nodes: Vec<Node>,
}

/// The folder of the real `rabbitmq-server` script: `$CHAOS_RABBITMQ_SBIN`, else the one
/// Debian's wrapper points at (`/usr/lib/rabbitmq/bin/rabbitmq-server` is a link into it),
/// else `/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin`.
pub fn find_sbin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CHAOS_RABBITMQ_SBIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(real) = std::fs::canonicalize("/usr/lib/rabbitmq/bin/rabbitmq-server")
        && let Some(dir) = real.parent()
        && dir.join("rabbitmqctl").exists()
    {
        return Ok(dir.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("sbin"))
        .filter(|p| p.join("rabbitmq-server").exists())
        .collect();
    found.sort();
    found.pop().context(
        "RabbitMQ's own scripts not found (install rabbitmq-server, or set CHAOS_RABBITMQ_SBIN)",
    )
}

fn random_cookie() -> String {
    // 32 upper-case letters from two v4 UUIDs' random bits.
    let a = uuid::Uuid::new_v4().as_u128();
    let b = uuid::Uuid::new_v4().as_u128();
    (0..32)
        .map(|i| {
            let bits = if i < 16 {
                a >> (i * 8)
            } else {
                b >> ((i - 16) * 8)
            };
            char::from(b'A' + (bits % 26) as u8)
        })
        .collect()
}

impl Cluster {
    /// Lays out three nodes under `dir` (nothing starts yet). Node `i` gets AMQP port
    /// `amqp_base + i`, distribution port `dist_base + i`.
    pub fn new(
        dir: &Path,
        tag: &str,
        amqp_base: u16,
        dist_base: u16,
        ctl_ports: (u16, u16),
    ) -> anyhow::Result<Self> {
        let sbin = find_sbin()?;
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, random_cookie())?;
        set_mode(&cookie, 0o400)?;
        // Our own (empty) env file instead of /etc/rabbitmq/rabbitmq-env.conf, which names
        // the default node; our own plugins file, so that no node starts management on 15672.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let mut nodes = Vec::new();
        for (i, letter) in ["a", "b", "c"].iter().enumerate() {
            let offset = u16::try_from(i).unwrap_or(0);
            let node_dir = dir.join(format!("node-{letter}"));
            std::fs::create_dir_all(node_dir.join("log"))?;
            let amqp_port = amqp_base + offset;
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.1 = 127.0.0.1:{amqp_port}\n\
                     loopback_users.guest = true\n\
                     log.file.level = info\n"
                ),
            )?;
            nodes.push(Node {
                name: format!("chaos-{tag}-{letter}@localhost"),
                amqp_port,
                dist_port: dist_base + offset,
                dir: node_dir,
                child: None,
            });
        }
        Ok(Self {
            sbin,
            dir: dir.to_path_buf(),
            home,
            ctl_ports,
            nodes,
        })
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn env(&self, command: &mut Command) {
        command
            .env("HOME", &self.home)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CTL_DIST_PORT_MIN", self.ctl_ports.0.to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MAX", self.ctl_ports.1.to_string())
            .env_remove("RABBITMQ_NODENAME")
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("ERL_FLAGS");
    }

    /// Starts node `i` (on its existing data, if any). Does not wait for it.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("console.log"))?;
        let mut command = Command::new(self.sbin.join("rabbitmq-server"));
        self.env(&mut command);
        command
            .current_dir(&node.dir)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.dir.join("rabbit.pid"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", node.name))?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// `kill -9` of node `i`'s whole process group (the VM and its helpers).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            if let Some(pid) = child.id() {
                kill_group(pid);
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// Runs `rabbitmqctl -n <node i> args…` (or another script of the same folder).
    pub async fn ctl_on(
        &self,
        script: &str,
        i: usize,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut command = Command::new(self.sbin.join(script));
        self.env(&mut command);
        command
            .current_dir(&self.dir)
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout, command.output())
            .await
            .with_context(|| format!("{script} {args:?} on {}: timed out", self.nodes[i].name))??;
        if !output.status.success() {
            bail!(
                "{script} {args:?} on {}: {}{}",
                self.nodes[i].name,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `rabbitmqctl` on the first node we believe up that answers.
    pub async fn ctl(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_up() {
                continue;
            }
            match self.ctl_on("rabbitmqctl", i, args, timeout).await {
                Ok(out) => return Ok(out),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node is up")))
    }

    /// Waits until node `i`'s broker has booted.
    pub async fn await_startup(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        // `await_startup` gives up at once while the node is not registered with epmd yet.
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed()).as_secs().max(1);
            let result = self
                .ctl_on(
                    "rabbitmqctl",
                    i,
                    &["await_startup", "--timeout", &left.to_string()],
                    Duration::from_secs(left + 15),
                )
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(error) if start.elapsed() > timeout => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Names of the running nodes, as the cluster sees them.
    pub async fn running_nodes(&self) -> anyhow::Result<Vec<String>> {
        let out = self
            .ctl(
                &["cluster_status", "--formatter", "json"],
                Duration::from_secs(20),
            )
            .await?;
        let status: Value = serde_json::from_str(&out).context("cluster_status JSON")?;
        Ok(status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until all three nodes run, clustered.
    pub async fn wait_all_running(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            match self.running_nodes().await {
                Ok(nodes) if nodes.len() == self.nodes.len() => return Ok(start.elapsed()),
                _ if start.elapsed() > timeout => {
                    bail!(
                        "the cluster did not show {} running nodes within {timeout:?}",
                        self.nodes.len()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Starts the three nodes and clusters b and c with a.
    pub async fn form(&mut self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        for i in 0..self.nodes.len() {
            self.await_startup(i, Duration::from_secs(120))
                .await
                .with_context(|| format!("node {} did not boot", self.nodes[i].name))?;
        }
        let first = self.nodes[0].name.clone();
        for i in 1..self.nodes.len() {
            let t = Duration::from_secs(60);
            self.ctl_on("rabbitmqctl", i, &["stop_app"], t).await?;
            self.ctl_on("rabbitmqctl", i, &["join_cluster", &first], t)
                .await?;
            self.ctl_on("rabbitmqctl", i, &["start_app"], t).await?;
        }
        self.wait_all_running(Duration::from_secs(120)).await?;
        Ok(start.elapsed())
    }

    /// The node index that leads quorum queue `queue`, if known.
    pub async fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        let out = self
            .ctl(
                &["list_queues", "name", "leader", "--formatter", "json"],
                Duration::from_secs(20),
            )
            .await?;
        let rows: Value = serde_json::from_str(&out).context("list_queues JSON")?;
        let leader = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|row| row["name"] == queue)
            .and_then(|row| row["leader"].as_str())
            .with_context(|| format!("no leader listed for {queue}"))?;
        self.nodes
            .iter()
            .position(|n| n.name == leader)
            .with_context(|| format!("leader {leader} is not one of our nodes"))
    }

    /// (name, messages) of every queue whose name starts with `prefix` (ready and
    /// unacknowledged together).
    pub async fn queue_depths(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let out = self
            .ctl(
                &["list_queues", "name", "messages", "--formatter", "json"],
                Duration::from_secs(20),
            )
            .await?;
        let rows: Value = serde_json::from_str(&out).context("list_queues JSON")?;
        let mut depths: Vec<(String, u64)> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| {
                let name = row["name"].as_str()?;
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), row["messages"].as_u64().unwrap_or(0)))
            })
            .collect();
        depths.sort();
        Ok(depths)
    }

    /// A table of the queues with more columns, and the Raft status of each queue in
    /// `stuck`: what to look at when the queues do not drain.
    pub async fn diagnose(&self, stuck: &[String]) -> String {
        let mut out = self
            .ctl(
                &[
                    "list_queues",
                    "-q",
                    "name",
                    "messages",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                    "leader",
                    "online",
                ],
                Duration::from_secs(20),
            )
            .await
            .unwrap_or_else(|e| format!("list_queues: {e:#}"));
        for queue in stuck {
            let Some(up) = self.nodes.iter().position(Node::is_up) else {
                break;
            };
            let status = self
                .ctl_on(
                    "rabbitmq-queues",
                    up,
                    &["quorum_status", queue, "--formatter", "json"],
                    Duration::from_secs(20),
                )
                .await
                .unwrap_or_else(|e| format!("{e:#}"));
            out.push_str(&format!("\nquorum_status {queue}:\n{status}"));
        }
        out
    }

    /// Kills every node (cleanup).
    pub async fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(pid) = node.child.as_ref().and_then(Child::id) {
                kill_group(pid);
            }
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
