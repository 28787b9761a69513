//! The final checks: the database and the dead-letter queue against the model of what the
//! accepted events must have done.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{self, Effect};
use crate::traffic::Traffic;

/// One broken promise, with the events behind it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: &'static str,
    pub event_ids: Vec<String>,
    pub detail: String,
}

/// A dead letter as `processor dlq list --json` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct DeadLetter {
    pub event_id: String,
    #[serde(default)]
    pub event_type: String,
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DbPurchase {
    id: Uuid,
    payment_intent: String,
    status: String,
    refunded: i64,
    dispute: Option<String>,
    customer: Uuid,
    content: Uuid,
    event_id: String,
    access: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub payments: usize,
    pub purchases: usize,
    pub by_status: BTreeMap<String, usize>,
    pub dead_letters: usize,
    pub dead_letter_copies: usize,
    pub events_logged: usize,
}

/// id, payment intent, status, refunded, dispute, customer, content, event id, access.
type PurchaseRow = (
    Uuid,
    Option<String>,
    String,
    i32,
    Option<String>,
    Uuid,
    Uuid,
    String,
    bool,
);

type State = Option<(String, i64, Option<String>, bool)>;

/// Payment intent, platform and organization bps, then `purchase_revenue`'s seven amounts.
type RevenueRow = (Option<String>, i32, i32, i64, i64, i64, i64, i64, i64, i64);

fn show(state: &State) -> String {
    match state {
        None => "no purchase".to_owned(),
        Some((status, refunded, dispute, access)) => format!(
            "status={status} refunded={refunded} dispute={} access={access}",
            dispute.as_deref().unwrap_or("none")
        ),
    }
}

/// Accepted events (poison excepted) not yet handled in `stripe_events`.
pub async fn unhandled(
    traffic: &Traffic,
    accepted: &HashMap<usize, u32>,
    pool: &PgPool,
) -> anyhow::Result<Vec<String>> {
    let done: Vec<String> =
        sqlx::query_scalar("SELECT id FROM stripe_events WHERE status IN ('processed', 'ignored')")
            .fetch_all(pool)
            .await?;
    let done: HashSet<String> = done.into_iter().collect();
    let mut waiting: Vec<String> = traffic
        .events
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            accepted.get(i).copied().unwrap_or(0) > 0
                && e.effect != Effect::Poison
                && !done.contains(&e.id)
        })
        .map(|(_, e)| e.id.clone())
        .collect();
    waiting.sort();
    Ok(waiting)
}

/// Runs every check; returns the violations and a summary of what the database holds.
pub async fn check(
    traffic: &Traffic,
    accepted: &HashMap<usize, u32>,
    pool: &PgPool,
    dead: &[DeadLetter],
) -> anyhow::Result<(Vec<Violation>, Summary)> {
    let mut violations = Vec::new();
    let mut summary = Summary {
        payments: traffic.payments.len(),
        ..Summary::default()
    };
    let revenue_rows: Vec<RevenueRow> = sqlx::query_as(
        "SELECT p.stripe_payment_intent_id, p.platform_fee_bps, p.organization_fee_bps,
                r.gross_cents, r.refunded_cents, r.charged_back_cents, r.net_cents,
                r.platform_net_cents, r.organization_net_cents, r.creator_net_cents
           FROM purchase_revenue r JOIN purchases p ON p.id = r.purchase_id",
    )
    .fetch_all(pool)
    .await?;
    let revenue_by_intent: HashMap<String, RevenueRow> = revenue_rows
        .into_iter()
        .map(|row| (row.0.clone().unwrap_or_default(), row))
        .collect();

    let rows: Vec<PurchaseRow> = sqlx::query_as(
        "SELECT id, stripe_payment_intent_id, status, refunded_amount_cents, dispute_status,
                    customer_id, content_id, stripe_event_id, has_access(customer_id, content_id)
               FROM purchases",
    )
    .fetch_all(pool)
    .await?;
    summary.purchases = rows.len();
    let mut by_intent: HashMap<String, Vec<DbPurchase>> = HashMap::new();
    for (id, pi, status, refunded, dispute, customer, content, event_id, access) in rows {
        *summary.by_status.entry(status.clone()).or_default() += 1;
        let pi = pi.unwrap_or_default();
        by_intent.entry(pi.clone()).or_default().push(DbPurchase {
            id,
            payment_intent: pi,
            status,
            refunded: i64::from(refunded),
            dispute,
            customer,
            content,
            event_id,
            access,
        });
    }
    let grants: Vec<(Uuid, Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT user_id, content_id, purchase_id, revoked_at IS NULL FROM content_access",
    )
    .fetch_all(pool)
    .await?;
    let events: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, last_error FROM stripe_events")
            .fetch_all(pool)
            .await?;
    summary.events_logged = events.len();
    let logged: HashMap<&str, (&str, Option<&str>)> = events
        .iter()
        .map(|(id, status, error)| (id.as_str(), (status.as_str(), error.as_deref())))
        .collect();

    let sent_ids: HashMap<&str, usize> = traffic
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    let is_accepted = |i: usize| accepted.get(&i).copied().unwrap_or(0) > 0;

    // Expected dead letters: event id → (class, piece of the error).
    let mut expected_dead: HashMap<String, (&'static str, String)> = HashMap::new();
    let mut known_intents = HashSet::new();
    let mut grants_by_pair: HashMap<(Uuid, Uuid), Vec<(Uuid, bool)>> = HashMap::new();
    for (user, content, purchase, active) in &grants {
        grants_by_pair
            .entry((*user, *content))
            .or_default()
            .push((*purchase, *active));
    }

    for payment in &traffic.payments {
        known_intents.insert(payment.payment_intent.as_str());
        let natural: Vec<(&str, &Effect)> = payment
            .events
            .iter()
            .filter(|&&i| is_accepted(i))
            .map(|&i| (traffic.events[i].id.as_str(), &traffic.events[i].effect))
            .collect();
        let accepted_ids: Vec<String> = natural.iter().map(|(id, _)| (*id).to_owned()).collect();
        let outcome = model::outcome(&natural, payment.amount);
        for id in &outcome.never_applied {
            expected_dead.insert(id.clone(), ("transient", "retries exhausted".to_owned()));
        }
        if let Some(kind) = payment.poison {
            for &i in &payment.events {
                if is_accepted(i) {
                    expected_dead.insert(
                        traffic.events[i].id.clone(),
                        ("permanent", kind.reason().to_owned()),
                    );
                }
            }
        }
        let expected: State = outcome.purchase.as_ref().map(|p| {
            (
                p.status.as_str().to_owned(),
                p.refunded,
                p.dispute.clone(),
                p.access(),
            )
        });
        let found = by_intent.get(&payment.payment_intent);
        if found.is_some_and(|f| f.len() > 1) {
            violations.push(Violation {
                kind: "two purchases for one payment",
                event_ids: accepted_ids.clone(),
                detail: format!("{}: {:?}", payment.payment_intent, found),
            });
        }
        let db = found.and_then(|f| f.first());
        let actual: State = db.map(|p| (p.status.clone(), p.refunded, p.dispute.clone(), p.access));
        if actual != expected {
            let kind = match (&expected, &actual) {
                (Some(_), None) => "accepted event not reflected (no purchase)",
                (None, Some(_)) => "purchase without an accepted event",
                _ => "purchase state differs from the model",
            };
            violations.push(Violation {
                kind,
                event_ids: accepted_ids.clone(),
                detail: format!(
                    "{} ({}): model {} | database {}",
                    payment.payment_intent,
                    payment.shape,
                    show(&expected),
                    show(&actual)
                ),
            });
        }
        // Net revenue: the view against the formula, under the purchase's own split rule.
        if let (Some(model), Some(row)) = (
            outcome.purchase.as_ref(),
            revenue_by_intent.get(&payment.payment_intent),
        ) {
            let (_, platform_bps, organization_bps, gross, refunded, charged_back, net, p, o, c) =
                row;
            let want = model.revenue(i64::from(*platform_bps), i64::from(*organization_bps));
            let have = model::Revenue {
                gross: *gross,
                refunded: *refunded,
                charged_back: *charged_back,
                net: *net,
                platform: *p,
                organization: *o,
                creator: *c,
            };
            if want != have {
                violations.push(Violation {
                    kind: "net revenue differs from the model",
                    event_ids: accepted_ids.clone(),
                    detail: format!(
                        "{} ({}): model {want:?} | purchase_revenue {have:?}",
                        payment.payment_intent, payment.shape
                    ),
                });
            }
        }
        if let Some(p) = db {
            if !payment
                .events
                .iter()
                .any(|&i| is_accepted(i) && traffic.events[i].id == p.event_id)
            {
                violations.push(Violation {
                    kind: "purchase recorded from an event that was not accepted",
                    event_ids: vec![p.event_id.clone()],
                    detail: format!("{} purchase {}", payment.payment_intent, p.id),
                });
            }
            if p.customer != payment.customer || p.content != payment.content {
                violations.push(Violation {
                    kind: "purchase for the wrong customer or content",
                    event_ids: accepted_ids.clone(),
                    detail: format!("{} purchase {}", payment.payment_intent, p.id),
                });
            }
        }
        // Access: only through this payment's purchase, and only when the model grants it.
        if let Some(pair_grants) = grants_by_pair.get(&(payment.customer, payment.content)) {
            let own = db.map(|p| p.id);
            let model_access = expected.as_ref().is_some_and(|s| s.3);
            for (purchase, active) in pair_grants {
                if Some(*purchase) != own {
                    violations.push(Violation {
                        kind: "access without an accepted event",
                        event_ids: accepted_ids.clone(),
                        detail: format!(
                            "{}: grant from purchase {purchase} (active={active})",
                            payment.payment_intent
                        ),
                    });
                } else if *active != model_access {
                    violations.push(Violation {
                        kind: "access differs from the model",
                        event_ids: accepted_ids.clone(),
                        detail: format!(
                            "{}: grant active={active}, model access={model_access}",
                            payment.payment_intent
                        ),
                    });
                }
            }
        }

        // The event log: every accepted event handled, with the status its effect implies.
        for &i in &payment.events {
            if !is_accepted(i) {
                continue;
            }
            let event = &traffic.events[i];
            let status = logged.get(event.id.as_str()).map(|(s, _)| *s);
            let want: &[&str] = if expected_dead.contains_key(&event.id) {
                &["dead", "retrying", "received"]
            } else if event.effect == Effect::Ignored {
                &["ignored"]
            } else {
                &["processed"]
            };
            let fine = match status {
                Some(s) => want.contains(&s),
                // A failure is recorded best effort (outside the rolled-back transaction).
                None => expected_dead.contains_key(&event.id),
            };
            if !fine {
                violations.push(Violation {
                    kind: "accepted event not handled in stripe_events",
                    event_ids: vec![event.id.clone()],
                    detail: format!(
                        "{}: status {:?}, expected one of {want:?}; last_error {:?}",
                        event.event_type,
                        status,
                        logged.get(event.id.as_str()).and_then(|(_, e)| *e)
                    ),
                });
            }
        }
    }

    // Nothing from nowhere.
    for (pi, purchases) in &by_intent {
        if !known_intents.contains(pi.as_str()) {
            for p in purchases {
                violations.push(Violation {
                    kind: "purchase without an accepted event",
                    event_ids: vec![p.event_id.clone()],
                    detail: format!("unknown payment intent {pi:?}, purchase {}", p.id),
                });
            }
        }
    }
    for (id, status, _) in &events {
        match sent_ids.get(id.as_str()) {
            None => violations.push(Violation {
                kind: "event in stripe_events that was never sent",
                event_ids: vec![id.clone()],
                detail: format!("status {status}"),
            }),
            Some(&i) if !is_accepted(i) && status != "dead" => violations.push(Violation {
                kind: "event handled that was never accepted (no 200)",
                event_ids: vec![id.clone()],
                detail: format!("status {status}"),
            }),
            _ => {}
        }
    }
    // No payment has two completed purchases (nor a customer two for one content).
    let completed: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT customer_id, content_id, count(*) FROM purchases WHERE status = 'completed'
          GROUP BY customer_id, content_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    for (customer, content, n) in completed {
        violations.push(Violation {
            kind: "two completed purchases",
            event_ids: Vec::new(),
            detail: format!("customer {customer} content {content}: {n} completed purchases"),
        });
    }

    // The dead-letter queue holds exactly the poison events, each with its reason.
    let mut copies: HashMap<&str, Vec<&DeadLetter>> = HashMap::new();
    for letter in dead {
        copies
            .entry(letter.event_id.as_str())
            .or_default()
            .push(letter);
    }
    summary.dead_letters = copies.len();
    summary.dead_letter_copies = dead.len();
    let mut missing: Vec<String> = expected_dead
        .keys()
        .filter(|id| !copies.contains_key(id.as_str()))
        .cloned()
        .collect();
    missing.sort();
    if !missing.is_empty() {
        let detail = missing
            .iter()
            .take(20)
            .map(|id| format!("{id}: expected {:?}", expected_dead[id]))
            .collect::<Vec<_>>()
            .join("; ");
        violations.push(Violation {
            kind: "poison event missing from the dead-letter queue",
            event_ids: missing,
            detail,
        });
    }
    let mut ids: Vec<&str> = copies.keys().copied().collect();
    ids.sort();
    for id in ids {
        let letters = &copies[id];
        match expected_dead.get(id) {
            None => violations.push(Violation {
                kind: "dead letter that is not a poison event",
                event_ids: vec![id.to_owned()],
                detail: letters
                    .iter()
                    .map(|l| {
                        format!(
                            "{} class={} attempts={} error={}",
                            l.event_type, l.class, l.attempts, l.last_error
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" | "),
            }),
            Some((class, reason)) => {
                for l in letters {
                    if l.class != *class || !l.last_error.contains(reason.as_str()) {
                        violations.push(Violation {
                            kind: "dead letter with the wrong reason",
                            event_ids: vec![id.to_owned()],
                            detail: format!(
                                "expected class {class} and an error with {reason:?}; got class={} error={}",
                                l.class, l.last_error
                            ),
                        });
                    }
                }
            }
        }
    }
    Ok((violations, summary))
}
