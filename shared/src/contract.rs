//! The message contract between ingest and processor: what a message on the
//! `stripe.events` exchange carries. One place, so both sides cannot drift apart.
//!
//! - body: the raw webhook body, byte for byte as Stripe sent it (the signature covers it);
//! - routing key: the event type; `message_id`: the event id;
//! - persistent (delivery mode 2), `content_type` `application/json`;
//! - headers: [`HEADER_ENDPOINT`], [`HEADER_RECEIVED_AT`], [`HEADER_SOURCE`], and
//!   [`HEADER_ATTEMPT`] once a message has been retried.
//!
//! An event listed from Stripe's Events API by `processor reconcile` travels the same way,
//! its body the event's JSON as the API returned it, marked [`EventSource::Api`].

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Which webhook endpoint received the event (`booking`, `payment`, …).
pub const HEADER_ENDPOINT: &str = "x-stripe-endpoint";
/// When ingest received it, unix milliseconds.
pub const HEADER_RECEIVED_AT: &str = "x-received-at-ms";
/// How the event reached us: `webhook` (ingest) or `api` (`processor reconcile`). A message
/// without it came from ingest before the header existed: a webhook.
pub const HEADER_SOURCE: &str = "x-event-source";
/// Processing attempt this delivery stands for (1 for the first). Our own header: brokers
/// from 3.13 on ignore an `x-death` header that a client republishes.
pub const HEADER_ATTEMPT: &str = "x-attempt";

/// On a message waiting in a delay queue: when it is due back on the work queue, unix
/// milliseconds. The processor's delay forwarder reads it (see `processor::worker::delay`).
pub const HEADER_RETRY_DUE_AT: &str = "x-retry-due-at-ms";

/// Set on a message an operator put back (`dlq replay`, `events replay`), unix milliseconds.
pub const HEADER_REPLAYED_AT: &str = "x-replayed-at-ms";
/// Dead letters and retries: why the message failed.
pub const HEADER_FAILURE_CLASS: &str = "x-failure-class";
/// The last error, as text.
pub const HEADER_LAST_ERROR: &str = "x-last-error";
/// When handling first failed, unix milliseconds.
pub const HEADER_FIRST_FAILURE_AT: &str = "x-first-failure-at-ms";
/// When handling last failed, unix milliseconds.
pub const HEADER_LAST_FAILURE_AT: &str = "x-last-failure-at-ms";
/// The routing key (event type) the message was first published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";

const PERSISTENT: u8 = 2;

/// How an event reached the pipeline (the [`HEADER_SOURCE`] header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventSource {
    /// Posted to ingest by Stripe and signed: the normal path.
    #[default]
    Webhook,
    /// Listed from Stripe's Events API by `processor reconcile` (no signature: the API call,
    /// over TLS with our key, authenticated it).
    Api,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Api => "api",
        }
    }

    /// The source a message's headers name; a missing or unknown value reads as a webhook.
    pub fn of(headers: &FieldTable) -> Self {
        match header_str(headers, HEADER_SOURCE).as_deref() {
            Some("api") => Self::Api,
            _ => Self::Webhook,
        }
    }
}

/// The failure a retried or dead-lettered message carries in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureInfo {
    /// `transient`, `permanent` or `crash`.
    pub class: String,
    pub last_error: String,
    pub first_failure_at: DateTime<Utc>,
    pub last_failure_at: DateTime<Utc>,
    pub original_routing_key: String,
}

impl FailureInfo {
    /// Reads the failure headers a message already carries (from an earlier failure).
    pub fn read(headers: &FieldTable) -> Option<Self> {
        let at =
            |key| header_i64(headers, key).and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        Some(Self {
            class: header_str(headers, HEADER_FAILURE_CLASS)?,
            last_error: header_str(headers, HEADER_LAST_ERROR).unwrap_or_default(),
            first_failure_at: at(HEADER_FIRST_FAILURE_AT)?,
            last_failure_at: at(HEADER_LAST_FAILURE_AT)?,
            original_routing_key: header_str(headers, HEADER_ORIGINAL_ROUTING_KEY)
                .unwrap_or_default(),
        })
    }

    /// Writes these failure headers, replacing earlier ones.
    pub fn write(&self, headers: &mut FieldTable) {
        headers.insert(HEADER_FAILURE_CLASS.into(), long_string(&self.class));
        headers.insert(HEADER_LAST_ERROR.into(), long_string(&self.last_error));
        headers.insert(
            HEADER_FIRST_FAILURE_AT.into(),
            AMQPValue::LongLongInt(self.first_failure_at.timestamp_millis()),
        );
        headers.insert(
            HEADER_LAST_FAILURE_AT.into(),
            AMQPValue::LongLongInt(self.last_failure_at.timestamp_millis()),
        );
        headers.insert(
            HEADER_ORIGINAL_ROUTING_KEY.into(),
            long_string(&self.original_routing_key),
        );
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Headers that describe a message's failures, by us or by the broker.
const FAILURE_HEADERS: [&str; 7] = [
    HEADER_FAILURE_CLASS,
    HEADER_LAST_ERROR,
    HEADER_FIRST_FAILURE_AT,
    HEADER_LAST_FAILURE_AT,
    HEADER_ORIGINAL_ROUTING_KEY,
    "x-death",
    "x-delivery-count",
];

/// Properties for putting a failed message back to work: the failure history is dropped, the
/// attempt count starts again at 1, and the replay time is recorded.
pub fn replayed(properties: &BasicProperties, now: DateTime<Utc>) -> BasicProperties {
    let mut fresh = FieldTable::default();
    if let Some(headers) = properties.headers() {
        for (key, value) in headers {
            if !FAILURE_HEADERS.contains(&key.as_str())
                && !key.as_str().starts_with("x-first-death")
            {
                fresh.insert(key.clone(), value.clone());
            }
        }
    }
    fresh.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(1));
    fresh.insert(
        HEADER_REPLAYED_AT.into(),
        AMQPValue::LongLongInt(now.timestamp_millis()),
    );
    properties
        .clone()
        .with_headers(fresh)
        .with_delivery_mode(PERSISTENT)
}

/// The same properties with `headers` changed by `edit`: how a message is re-published to a
/// retry or dead-letter queue, keeping everything else it carried.
pub fn with_headers(
    properties: &BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    edit(&mut headers);
    properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT)
}

/// An event as it travels through the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
    pub event_id: String,
    pub event_type: String,
    pub endpoint: String,
    pub received_at: DateTime<Utc>,
    pub attempt: u32,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("message has no message_id (event id)")]
    MissingEventId,
    #[error("message header `{0}` is missing or has the wrong type")]
    BadHeader(&'static str),
    #[error("`{field}` is too long for an AMQP short string ({len} bytes)")]
    TooLong { field: &'static str, len: usize },
}

pub fn short(field: &'static str, value: &str) -> Result<ShortString, ContractError> {
    ShortString::try_new(value.to_owned()).map_err(|_| ContractError::TooLong {
        field,
        len: value.len(),
    })
}

impl EventMessage {
    /// Properties of the message as ingest publishes it: persistent, with id and headers.
    pub fn properties(&self) -> Result<BasicProperties, ContractError> {
        self.properties_from(EventSource::Webhook)
    }

    /// The same, marked as coming from `source`.
    pub fn properties_from(&self, source: EventSource) -> Result<BasicProperties, ContractError> {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_SOURCE.into(), long_string(source.as_str()));
        headers.insert(HEADER_ENDPOINT.into(), long_string(&self.endpoint));
        headers.insert(
            HEADER_RECEIVED_AT.into(),
            AMQPValue::LongLongInt(self.received_at.timestamp_millis()),
        );
        headers.insert(
            HEADER_ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt.into()),
        );
        Ok(BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(short("event id", &self.event_id)?)
            .with_type(short("event type", &self.event_type)?)
            .with_timestamp(u64::try_from(self.received_at.timestamp()).unwrap_or(0))
            .with_headers(headers))
    }

    /// Reads a delivered message back. `routing_key` is the key it was delivered with; the
    /// event type comes from the `type` property when present, since retried messages
    /// travel with another routing key.
    pub fn from_delivery(
        routing_key: &str,
        properties: &BasicProperties,
        body: Vec<u8>,
    ) -> Result<Self, ContractError> {
        let event_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .ok_or(ContractError::MissingEventId)?;
        let event_type = properties
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| routing_key.to_owned());
        let headers = properties.headers().clone().unwrap_or_default();
        let endpoint = header_str(&headers, HEADER_ENDPOINT)
            .ok_or(ContractError::BadHeader(HEADER_ENDPOINT))?;
        let received_at = header_i64(&headers, HEADER_RECEIVED_AT)
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .ok_or(ContractError::BadHeader(HEADER_RECEIVED_AT))?;
        let attempt = header_i64(&headers, HEADER_ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(1);
        Ok(Self {
            event_id,
            event_type,
            endpoint,
            received_at,
            attempt,
            body,
        })
    }
}

/// A header as text, whichever string type the sender used.
pub fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A header as an integer, whichever integer type the sender (or a tool) used.
pub fn header_i64(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_properties() {
        let msg = EventMessage {
            event_id: "evt_1".into(),
            event_type: "checkout.session.completed".into(),
            endpoint: "booking".into(),
            received_at: Utc.timestamp_millis_opt(1_764_000_000_123).unwrap(),
            attempt: 3,
            body: b"{}".to_vec(),
        };
        let props = msg.properties().unwrap();
        assert_eq!(props.delivery_mode(), &Some(2));
        let back = EventMessage::from_delivery("ignored.key", &props, b"{}".to_vec()).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn source_defaults_to_webhook() {
        let msg = EventMessage {
            event_id: "evt_1".into(),
            event_type: "a.b".into(),
            endpoint: "booking".into(),
            received_at: Utc::now(),
            attempt: 1,
            body: vec![],
        };
        let headers = |props: BasicProperties| props.headers().clone().unwrap();
        let webhook = headers(msg.properties().unwrap());
        assert_eq!(EventSource::of(&webhook), EventSource::Webhook);
        assert_eq!(
            header_str(&webhook, HEADER_SOURCE).as_deref(),
            Some("webhook")
        );
        let api = headers(msg.properties_from(EventSource::Api).unwrap());
        assert_eq!(EventSource::of(&api), EventSource::Api);
        assert_eq!(
            EventSource::of(&FieldTable::default()),
            EventSource::Webhook
        );
    }

    #[test]
    fn replay_starts_afresh() {
        let mut headers = FieldTable::default();
        FailureInfo {
            class: "permanent".into(),
            last_error: "boom".into(),
            first_failure_at: Utc::now(),
            last_failure_at: Utc::now(),
            original_routing_key: "a.b".into(),
        }
        .write(&mut headers);
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(7));
        headers.insert(HEADER_ENDPOINT.into(), long_string("booking"));
        let props = BasicProperties::default().with_headers(headers);
        let fresh = replayed(&props, Utc::now());
        let headers = fresh.headers().clone().unwrap();
        assert!(FailureInfo::read(&headers).is_none());
        assert_eq!(header_i64(&headers, HEADER_ATTEMPT), Some(1));
        assert!(header_i64(&headers, HEADER_REPLAYED_AT).is_some());
        assert_eq!(
            header_str(&headers, HEADER_ENDPOINT).as_deref(),
            Some("booking")
        );
    }

    #[test]
    fn missing_id_is_an_error() {
        let props = BasicProperties::default();
        assert!(matches!(
            EventMessage::from_delivery("a.b", &props, vec![]),
            Err(ContractError::MissingEventId)
        ));
    }
}
