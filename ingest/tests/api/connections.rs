//! No connection outlives INGEST_HEADER_TIMEOUT without sending a request: not one that
//! sends nothing, not one that speaks HTTP/2 (ingest serves HTTP/1.1 only), not a kept-alive
//! one left idle after its answer. Raw sockets, so that no client library closes first.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::*;

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the server to close: well past the timeout, well under "never".
const PATIENCE: Duration = Duration::from_secs(6);

/// What the server sent after `sent` was written, and how long after the write the server
/// closed the connection (None if it was still open after `PATIENCE`).
fn exchange(addr: String, sent: &'static [u8]) -> (String, Option<Duration>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    if !sent.is_empty() {
        stream.write_all(sent).unwrap();
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Some(started.elapsed()),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break Some(started.elapsed());
            }
            Err(_) => break None,
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

async fn app() -> (TestApp, Vec<String>) {
    let app = spawn_app_with(Options {
        extra_args: vec![format!("--header-timeout={}s", HEADER_TIMEOUT.as_secs())],
        ..Options::default()
    })
    .await;
    let addrs = [&app.base, &app.internal]
        .map(|base| base.trim_start_matches("http://").to_owned())
        .to_vec();
    (app, addrs)
}

async fn run(addr: &str, sent: &'static [u8]) -> (String, Option<Duration>) {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || exchange(addr, sent))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let (_app, addrs) = app().await;
    for addr in &addrs {
        let (answer, closed) = run(addr, b"").await;
        let closed = closed.unwrap_or_else(|| panic!("{addr}: still open after {PATIENCE:?}"));
        assert!(
            closed >= HEADER_TIMEOUT - Duration::from_millis(100),
            "{addr}: closed after {closed:?}, before the timeout"
        );
        assert!(
            closed < HEADER_TIMEOUT * 3,
            "{addr}: closed after {closed:?}"
        );
        // Whatever hyper says on the way out (a 408 or nothing), never a 2xx.
        assert!(!answer.starts_with("HTTP/1.1 2"), "{addr}: {answer}");
    }
}

#[tokio::test]
async fn an_http2_preface_is_refused_and_closed() {
    let (_app, addrs) = app().await;
    for addr in &addrs {
        let (answer, closed) = run(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let closed = closed.unwrap_or_else(|| panic!("{addr}: still open after {PATIENCE:?}"));
        assert!(
            closed < HEADER_TIMEOUT * 3,
            "{addr}: closed after {closed:?}"
        );
        assert!(!answer.starts_with("HTTP/1.1 2"), "{addr}: {answer}");
        // No HTTP/2 frame (a SETTINGS frame would start the answer) was sent back.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 "),
            "{addr}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn a_kept_alive_connection_left_idle_is_closed_after_the_header_timeout() {
    let (_app, addrs) = app().await;
    for addr in &addrs {
        let (answer, closed) = run(addr, b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n").await;
        // The answer came at once and kept the connection open (HTTP/1.1's default).
        assert!(answer.starts_with("HTTP/1.1 404"), "{addr}: {answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        let closed = closed.unwrap_or_else(|| panic!("{addr}: still open after {PATIENCE:?}"));
        assert!(
            closed >= HEADER_TIMEOUT - Duration::from_millis(100),
            "{addr}: closed after {closed:?}, before the idle timeout"
        );
        assert!(
            closed < HEADER_TIMEOUT * 3,
            "{addr}: closed after {closed:?}"
        );
    }
}
