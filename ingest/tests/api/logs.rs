//! Logs are best effort; the work and the shutdown are not. The real binary keeps answering
//! and stops cleanly on SIGTERM when nobody reads its logs: a pipe whose reader is gone
//! (`ingest 2>&1 | head -1`), a pipe nobody drains, output descriptors that cannot be
//! written at all.

use std::process::{Child, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties};
use shared::topology::{QueueSettings, Topology};

use crate::helpers::*;

/// Removes the queues declared for a binary run when the test ends.
struct Declared(Topology);

impl Drop for Declared {
    fn drop(&mut self) {
        remove_topology(self.0.clone());
    }
}

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

/// Runs ingest with `output`, sends it signed events while its logs go nowhere, then stops
/// it with SIGTERM: it must answer every request and exit 0.
async fn keeps_working_with(output: Output) {
    let unwritable = || Stdio::from(std::fs::File::open("/dev/null").unwrap());
    let (child, base, internal, leftovers) = ingest_binary_with(
        &[
            ("AMQP_URL", amqp_url()),
            ("STRIPE_WEBHOOK_SECRET_BOOKING", SECRET.into()),
            // Plenty of lines, so that a pipe nobody reads fills up.
            ("RUST_LOG", "debug".into()),
        ],
        |command| {
            if matches!(output, Output::Unwritable) {
                command.stdout(unwritable()).stderr(unwritable());
            }
        },
    );
    let mut child = Running(child);
    let kept = match output {
        Output::ReaderGone => {
            drop(child.0.stdout.take());
            drop(child.0.stderr.take());
            None
        }
        Output::NeverRead => Some((child.0.stdout.take(), child.0.stderr.take())),
        Output::Unwritable => None,
    };
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(&leftovers.0);
    let settings = QueueSettings {
        delivery_limit: 5,
        retry_delays: vec![],
    };
    topology.declare(&channel, &settings).await.unwrap();
    let _declared = Declared(topology.clone());

    let client = reqwest::Client::new();
    wait_healthy(&client, &internal).await;
    for _ in 0..100 {
        let ready = client.get(format!("{internal}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several hundred requests: far more log lines than a pipe holds (64 KiB).
    let statuses: Vec<u16> = futures_util::stream::iter(0..400)
        .map(|_| {
            let (_, body) = event("checkout.session.completed");
            client
                .post(format!("{base}/webhooks/stripe/booking"))
                .header("stripe-signature", sign(&body))
                .timeout(Duration::from_secs(10))
                .body(body)
                .send()
        })
        .buffer_unordered(16)
        .map(|r| r.map_or(0, |r| r.status().as_u16()))
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{output:?}: {statuses:?}"
    );
    let health = client.get(format!("{internal}/healthz")).send().await;
    assert!(health.is_ok_and(|r| r.status() == 200), "{output:?}");

    let status = stop(&mut child.0).await;
    assert_eq!(status.code(), Some(0), "{output:?}: {status}");
    drop(kept);
    let depth = channel
        .queue_declare(
            topology.work_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(depth, 400, "{output:?}");
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

/// SIGTERM, then the exit status; fails the test if it takes more than 10 s.
async fn stop(child: &mut Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("ingest did not stop within 10 s of SIGTERM");
}

#[tokio::test]
async fn ingest_works_and_stops_when_its_log_reader_is_gone() {
    keeps_working_with(Output::ReaderGone).await;
}

#[tokio::test]
async fn ingest_works_and_stops_when_nobody_drains_its_logs() {
    keeps_working_with(Output::NeverRead).await;
}

#[tokio::test]
async fn ingest_works_and_stops_with_unwritable_stdout_and_stderr() {
    keeps_working_with(Output::Unwritable).await;
}
