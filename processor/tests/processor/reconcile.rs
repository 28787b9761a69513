//! `processor reconcile` (the binary) against the local fake of Stripe's Events API
//! ([`crate::stripe_api_fake`]), a real RabbitMQ and a real PostgreSQL: only the events
//! the pipeline never saw are published, once, and become one purchase each.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use shared::contract::{EventSource, HEADER_ENDPOINT, header_str};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;
use crate::stripe_api_fake::{Failure, FakeStripe, StoredEvent};

const KEY: &str = "sk_test_reconcile_fake_key_4242";

/// A paid checkout session made from the fixture's text (not re-serialized: the fixture's
/// own key order and whitespace, so byte-for-byte publishing can be checked), with its own
/// event id, payment, content and creation time.
fn paid_event(tag: &str, n: usize, created: i64, livemode: bool) -> (Vec<u8>, Uuid) {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/events/checkout.session.completed.json"))
            .unwrap();
    let content = Uuid::new_v4();
    let mut text = text
        .replace(
            "evt_1SampleCompletedPaid0001",
            &format!("evt_rec{tag}{n:04}"),
        )
        .replace(
            "\"created\": 1764000000,",
            &format!("\"created\": {created},"),
        )
        .replace(
            "cs_test_a1SampleSessionB2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9",
            &format!("cs_rec{tag}{n:04}"),
        )
        .replace("pi_3SampleA1b2C3d4E5f6G7h8", &format!("pi_rec{tag}{n:04}"))
        .replace("5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8", &content.to_string());
    if livemode {
        text = text.replace(
            "\"livemode\": false,\n  \"pending_webhooks\"",
            "\"livemode\": true,\n  \"pending_webhooks\"",
        );
        assert!(text.contains("\"livemode\": true"));
    }
    (text.into_bytes(), content)
}

/// `count` paid events, newest `now - 1h`, ten seconds apart; `delivered(n)` says which
/// ones a webhook delivered. Their contents are inserted.
async fn events(
    pool: &PgPool,
    tag: &str,
    count: usize,
    delivered: impl Fn(usize) -> bool,
) -> Vec<(StoredEvent, Vec<u8>)> {
    let newest = Utc::now().timestamp() - 3600;
    let mut out = Vec::new();
    for n in 0..count {
        let (body, content) = paid_event(tag, n, newest - 10 * n as i64, false);
        insert_content(pool, content).await;
        out.push((StoredEvent::new(&body, delivered(n)), body));
    }
    out
}

struct Run {
    code: i32,
    summary: Value,
    stderr: String,
}

/// Runs `processor reconcile --json …` against the fake; returns exit code, the summary of
/// its (last) round and stderr.
async fn reconcile(
    pool: &PgPool,
    prefix: &str,
    fake: &FakeStripe,
    key: &str,
    args: &[&str],
) -> Run {
    let mut command = processor(pool, prefix);
    command
        .env("STRIPE_API_KEY", key)
        .env("STRIPE_API_BASE", &fake.base)
        .env_remove("STRIPE_API_RATE")
        .env_remove("STRIPE_LIVEMODE")
        .env_remove("STRIPE_LIVEMODE_BOOKING")
        .arg("reconcile")
        .arg("--json")
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let summary = stdout
        .lines()
        .last()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}")))
        .unwrap_or(Value::Null);
    Run {
        code: output.status.code().unwrap_or(-1),
        summary,
        stderr,
    }
}

/// A queue of the test's own that gets a copy of everything published to the exchange;
/// exclusive, so the broker removes it with the test's connection.
async fn capture(worker: &TestWorker) -> String {
    let queue = worker
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = queue.name().to_string();
    worker
        .channel
        .queue_bind(
            name.as_str().into(),
            worker.topology.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    name
}

fn count_of(summary: &Value, field: &str) -> i64 {
    summary[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no {field} in {summary}"))
}

#[sqlx::test(migrations = "../migrations")]
async fn publishes_exactly_the_events_webhooks_never_delivered_once(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(
        pool.clone(),
        settings(&prefix, vec![Duration::from_millis(200)], 3),
    )
    .await;
    // 40 of 250 never came by webhook; the other 210 did, and were processed.
    let events = events(&pool, "a", 250, |n| n % 25 >= 4).await;
    for (event, body) in &events {
        if event.delivered {
            worker.publish(&message(body.clone())).await;
        }
    }
    wait_for("the 210 webhooks to be processed", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'",
        )
        .await
            == 210
    })
    .await;
    let copies = capture(&worker).await;
    let fake = FakeStripe::start(KEY, events.iter().map(|(e, _)| e.clone()).collect()).await;

    let run = reconcile(&pool, &prefix, &fake, KEY, &["--since", "2d"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = &run.summary;
    assert_eq!(
        [
            count_of(s, "pages"),
            count_of(s, "listed"),
            count_of(s, "already_known"),
            count_of(s, "missing"),
            count_of(s, "published"),
        ],
        [3, 250, 210, 40, 40],
        "{s}"
    );
    assert_eq!(s["skipped"], serde_json::json!({}));
    assert!(s["error"].is_null());

    wait_for("all 250 to be processed", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'",
        )
        .await
            == 250
    })
    .await;
    // Each exactly once: one delivery per event, one purchase per payment.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE attempts = 1"
        )
        .await,
        250
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM purchases WHERE status = 'completed'"
        )
        .await,
        250
    );

    // What was published: the 40 missing events, as the API returned them, marked `api`.
    let bodies: HashMap<&str, &str> = events
        .iter()
        .map(|(e, _)| (e.id.as_str(), e.json.as_str()))
        .collect();
    let published = worker.take(&copies).await;
    assert_eq!(published.len(), 40);
    for m in &published {
        let id = m.properties.message_id().as_ref().unwrap().to_string();
        let headers = m.properties.headers().clone().unwrap();
        assert!(
            !events.iter().any(|(e, _)| e.id == id && e.delivered),
            "{id} was delivered"
        );
        assert_eq!(EventSource::of(&headers), EventSource::Api);
        assert_eq!(
            header_str(&headers, HEADER_ENDPOINT).as_deref(),
            Some("booking")
        );
        assert_eq!(m.routing_key.as_str(), "checkout.session.completed");
        assert_eq!(m.properties.delivery_mode(), &Some(2));
        assert_eq!(
            std::str::from_utf8(&m.data).unwrap(),
            bodies[id.as_str()],
            "{id}"
        );
    }

    // Every page repeated the window and the page size; pages 2 and 3 continued from the
    // last event of the page before.
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let window = |r: &crate::stripe_api_fake::Recorded| {
        (
            r.param("created[gte]").map(str::to_owned),
            r.param("created[lte]").map(str::to_owned),
            r.param("limit").map(str::to_owned),
        )
    };
    assert!(requests.iter().all(|r| window(r) == window(&requests[0])));
    assert_eq!(requests[0].param("limit"), Some("100"));
    assert!(requests[0].param("starting_after").is_none());
    let mut newest_first: Vec<&StoredEvent> = events.iter().map(|(e, _)| e).collect();
    newest_first.sort_by_key(|e| std::cmp::Reverse(e.created));
    assert_eq!(
        requests[1].param("starting_after"),
        Some(newest_first[99].id.as_str())
    );
    assert_eq!(
        requests[2].param("starting_after"),
        Some(newest_first[199].id.as_str())
    );

    // Run twice: nothing is published the second time.
    let again = reconcile(&pool, &prefix, &fake, KEY, &["--since", "2d"]).await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(count_of(&again.summary, "already_known"), 250);
    assert_eq!(count_of(&again.summary, "published"), 0);
    assert_eq!(worker.depth(&copies).await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 250);
}

#[sqlx::test(migrations = "../migrations")]
async fn rides_out_a_429_and_a_500_in_the_middle(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_secs(5)], 3)).await;
    let events = events(&pool, "b", 250, |_| false).await;
    let fake = FakeStripe::start(KEY, events.into_iter().map(|(e, _)| e).collect()).await;
    // Page 2 is refused once with 429 (Retry-After: 1), then fails once with a 500.
    fake.fail_request(
        1,
        Failure::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    fake.fail_request(2, Failure::ServerError);

    let run = reconcile(&pool, &prefix, &fake, KEY, &["--since", "1d"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(count_of(&run.summary, "published"), 250, "{}", run.summary);
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 250);

    let requests = fake.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 429, 500, 200, 200]);
    // The retries asked for the same page, and waited out Retry-After.
    assert_eq!(requests[1].query, requests[2].query);
    assert_eq!(requests[2].query, requests[3].query);
    assert!(requests[2].at - requests[1].at >= Duration::from_secs(1));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_refused_key_is_a_clear_error_and_publishes_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_secs(5)], 3)).await;
    let events = events(&pool, "c", 5, |_| false).await;
    let fake = FakeStripe::start(KEY, events.into_iter().map(|(e, _)| e).collect()).await;

    let wrong = "sk_test_wrong_key_that_must_not_be_printed";
    let run = reconcile(&pool, &prefix, &fake, wrong, &["--since", "1d"]).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("STRIPE_API_KEY"), "{}", run.stderr);
    assert!(run.stderr.contains("HTTP 401"), "{}", run.stderr);
    let everything = format!("{}{}", run.stderr, run.summary);
    assert!(!everything.contains(wrong), "{everything}");
    assert_eq!(count_of(&run.summary, "published"), 0);
    assert!(
        run.summary["error"]
            .as_str()
            .unwrap()
            .contains("STRIPE_API_KEY")
    );
    // Not retried: a wrong key stays wrong.
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn dry_run_counts_and_publishes_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_secs(5)], 3)).await;
    let events = events(&pool, "d", 50, |n| n < 10).await;
    // The ten delivered ones are known, whatever became of them.
    for (i, (event, body)) in events.iter().take(10).enumerate() {
        let status = ["processed", "dead", "failed", "ignored", "purged"][i % 5];
        sqlx::query(
            "INSERT INTO stripe_events (id, type, endpoint, payload, status) VALUES ($1, $2, 'booking', $3::jsonb, $4)",
        )
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(std::str::from_utf8(body).unwrap())
        .bind(status)
        .execute(&pool)
        .await
        .unwrap();
    }
    let fake = FakeStripe::start(KEY, events.into_iter().map(|(e, _)| e).collect()).await;
    // Three live-mode events, which a test-mode endpoint does not take.
    for n in 0..3 {
        let (body, content) = paid_event("dl", n, Utc::now().timestamp() - 60, true);
        insert_content(&pool, content).await;
        fake.add(StoredEvent::new(&body, false));
    }

    let run = reconcile(&pool, &prefix, &fake, KEY, &["--since", "1d", "--dry-run"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = &run.summary;
    assert_eq!(s["dry_run"], true);
    assert_eq!(
        [
            count_of(s, "listed"),
            count_of(s, "already_known"),
            count_of(s, "missing"),
            count_of(s, "published"),
        ],
        [53, 10, 40, 0],
        "{s}"
    );
    assert_eq!(s["skipped"], serde_json::json!({ "other_mode": 3 }));
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM stripe_events").await, 10);

    // The filters reach Stripe: --type and --only-undelivered.
    let run = reconcile(
        &pool,
        &prefix,
        &fake,
        KEY,
        &[
            "--since",
            "1d",
            "--dry-run",
            "--only-undelivered",
            "--type",
            "checkout.session.completed",
            "--type",
            "charge.refunded",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(count_of(&run.summary, "listed"), 43);
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.param("delivery_success"), Some("false"));
    let types: Vec<&str> = last
        .query
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(types, ["checkout.session.completed", "charge.refunded"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_window_beyond_thirty_days_is_refused(pool: PgPool) {
    let prefix = test_prefix();
    let fake = FakeStripe::start(KEY, Vec::new()).await;
    let from = (Utc::now() - chrono::TimeDelta::days(40)).to_rfc3339();
    for args in [vec!["--since", "31d"], vec!["--from", from.as_str()]] {
        let run = reconcile(&pool, &prefix, &fake, KEY, &args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("Stripe keeps events for 30 days"),
            "{}",
            run.stderr
        );
    }
    let run = reconcile(&pool, &prefix, &fake, KEY, &[]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--since"), "{}", run.stderr);
    assert!(fake.requests().is_empty());
}

#[sqlx::test(migrations = "../migrations")]
async fn webhooks_arriving_during_a_reconcile_still_make_one_purchase_each(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(
        pool.clone(),
        settings(&prefix, vec![Duration::from_millis(200)], 3),
    )
    .await;
    let events = events(&pool, "e", 100, |_| false).await;
    let fake = FakeStripe::start(KEY, events.iter().map(|(e, _)| e.clone()).collect()).await;
    // Ten pages at five requests a second: two seconds during which webhooks come in.
    fake.set_max_page(10);

    let webhooks = {
        let worker_channel = worker.channel.clone();
        let exchange = worker.topology.exchange.clone();
        let bodies: Vec<Vec<u8>> = events.iter().map(|(_, b)| b.clone()).collect();
        tokio::spawn(async move {
            // Oldest first (the order Stripe would deliver them), in bursts while the
            // reconcile pages from newest to oldest: they cross in the middle.
            for chunk in bodies.rchunks(10) {
                for body in chunk.iter().rev() {
                    let m = message(body.clone());
                    shared::broker::publish_confirmed(
                        &worker_channel,
                        &exchange,
                        &m.event_type,
                        &m.body,
                        m.properties().unwrap(),
                    )
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut command_args = vec!["--since", "1d"];
    command_args.extend(["--stripe-api-rate", "5"]);
    let run = reconcile(&pool, &prefix, &fake, KEY, &command_args).await;
    webhooks.await.unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(count_of(&run.summary, "listed"), 100);

    wait_for(
        "every event to be processed and the queue drained",
        || async {
            count(
                &pool,
                "SELECT count(*) FROM stripe_events WHERE status = 'processed'",
            )
            .await
                == 100
                && worker.depth(&worker.topology.work_queue).await == 0
        },
    )
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 100);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM (SELECT stripe_payment_intent_id FROM purchases
                GROUP BY 1 HAVING count(*) > 1) twice"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM content_access WHERE revoked_at IS NULL"
        )
        .await,
        100
    );

    // Paced: no six requests within one second (five a second, no burst above it). The
    // fake stamps arrivals, which can jitter by a little against the client's spacing.
    let times: Vec<_> = fake.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 10);
    for w in times.windows(6) {
        assert!(
            w[5] - w[0] >= Duration::from_millis(980),
            "six requests in {:?}",
            w[5] - w[0]
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn every_keeps_reconciling_until_sigterm(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let _broker = open_broker(settings(&prefix, vec![Duration::from_secs(5)], 3)).await;
    let events = events(&pool, "f", 3, |_| false).await;
    let fake = FakeStripe::start(KEY, events.into_iter().map(|(e, _)| e).collect()).await;

    let std_command = {
        let mut c = processor(&pool, &prefix);
        c.env("STRIPE_API_KEY", KEY)
            .env("STRIPE_API_BASE", &fake.base)
            .args(["reconcile", "--json", "--since", "1d", "--every", "1h"]);
        c
    };
    let mut child = tokio::process::Command::from(std_command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a summary within 20 s")
        .unwrap()
        .unwrap();
    let summary: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(count_of(&summary, "published"), 3);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exit within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Not a check: serves the fake (250 events, 40 never delivered, a 429 on the second
/// request) next to a test database and a running worker, for a run of the real binary by
/// hand, as in docs/RECONCILE.md. Prints the environment to use, then waits until
/// `$RECONCILE_DOCS_DONE` (default /tmp/reconcile-docs-done) exists, ten minutes at most:
/// `cargo test -p processor --test processor serve_fake_for_docs -- --ignored --nocapture`
#[ignore]
#[sqlx::test(migrations = "../migrations")]
async fn serve_fake_for_docs(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(
        pool.clone(),
        settings(&prefix, vec![Duration::from_millis(200)], 3),
    )
    .await;
    let events = events(&pool, "docs", 250, |n| n % 25 >= 4).await;
    for (event, body) in &events {
        if event.delivered {
            worker.publish(&message(body.clone())).await;
        }
    }
    wait_for("the 210 webhooks to be processed", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'",
        )
        .await
            == 210
    })
    .await;
    let fake = FakeStripe::start(KEY, events.into_iter().map(|(e, _)| e).collect()).await;
    fake.fail_request(
        1,
        Failure::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    println!(
        "export DATABASE_URL={} AMQP_PREFIX={prefix} STRIPE_API_BASE={} STRIPE_API_KEY={KEY}",
        database_url(&pool),
        fake.base
    );
    let done =
        std::env::var("RECONCILE_DOCS_DONE").unwrap_or_else(|_| "/tmp/reconcile-docs-done".into());
    for _ in 0..1200 {
        if std::path::Path::new(&done).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "purchases: {}",
        count(&pool, "SELECT count(*) FROM purchases").await
    );
}
