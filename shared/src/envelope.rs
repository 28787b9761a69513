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
/// the processor. `O` is what `data.object` is read into: a [`Value`] for the processor
/// ([`EventEnvelope`]), nothing for ingest ([`EventHead`]).
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope<O> {
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
    // `default` alone would make serde ask `O: Default`.
    #[serde(default = "Option::default", bound = "O: Deserialize<'de>")]
    pub data: Option<EventData<O>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData<O> {
    pub object: O,
}

/// The envelope the processor reads, `data.object` included.
pub type EventEnvelope = Envelope<Value>;

/// The same envelope with the event's object skipped, not built: what ingest needs (id and
/// type) at a fraction of the cost, since building `data.object` as a [`Value`] tree is most
/// of the parsing. It accepts and refuses exactly the bodies [`EventEnvelope::parse`] does:
/// the object is still read through, so the JSON must be whole and well formed.
pub type EventHead = Envelope<Skim>;

/// Reads any JSON value through as [`Value`] would (every string decoded, so a lone UTF-16
/// surrogate is refused; every number converted), without building it.
/// `serde::de::IgnoredAny` is not enough: it skips strings without decoding their escapes.
#[derive(Debug, Clone)]
pub struct Skim;

impl<'de> Deserialize<'de> for Skim {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Skim)
    }
}

impl<'de> serde::de::Visitor<'de> for Skim {
    type Value = Skim;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_unit<E>(self) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_none<E>(self) -> Result<Skim, E> {
        Ok(Skim)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Skim, D::Error> {
        Skim::deserialize(deserializer)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Skim, A::Error> {
        while seq.next_element::<Skim>()?.is_some() {}
        Ok(Skim)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skim, A::Error> {
        while map.next_key::<Skim>()?.is_some() {
            map.next_value::<Skim>()?;
        }
        Ok(Skim)
    }
}

impl<O: serde::de::DeserializeOwned> Envelope<O> {
    /// Parses and checks the fields the pipeline relies on.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Self = serde_json::from_slice(body).map_err(EnvelopeError::NotJson)?;
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
}

impl EventEnvelope {
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
            assert!(EventHead::parse(body).is_err());
        }
        let long = format!(r#"{{"id":"evt_{}","type":"a.b"}}"#, "x".repeat(300));
        assert!(EventEnvelope::parse(long.as_bytes()).is_err());
    }

    /// Ingest's parse and the processor's must agree on every body: what ingest accepts, the
    /// processor can read.
    #[test]
    fn head_and_envelope_agree() {
        let bodies = [
            &br#"{"id":"evt_1","type":"a.b","data":{"object":{"x":[1,2,{"y":null}]}}}"#[..],
            br#"{"id":"evt_1","type":"a.b","data":{}}"#,
            br#"{"id":"evt_1","type":"a.b","data":null}"#,
            br#"{"id":"evt_1","type":"a.b","data":{"object":1}"#,
            br#"{"id":"evt_1","type":"a.b","created":"soon"}"#,
            br#"{"id":"evt_1","type":"a.b","livemode":"yes"}"#,
            br#"{"id":"evt_1","type":"a.b","api_version":7}"#,
            br#"{"id":"evt_1","type":"a.b","id":"evt_2"}"#,
            br#"{"id":"evt_1","type":"a.b","data":{"object":"\ud800"}}"#,
            br#"{"id":"evt_1","type":"a.b","data":{"object":{"\udc00":1}}}"#,
            br#"{"id":"evt_1","type":"a.b","data":{"object":[1e999]}}"#,
            br#"{"id":"evt_1","type":"a.b","data":{"object":[-0.0, 18446744073709551616, "\u00e9"]}}"#,
            br#"{"id":"evt_1","type":"a.b"} trailing"#,
            include_bytes!("../../fixtures/stripe/events/checkout.session.completed.json"),
        ];
        for body in bodies {
            let full = EventEnvelope::parse(body);
            let head = EventHead::parse(body);
            assert_eq!(
                full.is_ok(),
                head.is_ok(),
                "disagree on {}",
                String::from_utf8_lossy(body)
            );
            if let (Ok(full), Ok(head)) = (full, head) {
                assert_eq!((full.id, full.event_type), (head.id, head.event_type));
            }
        }
    }
}
