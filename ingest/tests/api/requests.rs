//! Every answer ingest gives, and that nothing but a verified event reaches the queue.

use shared::signature::WebhookSecret;

use crate::helpers::*;

#[tokio::test]
async fn accepted_event_is_published_byte_for_byte() {
    let app = spawn_app().await;
    // The official fixture, exactly as Stripe would send it (signed now).
    let body = fixture("checkout.session.completed.json");
    let response = app.post_signed(body.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"received": true})
    );

    let queued = app.queued().await;
    assert_eq!(queued.len(), 1);
    let message = &queued[0].delivery;
    assert_eq!(message.data, body, "body must be published unchanged");
    assert_eq!(message.routing_key.as_str(), "checkout.session.completed");
    let props = &message.properties;
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        "evt_1SampleCompletedPaid0001"
    );
    let decoded = shared::contract::EventMessage::from_delivery(
        message.routing_key.as_str(),
        props,
        message.data.clone(),
    )
    .unwrap();
    assert_eq!(decoded.endpoint, "booking");
    assert_eq!(decoded.attempt, 1);
    assert!((chrono::Utc::now() - decoded.received_at).num_seconds() < 30);
}

#[tokio::test]
async fn each_refused_request_gets_its_status_and_enqueues_nothing() {
    let app = spawn_app().await;
    let (_, body) = event("checkout.session.completed");
    let now = chrono::Utc::now().timestamp();
    let wrong_secret = shared::signature::WebhookSecret::parse("whsec_wrong", 1).unwrap();
    let not_json = b"this is not json".to_vec();
    let no_type = br#"{"id":"evt_1","object":"event"}"#.to_vec();

    // (case, endpoint, body, Stripe-Signature, expected status, expected error text)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, Option<String>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no header",
            "booking",
            body.clone(),
            None,
            400,
            "missing Stripe-Signature",
        ),
        (
            "garbage header",
            "booking",
            body.clone(),
            Some("garbage".into()),
            400,
            "malformed",
        ),
        (
            "spaces",
            "booking",
            body.clone(),
            Some(sign(&body).replace(",", ", ")),
            400,
            "malformed",
        ),
        (
            "non-hex",
            "booking",
            body.clone(),
            Some(format!("t={now},v1=zz")),
            400,
            "malformed",
        ),
        (
            "v0 only",
            "booking",
            body.clone(),
            Some(sign(&body).replace("v1=", "v0=")),
            401,
            "no v1",
        ),
        (
            "wrong secret",
            "booking",
            body.clone(),
            Some(wrong_secret.sign(now, &body)),
            401,
            "no v1 signature matches",
        ),
        (
            "tampered body",
            "booking",
            [&body[..], b" "].concat(),
            Some(sign(&body)),
            401,
            "no v1 signature matches",
        ),
        (
            "stale",
            "booking",
            body.clone(),
            Some(sign_at(&body, now - 301)),
            401,
            "old",
        ),
        (
            "future",
            "booking",
            body.clone(),
            Some(sign_at(&body, now + 301)),
            401,
            "future",
        ),
        (
            "not json",
            "booking",
            not_json.clone(),
            Some(sign(&not_json)),
            400,
            "not a JSON object",
        ),
        (
            "no type",
            "booking",
            no_type.clone(),
            Some(sign(&no_type)),
            400,
            "type",
        ),
        (
            "unknown endpoint",
            "nope",
            body.clone(),
            Some(sign(&body)),
            404,
            "unknown webhook endpoint `nope`",
        ),
        (
            "endpoint without secret",
            "payment",
            body.clone(),
            Some(sign(&body)),
            404,
            "unknown webhook endpoint",
        ),
    ];
    for (name, endpoint, body, signature, status, message) in cases {
        let response = app.post(endpoint, body, signature).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let error = error_of(response).await;
        assert!(error.contains(message), "{name}: {error}");
        assert!(!error.contains(SECRET), "{name}: secret in {error}");
    }
    assert!(
        app.queued().await.is_empty(),
        "a refused request reached the queue"
    );
}

#[tokio::test]
async fn wrong_method_and_path_get_json_errors() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/webhooks/stripe/booking", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert!(error_of(response).await.contains("POST"));

    let response = app
        .client
        .get(format!("{}/nowhere", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    error_of(response).await;
}

#[tokio::test]
async fn too_large_body_is_413() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--max-body-bytes=200".into()],
        ..Options::default()
    })
    .await;
    let (id, small) = event("a.b");
    assert!(small.len() < 200, "{id}");
    assert_eq!(app.post_signed(small).await.status(), 200);

    let big = format!(
        r#"{{"id":"evt_big","type":"a.b","pad":"{}"}}"#,
        "x".repeat(300)
    )
    .into_bytes();
    let response = app.post_signed(big.clone()).await;
    assert_eq!(response.status(), 413);
    assert!(error_of(response).await.contains("200 bytes"));

    // Without a Content-Length (chunked), the limit still holds.
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.clone())]);
    let response = app
        .client
        .post(format!("{}/webhooks/stripe/booking", app.base))
        .header("Stripe-Signature", sign(&big))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(app.queued().await.len(), 1);
}

#[tokio::test]
async fn only_refused_requests_count_against_the_rate_limit() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--rate-limit-per-minute=3".into()],
        ..Options::default()
    })
    .await;
    // Validly signed requests never count: Stripe is not throttled.
    for _ in 0..6 {
        let (_, body) = event("a.b");
        assert_eq!(app.post_signed(body).await.status(), 200);
    }
    // Refused ones do: a bad signature, a missing one, an endpoint that does not exist.
    let mut statuses = Vec::new();
    for attempt in 0..5 {
        let (_, body) = event("a.b");
        let response = match attempt {
            0 => app.post("booking", body, Some("t=1,v1=00".into())).await,
            1 => app.post("booking", body, None).await,
            2 => app.post("no-such-endpoint", body, None).await,
            _ => {
                let forged = WebhookSecret::parse("whsec_forged", 1)
                    .unwrap()
                    .sign(chrono::Utc::now().timestamp(), &body);
                app.post("booking", body, Some(forged)).await
            }
        };
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry_after), "{retry_after}");
            assert!(
                error_of(response)
                    .await
                    .contains("too many refused requests")
            );
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    assert_eq!(statuses, [400, 400, 404, 429, 429]);
    assert_eq!(app.queued().await.len(), 6);
    // Health probes are on the internal server, which has no limit.
    let response = app
        .client
        .get(format!("{}/healthz", app.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn probes_and_metrics_are_served_on_the_internal_listener_only() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let public = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(public.status(), 404, "{path} on the webhook listener");
        let internal = app
            .client
            .get(format!("{}{path}", app.internal))
            .send()
            .await
            .unwrap();
        assert_eq!(internal.status(), 200, "{path} on the internal listener");
    }
    let (_, body) = event("a.b");
    let webhook = app
        .client
        .post(format!("{}/webhooks/stripe/booking", app.internal))
        .header("Stripe-Signature", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status(), 404, "webhooks on the internal listener");
    assert!(app.queued().await.is_empty());
}

#[tokio::test]
async fn duplicate_deliveries_are_all_accepted_and_queued() {
    // Ingest does not deduplicate: that is the processor's job, and answering anything but
    // 200 would make Stripe retry forever.
    let app = spawn_app().await;
    let (_, body) = event("checkout.session.completed");
    for _ in 0..3 {
        assert_eq!(app.post_signed(body.clone()).await.status(), 200);
    }
    assert_eq!(app.queued().await.len(), 3);
}

#[tokio::test]
async fn metrics_count_requests_by_endpoint_and_status() {
    let app = spawn_app().await;
    let (_, body) = event("a.b");
    assert_eq!(app.post_signed(body.clone()).await.status(), 200);
    assert_eq!(app.post("booking", body, None).await.status(), 400);
    let (_, other) = event("a.b");
    assert_eq!(
        app.post("no-such-endpoint", other, None).await.status(),
        404
    );

    let text = app
        .client
        .get(format!("{}/metrics", app.internal))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Other tests in this process count too, so only presence is asserted.
    for line in [
        r#"ingest_requests_total{endpoint="booking",status="200"}"#,
        r#"ingest_requests_total{endpoint="booking",status="400"}"#,
        r#"ingest_requests_total{endpoint="unknown",status="404"}"#,
        r#"ingest_publish_confirm_seconds_bucket{outcome="ack""#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(
        !text.contains("no-such-endpoint"),
        "unknown endpoints must not become labels"
    );
}
