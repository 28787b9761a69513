//! The faults, one at a time at random moments: `kill -9` and restart of a processor, of the
//! ingest, of a broker node (the work queue's leader or a follower); a cut of the database
//! link for a few seconds. Between faults it watches for processes that died on their own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::procs::Managed;
use crate::proxy::Proxy;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillProcessor,
    KillIngest,
    KillBrokerLeader,
    KillBrokerFollower,
    CutDatabase,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::KillProcessor,
        Fault::KillIngest,
        Fault::KillBrokerLeader,
        Fault::KillBrokerFollower,
        Fault::CutDatabase,
    ];

    /// The name `--faults` takes.
    pub fn key(self) -> &'static str {
        match self {
            Self::KillProcessor => "processor",
            Self::KillIngest => "ingest",
            Self::KillBrokerLeader => "leader",
            Self::KillBrokerFollower => "follower",
            Self::CutDatabase => "database",
        }
    }

    /// Parses a comma-separated list of [`Fault::key`]s.
    pub fn parse_list(raw: &str) -> Result<Vec<Fault>, String> {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|key| {
                Fault::ALL
                    .into_iter()
                    .find(|f| f.key() == key)
                    .ok_or_else(|| {
                        let keys: Vec<&str> = Fault::ALL.iter().map(|f| f.key()).collect();
                        format!("unknown fault `{key}` (one of {})", keys.join(", "))
                    })
            })
            .collect()
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::KillProcessor => "kill -9 processor",
            Self::KillIngest => "kill -9 ingest",
            Self::KillBrokerLeader => "kill -9 broker node (queue leader)",
            Self::KillBrokerFollower => "kill -9 broker node (follower)",
            Self::CutDatabase => "database cut",
        }
    }
}

fn show_pid(pid: Option<u32>) -> String {
    pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
}

/// Everything the faults act on.
pub struct Rig {
    pub cluster: Cluster,
    pub processors: Vec<Managed>,
    pub ingest: Managed,
    pub proxy: Proxy,
    pub work_queue: String,
}

#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    pub counts: BTreeMap<Fault, u32>,
    /// Processes that ended without being killed by the suite: (name, status).
    pub unexpected_exits: Vec<(String, String)>,
    /// Problems while injecting or recovering (a node slow to rejoin, …).
    pub troubles: Vec<String>,
    pub timeline: Vec<String>,
    /// Longest time for a killed broker node to be back in the cluster.
    pub slowest_rejoin: Duration,
}

pub struct Faults {
    pub rig: Arc<Mutex<Rig>>,
    pub http: reqwest::Client,
    pub gap: (f64, f64),
    pub started: Instant,
    /// The kinds to inject.
    pub kinds: Vec<Fault>,
}

impl Faults {
    fn stamp(&self) -> String {
        format!("[{:>7.1}s]", self.started.elapsed().as_secs_f64())
    }

    fn note(&self, log: &mut FaultLog, line: String) {
        let line = format!("{} {line}", self.stamp());
        println!("{line}");
        log.timeline.push(line);
    }

    /// Injects faults until `stop` is set, then makes sure everything runs again.
    pub async fn run(&self, stop: Arc<AtomicBool>, seed: u64) -> FaultLog {
        let mut rng = Rng::new(seed);
        let mut log = FaultLog::default();
        let mut deck: Vec<Fault> = Vec::new();
        'outer: while !stop.load(Ordering::SeqCst) {
            let gap = rng.secs(self.gap.0, self.gap.1);
            let until = Instant::now() + gap;
            while Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    break 'outer;
                }
                self.supervise(&mut log).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if self.kinds.is_empty() {
                continue;
            }
            if deck.is_empty() {
                deck = self.kinds.clone();
                rng.shuffle(&mut deck);
            }
            let fault = deck.pop().unwrap_or(Fault::KillProcessor);
            self.inject(fault, &mut rng, &mut log).await;
            *log.counts.entry(fault).or_default() += 1;
        }
        self.supervise(&mut log).await;
        log
    }

    /// Restarts whatever died on its own, and notes it.
    async fn supervise(&self, log: &mut FaultLog) {
        let mut rig = self.rig.lock().await;
        let rig = &mut *rig;
        let mut died = Vec::new();
        for p in rig
            .processors
            .iter_mut()
            .chain(std::iter::once(&mut rig.ingest))
        {
            if let Some(status) = p.exited() {
                died.push((p.name.clone(), status.to_string(), p.log_tail(5)));
                if let Err(error) = p.start() {
                    log.troubles
                        .push(format!("restarting {}: {error:#}", p.name));
                }
            }
        }
        for (name, status, tail) in died {
            self.note(
                log,
                format!(
                    "UNEXPECTED: {name} exited on its own ({status}); restarted. Log tail:\n{tail}"
                ),
            );
            log.unexpected_exits.push((name, status));
        }
    }

    async fn inject(&self, fault: Fault, rng: &mut Rng, log: &mut FaultLog) {
        match fault {
            Fault::KillProcessor => {
                let mut rig = self.rig.lock().await;
                let i = usize::try_from(rng.below(rig.processors.len() as u64)).unwrap_or(0);
                let p = &mut rig.processors[i];
                let pid = p.pid();
                p.kill().await;
                let down = rng.secs(0.3, 3.0);
                tokio::time::sleep(down).await;
                let restarted = p.start();
                let ready = match restarted {
                    Ok(()) => p.wait_ready(&self.http, Duration::from_secs(60)).await,
                    Err(e) => Err(e),
                };
                let name = p.name.clone();
                drop(rig);
                self.report(
                    log,
                    fault,
                    &format!("{name} (pid {}), down {down:.1?}", show_pid(pid)),
                    ready,
                );
            }
            Fault::KillIngest => {
                let mut rig = self.rig.lock().await;
                let p = &mut rig.ingest;
                let pid = p.pid();
                p.kill().await;
                let down = rng.secs(0.2, 2.0);
                tokio::time::sleep(down).await;
                let ready = match p.start() {
                    Ok(()) => p.wait_ready(&self.http, Duration::from_secs(60)).await,
                    Err(e) => Err(e),
                };
                drop(rig);
                self.report(
                    log,
                    fault,
                    &format!("ingest (pid {}), down {down:.1?}", show_pid(pid)),
                    ready,
                );
            }
            Fault::KillBrokerLeader | Fault::KillBrokerFollower => {
                let mut rig = self.rig.lock().await;
                let leader = rig.cluster.leader_of(&rig.work_queue).await;
                let n = rig.cluster.nodes.len();
                let (target, what) = match (&leader, fault) {
                    (Ok(l), Fault::KillBrokerLeader) => (*l, "leader".to_owned()),
                    (Ok(l), _) => {
                        let step = 1 + usize::try_from(rng.below(n as u64 - 1)).unwrap_or(0);
                        (
                            (l + step) % n,
                            format!("follower; leader {}", rig.cluster.nodes[*l].name),
                        )
                    }
                    (Err(e), _) => (
                        usize::try_from(rng.below(n as u64)).unwrap_or(0),
                        format!("leader unknown: {e:#}"),
                    ),
                };
                let name = rig.cluster.nodes[target].name.clone();
                let pid = rig.cluster.nodes[target].pid();
                rig.cluster.kill(target).await;
                let down = rng.secs(2.0, 8.0);
                tokio::time::sleep(down).await;
                let back = match rig.cluster.start(target) {
                    Ok(()) => rig.cluster.wait_all_running(Duration::from_secs(120)).await,
                    Err(e) => Err(e),
                };
                let detail = format!("{name} ({what}; pid {}), down {down:.1?}", show_pid(pid));
                let after = match &back {
                    Ok(t) => {
                        log.slowest_rejoin = log.slowest_rejoin.max(*t + down);
                        Ok(*t)
                    }
                    Err(e) => Err(anyhow::anyhow!("{e:#}")),
                };
                drop(rig);
                self.report(log, fault, &detail, after);
            }
            Fault::CutDatabase => {
                let down = rng.secs(2.0, 6.0);
                let refused_before = {
                    let rig = self.rig.lock().await;
                    rig.proxy.cut();
                    rig.proxy.refused.load(Ordering::Relaxed)
                };
                tokio::time::sleep(down).await;
                let refused = {
                    let rig = self.rig.lock().await;
                    rig.proxy.restore();
                    rig.proxy.refused.load(Ordering::Relaxed) - refused_before
                };
                self.report(
                    log,
                    fault,
                    &format!("for {down:.1?}, {refused} connection attempts refused"),
                    Ok(Duration::ZERO),
                );
            }
        }
    }

    fn report(
        &self,
        log: &mut FaultLog,
        fault: Fault,
        detail: &str,
        back: anyhow::Result<Duration>,
    ) {
        match back {
            Ok(t) if t.is_zero() => self.note(log, format!("{}: {detail}", fault.label())),
            Ok(t) => self.note(
                log,
                format!("{}: {detail}; back after {t:.1?}", fault.label()),
            ),
            Err(e) => {
                self.note(log, format!("{}: {detail}; NOT BACK: {e:#}", fault.label()));
                log.troubles
                    .push(format!("{}: {detail}: {e:#}", fault.label()));
            }
        }
    }
}
