//! Logging setup. Logs go to stderr so that the ops commands keep stdout for their answer.
//!
//! Logging is best effort; the work and the shutdown are not. A log line is handed to a
//! bounded queue and written to stderr by a thread of its own, so:
//!
//! - a reader that went away (`processor run 2>&1 | head -1`) costs nothing: the write
//!   fails with EPIPE (Rust ignores SIGPIPE) and the error is dropped. With the plain
//!   writer, tracing-subscriber reported the failure with `eprintln!`, which panicked on the
//!   same broken pipe, inside whatever task was logging: the process exited 101, or, when
//!   the task was the one waiting for SIGTERM, kept running and ignored every SIGTERM;
//! - a reader that stopped reading (a full pipe) blocks only the log thread: the queue fills
//!   up and further lines are dropped (`log_lines_dropped_total`) instead of blocking the
//!   runtime's threads in `write`;
//! - no task of the runtime waits on stderr.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Lines queued for the log thread before further lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;
/// How long [`LogGuard`]'s drop waits for the queued lines to be written at exit.
const FLUSH_PATIENCE: Duration = Duration::from_secs(2);

/// Installs the global subscriber; safe to call more than once (later calls are no-ops,
/// which tests rely on). Keep the guard until the end of `main`: dropping it writes the
/// lines still queued, waiting at most two seconds.
#[must_use = "dropping the guard at once stops writing logs"]
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = BestEffortStderr::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Our writer never fails; were it to, reporting it on stderr is what must not happen.
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    let mut guard = guard;
    if installed.is_err() {
        // Already installed: this writer's thread ends with its last sender, here.
        guard.queue = None;
    }
    guard
}

/// A writer for tracing-subscriber that queues each line for the log thread and never
/// blocks or fails.
#[derive(Clone)]
pub struct BestEffortStderr {
    queue: SyncSender<Message>,
}

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// Writes the queued lines when dropped (at the end of `main`), within [`FLUSH_PATIENCE`].
pub struct LogGuard {
    queue: Option<SyncSender<Message>>,
}

impl BestEffortStderr {
    fn start() -> (Self, LogGuard) {
        let (queue, messages) = std::sync::mpsc::sync_channel::<Message>(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(messages));
        let guard = LogGuard {
            queue: spawned.is_ok().then(|| queue.clone()),
        };
        (Self { queue }, guard)
    }
}

/// The log thread: runs as long as a writer exists, that is for the whole process.
fn write_lines(messages: Receiver<Message>) {
    // Locked per line, not for good: `eprintln!` (a panic message, main's `Error: …`)
    // takes the same lock and would otherwise wait for ever.
    let stderr = std::io::stderr();
    for message in messages {
        match message {
            // EPIPE, EBADF: nobody reads the logs any more; the work goes on.
            Message::Line(line) => {
                let _ = stderr.lock().write_all(&line);
            }
            Message::Flush(done) => {
                let _ = stderr.lock().flush();
                let _ = done.try_send(());
            }
        }
    }
}

impl Write for BestEffortStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.queue.try_send(Message::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("log_lines_dropped_total").increment(1);
            }
            // The log thread could not be started: nothing to write to.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BestEffortStderr {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        // A stderr that blocks may never let the thread reach the marker, hence the bound;
        // lines still queued then are lost, as logs may be.
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        if queue.try_send(Message::Flush(done_tx)).is_ok() {
            let _ = done.recv_timeout(FLUSH_PATIENCE);
        }
    }
}
