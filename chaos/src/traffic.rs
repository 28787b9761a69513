//! The traffic: payments, each a sequence of Stripe events built from the fixtures in
//! `fixtures/stripe/events`, plus poison events; and the plan of sends (each event 1 to 3
//! times, spread over the run, shuffled).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::{Effect, Signal};
use crate::rng::Rng;

const COMPLETED: &str =
    include_str!("../../fixtures/stripe/events/checkout.session.completed.json");
const COMPLETED_UNPAID: &str =
    include_str!("../../fixtures/stripe/events/checkout.session.completed.unpaid.json");
const ASYNC_SUCCEEDED: &str =
    include_str!("../../fixtures/stripe/events/checkout.session.async_payment_succeeded.json");
const ASYNC_FAILED: &str =
    include_str!("../../fixtures/stripe/events/checkout.session.async_payment_failed.json");
const EXPIRED: &str = include_str!("../../fixtures/stripe/events/checkout.session.expired.json");
const REFUNDED: &str = include_str!("../../fixtures/stripe/events/charge.refunded.json");
const DISPUTE: &str = include_str!("../../fixtures/stripe/events/charge.dispute.created.json");
const INTENT_SUCCEEDED: &str =
    include_str!("../../fixtures/stripe/events/payment_intent.succeeded.json");

/// The organization and creator every content belongs to.
pub const ORGANIZATION: Uuid = Uuid::from_u128(0xc0ffee00_1234_4abc_8def_00000000c4a0);
pub const CREATOR: Uuid = Uuid::from_u128(0x7a9e4b2c_1d3f_4e5a_8b6c_00000000c4a0);

/// Why a poison event can never be handled, and what the dead letter's error must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poison {
    UnknownContent,
    UnknownCustomer,
    WrongOrganization,
    AmountMismatch,
    NotUuid,
}

impl Poison {
    pub const ALL: [Poison; 5] = [
        Poison::UnknownContent,
        Poison::UnknownCustomer,
        Poison::WrongOrganization,
        Poison::AmountMismatch,
        Poison::NotUuid,
    ];

    /// A piece of the processor's error text (`processor/src/error.rs`, `checkout.rs`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::UnknownContent => "unknown content",
            Self::UnknownCustomer => "unknown customer",
            Self::WrongOrganization => "belongs to organization",
            Self::AmountMismatch => "differs from the session's amount_total",
            Self::NotUuid => "is not a UUID",
        }
    }
}

/// One payment: its own customer and content, payment intent and session.
#[derive(Debug, Clone)]
pub struct Payment {
    pub n: usize,
    pub customer: Uuid,
    pub content: Uuid,
    pub amount: i64,
    pub payment_intent: String,
    /// Whether the catalog gets this payment's customer / content.
    pub seed_customer: bool,
    pub seed_content: bool,
    pub poison: Option<Poison>,
    /// Indexes into [`Traffic::events`], in Stripe's (natural) order.
    pub events: Vec<usize>,
    pub shape: &'static str,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub effect: Effect,
    pub body: Arc<Vec<u8>>,
    /// How many times it is sent (each send retried until accepted).
    pub copies: u32,
}

#[derive(Debug, Default)]
pub struct Traffic {
    pub payments: Vec<Payment>,
    pub events: Vec<Event>,
}

/// One planned request: event index and when (offset from the start of traffic).
#[derive(Debug, Clone, Copy)]
pub struct Send {
    pub event: usize,
    pub at: Duration,
}

fn fixture(text: &str) -> Value {
    serde_json::from_str(text).expect("fixtures are valid JSON")
}

struct Builder<'a> {
    traffic: &'a mut Traffic,
    run: &'a str,
    base_created: i64,
}

impl Builder<'_> {
    fn payment(&mut self, rng: &mut Rng, shape: &'static str) -> usize {
        let n = self.traffic.payments.len();
        self.traffic.payments.push(Payment {
            n,
            customer: Uuid::new_v4(),
            content: Uuid::new_v4(),
            amount: rng.range(500, 9999),
            payment_intent: format!("pi_chaos{}_{n:06}", self.run),
            seed_customer: true,
            seed_content: true,
            poison: None,
            events: Vec::new(),
            shape,
        });
        n
    }

    /// Adds an event: the fixture rewritten for payment `p`; `tag` keeps ids distinct.
    fn event(
        &mut self,
        rng: &mut Rng,
        p: usize,
        (fixture_text, tag): (&str, &str),
        effect: Effect,
        created_offset: i64,
        change: impl FnOnce(&mut Value),
    ) {
        let payment = &self.traffic.payments[p];
        let mut event = fixture(fixture_text);
        let id = format!("evt_chaos{}_{:06}_{tag}", self.run, payment.n);
        event["id"] = json!(id);
        event["created"] = json!(self.base_created + created_offset);
        let object = &mut event["data"]["object"];
        let amount = payment.amount;
        match object["object"].as_str() {
            Some("checkout.session") => {
                object["id"] = json!(format!("cs_chaos{}_{:06}", self.run, payment.n));
                object["payment_intent"] = json!(payment.payment_intent);
                object["amount_subtotal"] = json!(amount);
                object["amount_total"] = json!(amount);
                let metadata = &mut object["metadata"];
                metadata["customerId"] = json!(payment.customer.to_string());
                metadata["contentId"] = json!(payment.content.to_string());
                metadata["organizationId"] = json!(ORGANIZATION.to_string());
                metadata["amountPaidCents"] = json!(amount.to_string());
            }
            Some("charge") => {
                object["id"] = json!(format!("ch_chaos{}_{:06}", self.run, payment.n));
                object["payment_intent"] = json!(payment.payment_intent);
                object["amount"] = json!(amount);
                object["amount_captured"] = json!(amount);
            }
            Some("dispute") => {
                object["id"] = json!(format!("dp_chaos{}_{:06}", self.run, payment.n));
                object["charge"] = json!(format!("ch_chaos{}_{:06}", self.run, payment.n));
                object["payment_intent"] = json!(payment.payment_intent);
                object["amount"] = json!(amount);
            }
            Some("payment_intent") => {
                object["id"] = json!(payment.payment_intent);
                object["amount"] = json!(amount);
                object["amount_received"] = json!(amount);
            }
            _ => {}
        }
        change(&mut event);
        let event_type = event["type"].as_str().unwrap_or_default().to_owned();
        let body = serde_json::to_vec(&event).expect("serialisable");
        let copies = match rng.below(10) {
            0..=4 => 1,
            5..=7 => 2,
            _ => 3,
        };
        let index = self.traffic.events.len();
        self.traffic.events.push(Event {
            id,
            event_type,
            effect,
            body: Arc::new(body),
            copies,
        });
        self.traffic.payments[p].events.push(index);
    }

    /// Partial refunds (cumulative amounts, rising), maybe a full one; maybe a dispute.
    fn aftermath(&mut self, rng: &mut Rng, p: usize) {
        let amount = self.traffic.payments[p].amount;
        let mut refunded = 0;
        if rng.chance(0.3) {
            for k in 0..rng.range(1, 2) {
                refunded = rng.range(refunded + 1, (refunded + amount / 3).min(amount - 1));
                let cents = refunded;
                self.event(
                    rng,
                    p,
                    (REFUNDED, &format!("refund{k}_{cents}")),
                    Effect::Refund {
                        amount: cents,
                        full: false,
                    },
                    100 + k,
                    |e| {
                        e["data"]["object"]["amount_refunded"] = json!(cents);
                        e["data"]["object"]["refunded"] = json!(false);
                    },
                );
            }
        }
        if rng.chance(0.25) {
            self.event(
                rng,
                p,
                (REFUNDED, "refund_full"),
                Effect::Refund { amount, full: true },
                150,
                |e| {
                    e["data"]["object"]["amount_refunded"] = json!(amount);
                    e["data"]["object"]["refunded"] = json!(true);
                },
            );
        }
        if rng.chance(0.25) {
            let mut steps = vec![("created", "needs_response", 200)];
            if rng.chance(0.5) {
                steps.push(("updated", "under_review", 250));
            }
            if rng.chance(0.7) {
                let end = if rng.chance(0.5) { "won" } else { "lost" };
                steps.push(("closed", end, 300));
            }
            // All of the payment, or part of it: what a lost dispute takes back.
            let disputed = if rng.chance(0.5) {
                amount
            } else {
                rng.range(1, amount)
            };
            for (kind, status, offset) in steps {
                let at = self.base_created + offset;
                self.event(
                    rng,
                    p,
                    (DISPUTE, &format!("dispute_{kind}")),
                    Effect::Dispute {
                        status: status.to_owned(),
                        at,
                        amount: disputed,
                    },
                    offset,
                    |e| {
                        e["type"] = json!(format!("charge.dispute.{kind}"));
                        e["data"]["object"]["status"] = json!(status);
                        e["data"]["object"]["amount"] = json!(disputed);
                    },
                );
            }
        }
    }
}

impl Traffic {
    /// At least `events` distinct events (a payment is never cut short).
    pub fn generate(rng: &mut Rng, run: &str, events: usize) -> Self {
        let mut traffic = Traffic::default();
        let mut b = Builder {
            traffic: &mut traffic,
            run,
            base_created: chrono::Utc::now().timestamp() - 3600,
        };
        let mut poison_kind = 0usize;
        while b.traffic.events.len() < events {
            let roll = rng.below(100);
            match roll {
                // Paid at once (card).
                0..=44 => {
                    let p = b.payment(rng, "paid");
                    b.event(
                        rng,
                        p,
                        (COMPLETED, "completed"),
                        Effect::Session(Signal::Paid),
                        0,
                        |_| {},
                    );
                    if rng.chance(0.3) {
                        b.event(
                            rng,
                            p,
                            (INTENT_SUCCEEDED, "pi_succeeded"),
                            Effect::Ignored,
                            1,
                            |_| {},
                        );
                    }
                    b.aftermath(rng, p);
                }
                // Delayed payment that succeeds.
                45..=69 => {
                    let p = b.payment(rng, "delayed_succeeded");
                    b.event(
                        rng,
                        p,
                        (COMPLETED_UNPAID, "completed_unpaid"),
                        Effect::Session(Signal::Unpaid),
                        0,
                        |_| {},
                    );
                    b.event(
                        rng,
                        p,
                        (ASYNC_SUCCEEDED, "async_succeeded"),
                        Effect::Session(Signal::Paid),
                        50,
                        |_| {},
                    );
                    b.aftermath(rng, p);
                }
                // Delayed payment that fails.
                70..=86 => {
                    let p = b.payment(rng, "delayed_failed");
                    b.event(
                        rng,
                        p,
                        (COMPLETED_UNPAID, "completed_unpaid"),
                        Effect::Session(Signal::Unpaid),
                        0,
                        |_| {},
                    );
                    b.event(
                        rng,
                        p,
                        (ASYNC_FAILED, "async_failed"),
                        Effect::Session(Signal::PaymentFailed),
                        50,
                        |_| {},
                    );
                }
                // Abandoned checkout.
                87..=94 => {
                    let p = b.payment(rng, "expired");
                    b.event(rng, p, (EXPIRED, "expired"), Effect::Ignored, 0, |_| {});
                }
                // Poison: a paid session that can never be recorded.
                _ => {
                    let kind = Poison::ALL[poison_kind % Poison::ALL.len()];
                    poison_kind += 1;
                    let p = b.payment(rng, "poison");
                    let payment = &mut b.traffic.payments[p];
                    payment.poison = Some(kind);
                    match kind {
                        Poison::UnknownContent => payment.seed_content = false,
                        Poison::UnknownCustomer => payment.seed_customer = false,
                        _ => {}
                    }
                    let amount = payment.amount;
                    b.event(rng, p, (COMPLETED, "poison"), Effect::Poison, 0, |e| {
                        let metadata = &mut e["data"]["object"]["metadata"];
                        match kind {
                            Poison::WrongOrganization => {
                                metadata["organizationId"] = json!(Uuid::new_v4().to_string());
                            }
                            Poison::AmountMismatch => {
                                metadata["amountPaidCents"] = json!((amount + 1).to_string());
                            }
                            Poison::NotUuid => {
                                metadata["customerId"] = json!("customer-42");
                            }
                            Poison::UnknownContent | Poison::UnknownCustomer => {}
                        }
                    });
                }
            }
        }
        traffic
    }

    /// Every copy of every event, each at a time inside `window`. A payment's events all fall
    /// within `spread` of each other, in random order, interleaved with other payments'.
    pub fn plan(&self, rng: &mut Rng, window: Duration, spread: Duration) -> Vec<Send> {
        let window = window.as_secs_f64();
        let spread = spread.as_secs_f64().min(window / 3.0);
        let mut sends = Vec::new();
        for payment in &self.payments {
            let start = rng.unit() * (window - spread).max(0.0);
            for &event in &payment.events {
                for _ in 0..self.events[event].copies {
                    sends.push(Send {
                        event,
                        at: Duration::from_secs_f64(start + rng.unit() * spread),
                    });
                }
            }
        }
        sends.sort_by_key(|s| s.at);
        sends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_well_formed_and_distinct() {
        let mut rng = Rng::new(3);
        let traffic = Traffic::generate(&mut rng, "t", 600);
        assert!(traffic.events.len() >= 600);
        let mut ids: Vec<&str> = traffic.events.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), traffic.events.len(), "event ids are unique");
        for (i, event) in traffic.events.iter().enumerate() {
            let payment = traffic
                .payments
                .iter()
                .find(|p| p.events.contains(&i))
                .expect("every event belongs to a payment");
            let body: Value = serde_json::from_slice(&event.body).unwrap();
            assert_eq!(body["id"], json!(event.id));
            assert_eq!(body["type"], json!(event.event_type));
            let object = &body["data"]["object"];
            assert_eq!(
                object["payment_intent"].as_str().or(object["id"].as_str()),
                Some(payment.payment_intent.as_str()),
                "{}",
                event.id
            );
            assert!((1..=3).contains(&event.copies));
        }
        assert!(traffic.payments.iter().any(|p| p.poison.is_some()));
        let plan = traffic.plan(&mut rng, Duration::from_secs(60), Duration::from_secs(10));
        let copies: u32 = traffic.events.iter().map(|e| e.copies).sum();
        assert_eq!(plan.len(), copies as usize);
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(plan.iter().all(|s| s.at <= Duration::from_secs(60)));
    }
}
