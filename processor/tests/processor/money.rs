//! Money in every real case, against a real database: chargebacks, partial refunds, net
//! revenue, the twin that takes over, free and other-mode checkouts, byte-exact bodies.
//!
//! Net revenue is checked against the formula written out here on its own (not the
//! processor's `split` module): net = max(gross − refunded − charged back, 0), platform =
//! half-up(net × platform bps / 10000), organization = half-up((net − platform) ×
//! organization bps / 10000), creator = the rest.

use processor::error::FailureClass;
use processor::handler::Outcome;
use serde_json::{Value, json};
use shared::config::{EndpointModes, ModeArgs};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;
use crate::lifecycle::{Payment, deliver_all};

const PLATFORM_BPS: i64 = 1000;
const ORGANIZATION_BPS: i64 = 2500;

/// The sample catalog with a creator–organization agreement, so that all three shares are
/// non-trivial.
async fn seed(pool: &PgPool) {
    seed_catalog(pool).await;
    sqlx::query(
        "INSERT INTO creator_organization_agreements (id, creator_id, organization_id, organization_fee_bps, effective_from)
         VALUES ($1, $2, $3, $4, 'epoch')",
    )
    .bind(Uuid::new_v4())
    .bind(CREATOR)
    .bind(ORGANIZATION)
    .bind(ORGANIZATION_BPS as i32)
    .execute(pool)
    .await
    .unwrap();
}

#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
struct Revenue {
    gross_cents: i64,
    refunded_cents: i64,
    charged_back_cents: i64,
    net_cents: i64,
    platform_net_cents: i64,
    organization_net_cents: i64,
    creator_net_cents: i64,
}

fn half_up(amount: i64, bps: i64) -> i64 {
    (amount * bps + 5_000) / 10_000
}

/// What the view must say, from the formula alone.
fn expected(gross: i64, refunded: i64, charged_back: i64) -> Revenue {
    let net = (gross - refunded - charged_back).max(0);
    let platform = half_up(net, PLATFORM_BPS);
    let organization = half_up(net - platform, ORGANIZATION_BPS);
    Revenue {
        gross_cents: gross,
        refunded_cents: refunded,
        charged_back_cents: charged_back,
        net_cents: net,
        platform_net_cents: platform,
        organization_net_cents: organization,
        creator_net_cents: net - platform - organization,
    }
}

async fn revenue_of(pool: &PgPool, purchase_id: Uuid) -> Revenue {
    sqlx::query_as(
        "SELECT gross_cents, refunded_cents, charged_back_cents, net_cents,
                platform_net_cents, organization_net_cents, creator_net_cents
           FROM purchase_revenue WHERE purchase_id = $1",
    )
    .bind(purchase_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn purchase_id(pool: &PgPool, p: &Payment) -> Uuid {
    sqlx::query_scalar("SELECT id FROM purchases WHERE stripe_payment_intent_id = $1")
        .bind(format!("pi_{}", p.n))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn revenue(pool: &PgPool, p: &Payment) -> Revenue {
    revenue_of(pool, purchase_id(pool, p).await).await
}

/// A dispute event with its own disputed amount.
fn dispute(
    p: &Payment,
    kind: &str,
    status: &str,
    created: i64,
    amount: i64,
) -> shared::contract::EventMessage {
    let mut event = p.dispute(kind, status, created);
    event.body = edit(&event.body, |e| {
        e["data"]["object"]["amount"] = json!(amount)
    });
    event
}

/// (status, access) of every purchase of the customer for `content`, and which purchase the
/// access row points to.
async fn ownership(
    pool: &PgPool,
    content: Uuid,
) -> (Vec<(String, String)>, Option<(String, bool)>) {
    let purchases: Vec<(String, String)> = sqlx::query_as(
        "SELECT COALESCE(stripe_payment_intent_id, stripe_checkout_session_id), status FROM purchases
          WHERE customer_id = $1 AND content_id = $2 ORDER BY 1",
    )
    .bind(CUSTOMER)
    .bind(content)
    .fetch_all(pool)
    .await
    .unwrap();
    let access: Option<(String, bool)> = sqlx::query_as(
        "SELECT COALESCE(p.stripe_payment_intent_id, p.stripe_checkout_session_id), a.revoked_at IS NULL
           FROM content_access a JOIN purchases p ON p.id = a.purchase_id
          WHERE a.user_id = $1 AND a.content_id = $2",
    )
    .bind(CUSTOMER)
    .bind(content)
    .fetch_optional(pool)
    .await
    .unwrap();
    (purchases, access)
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

#[sqlx::test(migrations = "../migrations")]
async fn a_lost_dispute_is_a_chargeback_and_a_won_one_changes_nothing(pool: PgPool) {
    seed(&pool).await;
    let lost = Payment::new(&pool, "lost").await;
    handle(&pool, &lost.paid()).await.unwrap();
    handle(
        &pool,
        &dispute(&lost, "created", "needs_response", 100, 1999),
    )
    .await
    .unwrap();
    assert_eq!(
        lost.state(&pool).await.unwrap(),
        ("completed".into(), 0, Some("needs_response".into()), true),
        "an open dispute keeps access"
    );
    handle(&pool, &dispute(&lost, "closed", "lost", 300, 1999))
        .await
        .unwrap();
    assert_eq!(
        lost.state(&pool).await.unwrap(),
        ("charged_back".into(), 0, Some("lost".into()), false)
    );
    assert_eq!(revenue(&pool, &lost).await, expected(1999, 0, 1999));
    // Nothing brings it back: a stale update, a late success, a repeat.
    handle(&pool, &dispute(&lost, "updated", "under_review", 200, 1999))
        .await
        .unwrap();
    handle(&pool, &lost.async_succeeded()).await.unwrap();
    assert_eq!(
        lost.state(&pool).await.unwrap(),
        ("charged_back".into(), 0, Some("lost".into()), false)
    );
    let adjustments: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT kind, amount_cents, stripe_event_id FROM purchase_adjustments ORDER BY recorded_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        adjustments,
        [("chargeback".into(), 1999, "evt_lost_dispute_lost".into())]
    );

    // Won after a full refund: the purchase stays refunded.
    let won = Payment::new(&pool, "won").await;
    handle(&pool, &won.paid()).await.unwrap();
    handle(&pool, &won.refund(1999, true)).await.unwrap();
    handle(&pool, &dispute(&won, "closed", "won", 300, 1999))
        .await
        .unwrap();
    assert_eq!(
        won.state(&pool).await.unwrap(),
        ("refunded".into(), 1999, Some("won".into()), false)
    );
    assert_eq!(revenue(&pool, &won).await, expected(1999, 1999, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_partial_refund_lowers_every_share(pool: PgPool) {
    seed(&pool).await;
    let p = Payment::new(&pool, "partial").await;
    handle(&pool, &p.paid()).await.unwrap();
    // With nothing refunded the view equals the stored snapshot.
    let snapshot: (i32, i32, i32) = sqlx::query_as(
        "SELECT platform_fee_cents, organization_fee_cents, creator_payout_cents FROM purchases",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let before = revenue(&pool, &p).await;
    assert_eq!(
        (
            before.platform_net_cents,
            before.organization_net_cents,
            before.creator_net_cents
        ),
        (
            i64::from(snapshot.0),
            i64::from(snapshot.1),
            i64::from(snapshot.2)
        )
    );

    handle(&pool, &p.refund(500, false)).await.unwrap();
    // The README's worked example: 1999 paid, 500 refunded → net 1499; platform 10 % →
    // 149.9 → 150; organization 25 % of 1349 → 337.25 → 337; creator 1012.
    let after = revenue(&pool, &p).await;
    assert_eq!(after, expected(1999, 500, 0));
    assert_eq!(
        (
            after.net_cents,
            after.platform_net_cents,
            after.organization_net_cents,
            after.creator_net_cents
        ),
        (1499, 150, 337, 1012)
    );
    assert_eq!(
        p.state(&pool).await.unwrap(),
        ("completed".into(), 500, None, true)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn refund_amounts_are_counted_once_and_never_move_back(pool: PgPool) {
    seed(&pool).await;
    let p = Payment::new(&pool, "cumulative").await;
    handle(&pool, &p.paid()).await.unwrap();
    let first = p.refund(500, false);
    handle(&pool, &first).await.unwrap();
    // The same cumulative amount in another event (Stripe resends), a stale smaller one, and
    // a repeat of the first event.
    let mut again = p.refund(500, false);
    again.event_id = "evt_cumulative_refund_500_again".into();
    again.body = edit(&again.body, |e| {
        e["id"] = json!("evt_cumulative_refund_500_again")
    });
    handle(&pool, &again).await.unwrap();
    handle(&pool, &p.refund(300, false)).await.unwrap();
    assert_eq!(handle(&pool, &first).await.unwrap(), Outcome::Duplicate);
    handle(&pool, &p.refund(800, false)).await.unwrap();

    let rows: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT kind, amount_cents, stripe_event_id FROM purchase_adjustments ORDER BY recorded_at, amount_cents DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("refund".into(), 500, "evt_cumulative_refund_500".into()),
            ("refund".into(), 300, "evt_cumulative_refund_800".into()),
        ]
    );
    assert_eq!(revenue(&pool, &p).await, expected(1999, 800, 0));

    // Append-only: the history cannot be rewritten.
    let update = sqlx::query("UPDATE purchase_adjustments SET amount_cents = 1")
        .execute(&pool)
        .await;
    assert!(update.is_err(), "an adjustment was changed");
    let delete = sqlx::query("DELETE FROM purchase_adjustments")
        .execute(&pool)
        .await;
    assert!(delete.is_err(), "an adjustment was deleted");
}

/// Every order, then every event again in reverse (duplicates), of {completed, partial
/// refund, full refund, dispute created, dispute closed}: one final state per outcome of the
/// dispute, and the view always equals the formula.
#[sqlx::test(migrations = "../migrations")]
async fn every_order_of_a_payments_money_events_converges(pool: PgPool) {
    seed(&pool).await;
    let orders = permutations(5);
    assert_eq!(orders.len(), 120);
    for outcome in ["lost", "won"] {
        for (i, order) in orders.iter().enumerate() {
            let p = Payment::new(&pool, &format!("all_{outcome}_{i}")).await;
            let events = [
                p.paid(),
                p.refund(500, false),
                p.refund(1999, true),
                dispute(&p, "created", "needs_response", 100, 1999),
                dispute(&p, "closed", outcome, 300, 1999),
            ];
            let ordered: Vec<_> = order.iter().map(|&k| events[k].clone()).collect();
            deliver_all(&pool, ordered.clone()).await;
            let settled = p.state(&pool).await;
            let duplicates: Vec<_> = ordered.into_iter().rev().collect();
            deliver_all(&pool, duplicates).await;
            assert_eq!(
                p.state(&pool).await,
                settled,
                "duplicates changed {order:?}"
            );

            let (status, charged_back) = match outcome {
                "lost" => ("charged_back", 1999),
                _ => ("refunded", 0),
            };
            assert_eq!(
                settled,
                Some((status.into(), 1999, Some(outcome.into()), false)),
                "{outcome}, order {order:?}"
            );
            let revenue = revenue(&pool, &p).await;
            assert_eq!(
                revenue,
                expected(1999, 1999, charged_back),
                "{outcome} {order:?}"
            );
            assert_eq!(revenue.net_cents, 0);
        }
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 240);
}

/// The same without the full refund, and a dispute of part of the amount: the net is not 0,
/// and still the same whatever the order.
#[sqlx::test(migrations = "../migrations")]
async fn every_order_with_a_partial_refund_and_a_partial_dispute_converges(pool: PgPool) {
    seed(&pool).await;
    for outcome in ["lost", "won"] {
        for (i, order) in permutations(4).iter().enumerate() {
            let p = Payment::new(&pool, &format!("part_{outcome}_{i}")).await;
            let events = [
                p.paid(),
                p.refund(500, false),
                dispute(&p, "created", "needs_response", 100, 1000),
                dispute(&p, "closed", outcome, 300, 1000),
            ];
            let ordered: Vec<_> = order.iter().map(|&k| events[k].clone()).collect();
            deliver_all(&pool, ordered.clone()).await;
            deliver_all(&pool, ordered).await;
            let (status, access, charged_back) = match outcome {
                "lost" => ("charged_back", false, 1000),
                _ => ("completed", true, 0),
            };
            assert_eq!(
                p.state(&pool).await,
                Some((status.into(), 500, Some(outcome.into()), access)),
                "{outcome}, order {order:?}"
            );
            assert_eq!(revenue(&pool, &p).await, expected(1999, 500, charged_back));
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn buying_again_after_a_chargeback_or_a_refund_gives_access(pool: PgPool) {
    seed(&pool).await;
    for (n, lose) in [("cb", true), ("rf", false)] {
        let first = Payment::new(&pool, &format!("first_{n}")).await;
        let again = Payment {
            n: format!("again_{n}"),
            content: first.content,
        };
        handle(&pool, &first.paid()).await.unwrap();
        if lose {
            handle(&pool, &dispute(&first, "closed", "lost", 300, 1999))
                .await
                .unwrap();
        } else {
            handle(&pool, &first.refund(1999, true)).await.unwrap();
        }
        assert!(matches!(
            handle(&pool, &again.paid()).await.unwrap(),
            Outcome::Purchased(_)
        ));
        let (_, access) = ownership(&pool, first.content).await;
        assert_eq!(access, Some((format!("pi_again_{n}"), true)), "{n}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_paid_twin_takes_over_when_the_purchase_giving_access_is_refunded(pool: PgPool) {
    seed(&pool).await;
    for (n, lose) in [("rf", false), ("cb", true)] {
        let content = Uuid::new_v4();
        insert_content(&pool, content).await;
        let owner = Payment {
            n: format!("owner_{n}"),
            content,
        };
        let twin = Payment {
            n: format!("twin_{n}"),
            content,
        };
        handle(&pool, &owner.paid()).await.unwrap();
        assert!(matches!(
            handle(&pool, &twin.paid()).await.unwrap(),
            Outcome::RequiresRefund(_)
        ));

        // Support refunds the wrong one (or the bank takes it back).
        if lose {
            handle(&pool, &dispute(&owner, "closed", "lost", 300, 1999))
                .await
                .unwrap();
        } else {
            handle(&pool, &owner.refund(1999, true)).await.unwrap();
        }
        let lost_status = if lose { "charged_back" } else { "refunded" };
        let (purchases, access) = ownership(&pool, content).await;
        assert_eq!(
            purchases,
            [
                (format!("pi_owner_{n}"), lost_status.into()),
                (format!("pi_twin_{n}"), "completed".into())
            ]
        );
        assert_eq!(
            access,
            Some((format!("pi_twin_{n}"), true)),
            "access continues through the twin"
        );
    }

    // A twin that was partly refunded is not paid in full: it does not take over.
    let content = Uuid::new_v4();
    insert_content(&pool, content).await;
    let owner = Payment {
        n: "owner_p".into(),
        content,
    };
    let twin = Payment {
        n: "twin_p".into(),
        content,
    };
    handle(&pool, &owner.paid()).await.unwrap();
    handle(&pool, &twin.paid()).await.unwrap();
    handle(&pool, &twin.refund(100, false)).await.unwrap();
    handle(&pool, &owner.refund(1999, true)).await.unwrap();
    let (purchases, access) = ownership(&pool, content).await;
    assert_eq!(
        purchases,
        [
            ("pi_owner_p".into(), "refunded".into()),
            ("pi_twin_p".into(), "requires_refund".into())
        ]
    );
    assert_eq!(access, Some(("pi_owner_p".into(), false)));
}

/// Concurrent events around one customer's content never leave two purchases giving access,
/// nor none while one is paid and unrefunded.
#[sqlx::test(migrations = "../migrations")]
async fn twin_promotion_under_concurrent_events(pool: PgPool) {
    seed(&pool).await;
    for round in 0..12 {
        let content = Uuid::new_v4();
        insert_content(&pool, content).await;
        let owner = Payment {
            n: format!("co_{round}"),
            content,
        };
        let twin = Payment {
            n: format!("ct_{round}"),
            content,
        };
        let third = Payment {
            n: format!("cn_{round}"),
            content,
        };
        handle(&pool, &owner.paid()).await.unwrap();
        handle(&pool, &twin.paid()).await.unwrap();

        if round % 2 == 0 {
            // The owner refunded while a third payment arrives: exactly one gives access.
            tokio::join!(
                deliver_all(&pool, vec![owner.refund(1999, true)]),
                deliver_all(&pool, vec![third.paid()]),
            );
            let (purchases, access) = ownership(&pool, content).await;
            let completed: Vec<_> = purchases.iter().filter(|(_, s)| s == "completed").collect();
            assert_eq!(completed.len(), 1, "round {round}: {purchases:?}");
            assert_eq!(
                access,
                Some((completed[0].0.clone(), true)),
                "round {round}"
            );
        } else {
            // Both refunded at once: nothing paid is left, so nothing gives access.
            tokio::join!(
                deliver_all(&pool, vec![owner.refund(1999, true)]),
                deliver_all(&pool, vec![twin.refund(1999, true)]),
            );
            let (purchases, access) = ownership(&pool, content).await;
            assert!(
                purchases.iter().all(|(_, s)| s == "refunded"),
                "round {round}: {purchases:?}"
            );
            assert_eq!(
                access.map(|(_, active)| active),
                Some(false),
                "round {round}"
            );
        }
    }
}

pub fn free_session(p: &Payment, amount_metadata: &str) -> shared::contract::EventMessage {
    let session = format!("cs_{}", p.n);
    let mut event = p.event("checkout.session.completed.json", "free", |e| {
        let object = &mut e["data"]["object"];
        object["payment_status"] = json!("no_payment_required");
        object["amount_total"] = json!(0);
        object["amount_subtotal"] = json!(1999);
        object["payment_intent"] = Value::Null;
        object["metadata"]["amountPaidCents"] = json!(amount_metadata);
    });
    assert!(String::from_utf8_lossy(&event.body).contains(&session));
    event.attempt = 1;
    event
}

#[sqlx::test(migrations = "../migrations")]
async fn a_free_checkout_is_a_purchase_of_zero_with_access(pool: PgPool) {
    seed(&pool).await;
    let p = Payment::new(&pool, "free").await;
    assert!(matches!(
        handle(&pool, &free_session(&p, "0")).await.unwrap(),
        Outcome::Purchased(_)
    ));
    let row: (String, i32, i32, i32, i32, Option<String>) = sqlx::query_as(
        "SELECT status, amount_paid_cents, platform_fee_cents, organization_fee_cents,
                creator_payout_cents, stripe_payment_intent_id
           FROM purchases WHERE stripe_checkout_session_id = 'cs_free'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, ("completed".into(), 0, 0, 0, 0, None));
    let (_, access) = ownership(&pool, p.content).await;
    assert_eq!(access.map(|(_, active)| active), Some(true));
    let id: Uuid =
        sqlx::query_scalar("SELECT id FROM purchases WHERE stripe_checkout_session_id = 'cs_free'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(revenue_of(&pool, id).await, expected(0, 0, 0));

    // A free session whose metadata claims an amount is refused, with the reason.
    let q = Payment::new(&pool, "free_bad").await;
    let error = handle(&pool, &free_session(&q, "500")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::Permanent);
    assert!(error.to_string().contains("amountPaidCents 500"), "{error}");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_event_of_the_other_mode_is_recorded_as_ignored_and_changes_nothing(pool: PgPool) {
    seed(&pool).await;
    let live = EndpointModes::all(true);
    let p = Payment::new(&pool, "modes").await;
    let test_event = p.paid();
    let outcome = processor::handler::handle(&pool, &test_event, &live)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Ignored(_)), "{outcome:?}");
    assert_eq!(
        event_status(&pool, &test_event.event_id).await,
        Some((
            "ignored".into(),
            Some("test-mode event on a live endpoint".into())
        ))
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);

    // On the default (test-mode) system, a live event is ignored the same way.
    let mut live_event = p.event("checkout.session.completed.json", "live", |e| {
        e["livemode"] = json!(true)
    });
    live_event.endpoint = "booking".into();
    handle(&pool, &live_event).await.unwrap();
    assert_eq!(
        event_status(&pool, &live_event.event_id).await,
        Some((
            "ignored".into(),
            Some("live-mode event on a test-mode endpoint".into())
        ))
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 0);

    // One endpoint in live mode: its live events count, the others' do not.
    let mixed = ModeArgs {
        connect: Some(true),
        ..ModeArgs::default()
    }
    .modes();
    let mut on_connect = live_event.clone();
    on_connect.event_id = "evt_modes_connect".into();
    on_connect.body = edit(&on_connect.body, |e| e["id"] = json!("evt_modes_connect"));
    on_connect.endpoint = "connect".into();
    let outcome = processor::handler::handle(&pool, &on_connect, &mixed)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Purchased(_)), "{outcome:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_body_with_nul_is_processed_and_kept_byte_for_byte(pool: PgPool) {
    seed(&pool).await;
    let p = Payment::new(&pool, "nul").await;
    let event = p.event("checkout.session.completed.json", "paid", |e| {
        e["data"]["object"]["customer_details"]["name"] = json!("Test\u{0}Buyer");
    });
    assert!(String::from_utf8_lossy(&event.body).contains(r"Test\u0000Buyer"));
    assert!(matches!(
        handle(&pool, &event).await.unwrap(),
        Outcome::Purchased(_)
    ));
    let (body, name, api_version): (Vec<u8>, String, Option<String>) = sqlx::query_as(
        "SELECT body, payload->'data'->'object'->'customer_details'->>'name', api_version
           FROM stripe_events WHERE id = $1",
    )
    .bind(&event.event_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(body, event.body, "the body is kept as signed");
    assert_eq!(
        name, "Test\u{FFFD}Buyer",
        "the queryable copy replaces what jsonb refuses"
    );
    assert_eq!(api_version.as_deref(), Some("2025-04-30.basil"));
    let (_, access) = ownership(&pool, p.content).await;
    assert_eq!(access.map(|(_, active)| active), Some(true));
}

#[sqlx::test(migrations = "../migrations")]
async fn events_replay_republishes_the_signed_bytes(pool: PgPool) {
    seed(&pool).await;
    let prefix = test_prefix();
    let broker = open_broker(settings(&prefix, vec![ms(200)], 3)).await;
    // As Stripe formats it (pretty-printed, its key order), with an escape a JSON
    // round trip would rewrite, and a NUL.
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/events/checkout.session.completed.json"))
            .unwrap()
            .replace("Test Buyer", r"T\u00e9st\u0000Buyer");
    let body = text.into_bytes();
    let event = message(body.clone());
    handle(&pool, &event).await.unwrap();

    let (code, out) = ops(&pool, &prefix, &["events", "replay", &event.event_id]).await;
    assert_eq!(code, 0, "{out}");
    let replayed = broker.take(&broker.topology.work_queue).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        replayed[0].delivery.data, body,
        "replayed bytes differ from the signed ones"
    );

    let (code, out) = ops(&pool, &prefix, &["events", "show", &event.event_id]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("api version: 2025-04-30.basil"), "{out}");
}
