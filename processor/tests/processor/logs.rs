//! Logs are best effort; the work and the shutdown are not. The real `processor run` keeps
//! handling events and stops cleanly on SIGTERM when nobody reads its logs: a pipe whose
//! reader is gone (`processor run 2>&1 | head -1`, or a terminal closed under
//! scripts/run-local.sh), a pipe nobody drains, output descriptors that cannot be written.

use std::process::{Child, Stdio};
use std::time::Duration;

use sqlx::PgPool;

use crate::helpers::*;

/// Where the binary's stdout and stderr go.
#[derive(Debug, Clone, Copy)]
enum Output {
    /// Pipes whose read ends are closed at once: every write fails with EPIPE.
    ReaderGone,
    /// A pipe kept open but never read: it fills up and a write would block.
    NeverRead,
    /// Descriptors open for reading only: every write fails with EBADF.
    Unwritable,
}

/// The child process, killed when the test ends early (a failed assertion), so that no
/// binary outlives its test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM, then the exit status; fails the test if it takes more than 15 s.
async fn stop(child: &mut Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("processor did not stop within 15 s of SIGTERM");
}

async fn keeps_working_with(pool: PgPool, output: Output) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_millis(200)], 3)).await;
    let unwritable = || Stdio::from(std::fs::File::open("/dev/null").unwrap());
    let mut command = processor(&pool, &prefix);
    command
        .args(["run"])
        .env("PROCESSOR_RETRY_DELAYS", "200ms")
        .env("PROCESSOR_SHUTDOWN_TIMEOUT", "5s")
        // Plenty of lines (sqlx logs every statement at debug), so that a pipe nobody reads
        // fills up.
        .env("RUST_LOG", "debug");
    match output {
        Output::ReaderGone | Output::NeverRead => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Output::Unwritable => {
            command.stdout(unwritable()).stderr(unwritable());
        }
    }
    let mut child = Running(command.spawn().unwrap());
    let kept = match output {
        Output::ReaderGone => {
            drop(child.0.stdout.take());
            drop(child.0.stderr.take());
            None
        }
        Output::NeverRead => Some((child.0.stdout.take(), child.0.stderr.take())),
        Output::Unwritable => None,
    };
    // The first lines (the configuration, the migrations) are written before the first
    // event: by then a closed pipe has failed a write, and a panic would have followed.
    const EVENTS: usize = 60;
    for i in 0..EVENTS {
        broker
            .publish(&message(paid_session_body(
                &format!("evt_logs{i}"),
                &format!("pi_logs{i}"),
                1999,
            )))
            .await;
    }
    wait_for("every purchase", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == EVENTS as i64
    })
    .await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "{output:?}: the processor died"
    );
    let status = stop(&mut child.0).await;
    assert_eq!(status.code(), Some(0), "{output:?}: {status}");
    drop(kept);
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_processor_works_and_stops_when_its_log_reader_is_gone(pool: PgPool) {
    keeps_working_with(pool, Output::ReaderGone).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_processor_works_and_stops_when_nobody_drains_its_logs(pool: PgPool) {
    keeps_working_with(pool, Output::NeverRead).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_processor_works_and_stops_with_unwritable_stdout_and_stderr(pool: PgPool) {
    keeps_working_with(pool, Output::Unwritable).await;
}
