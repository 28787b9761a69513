//! Ingest never answers 200 for an event the broker has not confirmed.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn broker_unreachable_gives_503_and_not_ready() {
    // Nothing listens on port 1.
    let app = spawn_app_with(Options {
        amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        wait_ready: false,
        ..Options::default()
    })
    .await;
    let response = app
        .client
        .get(format!("{}/readyz", app.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let health = app
        .client
        .get(format!("{}/healthz", app.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let (_, body) = event("checkout.session.completed");
    let response = app.post_signed(body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let error = error_of(response).await;
    assert!(error.contains("not connected to RabbitMQ"), "{error}");
    assert!(!error.contains("guest"), "credentials leaked: {error}");
}

#[tokio::test]
async fn unroutable_event_gives_503() {
    // The exchange exists (ingest declares it) but no processor has declared the work queue.
    let app = spawn_app_with(Options {
        declare_queues: false,
        ..Options::default()
    })
    .await;
    let (_, body) = event("checkout.session.completed");
    let response = app.post_signed(body).await;
    assert_eq!(response.status(), 503);
    assert!(error_of(response).await.contains("no queue is bound"));
}

#[tokio::test]
async fn many_concurrent_publishes_are_all_confirmed() {
    let app = spawn_app().await;
    let mut requests = Vec::new();
    for _ in 0..200 {
        let (_, body) = event("checkout.session.completed");
        requests.push(app.post_signed(body));
    }
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(app.queued().await.len(), 200);
}

#[tokio::test]
async fn reconnects_after_the_connection_is_killed() {
    let app = spawn_app().await;
    let (_, body) = event("a.b");
    assert_eq!(app.post_signed(body).await.status(), 200);

    // Close ingest's connection (only this test's) from the broker side, as a broker
    // restart or a network cut would.
    let Some(pid) = connection_pid(&format!("ingest {}", app.topology.exchange)) else {
        panic!("could not find ingest's connection with rabbitmqctl");
    };
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test: connection killed"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{closed:?}");
    let mut accepted = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = event("a.b");
        let status = app.post_signed(body).await.status();
        assert!(status == 200 || status == 503, "{status}");
        if status == 200 {
            accepted = true;
            break;
        }
    }
    assert!(accepted, "ingest did not reconnect");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_refuses_connections() {
    let mut app = spawn_app().await;
    let mut in_flight = Vec::new();
    for _ in 0..50 {
        let (_, body) = event("a.b");
        let client = app.client.clone();
        let url = format!("{}/webhooks/stripe/booking", app.base);
        let signature = sign(&body);
        in_flight.push(tokio::spawn(async move {
            client
                .post(url)
                .header("Stripe-Signature", signature)
                .body(body)
                .send()
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    app.stop().await;
    let mut ok = 0;
    for request in in_flight {
        match request.await.unwrap() {
            // Every request that got an answer got a real one: confirmed, or 503.
            Ok(response) => {
                let status = response.status().as_u16();
                assert!(status == 200 || status == 503, "{status}");
                ok += usize::from(status == 200);
            }
            // Requests that had not connected before shutdown are refused.
            Err(error) => assert!(error.is_connect() || error.is_request(), "{error}"),
        }
    }
    assert_eq!(
        app.queued().await.len(),
        ok,
        "every 200 is a queued message"
    );
    for base in [&app.base, &app.internal] {
        let after = app.client.get(format!("{base}/healthz")).send().await;
        assert!(after.is_err(), "{base} still accepts after shutdown");
    }
}

/// The broker-side pid of the connection whose client name is `name`.
fn connection_pid(name: &str) -> Option<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}
