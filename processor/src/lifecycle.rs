//! The purchase lifecycle: which event may move a purchase from which status to which.
//!
//! Stripe delivers events in any order and more than once, so every rule here is written to
//! converge: applying the events of one payment in any order, any number of times, ends in
//! the same state. Stale events never move a purchase backwards.
//!
//! | from \ event      | paid¹        | unpaid completed | payment failed | full refund | dispute lost  |
//! |-------------------|--------------|------------------|----------------|-------------|---------------|
//! | (no purchase)     | completed²   | pending          | failed         | retry³      | retry³        |
//! | pending           | completed²   | —                | failed         | refunded⁴   | charged_back⁴ |
//! | completed         | —            | —                | —              | refunded⁵   | charged_back⁵ |
//! | requires_refund   | —            | —                | —              | refunded    | charged_back  |
//! | failed            | —            | —                | —              | —           | —             |
//! | refunded          | —            | —                | —              | —           | charged_back  |
//! | charged_back      | —            | —                | —              | —           | —             |
//!
//! ¹ `checkout.session.completed` with `payment_status` `paid`, or `no_payment_required` for
//!   a free checkout (`amount_total` 0, keyed by its session: it has no payment intent), or
//!   `checkout.session.async_payment_succeeded`.
//! ² `requires_refund` instead when the customer already has access to the content through
//!   another purchase (a double payment).
//! ³ A refund or dispute whose purchase is not there yet is a transient failure: it is
//!   retried until the purchase arrives, and dead-lettered if it never does.
//! ⁴ A refund or a dispute implies the payment succeeded; its `async_payment_succeeded` is
//!   just late, and changes nothing when it comes.
//! ⁵ When the purchase that gave access leaves `completed`, a `requires_refund` twin of the
//!   same customer and content that is still paid and unrefunded takes over: it becomes
//!   `completed` and access continues through it ([`takes_over`]).
//!
//! `charged_back` is final: money lost in a chargeback is never earned again. A purchase
//! both fully refunded and charged back ends `charged_back`, whatever the order, with a net
//! of 0. Disputes that are open, `won`, `warning_closed` or `prevented` change no status
//! (a refunded purchase whose dispute is won stays refunded).
//!
//! Amounts move apart from statuses. A refund (partial or full) raises the refunded amount
//! to Stripe's cumulative `amount_refunded` when that is larger (so repeats and stale
//! events count nothing twice and never move it back); a lost dispute records its disputed
//! amount as charged back, once. Each change is a row in `purchase_adjustments`, and the
//! view `purchase_revenue` derives net revenue from them (see [`crate::split`]).
//!
//! Access is derived, never toggled: the customer has access through a purchase exactly when
//! it is `completed`. "Owns the content" and "has access" are the same thing, so a refunded
//! or charged-back purchase never blocks buying the content again.

/// Purchase statuses, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
    Refunded,
    RequiresRefund,
    ChargedBack,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
            Self::RequiresRefund => "requires_refund",
            Self::ChargedBack => "charged_back",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "refunded" => Self::Refunded,
            "requires_refund" => Self::RequiresRefund,
            "charged_back" => Self::ChargedBack,
            _ => return None,
        })
    }

    /// Whether the customer paid for this purchase (money moved): the statuses whose amount
    /// counts as gross revenue in `purchase_revenue`.
    pub fn was_paid(self) -> bool {
        !matches!(self, Self::Pending | Self::Failed)
    }
}

/// What an event says about a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A paid (or free) completed checkout session, or `async_payment_succeeded`.
    Paid,
    /// `checkout.session.completed` with a delayed payment method, not paid yet.
    Unpaid,
    /// `checkout.session.async_payment_failed`.
    PaymentFailed,
    /// `charge.refunded` with `refunded = true`.
    FullRefund,
    /// A `charge.dispute.*` event whose dispute is `lost`: a chargeback.
    DisputeLost,
}

/// What to do when a purchase for the payment already exists (`Some(status)`) or not
/// (`None`). `None` as the answer: nothing changes. For a new purchase, `Paid` gives
/// `Completed`; the caller turns that into `RequiresRefund` for a double payment.
pub fn next(current: Option<Status>, signal: Signal) -> Option<Status> {
    use Signal::*;
    use Status::*;
    match (current, signal) {
        (None, Paid) | (Some(Pending), Paid) => Some(Completed),
        (None, Unpaid) => Some(Pending),
        (None, PaymentFailed) | (Some(Pending), PaymentFailed) => Some(Failed),
        (Some(Pending | Completed | RequiresRefund), FullRefund) => Some(Refunded),
        (Some(Pending | Completed | RequiresRefund | Refunded), DisputeLost) => Some(ChargedBack),
        // (None, FullRefund | DisputeLost) is not a transition: the caller retries until the
        // purchase exists.
        _ => None,
    }
}

/// Whether a purchase in this status gives access: owning is having access.
pub fn grants_access(status: Status) -> bool {
    status == Status::Completed
}

/// Whether a twin (a second payment kept as `requires_refund`) may take over when the
/// purchase that gave access leaves `completed`: it must still be paid in full, unrefunded.
pub fn takes_over(twin: Status, twin_refunded_cents: i64) -> bool {
    twin == Status::RequiresRefund && twin_refunded_cents == 0
}

/// Closed dispute statuses: final, never replaced by an open one.
pub fn dispute_closed(status: &str) -> bool {
    matches!(status, "won" | "lost" | "warning_closed" | "prevented")
}

/// The dispute status that means a chargeback.
pub const DISPUTE_LOST: &str = "lost";

/// Whether a dispute status seen in an event created at `at` replaces the stored one.
pub fn dispute_replaces(
    stored: Option<(&str, chrono::DateTime<chrono::Utc>)>,
    new: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> bool {
    match stored {
        None => true,
        Some((current, _)) if dispute_closed(current) => false,
        Some(_) if dispute_closed(new) => true,
        Some((_, stored_at)) => at >= stored_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn stale_events_never_move_backwards() {
        for signal in [
            Signal::Paid,
            Signal::Unpaid,
            Signal::PaymentFailed,
            Signal::FullRefund,
        ] {
            assert_eq!(next(Some(Status::Refunded), signal), None, "{signal:?}");
        }
        for signal in [
            Signal::Paid,
            Signal::Unpaid,
            Signal::PaymentFailed,
            Signal::FullRefund,
            Signal::DisputeLost,
        ] {
            assert_eq!(next(Some(Status::ChargedBack), signal), None, "{signal:?}");
        }
        assert_eq!(next(Some(Status::Completed), Signal::Unpaid), None);
        assert_eq!(next(Some(Status::Completed), Signal::PaymentFailed), None);
        assert_eq!(next(Some(Status::Failed), Signal::Paid), None);
    }

    #[test]
    fn forward_transitions() {
        assert_eq!(next(None, Signal::Paid), Some(Status::Completed));
        assert_eq!(next(None, Signal::Unpaid), Some(Status::Pending));
        assert_eq!(
            next(Some(Status::Pending), Signal::Paid),
            Some(Status::Completed)
        );
        assert_eq!(
            next(Some(Status::Pending), Signal::PaymentFailed),
            Some(Status::Failed)
        );
        assert_eq!(
            next(Some(Status::Completed), Signal::FullRefund),
            Some(Status::Refunded)
        );
        assert_eq!(next(None, Signal::FullRefund), None);
        assert_eq!(next(None, Signal::DisputeLost), None);
        for from in [
            Status::Pending,
            Status::Completed,
            Status::RequiresRefund,
            Status::Refunded,
        ] {
            assert_eq!(
                next(Some(from), Signal::DisputeLost),
                Some(Status::ChargedBack),
                "{from:?}"
            );
        }
        assert_eq!(next(Some(Status::Failed), Signal::DisputeLost), None);
    }

    #[test]
    fn access_is_owning() {
        assert!(grants_access(Status::Completed));
        for status in [
            Status::Pending,
            Status::Failed,
            Status::Refunded,
            Status::RequiresRefund,
            Status::ChargedBack,
        ] {
            assert!(!grants_access(status), "{status:?}");
        }
        assert!(takes_over(Status::RequiresRefund, 0));
        assert!(!takes_over(Status::RequiresRefund, 1));
        assert!(!takes_over(Status::Refunded, 0));
    }

    #[test]
    fn closed_disputes_stay_closed() {
        let t = |s| Utc.timestamp_opt(s, 0).unwrap();
        assert!(dispute_replaces(None, "needs_response", t(1)));
        assert!(dispute_replaces(
            Some(("needs_response", t(5))),
            "lost",
            t(1)
        ));
        assert!(!dispute_replaces(
            Some(("lost", t(1))),
            "under_review",
            t(9)
        ));
        assert!(!dispute_replaces(
            Some(("under_review", t(5))),
            "needs_response",
            t(4)
        ));
        assert!(dispute_replaces(
            Some(("needs_response", t(5))),
            "under_review",
            t(6)
        ));
    }
}
