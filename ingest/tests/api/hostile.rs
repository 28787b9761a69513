//! Hostile input: a table of bad requests, each with its documented status and nothing
//! enqueued; slow clients; a flood from one address; secrets never in the logs.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};

use crate::helpers::*;

struct Bad {
    name: &'static str,
    method: Method,
    path: String,
    signature: Option<HeaderValue>,
    extra: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
    status: u16,
}

fn bad(name: &'static str, body: &[u8], signature: Option<String>, status: u16) -> Bad {
    Bad {
        name,
        method: Method::POST,
        path: "/webhooks/stripe/booking".into(),
        signature: signature.map(|s| HeaderValue::from_str(&s).unwrap()),
        extra: Vec::new(),
        body: body.to_vec(),
        status,
    }
}

fn cases() -> Vec<Bad> {
    let (_, body) = event("checkout.session.completed");
    let now = chrono::Utc::now().timestamp();
    let good = sign(&body);
    let v1 = good.split_once(",v1=").unwrap().1.to_owned();
    let signed = |b: &[u8]| (b.to_vec(), Some(sign(b)));
    let mut cases = vec![
        // The signature header.
        bad("no signature header", &body, None, 400),
        bad("empty signature header", &body, Some(String::new()), 400),
        bad("only t=", &body, Some(format!("t={now}")), 401),
        bad("no timestamp", &body, Some(format!("v1={v1}")), 400),
        bad(
            "timestamp not a number",
            &body,
            Some(format!("t=abc,v1={v1}")),
            400,
        ),
        bad(
            "negative timestamp",
            &body,
            Some(format!("t=-{now},v1={v1}")),
            400,
        ),
        bad(
            "timestamp overflows",
            &body,
            Some(format!("t=99999999999999999999999,v1={v1}")),
            400,
        ),
        bad(
            "two timestamps",
            &body,
            Some(format!("t={now},t={now},v1={v1}")),
            400,
        ),
        bad(
            "space after comma",
            &body,
            Some(good.replace(',', ", ")),
            400,
        ),
        bad("tab inside", &body, Some(good.replace(',', ",\t")), 400),
        bad(
            "v1 not hex",
            &body,
            Some(format!("t={now},v1={}", "z".repeat(64))),
            400,
        ),
        bad(
            "v1 too short",
            &body,
            Some(format!("t={now},v1={}", &v1[..32])),
            400,
        ),
        bad(
            "v1 too long",
            &body,
            Some(format!("t={now},v1={v1}ab")),
            400,
        ),
        bad(
            "empty element",
            &body,
            Some(format!("t={now},,v1={v1}")),
            400,
        ),
        bad("element without =", &body, Some(format!("t={now},v1")), 400),
        bad("empty key", &body, Some(format!("t={now},={v1}")), 400),
        bad("v0 only", &body, Some(format!("t={now},v0={v1}")), 401),
        bad(
            "unknown scheme only",
            &body,
            Some(format!("t={now},v9={v1}")),
            401,
        ),
        bad(
            "wrong secret",
            &body,
            Some(
                shared::signature::WebhookSecret::parse("whsec_other", 1)
                    .unwrap()
                    .sign(now, &body),
            ),
            401,
        ),
        bad(
            "stale timestamp",
            &body,
            Some(sign_at(&body, now - 3600)),
            401,
        ),
        bad(
            "future timestamp",
            &body,
            Some(sign_at(&body, now + 3600)),
            401,
        ),
        bad("signature of another body", &body, Some(sign(b"{}")), 401),
        bad(
            "signature for the same body re-serialised",
            &[&body[..], b"\n"].concat(),
            Some(good.clone()),
            401,
        ),
    ];
    let mut opaque = bad("signature header not text", &body, None, 400);
    opaque.signature = Some(HeaderValue::from_bytes(b"t=1,v1=\xff\xfe").unwrap());
    cases.push(opaque);

    // The body, correctly signed: it must still be a Stripe event.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let long_id = format!(r#"{{"id":"evt_{}","type":"a.b"}}"#, "x".repeat(300));
    let bodies: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("not JSON", b"hello".to_vec()),
        ("JSON array", b"[1,2,3]".to_vec()),
        ("JSON string", br#""evt_1""#.to_vec()),
        ("JSON null", b"null".to_vec()),
        ("missing id", br#"{"type":"a.b"}"#.to_vec()),
        ("missing type", br#"{"id":"evt_1"}"#.to_vec()),
        ("id not a string", br#"{"id":1,"type":"a.b"}"#.to_vec()),
        (
            "type with capitals",
            br#"{"id":"evt_1","type":"A.B"}"#.to_vec(),
        ),
        (
            "type with spaces",
            br#"{"id":"evt_1","type":"a b"}"#.to_vec(),
        ),
        ("empty id", br#"{"id":"","type":"a.b"}"#.to_vec()),
        ("id too long", long_id.into_bytes()),
        (
            "object is not event",
            br#"{"id":"evt_1","type":"a.b","object":"charge"}"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            b"{\"id\":\"evt_\xff\",\"type\":\"a.b\"}".to_vec(),
        ),
        (
            "trailing garbage",
            br#"{"id":"evt_1","type":"a.b"} x"#.to_vec(),
        ),
        ("deeply nested", deep.into_bytes()),
        ("UTF-16 with BOM", {
            let mut b = vec![0xFF, 0xFE];
            for unit in r#"{"id":"evt_1","type":"a.b"}"#.encode_utf16() {
                b.extend_from_slice(&unit.to_le_bytes());
            }
            b
        }),
        ("NUL bytes", b"\0\0\0\0".to_vec()),
    ];
    for (name, body) in bodies {
        let (body, signature) = signed(&body);
        cases.push(bad(name, &body, signature, 400));
    }
    let mut gzip = bad(
        "gzip-encoded body",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3],
        None,
        400,
    );
    gzip.signature = Some(HeaderValue::from_str(&sign(&gzip.body)).unwrap());
    gzip.extra
        .push(("content-encoding", HeaderValue::from_static("gzip")));
    cases.push(gzip);

    // Sizes.
    let huge = vec![b'x'; 2 * 1024 * 1024];
    cases.push(bad("body over the limit", &huge, Some(sign(&huge)), 413));

    // Methods and paths.
    for method in [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let mut case = bad("other method", &body, Some(good.clone()), 405);
        case.method = method;
        cases.push(case);
    }
    for (name, path) in [
        ("unknown endpoint", "/webhooks/stripe/nope".to_owned()),
        (
            "endpoint without a secret",
            "/webhooks/stripe/payment".to_owned(),
        ),
        (
            "endpoint in capitals",
            "/webhooks/stripe/BOOKING".to_owned(),
        ),
        (
            "extra path segment",
            "/webhooks/stripe/booking/extra".to_owned(),
        ),
        ("empty endpoint", "/webhooks/stripe/".to_owned()),
        ("root", "/".to_owned()),
        (
            "very long endpoint",
            format!("/webhooks/stripe/{}", "a".repeat(4000)),
        ),
        (
            "encoded traversal",
            "/webhooks/stripe/..%2Fbooking".to_owned(),
        ),
    ] {
        let mut case = bad(name, &body, Some(good.clone()), 404);
        case.path = path;
        cases.push(case);
    }
    let mut query = bad(
        "query string does not help a bad signature",
        &body,
        Some("t=1".into()),
        401,
    );
    query.path = "/webhooks/stripe/booking?debug=true".into();
    cases.push(query);
    cases
}

#[tokio::test]
async fn every_bad_request_gets_its_status_and_enqueues_nothing() {
    let app = spawn_app().await;
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    for case in cases {
        let mut headers = HeaderMap::new();
        if let Some(signature) = case.signature {
            headers.insert("stripe-signature", signature);
        }
        for (name, value) in case.extra {
            headers.insert(name, value);
        }
        let response = app
            .client
            .request(case.method.clone(), format!("{}{}", app.base, case.path))
            .headers(headers)
            .header("content-type", "application/json")
            .body(case.body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            case.status,
            "{} ({})",
            case.name,
            case.method
        );
        let error = error_of(response).await;
        assert!(!error.contains(SECRET), "{}: {error}", case.name);
        assert!(
            error.len() < 300,
            "{}: error echoes too much: {} bytes",
            case.name,
            error.len()
        );
    }
    assert!(
        app.queued().await.is_empty(),
        "a bad request reached the queue"
    );
}

/// Opens a raw connection, sends `head`, then waits; returns what the server sent and when
/// the connection was closed (or None if still open at `limit`).
fn slow_client(addr: &str, head: &[u8], limit: Duration) -> (String, Option<Duration>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(head).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                return (
                    String::from_utf8_lossy(&received).into_owned(),
                    Some(started.elapsed()),
                );
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {
                return (
                    String::from_utf8_lossy(&received).into_owned(),
                    Some(started.elapsed()),
                );
            }
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), None),
        }
    }
}

#[tokio::test]
async fn slow_clients_cannot_hold_connections() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--header-timeout=1s".into(), "--body-timeout=1s".into()],
        ..Options::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // Headers that never end.
    let head = b"POST /webhooks/stripe/booking HTTP/1.1\r\nHost: x\r\nStripe-Sig".to_vec();
    let a = addr.clone();
    let (_, closed) =
        tokio::task::spawn_blocking(move || slow_client(&a, &head, Duration::from_secs(5)))
            .await
            .unwrap();
    let closed = closed.expect("a connection trickling its headers was not closed");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");

    // A body that never arrives.
    let (_, body) = event("a.b");
    let head = format!(
        "POST /webhooks/stripe/booking HTTP/1.1\r\nHost: x\r\nStripe-Signature: {}\r\nContent-Length: {}\r\n\r\n{{",
        sign(&body),
        body.len()
    );
    let (answer, closed) = tokio::task::spawn_blocking(move || {
        slow_client(&addr, head.as_bytes(), Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#"{"error":"#), "{answer}");
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(4)),
        "{closed:?}"
    );
    assert!(app.queued().await.is_empty());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_flood_from_one_address_gets_429s_without_memory_growth() {
    let (mut child, base, internal, _leftovers) = ingest_binary(&[
        ("AMQP_URL", amqp_url()),
        ("STRIPE_WEBHOOK_SECRET_BOOKING", SECRET.into()),
        ("INGEST_RATE_LIMIT_PER_MINUTE", "60".into()),
        ("RUST_LOG", "error".into()),
    ]);
    let client = reqwest::Client::new();
    wait_healthy(&client, &internal).await;
    let flood = |n: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let mut limited = 0;
            let mut requests = futures_util::stream::iter(0..n)
                .map(|_| {
                    // Badly signed: only refused requests count against the limit.
                    let (_, body) = event("a.b");
                    client
                        .post(format!("{base}/webhooks/stripe/booking"))
                        .header("stripe-signature", sign_wrongly(&body))
                        .body(body)
                        .send()
                })
                .buffer_unordered(32);
            while let Some(response) = requests.next().await {
                if response.is_ok_and(|r| r.status() == 429) {
                    limited += 1;
                }
            }
            limited
        }
    };
    use futures_util::StreamExt;
    // Warm up (the limit is spent here), then measure.
    let limited = flood(500).await;
    assert!(limited >= 500 - 60, "only {limited} of 500 limited");
    let before = rss_kib(child.id());
    let started = Instant::now();
    let limited = flood(5000).await;
    let after = rss_kib(child.id());
    // The quota refills at one request a second meanwhile.
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        limited >= 5000 - refilled,
        "only {limited} of 5000 limited in {:?}",
        started.elapsed()
    );
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB during the flood"
    );
    terminate(&mut child);
}

#[tokio::test]
async fn no_secret_ever_reaches_the_logs() {
    let secret = "whsec_this_value_must_never_be_logged";
    let rotated = "whsec_old_value_also_never_logged";
    let (mut child, base, internal, _leftovers) = ingest_binary(&[
        ("AMQP_URL", amqp_url()),
        (
            "STRIPE_WEBHOOK_SECRET_BOOKING",
            format!("{secret},{rotated}"),
        ),
        (
            "STRIPE_WEBHOOK_SECRET_DISPUTE",
            "not_a_whsec_secret_value".into(),
        ),
        ("RUST_LOG", "debug".into()),
        ("LOG_FORMAT", "json".into()),
    ]);
    // A malformed secret stops start-up with a message naming the variable only.
    let output = std::mem::replace(&mut child, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("STRIPE_WEBHOOK_SECRET_DISPUTE"), "{stderr}");
    assert!(!stderr.contains("not_a_whsec_secret_value"), "{stderr}");
    drop((base, internal));

    let (mut child, base, internal, _leftovers) = ingest_binary(&[
        ("AMQP_URL", amqp_url()),
        (
            "STRIPE_WEBHOOK_SECRET_BOOKING",
            format!("{secret},{rotated}"),
        ),
        ("RUST_LOG", "debug".into()),
        ("LOG_FORMAT", "json".into()),
    ]);
    let client = reqwest::Client::new();
    wait_healthy(&client, &internal).await;
    let (_, body) = event("a.b");
    let t = chrono::Utc::now().timestamp();
    let good = shared::signature::WebhookSecret::parse(secret, 1)
        .unwrap()
        .sign(t, &body);
    for signature in [
        good.clone(),
        good.replace("v1=", "v0="),
        "t=1,v1=00".into(),
        sign(&body),
    ] {
        let _ = client
            .post(format!("{base}/webhooks/stripe/booking"))
            .header("stripe-signature", signature)
            .body(body.clone())
            .send()
            .await
            .unwrap();
    }
    let stderr = terminate(&mut child);
    assert!(
        stderr.lines().count() > 3,
        "expected a full run's logs: {stderr}"
    );
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
        for needle in [secret, rotated, "this_value_must_never", ":guest@"] {
            assert!(!line.contains(needle), "secret in log line: {line}");
        }
    }
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_are_shed_with_503() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--max-in-flight=1".into(), "--body-timeout=3s".into()],
        ..Options::default()
    })
    .await;
    // One request holds the only slot while its body trickles in.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let held = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"POST /webhooks/stripe/booking HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(stream);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = event("a.b");
    let response = app.post_signed(body.clone()).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        error_of(response)
            .await
            .contains("too many requests in flight")
    );
    held.join().unwrap();
    // The slot is free again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.post_signed(body).await.status(), 200);
}
