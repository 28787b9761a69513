//! A model of the purchase lifecycle, written from the table in `processor/src/lifecycle.rs`
//! (and the README's "Purchase lifecycle"), independent of the processor's code: what a
//! payment's purchase must look like once a set of its events has been handled, in any order
//! and any number of times.
//!
//! | from \ event      | paid             | unpaid completed | payment failed | full refund |
//! |-------------------|------------------|------------------|----------------|-------------|
//! | (no purchase)     | completed        | pending          | failed         | wait        |
//! | pending           | completed        | —                | failed         | refunded    |
//! | completed         | —                | —                | —              | refunded    |
//! | requires_refund   | —                | —                | —              | refunded    |
//! | failed            | —                | —                | —              | —           |
//! | refunded          | —                | —                | —              | —           |
//!
//! A refund or a dispute whose purchase does not exist yet waits (the processor retries it).
//! A refund raises the refunded amount to the largest seen (capped at the amount paid), a
//! full one also moves the status. Disputes: a closed status (`won`, `lost`,
//! `warning_closed`, `prevented`) is final; among open ones the latest `created` wins. Access:
//! `completed` and a dispute that is not `lost`. Every payment of the chaos traffic has its
//! own customer and content, so no double payment (`requires_refund`) arises.

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
    Refunded,
    /// A double payment; the chaos traffic gives every payment its own customer and
    /// content, so it never arises, but the table keeps it.
    #[allow(dead_code)]
    RequiresRefund,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
            Self::RequiresRefund => "requires_refund",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Paid,
    Unpaid,
    PaymentFailed,
    FullRefund,
}

/// The lifecycle table. `None`: nothing changes.
pub fn next(current: Option<Status>, signal: Signal) -> Option<Status> {
    use Signal as G;
    use Status as S;
    match (current, signal) {
        (None | Some(S::Pending), G::Paid) => Some(S::Completed),
        (None, G::Unpaid) => Some(S::Pending),
        (None | Some(S::Pending), G::PaymentFailed) => Some(S::Failed),
        (Some(S::Pending | S::Completed | S::RequiresRefund), G::FullRefund) => Some(S::Refunded),
        _ => None,
    }
}

pub fn grants_access(status: Status, dispute: Option<&str>) -> bool {
    status == Status::Completed && dispute != Some("lost")
}

pub fn dispute_closed(status: &str) -> bool {
    matches!(status, "won" | "lost" | "warning_closed" | "prevented")
}

/// Whether a dispute status seen in an event created at `at` replaces the stored one.
pub fn dispute_replaces(stored: Option<(&str, i64)>, new: &str, at: i64) -> bool {
    match stored {
        None => true,
        Some((current, _)) if dispute_closed(current) => false,
        Some(_) if dispute_closed(new) => true,
        Some((_, stored_at)) => at >= stored_at,
    }
}

/// What one event says about its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A checkout-session event: paid, unpaid, or payment failed.
    Session(Signal),
    /// `charge.refunded`: Stripe's cumulative `amount_refunded`, and whether it is full.
    Refund { amount: i64, full: bool },
    /// `charge.dispute.*`: Stripe's dispute status and the event's `created`.
    Dispute { status: String, at: i64 },
    /// Recorded and ignored (expired session, payment intent events).
    Ignored,
    /// Can never be handled: must end in the dead-letter queue.
    Poison,
}

impl Effect {
    fn needs_purchase(&self) -> bool {
        matches!(self, Self::Refund { .. } | Self::Dispute { .. })
    }
}

/// The purchase of one payment as the database must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub status: Status,
    pub refunded: i64,
    pub dispute: Option<String>,
    dispute_at: Option<i64>,
}

impl Purchase {
    pub fn access(&self) -> bool {
        grants_access(self.status, self.dispute.as_deref())
    }
}

/// The end state of one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub purchase: Option<Purchase>,
    /// Events that waited for a purchase that never came (the processor dead-letters them
    /// once its attempts run out).
    pub never_applied: Vec<String>,
}

fn apply(purchase: &mut Option<Purchase>, effect: &Effect, amount_paid: i64) {
    match effect {
        Effect::Session(signal) => {
            let current = purchase.as_ref().map(|p| p.status);
            if let Some(to) = next(current, *signal) {
                match purchase {
                    Some(p) => p.status = to,
                    None => {
                        *purchase = Some(Purchase {
                            status: to,
                            refunded: 0,
                            dispute: None,
                            dispute_at: None,
                        });
                    }
                }
            }
        }
        Effect::Refund { amount, full } => {
            let Some(p) = purchase else { return };
            p.refunded = p.refunded.max((*amount).clamp(0, amount_paid));
            if *full && let Some(to) = next(Some(p.status), Signal::FullRefund) {
                p.status = to;
            }
        }
        Effect::Dispute { status, at } => {
            let Some(p) = purchase else { return };
            let stored = p.dispute.as_deref().zip(p.dispute_at);
            if p.dispute.as_deref() != Some(status.as_str())
                && dispute_replaces(stored, status, *at)
            {
                p.dispute = Some(status.clone());
                p.dispute_at = Some(*at);
            }
        }
        Effect::Ignored | Effect::Poison => {}
    }
}

/// Handles the events in this order, as the pipeline would: an event that needs a purchase
/// not there yet goes to the back of the line and is tried again once something changed.
pub fn run(order: &[(&str, &Effect)], amount_paid: i64) -> Outcome {
    let mut purchase = None;
    let mut waiting: std::collections::VecDeque<(&str, &Effect)> = order.iter().copied().collect();
    let mut stalled = 0;
    while let Some((id, effect)) = waiting.pop_front() {
        if effect.needs_purchase() && purchase.is_none() {
            waiting.push_back((id, effect));
            stalled += 1;
            if stalled > waiting.len() {
                break;
            }
            continue;
        }
        stalled = 0;
        apply(&mut purchase, effect, amount_paid);
    }
    let mut never_applied: Vec<String> = waiting.iter().map(|(id, _)| (*id).to_owned()).collect();
    never_applied.sort();
    Outcome {
        purchase,
        never_applied,
    }
}

/// Two orders of the same events that end differently.
#[derive(Debug)]
pub struct Divergence {
    pub natural: Outcome,
    pub order: Vec<String>,
    pub other: Outcome,
}

/// The outcome of the events in their natural (Stripe's) order, checked against `tries`
/// random orders: the lifecycle promises they all agree. `Err` holds the first order that
/// disagrees and its outcome.
pub fn expected(
    natural: &[(&str, &Effect)],
    amount_paid: i64,
    rng: &mut Rng,
    tries: usize,
) -> Result<Outcome, Box<Divergence>> {
    let reference = run(natural, amount_paid);
    let mut order = natural.to_vec();
    for _ in 0..tries {
        rng.shuffle(&mut order);
        let other = run(&order, amount_paid);
        if other != reference {
            return Err(Box::new(Divergence {
                natural: reference,
                order: order.iter().map(|(id, _)| (*id).to_owned()).collect(),
                other,
            }));
        }
    }
    Ok(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(outcome: &Outcome) -> Option<(Status, i64, Option<&str>, bool)> {
        outcome
            .purchase
            .as_ref()
            .map(|p| (p.status, p.refunded, p.dispute.as_deref(), p.access()))
    }

    fn dispute(status: &str, at: i64) -> Effect {
        Effect::Dispute {
            status: status.into(),
            at,
        }
    }

    #[test]
    fn every_order_converges_for_the_traffic_shapes() {
        let mut rng = Rng::new(1);
        let shapes: Vec<Vec<Effect>> = vec![
            vec![Effect::Session(Signal::Paid)],
            vec![
                Effect::Session(Signal::Unpaid),
                Effect::Session(Signal::Paid),
                Effect::Refund {
                    amount: 300,
                    full: false,
                },
                Effect::Refund {
                    amount: 1000,
                    full: true,
                },
                dispute("needs_response", 100),
                dispute("under_review", 200),
                dispute("lost", 300),
            ],
            vec![
                Effect::Session(Signal::Unpaid),
                Effect::Session(Signal::PaymentFailed),
            ],
            vec![
                Effect::Session(Signal::Paid),
                Effect::Ignored,
                dispute("needs_response", 100),
                dispute("won", 300),
            ],
        ];
        for shape in &shapes {
            let ids: Vec<String> = (0..shape.len()).map(|i| format!("e{i}")).collect();
            let natural: Vec<(&str, &Effect)> =
                ids.iter().map(String::as_str).zip(shape.iter()).collect();
            assert!(
                expected(&natural, 1000, &mut rng, 200).is_ok(),
                "{shape:?} does not converge"
            );
        }
    }

    #[test]
    fn the_table() {
        let order = |effects: &[Effect]| {
            let ids: Vec<String> = (0..effects.len()).map(|i| format!("e{i}")).collect();
            let natural: Vec<(&str, &Effect)> =
                ids.iter().map(String::as_str).zip(effects.iter()).collect();
            run(&natural, 1000)
        };
        let paid = Effect::Session(Signal::Paid);
        let unpaid = Effect::Session(Signal::Unpaid);
        let failed = Effect::Session(Signal::PaymentFailed);
        let full = Effect::Refund {
            amount: 1000,
            full: true,
        };
        let partial = Effect::Refund {
            amount: 400,
            full: false,
        };
        assert_eq!(
            state(&order(std::slice::from_ref(&paid))),
            Some((Status::Completed, 0, None, true))
        );
        assert_eq!(
            state(&order(&[unpaid.clone(), failed.clone(), paid.clone()])),
            Some((Status::Failed, 0, None, false))
        );
        assert_eq!(
            state(&order(&[full.clone(), unpaid.clone()])),
            Some((Status::Refunded, 1000, None, false)),
            "a full refund of a pending purchase refunds it"
        );
        assert_eq!(
            state(&order(&[partial.clone(), paid.clone()])),
            Some((Status::Completed, 400, None, true))
        );
        assert_eq!(
            state(&order(&[
                paid.clone(),
                dispute("lost", 300),
                dispute("needs_response", 400)
            ])),
            Some((Status::Completed, 0, Some("lost"), false))
        );
        let waiting = order(&[partial.clone(), dispute("won", 1)]);
        assert_eq!(waiting.purchase, None);
        assert_eq!(waiting.never_applied, vec!["e0", "e1"]);
        assert_eq!(order(&[Effect::Poison, Effect::Ignored]).purchase, None);
    }
}
