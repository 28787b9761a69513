//! Why handling an event failed, and what to do about it.

use chrono::{DateTime, Utc};
use shared::contract::ContractError;
use shared::envelope::EnvelopeError;
use uuid::Uuid;

use crate::checkout::MetadataError;

/// What a failure means for the message. Named in logs and in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// May succeed later (database unreachable, deadlock, …): retry.
    Transient,
    /// Will fail the same way every time until someone fixes the data: dead-letter now.
    Permanent,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("message does not follow the ingest contract: {0}")]
    Contract(#[from] ContractError),
    #[error("payload is not a Stripe event: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("message_id `{message_id}` differs from the event id `{body_id}` in the body")]
    IdMismatch { message_id: String, body_id: String },
    #[error("event {event_id} has no data.object")]
    NoObject { event_id: String },
    #[error("data.object is not a checkout session: {0}")]
    NotASession(#[source] serde_json::Error),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("unknown customer {0}")]
    UnknownCustomer(Uuid),
    #[error("unknown content {0}")]
    UnknownContent(Uuid),
    #[error("content {content} belongs to organization {actual}, not {claimed}")]
    WrongOrganization {
        content: Uuid,
        claimed: Uuid,
        actual: Uuid,
    },
    #[error("no platform fee is configured at {0}")]
    NoPlatformFee(DateTime<Utc>),
    #[error("no purchase for payment intent {payment_intent} yet: the {event} waits for it")]
    PurchaseNotYet {
        payment_intent: String,
        event: &'static str,
    },
    #[error("another transaction kept changing this payment's purchase; retrying")]
    Concurrent,
    #[error("purchase has an unknown status `{0}`")]
    UnknownStatus(String),
    #[error("data.object is not a {kind}: {source}")]
    BadObject {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} has no payment_intent")]
    NoPaymentIntent(&'static str),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The batch this event was in could not reach the database after waiting as a whole.
    #[error("database unreachable: {0}")]
    DatabaseUnreachable(String),
}

impl ProcessError {
    /// Whether the database could not be reached at all (as opposed to refusing or losing a
    /// transaction): every event would fail the same way, so the batch waits as a whole.
    pub fn database_unreachable(&self) -> bool {
        let error = match self {
            Self::Database(error) => error,
            Self::DatabaseUnreachable(_) => return true,
            _ => return false,
        };
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
            _ => false,
        }
    }

    pub fn class(&self) -> FailureClass {
        match self {
            Self::Database(error) => classify_database(error),
            // The purchase may arrive later (events come in any order); a race resolves itself.
            Self::PurchaseNotYet { .. } | Self::Concurrent | Self::DatabaseUnreachable(_) => {
                FailureClass::Transient
            }
            _ => FailureClass::Permanent,
        }
    }
}

/// Connection trouble, timeouts and conflicts between transactions pass; anything the
/// database refuses about the data itself (a constraint, a type) will be refused again.
fn classify_database(error: &sqlx::Error) -> FailureClass {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            let transient = code == "40001" // serialization_failure
                || code == "23505" // unique_violation: a concurrent insert won; retry sees it
                || code == "40P01" // deadlock_detected
                || code == "55P03" // lock_not_available
                || code == "57014" // query_canceled (statement timeout)
                || code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources
                || code.starts_with("57P"); // admin/crash shutdown, cannot connect now
            if transient {
                FailureClass::Transient
            } else {
                FailureClass::Permanent
            }
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_) => FailureClass::Permanent,
        // I/O, TLS, protocol, pool timeouts and closures, worker crashes.
        _ => FailureClass::Transient,
    }
}
