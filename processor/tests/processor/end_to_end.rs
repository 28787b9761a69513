//! Both halves together: a Stripe-signed POST to ingest ends as one purchase in PostgreSQL.

use clap::Parser;
use ingest::startup::Application;
use shared::signature::WebhookSecret;
use sqlx::PgPool;
use std::time::Duration;

use crate::helpers::*;

#[sqlx::test(migrations = "../migrations")]
async fn signed_post_becomes_a_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let _worker = start_worker(
        pool.clone(),
        settings(&prefix, vec![Duration::from_millis(200)], 3),
    )
    .await;

    let config = ingest::config::Config::try_parse_from([
        "ingest",
        "--addr=127.0.0.1:0",
        "--metrics-addr=127.0.0.1:0",
        &format!("--amqp-url={}", amqp_url()),
        &format!("--amqp-prefix={prefix}"),
        "--secret-booking=whsec_test_secret",
    ])
    .unwrap();
    let app = Application::build(&config).await.unwrap();
    let base = format!("http://{}", app.local_addr().unwrap());
    let internal = format!("http://{}", app.metrics_addr().unwrap());
    let server = tokio::spawn(app.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    wait_for("ingest to be ready", || async {
        client
            .get(format!("{internal}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let body = std::fs::read(format!("{FIXTURES}/events/checkout.session.completed.json")).unwrap();
    let secret = WebhookSecret::parse("whsec_test_secret", 1).unwrap();
    // Stripe delivers it twice, the second time signed afresh.
    for _ in 0..2 {
        let response = client
            .post(format!("{base}/webhooks/stripe/booking"))
            .header(
                "Stripe-Signature",
                secret.sign(chrono::Utc::now().timestamp(), &body),
            )
            .header("content-type", "application/json; charset=utf-8")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    wait_for("the event to be processed twice", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE attempts = 2 AND status = 'processed'",
        )
        .await
            == 1
    })
    .await;
    let rows: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT status, platform_fee_cents, creator_payout_cents FROM purchases")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, [("completed".to_owned(), 200, 1799)]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM content_access WHERE revoked_at IS NULL"
        )
        .await,
        1
    );
    server.abort();
}
