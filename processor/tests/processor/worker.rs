//! The worker with a real broker: acks after commit, retries through delay queues,
//! dead-letters with the reason, survives a database outage, shuts down cleanly.

use shared::contract::{FailureInfo, HEADER_ATTEMPT, header_i64};
use sqlx::PgPool;
use std::time::Duration;

use uuid::Uuid;

use crate::helpers::*;

#[sqlx::test(migrations = "../migrations")]
async fn paid_event_through_the_broker_becomes_a_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let worker = start_worker(pool.clone(), settings(&test_prefix(), vec![ms(200)], 2)).await;
    let msg = message(paid_session_body("evt_w1", "pi_w1", 1999));
    // Delivered twice, as Stripe may.
    worker.publish(&msg).await;
    worker.publish(&msg).await;
    wait_for("the purchase", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed' AND attempts = 2",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 1);
    assert_eq!(worker.depth(&worker.topology.work_queue).await, 0);
    assert!(worker.take_dead().await.is_empty());
}

#[sqlx::test(migrations = "../migrations")]
async fn permanent_failure_is_dead_lettered_at_once_with_the_reason(pool: PgPool) {
    seed_catalog(&pool).await;
    let worker = start_worker(pool.clone(), settings(&test_prefix(), vec![ms(100)], 5)).await;
    let missing = Uuid::new_v4();
    let body = edit(&paid_session_body("evt_perm", "pi_perm", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = missing.to_string().into();
    });
    worker.publish(&message(body.clone())).await;

    wait_for("the dead letter", || async {
        worker.depth(&worker.topology.dead_queue).await == 1
    })
    .await;
    let dead = worker.take_dead().await;
    assert_eq!(dead.len(), 1);
    let delivery = &dead[0].delivery;
    assert_eq!(delivery.data, body, "the raw body is kept");
    let headers = delivery.properties.headers().clone().unwrap();
    let failure = FailureInfo::read(&headers).unwrap();
    assert_eq!(failure.class, "permanent");
    assert!(
        failure
            .last_error
            .contains(&format!("unknown content {missing}")),
        "{}",
        failure.last_error
    );
    assert_eq!(failure.original_routing_key, "checkout.session.completed");
    assert_eq!(
        header_i64(&headers, HEADER_ATTEMPT),
        Some(1),
        "no retries for a permanent failure"
    );

    let (status, error) = event_status(&pool, "evt_perm").await.unwrap();
    assert_eq!(status, "dead");
    assert!(error.unwrap().contains("unknown content"));
    assert_eq!(worker.depth(&worker.topology.work_queue).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn transient_failure_retries_until_the_database_is_back(pool: PgPool) {
    seed_catalog(&pool).await;
    let proxy = CuttableProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let options = (*pool.connect_options()).clone().port(proxy.port);
    let proxied = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ms(500))
        .connect_lazy_with(options);
    let delays = vec![ms(300), ms(600)];
    let worker = start_worker(proxied, settings(&test_prefix(), delays.clone(), 50)).await;

    proxy.cut();
    worker
        .publish(&message(paid_session_body("evt_t1", "pi_t1", 1999)))
        .await;
    // It fails, goes to a delay queue, comes back, fails again... (long enough for a few
    // rounds; the worker cannot even record the failure, the database being down).
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);
    assert!(
        worker.take_dead().await.is_empty(),
        "a transient failure must not be dead-lettered early"
    );

    // Meanwhile the database comes back; other events flow and the retried one completes.
    proxy.restore();
    let other = Uuid::new_v4();
    insert_content(&pool, other).await;
    let second = edit(&paid_session_body("evt_t2", "pi_t2", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = other.to_string().into();
    });
    worker.publish(&message(second)).await;
    wait_for("both purchases", || async {
        count(
            &pool,
            "SELECT count(*) FROM purchases WHERE status = 'completed'",
        )
        .await
            == 2
    })
    .await;
    let (status, error) = event_status(&pool, "evt_t1").await.unwrap();
    assert_eq!((status.as_str(), error), ("processed", None));
    assert!(worker.take_dead().await.is_empty());
}

#[sqlx::test(migrations = "../migrations")]
async fn exhausted_retries_are_dead_lettered_with_the_attempt_count(pool: PgPool) {
    let proxy = CuttableProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    proxy.cut();
    let options = (*pool.connect_options()).clone().port(proxy.port);
    let down = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(ms(200))
        .connect_lazy_with(options);
    let worker = start_worker(down, settings(&test_prefix(), vec![ms(100), ms(200)], 3)).await;
    worker
        .publish(&message(paid_session_body("evt_x", "pi_x", 1999)))
        .await;

    wait_for("the dead letter", || async {
        worker.depth(&worker.topology.dead_queue).await == 1
    })
    .await;
    let dead = worker.take_dead().await;
    let headers = dead[0].delivery.properties.headers().clone().unwrap();
    let failure = FailureInfo::read(&headers).unwrap();
    assert_eq!(failure.class, "transient");
    assert!(
        failure
            .last_error
            .contains("retries exhausted after 3 attempts"),
        "{}",
        failure.last_error
    );
    assert_eq!(header_i64(&headers, HEADER_ATTEMPT), Some(3));
    assert!(
        failure.first_failure_at < failure.last_failure_at,
        "first failure time is kept across retries"
    );
    for delay in &worker.settings.retry_delays {
        assert_eq!(worker.depth(&worker.topology.retry_queue(*delay)).await, 0);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn shutdown_loses_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let contents: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for c in &contents {
        insert_content(&pool, *c).await;
    }
    let prefix = test_prefix();
    let mut worker = start_worker(pool.clone(), settings(&prefix, vec![ms(200)], 3)).await;
    for (i, c) in contents.iter().enumerate() {
        let body = edit(
            &paid_session_body(&format!("evt_s{i}"), &format!("pi_s{i}"), 1999),
            |e| {
                e["data"]["object"]["metadata"]["contentId"] = c.to_string().into();
            },
        );
        worker.publish(&message(body)).await;
    }
    tokio::time::sleep(ms(30)).await;
    worker.stop().await;
    // Whatever was not finished is back in the work queue, unacked work returned.
    // (The broker returns the unacked ones asynchronously after the channel closes.)
    wait_for("done + waiting to account for all 40", || async {
        let done = count(&pool, "SELECT count(*) FROM purchases").await;
        let waiting = i64::from(worker.depth(&worker.topology.work_queue).await);
        done + waiting == 40
    })
    .await;

    // A new worker finishes the rest.
    let _again = start_worker(pool.clone(), settings(&prefix, vec![ms(200)], 3)).await;
    wait_for("all purchases", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == 40
    })
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_panicking_handler_is_dead_lettered_at_the_delivery_limit(pool: PgPool) {
    seed_catalog(&pool).await;
    let mut settings = settings(&test_prefix(), vec![ms(200)], 3);
    settings.delivery_limit = 3;
    settings.test_hook = Some(processor::worker::TestHook::PanicOnEvent(
        "evt_panic".into(),
    ));
    let worker = start_worker(pool.clone(), settings).await;
    worker
        .publish(&message(paid_session_body("evt_panic", "pi_panic", 1999)))
        .await;
    // Other events keep flowing meanwhile.
    let other = Uuid::new_v4();
    insert_content(&pool, other).await;
    let fine = edit(&paid_session_body("evt_fine", "pi_fine", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = other.to_string().into();
    });
    worker.publish(&message(fine)).await;

    wait_for("the dead letter", || async {
        worker.depth(&worker.topology.dead_queue).await == 1
    })
    .await;
    let dead = worker.take_dead().await;
    let letter = processor::dlq::DeadLetter::from_delivery(&dead[0].delivery);
    assert_eq!(letter.event_id, "evt_panic");
    assert_eq!(letter.class, "crash", "{letter:?}");
    assert_eq!(worker.depth(&worker.topology.work_queue).await, 0);
    wait_for("the other purchase", || async {
        count(
            &pool,
            "SELECT count(*) FROM purchases WHERE stripe_payment_intent_id = 'pi_fine'",
        )
        .await
            == 1
    })
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_batch_commits_together_and_bad_events_fail_alone(pool: PgPool) {
    seed_catalog(&pool).await;
    let mut settings = settings(&test_prefix(), vec![ms(200)], 3);
    // One consumer batch of up to 32, waiting long enough to fill it.
    settings.concurrency = 1;
    settings.batch = processor::worker::BatchLimits {
        size: 32,
        wait: ms(300),
        partial: 1,
    };
    let worker = start_worker(pool.clone(), settings).await;
    let mut good = 0;
    for i in 0..24 {
        let content = if i % 4 == 3 {
            Uuid::new_v4() // not in the catalog: a permanent failure
        } else {
            let c = Uuid::new_v4();
            insert_content(&pool, c).await;
            good += 1;
            c
        };
        let body = edit(
            &paid_session_body(&format!("evt_b{i}"), &format!("pi_b{i}"), 1999),
            |e| {
                e["data"]["object"]["metadata"]["contentId"] = content.to_string().into();
            },
        );
        let msg = message(body);
        worker.publish(&msg).await;
        if i == 5 {
            worker.publish(&msg).await; // a duplicate inside the batch
        }
    }
    wait_for("six dead letters", || async {
        worker.depth(&worker.topology.dead_queue).await == 6
    })
    .await;
    wait_for("the good purchases", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == good
    })
    .await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'"
        )
        .await,
        good
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'dead'"
        )
        .await,
        6
    );
    assert_eq!(
        count(
            &pool,
            "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_b5'"
        )
        .await,
        2
    );
    assert_eq!(worker.depth(&worker.topology.work_queue).await, 0);
    for delay in &worker.settings.retry_delays {
        assert_eq!(
            worker.depth(&worker.topology.retry_queue(*delay)).await,
            0,
            "nothing was retried"
        );
    }
}

/// The delay forwarder: a retry waits in its delay queue until its due time, not less,
/// whatever happens to the processor in between; one already due goes on at once.
#[sqlx::test(migrations = "../migrations")]
async fn a_retry_waits_for_its_due_time_even_across_a_restart(pool: PgPool) {
    use shared::contract::{HEADER_RETRY_DUE_AT, with_headers};

    seed_catalog(&pool).await;
    let settings = settings(&test_prefix(), vec![ms(2500)], 5);
    let delay_queue = settings.topology.retry_queue(ms(2500));
    // Published while no processor runs, as after an outage.
    let broker = open_broker(settings.clone()).await;
    let due_at = chrono::Utc::now() + chrono::Duration::milliseconds(2500);
    // In due order, as a tier always is: every message of a tier waits the same delay.
    for (id, due) in [
        (
            "evt_overdue",
            chrono::Utc::now() - chrono::Duration::minutes(5),
        ),
        ("evt_later", due_at),
    ] {
        let msg = message(paid_session_body(id, &format!("pi_{id}"), 1999));
        let properties = with_headers(&msg.properties().unwrap(), |headers| {
            headers.insert(
                HEADER_ATTEMPT.into(),
                lapin::types::AMQPValue::LongLongInt(2),
            );
            headers.insert(
                HEADER_RETRY_DUE_AT.into(),
                lapin::types::AMQPValue::LongLongInt(due.timestamp_millis()),
            );
        });
        shared::broker::publish_confirmed(&broker.channel, "", &delay_queue, &msg.body, properties)
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    let mut first = start_worker(pool.clone(), settings.clone()).await;

    wait_for("the overdue retry", || async {
        event_status(&pool, "evt_overdue").await.map(|s| s.0) == Some("processed".into())
    })
    .await;
    assert!(
        started.elapsed() < ms(2000),
        "an overdue retry goes on at once"
    );
    assert_eq!(event_status(&pool, "evt_later").await, None, "not due yet");
    first.stop().await;
    assert_eq!(
        first.depth(&delay_queue).await,
        1,
        "it waits in its delay queue"
    );

    let second = start_worker(pool.clone(), settings).await;
    wait_for("the due retry", || async {
        event_status(&pool, "evt_later").await.map(|s| s.0) == Some("processed".into())
    })
    .await;
    let handled_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT processed_at FROM stripe_events WHERE id = 'evt_later'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        handled_at >= due_at,
        "handled at {handled_at}, due at {due_at}"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 2);
    assert_eq!(second.depth(&delay_queue).await, 0);
    assert_eq!(second.depth(&second.topology.work_queue).await, 0);
    drop((first, broker));
}

/// The event log counts failed deliveries too (their own claim was rolled back with the rest).
#[sqlx::test(migrations = "../migrations")]
async fn failed_deliveries_are_counted_in_the_event_log(pool: PgPool) {
    seed_catalog(&pool).await;
    let worker = start_worker(pool.clone(), settings(&test_prefix(), vec![ms(100)], 5)).await;
    let body = edit(&paid_session_body("evt_twice", "pi_twice", 1999), |e| {
        e["data"]["object"]["metadata"]["contentId"] = Uuid::new_v4().to_string().into();
    });
    // Delivered twice, as Stripe may; each copy fails for good.
    worker.publish(&message(body.clone())).await;
    worker.publish(&message(body)).await;
    wait_for("both dead letters", || async {
        worker.depth(&worker.topology.dead_queue).await == 2
    })
    .await;
    wait_for("both attempts in the log", || async {
        count(
            &pool,
            "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_twice' AND status = 'dead'",
        )
        .await
            == 2
    })
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_schedule_may_repeat_a_delay(pool: PgPool) {
    seed_catalog(&pool).await;
    // 150ms twice, then 300ms: three retries through two delay queues.
    let delays = vec![ms(150), ms(150), ms(300)];
    let worker = start_worker(pool.clone(), settings(&test_prefix(), delays, 4)).await;
    // A refund whose purchase never comes: transient every time.
    let refund = edit(&paid_session_body("evt_rep", "pi_rep", 1999), |e| {
        e["type"] = "charge.refunded".into();
        e["data"]["object"] = serde_json::json!({
            "id": "ch_rep", "object": "charge", "payment_intent": "pi_rep",
            "amount_refunded": 1999, "refunded": true
        });
    });
    worker.publish(&message(refund)).await;
    wait_for("the dead letter", || async {
        worker.depth(&worker.topology.dead_queue).await == 1
    })
    .await;
    let dead = worker.take_dead().await;
    let headers = dead[0].delivery.properties.headers().clone().unwrap();
    assert_eq!(header_i64(&headers, HEADER_ATTEMPT), Some(4));
    let failure = FailureInfo::read(&headers).unwrap();
    assert!(
        failure
            .last_error
            .contains("retries exhausted after 4 attempts"),
        "{}",
        failure.last_error
    );
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM stripe_events WHERE id = 'evt_rep'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 4);
    // Each failed attempt is in the event's timeline, the retries with their due times.
    let timeline: Vec<(i32, String, bool)> = sqlx::query_as(
        "SELECT attempt, outcome, retry_due_at IS NOT NULL FROM stripe_event_attempts
          WHERE event_id = 'evt_rep' ORDER BY at, id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        timeline,
        [
            (1, "retrying".into(), true),
            (2, "retrying".into(), true),
            (3, "retrying".into(), true),
            (4, "dead".into(), false)
        ]
    );
}

/// While the database is unreachable, a batch waits and fails as a whole: its events do not
/// each try the database (and wait out a connection timeout) on their own.
#[sqlx::test(migrations = "../migrations")]
async fn an_unreachable_database_costs_a_batch_a_few_tries_not_one_per_event(pool: PgPool) {
    let proxy = CuttableProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    // Each connection attempt hangs until the pool's acquire timeout: one attempt per try.
    proxy.hang();
    let options = (*pool.connect_options()).clone().port(proxy.port);
    let down = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(ms(300))
        .connect_lazy_with(options);
    let mut settings = settings(&test_prefix(), vec![Duration::from_secs(600)], 2);
    // One batch of all 100: the first delivery waits for the others.
    settings.batch.size = 100;
    settings.batch.wait = Duration::from_secs(2);
    settings.prefetch = 100;
    settings.concurrency = 1;
    // Queued before the worker starts, so that they come as one batch.
    let broker = open_broker(settings.clone()).await;
    for n in 0..100 {
        broker
            .publish(&message(paid_session_body(
                &format!("evt_u{n}"),
                &format!("pi_u{n}"),
                1999,
            )))
            .await;
    }
    let worker = start_worker(down, settings).await;
    let delay_queue = worker.topology.retry_queue(Duration::from_secs(600));
    wait_for("all 100 in the delay queue", || async {
        worker.depth(&delay_queue).await == 100
    })
    .await;
    let tries = proxy.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        tries <= 10,
        "{tries} connection attempts for 100 events: the batch did not wait as a whole"
    );
    assert_eq!(worker.depth(&worker.topology.dead_queue).await, 0);
    let retried = worker.take(&delay_queue).await;
    for message in &retried {
        let headers = message.delivery.properties.headers().clone().unwrap();
        assert_eq!(header_i64(&headers, HEADER_ATTEMPT), Some(2));
    }
}
