//! Reading the dead-letter queue without disturbing it, for the ops commands and metrics.
//!
//! RabbitMQ has no "peek": a [`Snapshot`] takes every message with `basic.get` and holds them
//! unacknowledged. Messages an operation acks leave the queue; closing the snapshot's channel
//! returns all the others to their original positions, in order.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde_json::{Value, json};
use shared::contract::{
    FailureInfo, HEADER_ATTEMPT, HEADER_ENDPOINT, HEADER_RECEIVED_AT, header_i64, header_str,
};
use shared::topology::Topology;

/// The class of a message the broker dead-lettered itself (delivery limit reached: the
/// processor kept dying while holding it).
pub const CLASS_CRASH: &str = "crash";

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("RabbitMQ refused {what}: {source}")]
    Broker {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
}

fn broker(what: &'static str) -> impl FnOnce(lapin::Error) -> DlqError {
    move |source| DlqError::Broker { what, source }
}

/// One dead message, as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub event_id: String,
    pub event_type: String,
    /// `permanent`, `transient` (retries exhausted) or `crash`.
    pub class: String,
    pub attempts: u32,
    pub last_error: String,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub endpoint: Option<String>,
    pub received_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub delivery_tag: u64,
    #[serde(skip)]
    pub properties: BasicProperties,
    #[serde(skip)]
    pub body: Vec<u8>,
}

/// The broker's own dead-lettering record (`x-death`), most recent first.
#[derive(Debug, Clone, PartialEq)]
pub struct Death {
    pub reason: String,
    pub queue: String,
    pub count: i64,
    pub time: Option<DateTime<Utc>>,
}

pub fn deaths(headers: &FieldTable) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(table) => Some(Death {
                reason: header_str(table, "reason").unwrap_or_default(),
                queue: header_str(table, "queue").unwrap_or_default(),
                count: header_i64(table, "count").unwrap_or(1),
                time: header_i64(table, "time").and_then(|s| Utc.timestamp_opt(s, 0).single()),
            }),
            _ => None,
        })
        .collect()
}

/// Why a dead letter is dead.
struct Explanation {
    class: String,
    last_error: String,
    first_failure_at: Option<DateTime<Utc>>,
    last_failure_at: Option<DateTime<Utc>>,
    original_routing_key: String,
}

fn explain(headers: &FieldTable, routing_key: &str) -> Explanation {
    // Who dead-lettered it: the broker when `x-death` has an entry other than a TTL
    // expiry (a replay strips `x-death`, so within one life of a message such an entry
    // can only be its last move); otherwise the processor, whose failure headers say why.
    // A message that was retried before the broker gave up on it carries the processor's
    // headers from that retry too: they are history, not the reason.
    let failure = FailureInfo::read(headers);
    let broker_death = deaths(headers)
        .into_iter()
        .find(|death| death.reason != "expired");
    match (failure, broker_death) {
        (Some(failure), None) => Explanation {
            class: failure.class,
            last_error: failure.last_error,
            first_failure_at: Some(failure.first_failure_at),
            last_failure_at: Some(failure.last_failure_at),
            original_routing_key: failure.original_routing_key,
        },
        (earlier, death) => {
            let reason = death.as_ref().map_or("unknown", |d| d.reason.as_str());
            let class = if reason == "delivery_limit" {
                CLASS_CRASH.to_owned()
            } else {
                format!("broker:{reason}")
            };
            let mut error = match reason {
                // x-delivery-count is not a reliable count on a dead-lettered message
                // (RabbitMQ 3.10 left it at 0 in the chaos runs): no number here.
                "delivery_limit" => "reached the work queue's delivery limit without being \
                                     settled (each time the processor died or panicked \
                                     handling it, or could not move it)"
                    .to_owned(),
                other => format!("dead-lettered by RabbitMQ, reason `{other}`"),
            };
            if let Some(earlier) = &earlier {
                error.push_str(&format!(
                    "; before that it failed ({}): {}",
                    earlier.class, earlier.last_error
                ));
            }
            let time = death.as_ref().and_then(|d| d.time);
            Explanation {
                class,
                last_error: error,
                first_failure_at: earlier.as_ref().map(|e| e.first_failure_at).or(time),
                last_failure_at: time,
                original_routing_key: earlier
                    .map(|e| e.original_routing_key)
                    .filter(|key| !key.is_empty())
                    .unwrap_or_else(|| routing_key.to_owned()),
            }
        }
    }
}

impl DeadLetter {
    pub fn from_delivery(delivery: &Delivery) -> Self {
        let properties = delivery.properties.clone();
        let headers = properties.headers().clone().unwrap_or_default();
        let received_at = header_i64(&headers, HEADER_RECEIVED_AT)
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        let event_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(no message_id)".into());
        let attempts = header_i64(&headers, HEADER_ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(1);
        let Explanation {
            class,
            last_error,
            first_failure_at: first,
            last_failure_at: last,
            original_routing_key: routing_key,
        } = explain(&headers, delivery.routing_key.as_str());
        let event_type = properties
            .kind()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or(routing_key);
        Self {
            event_id,
            event_type,
            class,
            attempts,
            last_error,
            first_failure_at: first,
            last_failure_at: last,
            endpoint: header_str(&headers, HEADER_ENDPOINT),
            received_at,
            delivery_tag: delivery.delivery_tag,
            properties,
            body: delivery.data.clone(),
        }
    }

    /// How long it has been dead (since its last failure).
    pub fn age(&self, now: DateTime<Utc>) -> Duration {
        self.last_failure_at
            .or(self.received_at)
            .and_then(|t| (now - t).to_std().ok())
            .unwrap_or_default()
    }

    /// Everything about the message, for `dlq show`.
    pub fn describe(&self) -> Value {
        let headers = self.properties.headers().clone().unwrap_or_default();
        let payload = serde_json::from_slice::<Value>(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        let history: Vec<Value> = deaths(&headers)
            .into_iter()
            .map(
                |d| json!({"reason": d.reason, "queue": d.queue, "count": d.count, "time": d.time}),
            )
            .collect();
        json!({
            "summary": self,
            "headers": table_json(&headers),
            "broker_history": history,
            "payload": payload,
        })
    }
}

/// AMQP headers as plain JSON.
pub fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(v) => json!(v),
        AMQPValue::ShortShortUInt(v) => json!(v),
        AMQPValue::ShortInt(v) => json!(v),
        AMQPValue::ShortUInt(v) => json!(v),
        AMQPValue::LongInt(v) => json!(v),
        AMQPValue::LongUInt(v) => json!(v),
        AMQPValue::LongLongInt(v) => json!(v),
        AMQPValue::Float(v) => json!(v),
        AMQPValue::Double(v) => json!(v),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        other => json!(format!("{other:?}")),
    }
}

/// Which dead letters an operation applies to. Criteria combine with AND; `all` matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filter {
    pub all: bool,
    pub event_ids: Vec<String>,
    pub event_type: Option<String>,
    pub class: Option<String>,
    pub endpoint: Option<String>,
    /// Only letters dead for at least this long.
    #[serde(with = "humantime_serde_opt")]
    pub older_than: Option<Duration>,
}

impl Filter {
    /// Whether `letter` matches, its age measured at `now`.
    pub fn matches_at(&self, letter: &DeadLetter, now: DateTime<Utc>) -> bool {
        if self.all {
            return true;
        }
        (self.event_ids.is_empty() || self.event_ids.contains(&letter.event_id))
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| *t == letter.event_type)
            && self.class.as_ref().is_none_or(|c| *c == letter.class)
            && self
                .endpoint
                .as_ref()
                .is_none_or(|e| letter.endpoint.as_ref() == Some(e))
            && self.older_than.is_none_or(|min| letter.age(now) >= min)
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.matches_at(letter, Utc::now())
    }
}

/// `older_than` as `"1h"` in JSON (the audit log keeps filters as JSON).
mod humantime_serde_opt {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&humantime::format_duration(*d).to_string()),
            None => serializer.serialize_none(),
        }
    }
}

/// Every message of the dead-letter queue, held unacknowledged on its own channel.
pub struct Snapshot {
    channel: Channel,
    pub letters: Vec<DeadLetter>,
}

impl Snapshot {
    /// Takes the messages in queue order. `max` bounds how many are held at once.
    pub async fn take(
        connection: &Connection,
        topology: &Topology,
        max: usize,
    ) -> Result<Self, DlqError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("a channel"))?;
        let mut letters = Vec::new();
        while letters.len() < max {
            let got = channel
                .basic_get(
                    topology.dead_queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(broker("basic.get on the dead-letter queue"))?;
            let Some(message) = got else { break };
            letters.push(DeadLetter::from_delivery(&message.delivery));
        }
        Ok(Self { channel, letters })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Removes one message from the queue for good.
    pub async fn ack(&self, letter: &DeadLetter) -> Result<(), DlqError> {
        self.channel
            .basic_ack(letter.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(broker("basic.ack"))
    }

    /// Returns every message not acked to the queue, in its original position.
    pub async fn release(self) -> Result<(), DlqError> {
        self.channel
            .close(200, "snapshot released".into())
            .await
            .map_err(broker("closing the snapshot channel"))
    }
}

/// Counts for `dlq stats`.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub depth: usize,
    pub oldest_age_secs: u64,
    pub by_class: BTreeMap<String, usize>,
    pub by_type: BTreeMap<String, usize>,
    pub by_error: BTreeMap<String, usize>,
}

impl Stats {
    pub fn of(letters: &[DeadLetter], now: DateTime<Utc>) -> Self {
        let mut stats = Stats {
            depth: letters.len(),
            ..Stats::default()
        };
        for letter in letters {
            stats.oldest_age_secs = stats.oldest_age_secs.max(letter.age(now).as_secs());
            *stats.by_class.entry(letter.class.clone()).or_default() += 1;
            *stats.by_type.entry(letter.event_type.clone()).or_default() += 1;
            *stats
                .by_error
                .entry(error_kind(&letter.last_error))
                .or_default() += 1;
        }
        stats
    }
}

/// The error without the ids in it, so that counts group alike failures:
/// `unknown content 5d2e…` → `unknown content <id>`.
pub fn error_kind(error: &str) -> String {
    error
        .split_whitespace()
        .map(|word| {
            let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            let looks_like_id = uuid::Uuid::parse_str(bare).is_ok()
                || bare.bytes().any(|b| b.is_ascii_digit()) && bare.len() > 6;
            if looks_like_id { "<id>" } else { word }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Depth of a queue without touching its messages (`None` if it does not exist).
pub async fn depth(channel: &Channel, queue: &str) -> Option<(u32, u32)> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| (q.message_count(), q.consumer_count()))
}

pub fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_group_alike_errors() {
        assert_eq!(
            error_kind("unknown content 5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8"),
            "unknown content <id>"
        );
        assert_eq!(
            error_kind("retries exhausted after 7 attempts: database error: pool timed out"),
            "retries exhausted after 7 attempts: database error: pool timed out"
        );
    }

    fn death(reason: &str) -> AMQPValue {
        let mut entry = FieldTable::default();
        entry.insert("reason".into(), AMQPValue::LongString(reason.into()));
        entry.insert("queue".into(), AMQPValue::LongString("q".into()));
        entry.insert("time".into(), AMQPValue::Timestamp(1_795_000_000));
        AMQPValue::FieldTable(entry)
    }

    fn retried_before() -> FieldTable {
        let mut headers = FieldTable::default();
        FailureInfo {
            class: "transient".into(),
            last_error: "no purchase yet".into(),
            first_failure_at: Utc.timestamp_millis_opt(1_794_999_000_000).unwrap(),
            last_failure_at: Utc.timestamp_millis_opt(1_794_999_500_000).unwrap(),
            original_routing_key: "charge.refunded".into(),
        }
        .write(&mut headers);
        headers
    }

    #[test]
    fn the_processors_own_dead_letter_is_explained_by_its_headers() {
        let Explanation {
            class,
            last_error: error,
            ..
        } = explain(&retried_before(), "q");
        assert_eq!(
            (class.as_str(), error.as_str()),
            ("transient", "no purchase yet")
        );
        // A TTL expiry on the way (the retry tiers of older versions) changes nothing.
        let mut headers = retried_before();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("expired")].into()),
        );
        assert_eq!(explain(&headers, "q").class, "transient");
    }

    /// Chaos finding 2: the broker gave up on a message that had been retried before; the
    /// retry's headers are history, the class is `crash`.
    #[test]
    fn a_broker_dead_letter_is_a_crash_even_with_earlier_failure_headers() {
        let mut headers = retried_before();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("delivery_limit"), death("expired")].into()),
        );
        let Explanation {
            class,
            last_error: error,
            first_failure_at: first,
            last_failure_at: last,
            original_routing_key: key,
        } = explain(&headers, "stripe.events.processor");
        assert_eq!(class, "crash");
        assert!(
            error.starts_with("reached the work queue's delivery limit"),
            "{error}"
        );
        assert!(
            error.ends_with("before that it failed (transient): no purchase yet"),
            "{error}"
        );
        assert_eq!(
            first,
            Some(Utc.timestamp_millis_opt(1_794_999_000_000).unwrap())
        );
        assert_eq!(last, Utc.timestamp_opt(1_795_000_000, 0).single());
        assert_eq!(key, "charge.refunded");

        let mut bare = FieldTable::default();
        bare.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("rejected")].into()),
        );
        let Explanation {
            class,
            last_error: error,
            ..
        } = explain(&bare, "charge.refunded");
        assert_eq!(class, "broker:rejected");
        assert_eq!(error, "dead-lettered by RabbitMQ, reason `rejected`");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(format_age(Duration::from_secs(5)), "5s");
        assert_eq!(format_age(Duration::from_secs(125)), "2m5s");
        assert_eq!(format_age(Duration::from_secs(7300)), "2h1m");
        assert_eq!(format_age(Duration::from_secs(90000)), "1d1h");
    }
}
