//! Replays and purges started from the console. Each runs in a task of its own, records
//! itself in `ops_audit` when it starts and when it ends, and reports progress that the job
//! page polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::dlq::{DeadLetter, Filter};
use crate::ops::dead_letters::{purge_matching, replay_matching};

use super::{AppState, audit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Replay,
    Purge,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Purge => "purge",
        }
    }
}

/// One action, as the job page shows it.
pub struct Job {
    pub id: Uuid,
    pub action: Action,
    pub token_name: String,
    pub filter: Filter,
    /// What the dry run counted before the operator confirmed.
    pub expected: usize,
    pub started_at: DateTime<Utc>,
    pub done: AtomicUsize,
    pub total: AtomicUsize,
    pub result: Mutex<Option<Outcome>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub count: usize,
    pub summary: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub action: Action,
    pub expected: usize,
    pub done: usize,
    pub total: usize,
    pub finished: bool,
    pub outcome: Option<Outcome>,
}

impl Job {
    pub fn status(&self) -> Status {
        let outcome = self.result.lock().ok().and_then(|r| r.clone());
        Status {
            action: self.action,
            expected: self.expected,
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            finished: outcome.is_some(),
            outcome,
        }
    }
}

/// Jobs of this process, by id (the audit table keeps them for good).
#[derive(Default)]
pub struct Jobs(Mutex<HashMap<Uuid, Arc<Job>>>);

impl Jobs {
    pub fn get(&self, id: Uuid) -> Option<Arc<Job>> {
        self.0.lock().ok().and_then(|jobs| jobs.get(&id).cloned())
    }

    fn insert(&self, job: Arc<Job>) {
        if let Ok(mut jobs) = self.0.lock() {
            // Keep the map small: finished jobs older than a day go.
            let cutoff = Utc::now() - chrono::Duration::days(1);
            jobs.retain(|_, j| j.started_at > cutoff || j.status().outcome.is_none());
            jobs.insert(job.id, job);
        }
    }
}

/// Records the action in the audit log and starts it; returns the job's id.
pub async fn start(
    console: &AppState,
    action: Action,
    token_name: &str,
    filter: Filter,
    expected: usize,
) -> anyhow::Result<Uuid> {
    let filter_json = serde_json::to_value(&filter)?;
    let id = audit::start(&console.pool, token_name, action.as_str(), &filter_json).await?;
    let job = Arc::new(Job {
        id,
        action,
        token_name: token_name.to_owned(),
        filter,
        expected,
        started_at: Utc::now(),
        done: AtomicUsize::new(0),
        total: AtomicUsize::new(expected),
        result: Mutex::new(None),
    });
    console.jobs.insert(job.clone());
    tracing::info!(job = %id, action = action.as_str(), token = token_name, filter = %filter_json, "ops console action started");
    tokio::spawn(run(console.clone(), job));
    Ok(id)
}

async fn run(console: AppState, job: Arc<Job>) {
    let result = execute(&console, &job).await;
    let (outcome, end) = match result {
        Ok((outcome, matched, failed, letters)) => (outcome, (matched, failed, letters)),
        Err(error) => (
            Outcome {
                ok: false,
                count: 0,
                summary: format!("failed: {error:#}"),
            },
            (0, 0, Vec::new()),
        ),
    };
    let (matched, failed, letters) = end;
    let recorded = audit::finish(
        &console.pool,
        job.id,
        audit::Finish {
            matched,
            count: outcome.count,
            failed,
            outcome: &outcome.summary,
            letters: &letters,
        },
    )
    .await;
    if let Err(error) = recorded {
        tracing::error!(job = %job.id, %error, "could not record the end of an action in ops_audit");
    }
    tracing::info!(job = %job.id, action = job.action.as_str(), ok = outcome.ok, count = outcome.count, summary = outcome.summary, "ops console action finished");
    if let Ok(mut slot) = job.result.lock() {
        *slot = Some(outcome);
    }
    console.reindex.notify_one();
}

type Executed = (Outcome, usize, usize, Vec<DeadLetter>);

async fn execute(console: &AppState, job: &Job) -> anyhow::Result<Executed> {
    let _queue = console.queue_lock.lock().await;
    let connection = console.connect(job.action.as_str()).await?;
    let progress = |done: usize, total: usize| {
        job.done.store(done, Ordering::Relaxed);
        job.total.store(total, Ordering::Relaxed);
    };
    let executed = match job.action {
        Action::Replay => {
            let outcome = replay_matching(
                &connection,
                &console.topology,
                &job.filter,
                None,
                false,
                progress,
            )
            .await?;
            let summary = format!(
                "replayed {} of {} matching message(s) (dry run counted {}); {} duplicate copies dropped; {} failed; {} left in the dead-letter queue",
                outcome.replayed,
                outcome.matched,
                job.expected,
                outcome.dropped,
                outcome.failed,
                outcome.left()
            );
            (
                Outcome {
                    ok: outcome.failed == 0,
                    count: outcome.replayed,
                    summary,
                },
                outcome.matched,
                outcome.failed,
                outcome.letters,
            )
        }
        Action::Purge => {
            let outcome = purge_matching(
                &console.pool,
                &connection,
                &console.topology,
                &job.filter,
                |done| progress(done, job.total.load(Ordering::Relaxed).max(done)),
            )
            .await?;
            let summary = format!(
                "purged {} message(s) of {} event(s) (dry run counted {}); {} left in the dead-letter queue",
                outcome.purged,
                outcome.letters.len(),
                job.expected,
                outcome.total - outcome.purged
            );
            (
                Outcome {
                    ok: true,
                    count: outcome.purged,
                    summary,
                },
                outcome.purged,
                0,
                outcome.letters,
            )
        }
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(executed)
}
