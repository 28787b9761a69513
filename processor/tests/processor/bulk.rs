//! The set-based path of a batch (`processor::bulk`): which events it takes, and that a
//! mixed batch through the worker ends exactly as if each event had been handled alone.

use serde_json::json;
use shared::config::EndpointModes;
use shared::contract::EventMessage;
use sqlx::PgPool;

use crate::helpers::*;
use crate::lifecycle::Payment;
use crate::money::free_session;

fn intent_succeeded(n: &str) -> EventMessage {
    let text = std::fs::read_to_string(format!("{FIXTURES}/events/payment_intent.succeeded.json"))
        .unwrap();
    let mut event: serde_json::Value = serde_json::from_str(&text).unwrap();
    event["id"] = json!(format!("evt_pi_{n}"));
    message(serde_json::to_vec(&event).unwrap())
}

/// The payments both tests mix: four new ones, a second payment of `a`'s content (its
/// twin), one handled before the batch, and one for content that does not exist.
struct Mix {
    a: Payment,
    b: Payment,
    c: Payment,
    d: Payment,
    twin: Payment,
    known: Payment,
    unknown_content: Payment,
}

async fn mix(pool: &PgPool) -> Mix {
    seed_catalog(pool).await;
    let a = Payment::new(pool, "a").await;
    let twin = Payment {
        n: "twin".into(),
        content: a.content,
    };
    let known = Payment::new(pool, "known").await;
    handle(pool, &known.paid()).await.unwrap();
    let mut unknown_content = Payment::new(pool, "gone").await;
    unknown_content.content = uuid::Uuid::new_v4();
    Mix {
        a,
        b: Payment::new(pool, "b").await,
        c: Payment::new(pool, "c").await,
        d: Payment::new(pool, "d").await,
        twin,
        known,
        unknown_content,
    }
}

/// It takes new payments and events that are only recorded, one per payment and per
/// (customer, content) pair, and leaves everything else to the per-event path untouched.
#[sqlx::test(migrations = "../migrations")]
async fn the_set_based_path_takes_the_plain_events_and_leaves_the_rest(pool: PgPool) {
    let Mix {
        a,
        b,
        c,
        twin,
        known,
        unknown_content,
        ..
    } = mix(&pool).await;

    let batch = [
        a.paid(),                                                        // 0 taken: new purchase
        twin.paid(),                                                     // 1 left: same pair as 0
        b.unpaid(),                                                      // 2 taken: new pending
        intent_succeeded("x"),                                           // 3 taken: ignored
        a.refund(1999, true),                                            // 4 left: a refund
        known.paid(), // 5 left: in the log already
        known.event("checkout.session.completed.json", "again", |_| {}), // 6 left: recorded
        unknown_content.paid(), // 7 left: no such content
        free_session(&c, "0"), // 8 taken: free purchase
        a.paid(),     // 9 left: same event as 0
    ];
    let messages: Vec<&EventMessage> = batch.iter().collect();
    let candidates = processor::bulk::candidates(&messages, &EndpointModes::default());
    let mut tx = pool.begin().await.unwrap();
    let outcomes = processor::bulk::handle(&mut tx, &messages, candidates)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let taken: Vec<usize> = (0..batch.len())
        .filter(|&i| outcomes[i].is_some())
        .collect();
    assert_eq!(taken, [0, 2, 3, 8], "{outcomes:?}");
    assert_eq!(
        a.state(&pool).await,
        Some(("completed".into(), 0, None, true))
    );
    assert_eq!(
        b.state(&pool).await,
        Some(("pending".into(), 0, None, false))
    );
    let free: (String, i32) = sqlx::query_as(
        "SELECT status, amount_paid_cents FROM purchases WHERE stripe_checkout_session_id = 'cs_c'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(free, ("completed".into(), 0));
    let events: Vec<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT id, status, attempts, last_error FROM stripe_events ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected = [
        ("evt_a_paid", "processed", 1, None),
        ("evt_b_unpaid", "processed", 1, None),
        ("evt_c_free", "processed", 1, None),
        // Recorded, then left: the per-event path finishes it in the same transaction (and
        // counts its attempt there); nothing else of the batch is in the log.
        ("evt_gone_paid", "received", 0, None),
        ("evt_known_paid", "processed", 1, None),
        (
            "evt_pi_x",
            "ignored",
            1,
            Some("payment intent events repeat the checkout session events"),
        ),
    ];
    let expected: Vec<(String, String, i32, Option<String>)> = expected
        .iter()
        .map(|(id, status, attempts, note)| {
            (
                (*id).into(),
                (*status).into(),
                *attempts,
                note.map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(events, expected);
    let split: (i32, i32, i32) = sqlx::query_as(
        "SELECT platform_fee_cents, organization_fee_cents, creator_payout_cents
           FROM purchases WHERE stripe_payment_intent_id = 'pi_a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        split,
        (200, 0, 1799),
        "the sample catalog's 10 % platform fee"
    );
}

/// The same mix through the worker in one consumer batch: every event ends as the
/// per-event rules say, whichever path it took.
#[sqlx::test(migrations = "../migrations")]
async fn a_mixed_batch_ends_as_if_each_event_ran_alone(pool: PgPool) {
    let mut settings = settings(&test_prefix(), vec![ms(200)], 3);
    settings.concurrency = 1;
    settings.batch = processor::worker::BatchLimits {
        size: 64,
        wait: ms(500),
        partial: 1,
    };
    let Mix {
        a,
        b,
        c,
        d,
        twin,
        known,
        unknown_content,
    } = mix(&pool).await;
    let batch = [
        a.paid(),
        twin.paid(),
        a.refund(1999, true), // the twin takes over
        b.unpaid(),
        b.async_succeeded(),
        c.paid(),
        c.paid(),             // the same event twice
        d.refund(500, false), // before its purchase
        d.paid(),
        known.event("checkout.session.completed.json", "again", |_| {}),
        unknown_content.paid(),
        intent_succeeded("x"),
    ];
    let worker = start_worker(pool.clone(), settings).await;
    for event in &batch {
        worker.publish(event).await;
    }
    wait_for("every event settled", || async {
        count(
            &pool,
            "SELECT count(*) FROM stripe_events WHERE status IN ('processed', 'ignored', 'dead')",
        )
        .await
            == 12 // with evt_known_paid, handled before
    })
    .await;
    assert_eq!(
        a.state(&pool).await,
        Some(("refunded".into(), 1999, None, true)),
        "refunded, and the access stays through the twin"
    );
    assert_eq!(
        twin.state(&pool).await,
        Some(("completed".into(), 0, None, true))
    );
    assert_eq!(
        b.state(&pool).await,
        Some(("completed".into(), 0, None, true))
    );
    assert_eq!(
        c.state(&pool).await,
        Some(("completed".into(), 0, None, true))
    );
    assert_eq!(
        d.state(&pool).await,
        Some(("completed".into(), 500, None, true))
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 6);
    assert_eq!(
        event_status(&pool, "evt_gone_paid").await.map(|s| s.0),
        Some("dead".into())
    );
    assert_eq!(
        count(
            &pool,
            "SELECT attempts::bigint FROM stripe_events WHERE id = 'evt_c_paid'"
        )
        .await,
        2,
        "both deliveries counted"
    );
    let revenue: (i64, i64) = sqlx::query_as(
        "SELECT sum(net_cents)::bigint, sum(platform_net_cents + organization_net_cents + creator_net_cents)::bigint
           FROM purchase_revenue",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(revenue.0, revenue.1, "the shares add up to the net");
    assert_eq!(revenue.0, 1999 * 5 - 500, "a refunded, d partly refunded");
}
