//! The purchase lifecycle: which event may move a purchase from which status to which.
//!
//! Stripe delivers events in any order and more than once, so every rule here is written to
//! converge: applying the events of one payment in any order, any number of times, ends in
//! the state the natural order gives. Stale events never move a purchase backwards.
//!
//! | from \ event      | paid (completed paid, async succeeded) | unpaid completed | payment failed | full refund |
//! |-------------------|-----------------------------------------|------------------|----------------|-------------|
//! | (no purchase)     | completed¹                              | pending          | failed         | retry²      |
//! | pending           | completed¹                              | —                | failed         | refunded³   |
//! | completed         | —                                       | —                | —              | refunded    |
//! | requires_refund   | —                                       | —                | —              | refunded    |
//! | failed            | —                                       | —                | —              | —           |
//! | refunded          | —                                       | —                | —              | —           |
//!
//! ¹ `requires_refund` instead when the customer already owns the content through another
//!   completed purchase (a double payment).
//! ² A refund (or dispute) whose purchase is not there yet is a transient failure: it is
//!   retried until the purchase arrives, and dead-lettered if it never does.
//! ³ A refund implies the payment succeeded; its `async_payment_succeeded` is just late.
//!
//! A partial refund only raises the refunded amount (Stripe's `amount_refunded` is
//! cumulative, so the largest value seen wins). Disputes record Stripe's dispute status; a
//! closed status (`won`, `lost`, `warning_closed`, `prevented`) is never replaced by an open
//! one, and among open ones the most recent event wins.
//!
//! Access is derived, never toggled: the customer has access through a purchase exactly when
//! it is `completed` and its dispute is not `lost`.

/// Purchase statuses, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
    Refunded,
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

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "refunded" => Self::Refunded,
            "requires_refund" => Self::RequiresRefund,
            _ => return None,
        })
    }
}

/// What an event says about a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `checkout.session.completed` paid, or `checkout.session.async_payment_succeeded`.
    Paid,
    /// `checkout.session.completed` with a delayed payment method, not paid yet.
    Unpaid,
    /// `checkout.session.async_payment_failed`.
    PaymentFailed,
    /// `charge.refunded` with `refunded = true`.
    FullRefund,
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
        // (None, FullRefund) is not a transition: the caller retries until the purchase exists.
        _ => None,
    }
}

/// Whether a purchase in this state gives access.
pub fn grants_access(status: Status, dispute_status: Option<&str>) -> bool {
    status == Status::Completed && dispute_status != Some("lost")
}

/// Closed dispute statuses: final, never replaced by an open one.
pub fn dispute_closed(status: &str) -> bool {
    matches!(status, "won" | "lost" | "warning_closed" | "prevented")
}

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
    }

    #[test]
    fn access_follows_status_and_dispute() {
        assert!(grants_access(Status::Completed, None));
        assert!(grants_access(Status::Completed, Some("won")));
        assert!(grants_access(Status::Completed, Some("needs_response")));
        assert!(!grants_access(Status::Completed, Some("lost")));
        assert!(!grants_access(Status::Refunded, None));
        assert!(!grants_access(Status::Pending, None));
        assert!(!grants_access(Status::RequiresRefund, None));
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
