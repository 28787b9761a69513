//! The purchase completion, called directly: effects, idempotency, the split, failures.

use chrono::{TimeZone, Utc};
use processor::error::FailureClass;
use processor::handler::Outcome;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::helpers::*;

#[sqlx::test(migrations = "../migrations")]
async fn paid_session_makes_one_purchase_with_split_and_access(pool: PgPool) {
    seed_catalog(&pool).await;
    let body = std::fs::read(format!("{FIXTURES}/events/checkout.session.completed.json")).unwrap();
    let outcome = handle(&pool, &message(body)).await.unwrap();
    let Outcome::Purchased(purchase_id) = outcome else {
        panic!("{outcome:?}")
    };

    let row = sqlx::query("SELECT * FROM purchases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.get::<Uuid, _>("id"), purchase_id);
    assert_eq!(row.get::<Uuid, _>("customer_id"), CUSTOMER);
    assert_eq!(row.get::<Uuid, _>("content_id"), CONTENT);
    assert_eq!(row.get::<Uuid, _>("organization_id"), ORGANIZATION);
    assert_eq!(row.get::<i32, _>("amount_paid_cents"), 1999);
    assert_eq!(row.get::<String, _>("currency"), "usd");
    assert_eq!(row.get::<String, _>("status"), "completed");
    assert_eq!(
        row.get::<String, _>("stripe_payment_intent_id"),
        "pi_3SampleA1b2C3d4E5f6G7h8"
    );
    assert_eq!(row.get::<i32, _>("platform_fee_cents"), 200);
    assert_eq!(row.get::<i32, _>("organization_fee_cents"), 0);
    assert_eq!(row.get::<i32, _>("creator_payout_cents"), 1799);
    assert_eq!(row.get::<Option<Uuid>, _>("platform_agreement_id"), None);
    assert_eq!(
        row.get::<chrono::DateTime<Utc>, _>("purchased_at"),
        Utc.timestamp_opt(1_764_000_000, 0).unwrap(),
        "purchase time is the event's creation time"
    );

    let access =
        sqlx::query("SELECT user_id, content_id, purchase_id, revoked_at FROM content_access")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(access.len(), 1);
    assert_eq!(access[0].get::<Uuid, _>("user_id"), CUSTOMER);
    assert_eq!(access[0].get::<Uuid, _>("purchase_id"), purchase_id);
    assert!(
        access[0]
            .get::<Option<chrono::DateTime<Utc>>, _>("revoked_at")
            .is_none()
    );

    let (status, error) = event_status(&pool, "evt_1SampleCompletedPaid0001")
        .await
        .unwrap();
    assert_eq!((status.as_str(), error), ("processed", None));
}

#[sqlx::test(migrations = "../migrations")]
async fn same_event_three_times_is_one_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let msg = message(paid_session_body("evt_dup", "pi_dup", 1999));
    assert!(matches!(
        handle(&pool, &msg).await.unwrap(),
        Outcome::Purchased(_)
    ));
    assert_eq!(handle(&pool, &msg).await.unwrap(), Outcome::Duplicate);
    assert_eq!(handle(&pool, &msg).await.unwrap(), Outcome::Duplicate);
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM content_access").await, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_dup'"
        )
        .await,
        3
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn two_event_objects_for_one_payment_intent_are_one_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let first = message(paid_session_body("evt_a", "pi_same", 1999));
    let second = message(paid_session_body("evt_b", "pi_same", 1999));
    assert!(matches!(
        handle(&pool, &first).await.unwrap(),
        Outcome::Purchased(_)
    ));
    assert_eq!(handle(&pool, &second).await.unwrap(), Outcome::Duplicate);
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 1);
    // Both events are in the log, both done.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status = 'processed'"
        )
        .await,
        2
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_duplicates_make_one_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        // Half the same event id, half distinct event objects for the same payment.
        let id = if i % 2 == 0 {
            "evt_race".to_owned()
        } else {
            format!("evt_race_{i}")
        };
        let msg = message(paid_session_body(&id, "pi_race", 1999));
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move { handle(&pool, &msg).await }));
    }
    let mut purchased = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Outcome::Purchased(_) => purchased += 1,
            Outcome::Duplicate => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(purchased, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM content_access").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn double_payment_is_kept_as_requires_refund(pool: PgPool) {
    seed_catalog(&pool).await;
    let first = message(paid_session_body("evt_pay1", "pi_pay1", 1999));
    let second = message(paid_session_body("evt_pay2", "pi_pay2", 1999));
    let Outcome::Purchased(first_id) = handle(&pool, &first).await.unwrap() else {
        panic!()
    };
    let Outcome::RequiresRefund(second_id) = handle(&pool, &second).await.unwrap() else {
        panic!()
    };
    assert_ne!(first_id, second_id);
    let statuses: Vec<(String, String)> = sqlx::query_as(
        "SELECT stripe_payment_intent_id, status FROM purchases ORDER BY stripe_payment_intent_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        statuses,
        [
            ("pi_pay1".into(), "completed".into()),
            ("pi_pay2".into(), "requires_refund".into())
        ]
    );
    // Access still points at the first purchase; the double payment grants nothing.
    let access_purchase: Uuid = sqlx::query_scalar("SELECT purchase_id FROM content_access")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(access_purchase, first_id);
    // Redelivering the double payment changes nothing.
    assert_eq!(handle(&pool, &second).await.unwrap(), Outcome::Duplicate);
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn agreements_and_rounding(pool: PgPool) {
    seed_catalog(&pool).await;
    // Each purchase needs its own content (one completed purchase per customer and content).
    let contents: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for c in &contents {
        insert_content(&pool, *c).await;
    }
    let with_content = |event: &str, content: Uuid, amount: i64| {
        edit(
            &paid_session_body(event, &format!("pi_{event}"), amount),
            |e| {
                e["data"]["object"]["metadata"]["contentId"] =
                    serde_json::json!(content.to_string());
            },
        )
    };

    // Default: 10% platform, no organization share. 5 × 10% = 0.5 → 1 (half up).
    handle(&pool, &message(with_content("evt_r1", contents[0], 5)))
        .await
        .unwrap();
    let row: (i32, i32, i32) = sqlx::query_as(
        "SELECT platform_fee_cents, organization_fee_cents, creator_payout_cents FROM purchases WHERE stripe_event_id = 'evt_r1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, (1, 0, 4));

    // An organization override (12.5%) and a creator–organization share (25%), both active
    // at the event's time (2025-11-24); an expired override must not apply.
    let override_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO organization_platform_agreements (id, organization_id, platform_fee_bps, effective_from, effective_until)
         VALUES ($1, $2, 1250, '2025-01-01', NULL), ($3, $2, 9000, '2020-01-01', '2021-01-01')",
    )
    .bind(override_id)
    .bind(ORGANIZATION)
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await
    .unwrap();
    let share_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO creator_organization_agreements (id, creator_id, organization_id, organization_fee_bps, effective_from)
         VALUES ($1, $2, $3, 2500, '2025-01-01')",
    )
    .bind(share_id)
    .bind(CREATOR)
    .bind(ORGANIZATION)
    .execute(&pool)
    .await
    .unwrap();

    // 1999 × 12.5% = 249.875 → 250; (1999 − 250) × 25% = 437.25 → 437; 1999 − 250 − 437 = 1312.
    handle(&pool, &message(with_content("evt_r2", contents[1], 1999)))
        .await
        .unwrap();
    let split = split_of_existing(&pool, "evt_r2").await;
    assert_eq!(split, (250, 437, 1312, Some(override_id), Some(share_id)));

    // An agreement that starts after the payment does not apply to it.
    sqlx::query(
        "INSERT INTO organization_platform_agreements (id, organization_id, platform_fee_bps, effective_from)
         VALUES ($1, $2, 0, '2026-01-01')",
    )
    .bind(Uuid::new_v4())
    .bind(ORGANIZATION)
    .execute(&pool)
    .await
    .unwrap();
    // 2 × 12.5% = 0.25 → 0; 2 × 25% = 0.5 → 1.
    handle(&pool, &message(with_content("evt_r3", contents[2], 2)))
        .await
        .unwrap();
    assert_eq!(
        split_of_existing(&pool, "evt_r3").await,
        (0, 1, 1, Some(override_id), Some(share_id))
    );
}

async fn split_of_existing(
    pool: &PgPool,
    event: &str,
) -> (i32, i32, i32, Option<Uuid>, Option<Uuid>) {
    sqlx::query_as(
        "SELECT platform_fee_cents, organization_fee_cents, creator_payout_cents,
                platform_agreement_id, creator_org_agreement_id
           FROM purchases WHERE stripe_event_id = $1",
    )
    .bind(event)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn unhandled_types_and_expired_sessions_are_ignored(pool: PgPool) {
    seed_catalog(&pool).await;
    for file in [
        "payment_intent.succeeded.json",
        "checkout.session.expired.json",
    ] {
        let body = std::fs::read(format!("{FIXTURES}/events/{file}")).unwrap();
        let msg = message(body);
        assert!(
            matches!(handle(&pool, &msg).await.unwrap(), Outcome::Ignored(_)),
            "{file}"
        );
        let (status, _) = event_status(&pool, &msg.event_id).await.unwrap();
        assert_eq!(status, "ignored", "{file}");
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_metadata_and_unknown_catalog_are_permanent(pool: PgPool) {
    seed_catalog(&pool).await;
    let base = paid_session_body("evt_bad", "pi_bad", 1999);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not a uuid",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["customerId"] = "x".into()
            }),
            "customerId",
        ),
        (
            "amount mismatch",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["amountPaidCents"] = "1".into()
            }),
            "amount_total",
        ),
        (
            "currency mismatch",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["currency"] = "eur".into()
            }),
            "currency",
        ),
        (
            "missing field",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("contentId");
            }),
            "contentId",
        ),
        (
            "unknown customer",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["customerId"] = Uuid::new_v4().to_string().into()
            }),
            "unknown customer",
        ),
        (
            "unknown content",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["contentId"] = Uuid::new_v4().to_string().into()
            }),
            "unknown content",
        ),
        (
            "wrong organization",
            edit(&base, |e| {
                e["data"]["object"]["metadata"]["organizationId"] =
                    Uuid::new_v4().to_string().into()
            }),
            "belongs to organization",
        ),
        (
            "no object",
            edit(&base, |e| {
                e.as_object_mut().unwrap().remove("data");
            }),
            "data.object",
        ),
    ];
    for (name, body, expected) in cases {
        let error = handle(&pool, &message(body)).await.unwrap_err();
        assert_eq!(error.class(), FailureClass::Permanent, "{name}: {error}");
        assert!(error.to_string().contains(expected), "{name}: {error}");
    }
    // Nothing was written by the failed attempts (the consumer records the failure).
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM stripe_events").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn database_down_is_transient(pool: PgPool) {
    // A pool pointed at a port where nothing listens stands for a database outage.
    let options = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    let error = handle(
        &options,
        &message(paid_session_body("evt_down", "pi_down", 1999)),
    )
    .await
    .unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient, "{error}");
    drop(pool);
}

/// The per-event lookups must use indexes even in the generic plan PostgreSQL caches for a
/// prepared statement while the table is still small (a sequential scan there made the
/// drain slower with every purchase stored). `force_generic_plan` shows that plan.
#[sqlx::test(migrations = "../migrations")]
async fn purchase_lookups_use_indexes_in_their_generic_plans(pool: PgPool) {
    use processor::db::purchases::{LOCK_SQL, PAYMENT_RECORDED_SQL};

    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (name, sql) in [
        ("lock", LOCK_SQL),
        ("payment_recorded", PAYMENT_RECORDED_SQL),
    ] {
        // Our own constants, no input: safe to splice.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE {name}(text, text) AS {sql}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN EXECUTE {name}('pi', 'cs')"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{name}:\n{plan}");
        assert!(
            plan.contains("purchases_stripe_payment_intent_id_key"),
            "{name}:\n{plan}"
        );
        assert!(
            plan.contains("purchases_checkout_session_idx"),
            "{name}:\n{plan}"
        );
    }
}
