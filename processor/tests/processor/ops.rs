//! The operator commands, run as the `processor` binary against a real broker and database.

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;

/// A paid session for content that does not exist: a permanent failure.
fn poison(event_id: &str, content: Uuid) -> Vec<u8> {
    edit(
        &paid_session_body(event_id, &format!("pi_{event_id}"), 1999),
        |e| {
            e["data"]["object"]["metadata"]["contentId"] = content.to_string().into();
        },
    )
}

#[sqlx::test(migrations = "../migrations")]
async fn fix_the_cause_then_replay_creates_the_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(pool.clone(), settings(&prefix, vec![ms(200)], 3)).await;
    let missing = Uuid::new_v4();
    worker.publish(&message(poison("evt_fix", missing))).await;
    wait_for("the dead letter", || async {
        worker.depth(&worker.topology.dead_queue).await == 1
    })
    .await;

    let stats = ops_json(&pool, &prefix, &["dlq", "stats", "--json"]).await;
    assert_eq!(stats["depth"], 1);
    assert_eq!(stats["by_class"], json!({"permanent": 1}));
    assert_eq!(stats["by_type"], json!({"checkout.session.completed": 1}));
    assert_eq!(stats["by_error"], json!({"unknown content <id>": 1}));

    let (code, shown) = ops(&pool, &prefix, &["dlq", "show", "evt_fix"]).await;
    assert_eq!(code, 0);
    assert!(
        shown.contains("x-last-error") && shown.contains(&missing.to_string()),
        "{shown}"
    );
    let (code, _) = ops(&pool, &prefix, &["dlq", "show", "evt_nope"]).await;
    assert_eq!(code, 1);

    // The operator fixes the catalog, then replays.
    insert_content(&pool, missing).await;
    let (code, out) = ops(&pool, &prefix, &["dlq", "replay", "--event-id", "evt_fix"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 1 of 1"), "{out}");
    wait_for("the purchase", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == 1
    })
    .await;
    assert_eq!(worker.depth(&worker.topology.dead_queue).await, 0);
    let (status, error) = event_status(&pool, "evt_fix").await.unwrap();
    assert_eq!((status.as_str(), error), ("processed", None));

    let (code, history) = ops(&pool, &prefix, &["events", "show", "evt_fix"]).await;
    assert_eq!(code, 0);
    assert!(
        history.contains("status:     processed") && history.contains("purchase:"),
        "{history}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn filtered_replay_leaves_the_rest_in_place_and_dry_run_changes_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(pool.clone(), settings(&prefix, vec![ms(200)], 3)).await;
    // Three poison events of one type, one of another, in this order.
    for id in ["evt_p1", "evt_p2", "evt_p3"] {
        worker.publish(&message(poison(id, Uuid::new_v4()))).await;
    }
    // And one of another type that is not even a Stripe event.
    let mut odd = message(paid_session_body("evt_p4", "pi_p4", 1999));
    odd.event_type = "charge.refunded".into();
    odd.body = br#"{"id":"evt_p4","type":"charge.refunded","object":"charge"}"#.to_vec();
    worker.publish(&odd).await;
    wait_for("four dead letters", || async {
        worker.depth(&worker.topology.dead_queue).await == 4
    })
    .await;
    // Stop consuming, so that replayed messages stay visible in the work queue.
    let mut worker = worker;
    worker.stop().await;

    let (_, listed) = ops(&pool, &prefix, &["dlq", "list"]).await;
    let order: Vec<&str> = listed
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ["evt_p1", "evt_p2", "evt_p3", "evt_p4"], "{listed}");
    // Listing twice shows the same order: nothing was removed or reordered. (Ids only: the
    // ages may have ticked over between the two listings.)
    let (_, again) = ops(&pool, &prefix, &["dlq", "list"]).await;
    let again: Vec<&str> = again
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, again);
    let (_, only) = ops(
        &pool,
        &prefix,
        &["dlq", "list", "--type", "charge.refunded"],
    )
    .await;
    assert_eq!(only.lines().count(), 1, "{only}");

    let (code, out) = ops(
        &pool,
        &prefix,
        &[
            "dlq",
            "replay",
            "--type",
            "checkout.session.completed",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("would replay 3 message(s)") && out.contains("1 would stay"),
        "{out}"
    );
    // (The broker takes a released snapshot back asynchronously: wait for it.)
    wait_for("the dry run to leave all four in place", || async {
        worker.depth(&worker.topology.dead_queue).await == 4
    })
    .await;

    let (code, out) = ops(
        &pool,
        &prefix,
        &[
            "dlq",
            "replay",
            "--type",
            "checkout.session.completed",
            "--limit",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("replayed 2 of 2") && out.contains("2 left"),
        "{out}"
    );
    assert_eq!(worker.depth(&worker.topology.work_queue).await, 2);
    // The first two of that type (in queue order) went; the others kept their order.
    let mut sessions = order.iter().filter(|id| **id != "evt_p4");
    let (first, second) = (sessions.next().unwrap(), sessions.next().unwrap());
    let expected: Vec<&str> = order
        .iter()
        .copied()
        .filter(|id| id != first && id != second)
        .collect();
    let (_, rest) = ops(&pool, &prefix, &["dlq", "list"]).await;
    let left: Vec<&str> = rest
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(left, expected, "{rest}");
    let remaining_session = expected
        .iter()
        .find(|id| **id != "evt_p4")
        .unwrap()
        .to_string();
    // The replayed ones carry a fresh attempt count.
    let replayed = worker.take(&worker.topology.work_queue.clone()).await;
    for m in &replayed {
        let headers = m.delivery.properties.headers().clone().unwrap();
        assert_eq!(
            shared::contract::header_i64(&headers, shared::contract::HEADER_ATTEMPT),
            Some(1)
        );
        assert!(shared::contract::FailureInfo::read(&headers).is_none());
    }

    // Purge needs --yes, then records the event as purged.
    let (code, _) = ops(
        &pool,
        &prefix,
        &["dlq", "purge", "--event-id", &remaining_session],
    )
    .await;
    assert_eq!(code, 2);
    let (code, out) = ops(
        &pool,
        &prefix,
        &["dlq", "purge", "--event-id", &remaining_session, "--yes"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("purged 1 message(s)"), "{out}");
    assert_eq!(
        event_status(&pool, &remaining_session).await.unwrap().0,
        "purged"
    );
    let (_, rest) = ops(&pool, &prefix, &["dlq", "list", "--json"]).await;
    let rest: serde_json::Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(rest.as_array().unwrap().len(), 1);
    assert_eq!(rest[0]["event_id"], "evt_p4");
}

#[sqlx::test(migrations = "../migrations")]
async fn events_replay_reenqueues_from_the_log(pool: PgPool) {
    seed_catalog(&pool).await;
    let prefix = test_prefix();
    let worker = start_worker(pool.clone(), settings(&prefix, vec![ms(200)], 3)).await;
    worker
        .publish(&message(paid_session_body("evt_log", "pi_log", 1999)))
        .await;
    wait_for("the purchase", || async {
        count(&pool, "SELECT count(*) FROM purchases").await == 1
    })
    .await;

    let (code, out) = ops(
        &pool,
        &prefix,
        &["events", "replay", "evt_log", "evt_missing"],
    )
    .await;
    assert_eq!(code, 1, "a missing event fails the command");
    assert!(out.contains("re-enqueued evt_log"), "{out}");
    wait_for("the replay to be handled", || async {
        count(
            &pool,
            "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_log'",
        )
        .await
            == 2
    })
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM purchases").await,
        1,
        "replay is idempotent"
    );
}

/// A reader that goes away (`processor events show … | head -1`) ends the command quietly
/// with success, not with a panic about a broken pipe.
#[sqlx::test(migrations = "../migrations")]
async fn a_closed_stdout_ends_a_command_quietly(pool: PgPool) {
    seed_catalog(&pool).await;
    let event = message(paid_session_body("evt_pipe", "pi_pipe", 1999));
    handle(&pool, &event).await.unwrap();
    let mut command = processor(&pool, &test_prefix());
    command
        .args(["events", "show", "evt_pipe"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    // Closed before the command writes its first line.
    drop(child.stdout.take());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}
