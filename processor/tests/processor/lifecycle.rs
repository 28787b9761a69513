//! The purchase lifecycle against a real database: each transition, every order of events
//! for one payment, refunds, disputes, repeats.

use processor::error::FailureClass;
use processor::handler::Outcome;
use serde_json::{Value, json};
use shared::contract::EventMessage;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;

/// One payment of the sample customer: its own payment intent, session and content, so that
/// several payments can live in one test database.
pub struct Payment {
    pub n: String,
    pub content: Uuid,
}

impl Payment {
    pub async fn new(pool: &PgPool, n: &str) -> Self {
        let content = Uuid::new_v4();
        insert_content(pool, content).await;
        Self {
            n: n.to_owned(),
            content,
        }
    }

    /// A fixture rewritten for this payment; `tag` keeps event ids distinct.
    pub fn event(&self, file: &str, tag: &str, change: impl FnOnce(&mut Value)) -> EventMessage {
        let text = std::fs::read_to_string(format!("{FIXTURES}/events/{file}")).unwrap();
        let mut event: Value = serde_json::from_str(&text).unwrap();
        event["id"] = json!(format!("evt_{}_{tag}", self.n));
        let object = &mut event["data"]["object"];
        object["payment_intent"] = json!(format!("pi_{}", self.n));
        if object["object"] == "checkout.session" {
            object["id"] = json!(format!("cs_{}", self.n));
            object["metadata"]["contentId"] = json!(self.content.to_string());
        }
        change(&mut event);
        message(serde_json::to_vec(&event).unwrap())
    }

    pub fn paid(&self) -> EventMessage {
        self.event("checkout.session.completed.json", "paid", |_| {})
    }
    pub fn unpaid(&self) -> EventMessage {
        self.event("checkout.session.completed.unpaid.json", "unpaid", |_| {})
    }
    pub fn async_succeeded(&self) -> EventMessage {
        self.event(
            "checkout.session.async_payment_succeeded.json",
            "async_ok",
            |_| {},
        )
    }
    pub fn async_failed(&self) -> EventMessage {
        self.event(
            "checkout.session.async_payment_failed.json",
            "async_failed",
            |_| {},
        )
    }
    pub fn refund(&self, amount: i64, full: bool) -> EventMessage {
        self.event("charge.refunded.json", &format!("refund_{amount}"), |e| {
            e["data"]["object"]["amount_refunded"] = json!(amount);
            e["data"]["object"]["refunded"] = json!(full);
        })
    }
    pub fn dispute(&self, kind: &str, status: &str, created: i64) -> EventMessage {
        self.event(
            "charge.dispute.created.json",
            &format!("dispute_{status}"),
            |e| {
                e["type"] = json!(format!("charge.dispute.{kind}"));
                e["created"] = json!(created);
                e["data"]["object"]["status"] = json!(status);
            },
        )
    }

    /// (status, refunded cents, dispute status, access) — or None without a purchase.
    pub async fn state(&self, pool: &PgPool) -> Option<(String, i32, Option<String>, bool)> {
        let row: Option<(String, i32, Option<String>)> = sqlx::query_as(
            "SELECT status, refunded_amount_cents, dispute_status FROM purchases WHERE stripe_payment_intent_id = $1",
        )
        .bind(format!("pi_{}", self.n))
        .fetch_optional(pool)
        .await
        .unwrap();
        let access: bool = sqlx::query_scalar("SELECT has_access($1, $2)")
            .bind(CUSTOMER)
            .bind(self.content)
            .fetch_one(pool)
            .await
            .unwrap();
        row.map(|(status, refunded, dispute)| (status, refunded, dispute, access))
    }
}

/// Delivers events as the broker would: a transient failure goes to the back of the line
/// and is retried; gives up after a few rounds.
pub async fn deliver_all(pool: &PgPool, events: Vec<EventMessage>) {
    let mut queue: std::collections::VecDeque<EventMessage> = events.into();
    let mut retries = 0;
    while let Some(event) = queue.pop_front() {
        match handle(pool, &event).await {
            Ok(_) => {}
            Err(error) if error.class() == FailureClass::Transient && retries < 20 => {
                retries += 1;
                queue.push_back(event);
            }
            Err(error) => panic!("{}: {error}", event.event_id),
        }
    }
}

fn state(
    status: &str,
    refunded: i32,
    dispute: Option<&str>,
    access: bool,
) -> Option<(String, i32, Option<String>, bool)> {
    Some((
        status.to_owned(),
        refunded,
        dispute.map(str::to_owned),
        access,
    ))
}

#[sqlx::test(migrations = "../migrations")]
async fn delayed_payment_pending_then_succeeded(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "delayed").await;
    assert!(matches!(
        handle(&pool, &p.unpaid()).await.unwrap(),
        Outcome::Updated(_)
    ));
    assert_eq!(p.state(&pool).await, state("pending", 0, None, false));
    assert!(matches!(
        handle(&pool, &p.async_succeeded()).await.unwrap(),
        Outcome::Updated(_)
    ));
    assert_eq!(p.state(&pool).await, state("completed", 0, None, true));
}

#[sqlx::test(migrations = "../migrations")]
async fn delayed_payment_failed_and_async_events_alone(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "fails").await;
    handle(&pool, &p.unpaid()).await.unwrap();
    handle(&pool, &p.async_failed()).await.unwrap();
    assert_eq!(p.state(&pool).await, state("failed", 0, None, false));
    // A late success cannot revive a failed payment, a late "unpaid" cannot either.
    handle(&pool, &p.unpaid()).await.unwrap();
    assert_eq!(p.state(&pool).await, state("failed", 0, None, false));

    // The async events alone, the completed one never seen: they create the purchase.
    let q = Payment::new(&pool, "only_async_ok").await;
    assert!(matches!(
        handle(&pool, &q.async_succeeded()).await.unwrap(),
        Outcome::Purchased(_)
    ));
    assert_eq!(q.state(&pool).await, state("completed", 0, None, true));
    let r = Payment::new(&pool, "only_async_failed").await;
    handle(&pool, &r.async_failed()).await.unwrap();
    assert_eq!(r.state(&pool).await, state("failed", 0, None, false));
}

#[sqlx::test(migrations = "../migrations")]
async fn expired_session_makes_no_purchase(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "expired").await;
    let expired = p.event("checkout.session.expired.json", "expired", |_| {});
    assert!(matches!(
        handle(&pool, &expired).await.unwrap(),
        Outcome::Ignored(_)
    ));
    assert_eq!(p.state(&pool).await, None);
    assert_eq!(
        event_status(&pool, &expired.event_id).await.unwrap().0,
        "ignored"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn partial_then_full_refund(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "refunds").await;
    handle(&pool, &p.paid()).await.unwrap();
    handle(&pool, &p.refund(500, false)).await.unwrap();
    assert_eq!(
        p.state(&pool).await,
        state("completed", 500, None, true),
        "a partial refund keeps access"
    );
    // Cumulative amounts: an older, smaller one arriving late changes nothing.
    handle(&pool, &p.refund(300, false)).await.unwrap();
    assert_eq!(p.state(&pool).await, state("completed", 500, None, true));
    handle(&pool, &p.refund(1999, true)).await.unwrap();
    assert_eq!(p.state(&pool).await, state("refunded", 1999, None, false));
    let refunded_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT refunded_at FROM purchases WHERE stripe_payment_intent_id = 'pi_refunds'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(refunded_at.is_some());
    let revoked: i64 = count(
        &pool,
        "SELECT count(*) FROM content_access WHERE revoked_at IS NOT NULL",
    )
    .await;
    assert_eq!(revoked, 1);
    // A late completed event does not undo the refund.
    handle(&pool, &p.async_succeeded()).await.unwrap();
    assert_eq!(p.state(&pool).await, state("refunded", 1999, None, false));
}

#[sqlx::test(migrations = "../migrations")]
async fn refund_before_purchase_waits_then_applies(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "early_refund").await;
    let refund = p.refund(1999, true);
    let error = handle(&pool, &refund).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient, "{error}");
    assert!(
        error
            .to_string()
            .contains("no purchase for payment intent pi_early_refund"),
        "{error}"
    );
    handle(&pool, &p.paid()).await.unwrap();
    assert_eq!(p.state(&pool).await, state("completed", 0, None, true));
    handle(&pool, &refund).await.unwrap();
    assert_eq!(p.state(&pool).await, state("refunded", 1999, None, false));
}

#[sqlx::test(migrations = "../migrations")]
async fn every_order_of_completed_async_succeeded_refunded_converges(pool: PgPool) {
    seed_catalog(&pool).await;
    let orders: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (paid_first, name) in [(true, "paid"), (false, "unpaid")] {
        for (i, order) in orders.iter().enumerate() {
            let p = Payment::new(&pool, &format!("perm_{name}_{i}")).await;
            let completed = if paid_first { p.paid() } else { p.unpaid() };
            let events = [completed, p.async_succeeded(), p.refund(1999, true)];
            deliver_all(&pool, order.iter().map(|&k| events[k].clone()).collect()).await;
            assert_eq!(
                p.state(&pool).await,
                state("refunded", 1999, None, false),
                "{name} completed, order {order:?}"
            );
        }
    }
    // One purchase per payment, no more.
    assert_eq!(count(&pool, "SELECT count(*) FROM purchases").await, 12);
}

#[sqlx::test(migrations = "../migrations")]
async fn lost_dispute_revokes_won_keeps(pool: PgPool) {
    seed_catalog(&pool).await;
    let lost = Payment::new(&pool, "lost").await;
    handle(&pool, &lost.paid()).await.unwrap();
    handle(&pool, &lost.dispute("created", "needs_response", 100))
        .await
        .unwrap();
    assert_eq!(
        lost.state(&pool).await,
        state("completed", 0, Some("needs_response"), true)
    );
    handle(&pool, &lost.dispute("closed", "lost", 300))
        .await
        .unwrap();
    assert_eq!(
        lost.state(&pool).await,
        state("charged_back", 0, Some("lost"), false)
    );
    // A stale update arriving after the close changes nothing.
    handle(&pool, &lost.dispute("updated", "under_review", 200))
        .await
        .unwrap();
    assert_eq!(
        lost.state(&pool).await,
        state("charged_back", 0, Some("lost"), false)
    );

    let won = Payment::new(&pool, "won").await;
    handle(&pool, &won.paid()).await.unwrap();
    // Out of order: the close arrives before the creation.
    handle(&pool, &won.dispute("closed", "won", 300))
        .await
        .unwrap();
    handle(&pool, &won.dispute("created", "needs_response", 100))
        .await
        .unwrap();
    assert_eq!(
        won.state(&pool).await,
        state("completed", 0, Some("won"), true)
    );

    // A dispute for a purchase that is not there yet waits, like a refund.
    let early = Payment::new(&pool, "early_dispute").await;
    let error = handle(&pool, &early.dispute("created", "needs_response", 100))
        .await
        .unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient);
}

#[sqlx::test(migrations = "../migrations")]
async fn double_delivery_of_each_type_changes_nothing(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "twice").await;
    let events = [
        p.unpaid(),
        p.async_succeeded(),
        p.dispute("created", "needs_response", 100),
        p.refund(500, false),
        p.refund(1999, true),
        p.async_failed(),
        p.event("checkout.session.expired.json", "expired", |_| {}),
    ];
    for event in &events {
        handle(&pool, event).await.unwrap();
        let after_first = p.state(&pool).await;
        let purchases = count(&pool, "SELECT count(*) FROM purchases").await;
        assert_eq!(
            handle(&pool, event).await.unwrap(),
            Outcome::Duplicate,
            "{}",
            event.event_id
        );
        assert_eq!(p.state(&pool).await, after_first, "{}", event.event_id);
        assert_eq!(
            count(&pool, "SELECT count(*) FROM purchases").await,
            purchases
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn access_check_command(pool: PgPool) {
    seed_catalog(&pool).await;
    let p = Payment::new(&pool, "access").await;
    handle(&pool, &p.paid()).await.unwrap();
    let user = CUSTOMER.to_string();
    let content = p.content.to_string();
    let (code, out) = ops(
        &pool,
        "unused",
        &["access", "check", "--user", &user, "--content", &content],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "granted"));
    handle(&pool, &p.refund(1999, true)).await.unwrap();
    let (code, out) = ops(
        &pool,
        "unused",
        &["access", "check", "--user", &user, "--content", &content],
    )
    .await;
    assert_eq!((code, out.trim()), (1, "not granted"));
    let other = Uuid::new_v4().to_string();
    let (code, _) = ops(
        &pool,
        "unused",
        &["access", "check", "--user", &other, "--content", &content],
    )
    .await;
    assert_eq!(code, 1);
    let (code, _) = ops(
        &pool,
        "unused",
        &["access", "check", "--user", "nope", "--content", &content],
    )
    .await;
    assert_eq!(code, 2, "a malformed id is a usage error");
}
