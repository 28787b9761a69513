//! The `stripe_events` log: one row per Stripe event id, whatever happened to it.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use shared::contract::EventMessage;

/// Event statuses, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    Received,
    Processed,
    Ignored,
    Failed,
    Retrying,
    Dead,
    Purged,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Processed => "processed",
            Self::Ignored => "ignored",
            Self::Failed => "failed",
            Self::Retrying => "retrying",
            Self::Dead => "dead",
            Self::Purged => "purged",
        }
    }

    /// Whether an event in this status has had its whole effect already.
    pub fn is_done(status: &str) -> bool {
        status == Self::Processed.as_str() || status == Self::Ignored.as_str()
    }
}

/// The body as JSON for the queryable `payload` column; a body that is not JSON (it cannot
/// come from ingest, but a hand-published message could be anything) is kept as a JSON
/// string. `jsonb` refuses the character U+0000, which JSON allows (`\u0000`), so it is
/// replaced by U+FFFD here; the `body` column keeps the exact bytes.
pub fn payload_json(body: &[u8]) -> Value {
    let mut value = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    replace_nul(&mut value);
    value
}

fn replace_nul(value: &mut Value) {
    const NUL: char = '\u{0}';
    match value {
        Value::String(text) if text.contains(NUL) => *text = text.replace(NUL, "\u{FFFD}"),
        Value::Array(items) => items.iter_mut().for_each(replace_nul),
        Value::Object(map) => {
            if map.keys().any(|key| key.contains(NUL)) {
                let entries = std::mem::take(map);
                for (key, mut item) in entries {
                    replace_nul(&mut item);
                    map.insert(key.replace(NUL, "\u{FFFD}"), item);
                }
            } else {
                map.values_mut().for_each(replace_nul);
            }
        }
        _ => {}
    }
}

/// [`payload_json`] as the JSON text the `payload` column is written from (bound as text,
/// cast to `jsonb` by the statement). A body that serde_json reads as JSON and that holds
/// no `\u0000` escape is that text itself, borrowed: the common case costs one validating
/// pass, not a `Value` tree built, serialized and dropped. Anything else goes through
/// [`payload_json`]. What serde_json accepts, `jsonb` accepts too (it refuses only the NUL
/// escape, which takes the other path).
pub fn payload_text(body: &[u8]) -> Cow<'_, str> {
    const NUL_ESCAPE: &[u8] = b"\\u0000";
    if let Ok(text) = std::str::from_utf8(body)
        && !body.windows(NUL_ESCAPE.len()).any(|w| w == NUL_ESCAPE)
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return Cow::Borrowed(text);
    }
    Cow::Owned(payload_json(body).to_string())
}

/// What the event log keeps of a delivery besides its id and type.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub livemode: bool,
    pub api_version: Option<&'a str>,
    /// [`payload_text`] of the body.
    pub payload: &'a str,
}

/// Records a delivery of the event and locks its row until the transaction ends. Returns
/// the status it had before: a second processor handling the same event waits here for
/// the first one's commit, then sees `processed`.
pub async fn claim(
    conn: &mut PgConnection,
    message: &EventMessage,
    received: Received<'_>,
) -> Result<String, sqlx::Error> {
    // A row first written by `strike` or `record_failure` gets its full record here.
    sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, body, api_version, status, attempts, received_at)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, 'received', 1, $8)
         ON CONFLICT (id) DO UPDATE
            SET attempts = stripe_events.attempts + 1, updated_at = now(),
                body = COALESCE(stripe_events.body, EXCLUDED.body),
                api_version = COALESCE(stripe_events.api_version, EXCLUDED.api_version),
                livemode = EXCLUDED.livemode
         RETURNING status",
    )
    .bind(&message.event_id)
    .bind(&message.event_type)
    .bind(&message.endpoint)
    .bind(received.livemode)
    .bind(received.payload)
    .bind(&message.body)
    .bind(received.api_version)
    .bind(message.received_at)
    .fetch_one(conn)
    .await
}

/// A first delivery for [`claim_new`].
pub struct NewEvent<'a> {
    pub message: &'a EventMessage,
    pub received: Received<'a>,
}

/// Records the events that are not in the log yet, in one statement, and locks their rows
/// until the transaction ends. Returns the ids it recorded; an event already in the log
/// (a repeat, a retry, a start counted by `strike`) is left to [`claim`].
///
/// The rows start with `attempts = 0`: [`finish_new`] counts the attempt, and an event
/// left to the per-event path has it counted by [`claim`] instead, so an attempt counts
/// once either way. Rows are inserted in the order of their ids, so that two batches
/// sharing events wait for each other instead of deadlocking.
pub async fn claim_new(
    conn: &mut PgConnection,
    events: &[NewEvent<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    fn column<'a, T>(events: &'a [NewEvent<'a>], get: impl Fn(&'a NewEvent<'a>) -> T) -> Vec<T> {
        events.iter().map(get).collect()
    }
    sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, endpoint, livemode, payload, body, api_version, status, attempts, received_at)
         SELECT id, type, endpoint, livemode, payload::jsonb, body, api_version, 'received', 0, received_at
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[], $6::bytea[], $7::text[], $8::timestamptz[])
                AS e(id, type, endpoint, livemode, payload, body, api_version, received_at)
          ORDER BY id
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(column(events, |e| e.message.event_id.as_str()))
    .bind(column(events, |e| e.message.event_type.as_str()))
    .bind(column(events, |e| e.message.endpoint.as_str()))
    .bind(column(events, |e| e.received.livemode))
    .bind(column(events, |e| e.received.payload))
    .bind(column(events, |e| e.message.body.as_slice()))
    .bind(column(events, |e| e.received.api_version))
    .bind(column(events, |e| e.message.received_at))
    .fetch_all(conn)
    .await
}

/// How an event recorded by [`claim_new`] ended.
pub struct Finished<'a> {
    pub event_id: &'a str,
    pub status: EventStatus,
    pub note: Option<&'a str>,
}

/// [`finish`] for events recorded by [`claim_new`], in one statement; it also counts
/// their attempt.
pub async fn finish_new(
    conn: &mut PgConnection,
    finished: &[Finished<'_>],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE stripe_events e
            SET status = f.status, last_error = f.note, attempts = e.attempts + 1,
                crash_strikes = 0, processed_at = now(), updated_at = now()
           FROM unnest($1::text[], $2::text[], $3::text[]) AS f(id, status, note)
          WHERE e.id = f.id",
    )
    .bind(finished.iter().map(|f| f.event_id).collect::<Vec<_>>())
    .bind(
        finished
            .iter()
            .map(|f| f.status.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(finished.iter().map(|f| f.note).collect::<Vec<_>>())
    .execute(conn)
    .await
    .map(|_| ())
}

/// Counts a start of handling of a delivery that the broker gave back (the processor died,
/// or panicked, holding it), committed before the handling starts. Returns the count, or
/// `None` when the event is done already (a leftover duplicate, nothing to count).
/// Handling that ends, in success or failure, sets the count back to 0.
pub async fn strike(pool: &PgPool, message: &EventMessage) -> Result<Option<i32>, sqlx::Error> {
    let payload = payload_json(&message.body);
    sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, endpoint, payload, body, status, attempts, received_at, crash_strikes)
         VALUES ($1, $2, $3, $4, $5, 'received', 0, $6, 1)
         ON CONFLICT (id) DO UPDATE
            SET crash_strikes = stripe_events.crash_strikes + 1, updated_at = now()
          WHERE stripe_events.status NOT IN ('processed', 'ignored')
         RETURNING crash_strikes",
    )
    .bind(&message.event_id)
    .bind(&message.event_type)
    .bind(&message.endpoint)
    .bind(&payload)
    .bind(&message.body)
    .bind(message.received_at)
    .fetch_optional(pool)
    .await
}

/// Marks the event done, in the transaction that did its work.
/// `note` is kept in `last_error`: why an event was ignored.
pub async fn finish(
    conn: &mut PgConnection,
    event_id: &str,
    status: EventStatus,
    note: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE stripe_events
            SET status = $2, last_error = $3, crash_strikes = 0, processed_at = now(), updated_at = now()
          WHERE id = $1",
    )
    .bind(event_id)
    .bind(status.as_str())
    .bind(note)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The status of an event, if it is in the log.
pub async fn status(pool: &PgPool, event_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM stripe_events WHERE id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await
}

/// Records a failed attempt outside the (rolled back) processing transaction, and counts it:
/// the claim's own `attempts + 1` was rolled back with the rest. Never moves an event that
/// is already done back to a failure status. The attempt also gets its own row in
/// `stripe_event_attempts` (with `retry_due_at` when it waits for a retry), for its
/// timeline.
pub async fn record_failure(
    pool: &PgPool,
    message: &EventMessage,
    status: EventStatus,
    error: &str,
    retry_due_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    const QUERY: &str =
        "WITH attempt AS (
            INSERT INTO stripe_event_attempts (event_id, attempt, outcome, error, retry_due_at)
            SELECT $1, $10, $4, $6, $11 WHERE $4 IN ('retrying', 'dead'))
         INSERT INTO stripe_events (id, type, endpoint, livemode, payload, status, attempts, last_error, received_at, body)
         VALUES ($1, $2, $3, $8, $5, $4, 1, $6, $7, $9)
         ON CONFLICT (id) DO UPDATE
            SET status = EXCLUDED.status, last_error = EXCLUDED.last_error,
                attempts = stripe_events.attempts + 1, crash_strikes = 0, updated_at = now(),
                body = COALESCE(stripe_events.body, EXCLUDED.body)
          WHERE stripe_events.status NOT IN ('processed', 'ignored')";
    let payload = payload_json(&message.body);
    let livemode = payload
        .get("livemode")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    sqlx::query(QUERY)
        .bind(&message.event_id)
        .bind(&message.event_type)
        .bind(&message.endpoint)
        .bind(status.as_str())
        .bind(&payload)
        .bind(error)
        .bind(message.received_at)
        .bind(livemode)
        .bind(&message.body)
        .bind(i32::try_from(message.attempt.max(1)).unwrap_or(i32::MAX))
        .bind(retry_due_at)
        .execute(pool)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_text_is_the_body_itself_when_jsonb_takes_it() {
        let body = br#"{"id":"evt_1","n":[1,2.5,null],"s":"caf\u00e9 \"q\""}"#;
        assert!(matches!(payload_text(body), Cow::Borrowed(text) if text.as_bytes() == body));
    }

    #[test]
    fn payload_text_goes_through_the_value_when_it_must() {
        // The NUL escape, which jsonb refuses: replaced, as payload_json does.
        let nul = br#"{"a":"x\u0000y"}"#;
        let text = payload_text(nul);
        assert!(matches!(text, Cow::Owned(_)));
        assert_eq!(text, payload_json(nul).to_string());
        assert!(!text.contains("\\u0000"), "{text}");
        // Not JSON, or not UTF-8: kept as a JSON string.
        for body in [&b"not json"[..], &b"{\"a\":\xff}"[..]] {
            let text = payload_text(body);
            assert_eq!(text, payload_json(body).to_string());
            assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_string()));
        }
    }

    #[test]
    fn payload_replaces_what_jsonb_refuses() {
        let body = br#"{"a":"x\u0000y","b":[{"\u0000k":"\u0000"}],"c":"\u00e9"}"#;
        let payload = payload_json(body);
        let text = payload.to_string();
        assert!(!text.contains("\\u0000"), "{text}");
        assert_eq!(payload["a"], "x\u{FFFD}y");
        assert_eq!(payload["b"][0]["\u{FFFD}k"], "\u{FFFD}");
        assert_eq!(payload["c"], "\u{e9}");
    }
}
