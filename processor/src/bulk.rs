//! Set-based handling of a batch: the common events in a few multi-row statements.
//!
//! Most of what Stripe sends is either the first event of a new payment (a checkout session
//! that becomes a purchase) or an event that is only recorded (a payment intent event, a
//! test-mode event on a live endpoint). Handling those one at a time costs about eight
//! statement round trips each. Here a whole batch of them costs six, whatever its size:
//!
//! 1. record the events not in the log yet (one `INSERT … SELECT FROM unnest`);
//! 2. take the ownership locks of the new purchases' (customer, content) pairs;
//! 3. look up the terms in force, and whether each payment or ownership is already there;
//! 4. insert the purchases, 5. grant their access, 6. mark the events done.
//!
//! Whatever does not fit that shape is left to the per-event path ([`crate::handler`]), in
//! the same transaction: an event already in the log (a repeat, a retry), a second event for
//! a payment or a (customer, content) pair in the same batch, a payment already recorded or
//! content already owned (a double payment), refunds and disputes, and every event whose
//! body or catalog facts are wrong (the per-event path gives the precise error). The rules
//! are the per-event path's own: the same terms query, the same row builder, the same
//! locks, the same unique indexes deciding a race.

use std::collections::HashSet;

use shared::config::EndpointModes;
use shared::contract::EventMessage;
use sqlx::PgConnection;

use crate::checkout::PurchaseRequest;
use crate::db::events::{self, EventStatus, Finished, NewEvent, Received};
use crate::db::new_purchase::{self, NewPurchase};
use crate::db::purchases::Change;
use crate::db::terms::{self, Lookup};
use crate::error::ProcessError;
use crate::handler::{Outcome, Plan, Prepared, prepare};
use crate::lifecycle::{self, Status};

/// What the set-based path may do with an event.
enum Shape {
    /// Record it as ignored, with this note.
    Ignore(&'static str),
    /// Create its payment's purchase in this status.
    Create {
        request: PurchaseRequest,
        status: Status,
    },
}

/// An event of the batch that may take the set-based path; see [`candidates`].
pub struct Candidate {
    index: usize,
    prepared: Prepared,
    shape: Shape,
}

/// Handles the `candidates` of `messages` in the caller's transaction. Returns, per
/// message, its outcome, or `None` when it is left to the per-event path. `Err` is a failed
/// statement: the transaction is lost, as with any database error.
pub async fn handle(
    conn: &mut PgConnection,
    messages: &[&EventMessage],
    candidates: Vec<Candidate>,
) -> Result<Vec<Option<Outcome>>, ProcessError> {
    let mut outcomes = vec![None; messages.len()];
    if candidates.is_empty() {
        return Ok(outcomes);
    }

    let new_events: Vec<NewEvent> = candidates
        .iter()
        .map(|c| NewEvent {
            message: messages[c.index],
            received: Received {
                livemode: c.prepared.livemode,
                api_version: c.prepared.api_version.as_deref(),
                payload: &c.prepared.payload,
            },
        })
        .collect();
    let claimed: HashSet<String> = events::claim_new(conn, &new_events)
        .await?
        .into_iter()
        .collect();
    let candidates: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| claimed.contains(&messages[c.index].event_id))
        .collect();

    let (ignored, creating): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|c| matches!(c.shape, Shape::Ignore(_)));
    let mut finished = Vec::with_capacity(ignored.len() + creating.len());
    for candidate in &ignored {
        if let Shape::Ignore(note) = candidate.shape {
            outcomes[candidate.index] = Some(Outcome::Ignored(note));
            finished.push(Finished {
                event_id: &messages[candidate.index].event_id,
                status: EventStatus::Ignored,
                note: Some(note),
            });
        }
    }

    let created = create_purchases(conn, messages, &creating).await?;
    for (candidate, row) in created {
        outcomes[candidate.index] = Some(Outcome::of(Change::Created {
            id: row.id,
            status: row.status,
        }));
        finished.push(Finished {
            event_id: &messages[candidate.index].event_id,
            status: EventStatus::Processed,
            note: None,
        });
    }
    if !finished.is_empty() {
        events::finish_new(conn, &finished).await?;
    }
    Ok(outcomes)
}

/// The events of the batch that may take the set-based path: at most one per payment and
/// per (customer, content) pair, so that no two of them decide from the same state. Pure
/// work on the bodies (parsing, planning), done before the transaction opens so that no
/// transaction stays open while it runs.
pub fn candidates(messages: &[&EventMessage], modes: &EndpointModes) -> Vec<Candidate> {
    let mut seen_events = HashSet::new();
    let mut seen_intents = HashSet::new();
    let mut seen_sessions = HashSet::new();
    let mut seen_pairs = HashSet::new();
    let mut candidates = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        if !seen_events.insert(message.event_id.as_str()) {
            continue;
        }
        let Ok(prepared) = prepare(message, modes) else {
            continue;
        };
        let shape = match &prepared.plan {
            Plan::Ignore(note) => Shape::Ignore(note),
            Plan::Session { request, signal } => {
                let Some(status) = lifecycle::next(None, *signal) else {
                    continue;
                };
                // Every key is recorded, also when an earlier one repeats: a later event
                // sharing any of them must not take this path either.
                let mut fresh = seen_sessions.insert(request.checkout_session_id.clone());
                fresh &= seen_pairs.insert((request.customer_id, request.content_id));
                if let Some(intent) = &request.payment_intent_id {
                    fresh &= seen_intents.insert(intent.clone());
                }
                if !fresh {
                    continue;
                }
                Shape::Create {
                    request: request.clone(),
                    status,
                }
            }
            _ => continue,
        };
        candidates.push(Candidate {
            index,
            prepared,
            shape,
        });
    }
    candidates
}

/// Creates the purchases that need no decision beyond the row itself: the payment is not
/// recorded, and a completed purchase would be the customer's only one of the content.
/// Returns the candidates it created a purchase for, with the row.
async fn create_purchases<'c>(
    conn: &mut PgConnection,
    messages: &[&EventMessage],
    creating: &'c [Candidate],
) -> Result<Vec<(&'c Candidate, NewPurchase)>, ProcessError> {
    if creating.is_empty() {
        return Ok(Vec::new());
    }
    let requests: Vec<(&Candidate, &PurchaseRequest, Status)> = creating
        .iter()
        .filter_map(|c| match &c.shape {
            Shape::Create { request, status } => Some((c, request, *status)),
            Shape::Ignore(_) => None,
        })
        .collect();
    let lookups: Vec<Lookup> = requests
        .iter()
        .map(|(c, r, _)| Lookup {
            content_id: r.content_id,
            customer_id: r.customer_id,
            at: c.prepared.at,
            payment_intent_id: r.payment_intent_id.clone(),
            checkout_session_id: r.checkout_session_id.clone(),
        })
        .collect();
    let all_terms = terms::load(conn, &lookups).await?;

    let mut owners = Vec::with_capacity(requests.len());
    let mut rows = Vec::with_capacity(requests.len());
    for ((candidate, request, status), terms) in requests.into_iter().zip(all_terms) {
        let Some(terms) = terms else { continue };
        if terms.payment_recorded || (status == Status::Completed && terms.owned) {
            continue;
        }
        let event_id = &messages[candidate.index].event_id;
        if let Ok(row) =
            NewPurchase::build(request, status, &terms, candidate.prepared.at, event_id)
        {
            owners.push(candidate);
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let inserted: HashSet<uuid::Uuid> = new_purchase::insert(conn, &rows)
        .await?
        .into_iter()
        .collect();
    Ok(owners
        .into_iter()
        .zip(rows)
        .filter(|(_, row)| inserted.contains(&row.id))
        .collect())
}
