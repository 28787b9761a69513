//! Crashes of the real `processor` binary (a test hook aborts it, as `kill -9` would): a
//! message that kills it every time is dead-lettered by the broker after the delivery limit,
//! and a crash between the dead-letter publish and the ack loses nothing and doubles nothing.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;

const DELIVERY_LIMIT: u32 = 3;

fn run_processor(pool: &PgPool, prefix: &str, hook: Option<&str>) -> Child {
    let mut command = processor(pool, prefix);
    command
        .args(["run"])
        .env("PROCESSOR_DELIVERY_LIMIT", DELIVERY_LIMIT.to_string())
        .env("PROCESSOR_RETRY_DELAYS", "200ms")
        .env("PROCESSOR_SHUTDOWN_TIMEOUT", "5s")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(hook) = hook {
        command.env("PROCESSOR_TEST_HOOK", hook);
    }
    command.spawn().unwrap()
}

/// Waits for the child to exit on its own; kills it after `limit`. True if it exited.
async fn exited_within(child: &mut Child, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// SIGTERM, then the exit status.
async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("processor did not stop within 10 s of SIGTERM");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_message_that_kills_the_processor_is_dead_lettered_after_the_delivery_limit(
    pool: PgPool,
) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let mut settings = settings(&prefix, vec![Duration::from_millis(200)], 3);
    settings.delivery_limit = DELIVERY_LIMIT;
    let broker = open_broker(settings).await;
    broker
        .publish(&message(paid_session_body("evt_killer", "pi_killer", 1999)))
        .await;

    let mut crashes = 0;
    for _ in 0..10 {
        let mut child = run_processor(&pool, &prefix, Some("crash-on-event:evt_killer"));
        if exited_within(&mut child, Duration::from_secs(15)).await {
            crashes += 1;
        }
        if broker.depth(&broker.topology.dead_queue).await == 1 {
            break;
        }
    }
    assert_eq!(
        broker.depth(&broker.topology.dead_queue).await,
        1,
        "after {crashes} crashes"
    );
    assert!(
        crashes >= DELIVERY_LIMIT as usize,
        "dead-lettered after only {crashes} crashes"
    );
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 0);

    let stats = ops_json(&pool, &prefix, &["dlq", "stats", "--json"]).await;
    assert_eq!(stats["by_class"], json!({"crash": 1}), "{stats}");
    let (_, listed) = ops(&pool, &prefix, &["dlq", "list"]).await;
    assert!(
        listed.contains("evt_killer") && listed.contains("without being settled"),
        "{listed}"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_crash_between_dead_letter_and_ack_loses_nothing_and_doubles_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let mut settings = settings(&prefix, vec![Duration::from_millis(200)], 3);
    settings.delivery_limit = DELIVERY_LIMIT;
    let broker = open_broker(settings).await;
    let body = edit(&paid_session_body("evt_dl", "pi_dl", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = Uuid::new_v4().to_string().into();
    });
    broker.publish(&message(body)).await;

    // It dead-letters the event, then dies before acking the original.
    let mut child = run_processor(&pool, &prefix, Some("crash-after-dead-letter"));
    assert!(
        exited_within(&mut child, Duration::from_secs(20)).await,
        "the hook did not fire"
    );
    assert_eq!(broker.depth(&broker.topology.dead_queue).await, 1);
    assert_eq!(event_status(&pool, "evt_dl").await.unwrap().0, "dead");

    // A healthy processor gets the original again and recognises it as a leftover.
    let mut child = run_processor(&pool, &prefix, None);
    wait_for("the leftover to be settled", || async {
        broker.depth(&broker.topology.work_queue).await == 0
            && count(
                &pool,
                "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_dl'",
            )
            .await
                >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = terminate(&mut child).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");

    assert_eq!(
        broker.depth(&broker.topology.work_queue).await,
        0,
        "nothing left unsettled"
    );
    assert_eq!(
        broker.depth(&broker.topology.dead_queue).await,
        1,
        "exactly one dead letter"
    );
    let dead = broker.take_dead().await;
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "evt_dl"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_binary_serves_probes_and_metrics_and_stops_on_sigterm(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_millis(200)], 3)).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = processor(&pool, &prefix);
    command
        .args(["run"])
        .env("PROCESSOR_DELIVERY_LIMIT", "5")
        .env("PROCESSOR_RETRY_DELAYS", "200ms")
        .env("PROCESSOR_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for("/readyz", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    broker
        .publish(&message(paid_session_body("evt_m", "pi_m", 1999)))
        .await;
    wait_for("the purchase", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == 1
    })
    .await;
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"processor_messages_total{outcome="processed"} 1"#),
        "{text}"
    );
    assert!(text.contains("processor_handle_seconds_bucket"), "{text}");

    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
    assert_eq!(broker.depth(&broker.topology.work_queue).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn no_secret_reaches_the_processor_logs(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![Duration::from_millis(200)], 3)).await;
    // Trust authentication ignores the password, so it can be anything here.
    let password = "db-password-never-logged";
    let url = database_url(&pool).replace("postgres@", &format!("postgres:{password}@"));
    let mut command = processor(&pool, &prefix);
    command
        .args(["run"])
        .env("DATABASE_URL", &url)
        .env("PROCESSOR_DELIVERY_LIMIT", "5")
        .env("PROCESSOR_RETRY_DELAYS", "200ms")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    // Read as it comes: a full pipe would stall the processor's logging, and with it the work.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut text).map(|_| text)
    });
    broker
        .publish(&message(paid_session_body("evt_log1", "pi_log1", 1999)))
        .await;
    let poison = edit(&paid_session_body("evt_log2", "pi_log2", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = Uuid::new_v4().to_string().into();
    });
    broker.publish(&message(poison)).await;
    wait_for("both events", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status IN ('processed', 'dead')",
        )
        .await
            == 2
    })
    .await;
    terminate(&mut child).await;
    let stderr = reader.join().unwrap().unwrap();
    assert!(
        stderr.contains("postgres:***@"),
        "the effective configuration is logged, masked"
    );
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
        assert!(!line.contains(password), "database password in: {line}");
        assert!(!line.contains(":guest@"), "broker password in: {line}");
    }
}

/// With the default limits, a processor in a crash loop (killed six times in a row while
/// hundreds of messages wait, and one event that kills it whenever it is handled) dead-letters
/// that one event as `crash`, and no healthy one.
#[sqlx::test(migrations = "../migrations")]
async fn a_crash_loop_dead_letters_the_killer_and_no_healthy_event(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let mut settings = settings(&prefix, vec![Duration::from_millis(200)], 3);
    settings.delivery_limit = 50; // the binary's default
    let broker = open_broker(settings).await;
    let healthy = 600;
    for n in 0..healthy {
        if n == 100 {
            broker
                .publish(&message(paid_session_body(
                    "evt_killer2",
                    "pi_killer2",
                    1999,
                )))
                .await;
        }
        let body = paid_session_body(&format!("evt_h{n}"), &format!("pi_h{n}"), 1999);
        broker.publish(&message(body)).await;
    }
    let spawn = || {
        let mut command = processor(&pool, &prefix);
        command
            .args(["run"])
            .env_remove("PROCESSOR_DELIVERY_LIMIT") // the default
            .env("PROCESSOR_RETRY_DELAYS", "200ms")
            .env("PROCESSOR_TEST_HOOK", "crash-on-event:evt_killer2")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command.spawn().unwrap()
    };
    let settled = || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status IN ('processed', 'dead')",
        )
        .await
    };

    // SIGKILL six times in a row, each time as soon as the processor has made progress (or
    // has died on its own on the killer event).
    for _ in 0..6 {
        let before = settled().await;
        let mut child = spawn();
        // Not `wait_for`: the check needs the child mutably.
        for _ in 0..1200 {
            if matches!(child.try_wait(), Ok(Some(_))) || settled().await > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // The event log, not the queue depth: right after a SIGKILL the broker may still be
    // returning the dead consumer's unacked messages to the queue.
    let settled_by_then = settled().await;
    assert!(
        healthy + 1 - settled_by_then >= 300,
        "the kills came while hundreds of messages waited ({settled_by_then} settled)"
    );

    // Then it keeps crashing on the killer only, until that one is dead-lettered.
    for _ in 0..10 {
        if broker.depth(&broker.topology.dead_queue).await == 1 {
            break;
        }
        let mut child = spawn();
        if !exited_within(&mut child, Duration::from_secs(60)).await {
            // It did not crash again: the killer is dead-lettered and the rest done.
            break;
        }
    }
    let mut child = spawn();
    wait_for("every event settled", || async {
        settled().await == healthy + 1
    })
    .await;
    terminate(&mut child).await;

    let dead = broker.take_dead().await;
    let ids: Vec<String> = dead
        .iter()
        .map(|d| processor::dlq::DeadLetter::from_delivery(&d.delivery))
        .map(|letter| format!("{} {}", letter.event_id, letter.class))
        .collect();
    assert_eq!(
        ids,
        ["evt_killer2 crash"],
        "only the killer is dead-lettered"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'"
        )
        .await,
        healthy
    );
    let crashes: i32 =
        sqlx::query_scalar("SELECT attempts FROM stripe_events WHERE id = 'evt_killer2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(crashes >= 1, "its failure is in the event log");
}
