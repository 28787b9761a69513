//! Stripe's event envelope, parsed leniently: Stripe adds fields over time, so only what
//! the system reads is typed and the raw body is always kept as received.

use serde::Deserialize;
use serde_json::Value;

/// Longest id or type we accept: both travel in AMQP short strings (255 bytes).
pub const MAX_FIELD_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not a JSON object: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("body is not a Stripe event: field `{field}` {problem}")]
    BadField {
        field: &'static str,
        problem: &'static str,
    },
}

/// An event as both binaries need it: id and type for routing and dedup, the rest for
/// the processor.
#[derive(Debug, Clone, Deserialize)]
pub struct EventEnvelope {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub livemode: bool,
    /// Unix seconds when Stripe created the event.
    #[serde(default)]
    pub created: Option<i64>,
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub data: Option<EventData>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: Value,
}

impl EventEnvelope {
    /// Parses and checks the fields the pipeline relies on.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: EventEnvelope =
            serde_json::from_slice(body).map_err(EnvelopeError::NotJson)?;
        check_token("id", &envelope.id, |c| {
            c.is_ascii_alphanumeric() || c == '_'
        })?;
        check_token("type", &envelope.event_type, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_'
        })?;
        if envelope.object.as_deref().is_some_and(|o| o != "event") {
            return Err(EnvelopeError::BadField {
                field: "object",
                problem: "is not \"event\"",
            });
        }
        Ok(envelope)
    }

    /// The resource the event is about (`data.object`), if any.
    pub fn object(&self) -> Option<&Value> {
        self.data.as_ref().map(|d| &d.object)
    }
}

fn check_token(
    field: &'static str,
    value: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<(), EnvelopeError> {
    let problem = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_FIELD_LEN {
        "is longer than 255 bytes"
    } else if !value.chars().all(allowed) {
        "has characters Stripe never uses"
    } else {
        return Ok(());
    };
    Err(EnvelopeError::BadField { field, problem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_event() {
        let e = EventEnvelope::parse(br#"{"id":"evt_1","object":"event","type":"a.b"}"#).unwrap();
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.event_type, "a.b");
        assert!(e.object().is_none());
    }

    #[test]
    fn rejects_bad_shapes() {
        for body in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"type":"a.b"}"#,
            br#"{"id":"evt_1"}"#,
            br#"{"id":"","type":"a.b"}"#,
            br#"{"id":"evt 1","type":"a.b"}"#,
            br#"{"id":"evt_1","type":"A.B"}"#,
            br#"{"id":12,"type":"a.b"}"#,
            br#"{"id":"evt_1","type":"a.b","object":"charge"}"#,
        ] {
            assert!(
                EventEnvelope::parse(body).is_err(),
                "accepted {}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"id":"evt_{}","type":"a.b"}}"#, "x".repeat(300));
        assert!(EventEnvelope::parse(long.as_bytes()).is_err());
    }
}
