//! What a payment's purchase must look like once a set of its events has been handled, in
//! any order and any number of times, with the money it earned.
//!
//! Written from the README's lifecycle and revenue rules as statements about the *set* of
//! events a payment received, not as the processor's transition function (state × event →
//! state): the processor is checked against a different formulation of the same rules, so
//! a wrong rule in one is not restated in the other. Order cannot matter here by
//! construction; the chaos run checks that it did not matter in the database either.
//!
//! For a payment with amount A and the accepted events E:
//! - no checkout-session event in E: no purchase; its refunds and disputes wait for one
//!   that never comes (dead-lettered once their retries run out);
//! - the dispute status is the closed one in E if any (`won`, `lost`, `warning_closed`,
//!   `prevented`), else the open one created last;
//! - status: `charged_back` if the dispute is `lost`; else `refunded` after a full refund;
//!   else `completed` if paid; else `failed` if the payment failed; else `pending` (a
//!   partial refund or an open dispute moves no status);
//! - refunded = A after a full refund, else the largest `amount_refunded` (at most A);
//! - charged back = the disputed amount (at most A) when the dispute is `lost`, else 0;
//! - access: exactly when `completed`;
//! - revenue: gross = A unless pending or failed (then 0); net = max(gross − refunded −
//!   charged back, 0); platform = half-up(net × platform bps / 10000); organization =
//!   half-up((net − platform) × organization bps / 10000); creator = the rest.
//!
//! Every payment of the chaos traffic has its own customer and content, so no double
//! payment (`requires_refund`) arises.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
    Refunded,
    ChargedBack,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
            Self::ChargedBack => "charged_back",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Paid,
    Unpaid,
    PaymentFailed,
}

/// What one event says about its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A checkout-session event: paid, unpaid, or payment failed.
    Session(Signal),
    /// `charge.refunded`: Stripe's cumulative `amount_refunded`, and whether it is full.
    Refund { amount: i64, full: bool },
    /// `charge.dispute.*`: Stripe's dispute status, the event's `created`, the disputed
    /// amount.
    Dispute {
        status: String,
        at: i64,
        amount: i64,
    },
    /// Recorded and ignored (expired session, payment intent events).
    Ignored,
    /// Can never be handled: must end in the dead-letter queue.
    Poison,
}

fn closed(status: &str) -> bool {
    matches!(status, "won" | "lost" | "warning_closed" | "prevented")
}

/// Net revenue of a purchase and its three shares, in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revenue {
    pub gross: i64,
    pub refunded: i64,
    pub charged_back: i64,
    pub net: i64,
    pub platform: i64,
    pub organization: i64,
    pub creator: i64,
}

impl Revenue {
    /// The revenue formula, for a purchase's own split rule.
    pub fn of(
        gross: i64,
        refunded: i64,
        charged_back: i64,
        platform_bps: i64,
        organization_bps: i64,
    ) -> Self {
        let half_up = |amount: i64, bps: i64| (amount * bps + 5_000) / 10_000;
        let net = (gross - refunded - charged_back).max(0);
        let platform = half_up(net, platform_bps);
        let organization = half_up(net - platform, organization_bps);
        Self {
            gross,
            refunded,
            charged_back,
            net,
            platform,
            organization,
            creator: net - platform - organization,
        }
    }
}

/// The purchase of one payment as the database must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub status: Status,
    pub refunded: i64,
    pub charged_back: i64,
    pub dispute: Option<String>,
    amount: i64,
}

impl Purchase {
    pub fn access(&self) -> bool {
        self.status == Status::Completed
    }

    /// Net revenue under the purchase's split rule (its basis points, as stored).
    pub fn revenue(&self, platform_bps: i64, organization_bps: i64) -> Revenue {
        let gross = match self.status {
            Status::Pending | Status::Failed => 0,
            _ => self.amount,
        };
        Revenue::of(
            gross,
            self.refunded,
            self.charged_back,
            platform_bps,
            organization_bps,
        )
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

/// The outcome of a payment of `amount_paid` that received `events` (id, effect), repeats
/// included: a fold over the set, not a replay.
pub fn outcome(events: &[(&str, &Effect)], amount_paid: i64) -> Outcome {
    let effects = || events.iter().map(|(_, effect)| *effect);
    let has = |signal: Signal| effects().any(|e| *e == Effect::Session(signal));
    let sessions = effects().any(|e| matches!(e, Effect::Session(_)));
    if !sessions {
        let mut never_applied: Vec<String> = events
            .iter()
            .filter(|(_, e)| matches!(e, Effect::Refund { .. } | Effect::Dispute { .. }))
            .map(|(id, _)| (*id).to_owned())
            .collect();
        never_applied.sort();
        never_applied.dedup();
        return Outcome {
            purchase: None,
            never_applied,
        };
    }

    let disputes: Vec<(&str, i64, i64)> = effects()
        .filter_map(|e| match e {
            Effect::Dispute { status, at, amount } => Some((status.as_str(), *at, *amount)),
            _ => None,
        })
        .collect();
    let dispute = disputes
        .iter()
        .find(|(status, _, _)| closed(status))
        .or_else(|| disputes.iter().max_by_key(|(_, at, _)| *at))
        .copied();
    let lost = dispute.filter(|(status, _, _)| *status == "lost");

    let full_refund = effects().any(|e| matches!(e, Effect::Refund { full: true, .. }));
    let largest_refund = effects()
        .filter_map(|e| match e {
            Effect::Refund { amount, .. } => Some((*amount).clamp(0, amount_paid)),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let refunded = if full_refund {
        amount_paid
    } else {
        largest_refund
    };

    let status = if lost.is_some() && !has(Signal::PaymentFailed) {
        Status::ChargedBack
    } else if full_refund && !has(Signal::PaymentFailed) {
        Status::Refunded
    } else if has(Signal::Paid) {
        Status::Completed
    } else if has(Signal::PaymentFailed) {
        Status::Failed
    } else {
        Status::Pending
    };
    Outcome {
        purchase: Some(Purchase {
            status,
            refunded,
            charged_back: lost.map_or(0, |(_, _, amount)| amount.clamp(0, amount_paid)),
            dispute: dispute.map(|(status, _, _)| status.to_owned()),
            amount: amount_paid,
        }),
        never_applied: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispute(status: &str, at: i64) -> Effect {
        Effect::Dispute {
            status: status.into(),
            at,
            amount: 1000,
        }
    }

    fn of(effects: &[Effect]) -> Outcome {
        let ids: Vec<String> = (0..effects.len()).map(|i| format!("e{i}")).collect();
        let events: Vec<(&str, &Effect)> = ids.iter().map(String::as_str).zip(effects).collect();
        outcome(&events, 1000)
    }

    fn state(outcome: &Outcome) -> Option<(Status, i64, Option<&str>, bool)> {
        outcome
            .purchase
            .as_ref()
            .map(|p| (p.status, p.refunded, p.dispute.as_deref(), p.access()))
    }

    #[test]
    fn the_rules() {
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
            state(&of(std::slice::from_ref(&paid))),
            Some((Status::Completed, 0, None, true))
        );
        assert_eq!(
            state(&of(&[unpaid.clone(), failed.clone()])),
            Some((Status::Failed, 0, None, false))
        );
        assert_eq!(
            state(&of(&[full.clone(), unpaid.clone()])),
            Some((Status::Refunded, 1000, None, false)),
            "a full refund of a pending purchase refunds it"
        );
        assert_eq!(
            state(&of(&[partial.clone(), paid.clone()])),
            Some((Status::Completed, 400, None, true))
        );
        assert_eq!(
            state(&of(&[
                paid.clone(),
                dispute("lost", 300),
                dispute("needs_response", 400)
            ])),
            Some((Status::ChargedBack, 0, Some("lost"), false))
        );
        assert_eq!(
            state(&of(&[paid.clone(), full.clone(), dispute("lost", 300)])),
            Some((Status::ChargedBack, 1000, Some("lost"), false)),
            "refunded and charged back: charged back"
        );
        assert_eq!(
            state(&of(&[paid.clone(), full.clone(), dispute("won", 300)])),
            Some((Status::Refunded, 1000, Some("won"), false))
        );
        let waiting = of(&[partial.clone(), dispute("won", 1)]);
        assert_eq!(waiting.purchase, None);
        assert_eq!(waiting.never_applied, vec!["e0", "e1"]);
        assert_eq!(of(&[Effect::Poison, Effect::Ignored]).purchase, None);
    }

    #[test]
    fn revenue() {
        let paid = Effect::Session(Signal::Paid);
        let partial = Effect::Refund {
            amount: 400,
            full: false,
        };
        let p = of(&[paid.clone(), partial.clone()]).purchase.unwrap();
        // 600 net; platform 10 % = 60; organization 25 % of 540 = 135; creator 405.
        assert_eq!(
            p.revenue(1000, 2500),
            Revenue {
                gross: 1000,
                refunded: 400,
                charged_back: 0,
                net: 600,
                platform: 60,
                organization: 135,
                creator: 405
            }
        );
        let p = of(&[paid, partial, dispute("lost", 300)]).purchase.unwrap();
        assert_eq!(p.revenue(1000, 0).net, 0, "never below zero");
        let pending = of(&[Effect::Session(Signal::Unpaid)]).purchase.unwrap();
        assert_eq!(pending.revenue(1000, 0).gross, 0);
    }
}
