//! Checkout Sessions and the purchase metadata the checkout side puts on them.
//!
//! Metadata contract: `customerId`, `contentId`, `organizationId` (UUIDs), `amountPaidCents`
//! (an integer string equal to the session's `amount_total`) and `currency` (equal to the
//! session's currency, compared case-insensitively since Stripe's is lowercase).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

/// The fields of a Checkout Session we read; Stripe sends many more.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    /// `payment`, `setup` or `subscription`; only `payment` sessions are purchases.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub payment_status: Option<String>,
    /// An id, or the expanded object when the session was fetched with `expand`.
    #[serde(default)]
    pub payment_intent: Option<Value>,
    #[serde(default)]
    pub amount_total: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

impl CheckoutSession {
    pub fn from_object(object: &Value) -> Result<Self, serde_json::Error> {
        Self::deserialize(object)
    }

    pub fn is_paid(&self) -> bool {
        self.payment_status.as_deref() == Some("paid")
    }

    /// A checkout made free (e.g. by a 100 % coupon): complete with nothing to pay. Stripe
    /// sends it with `payment_intent: null`.
    pub fn is_free(&self) -> bool {
        self.payment_status.as_deref() == Some("no_payment_required")
            && self.amount_total == Some(0)
    }

    pub fn payment_intent_id(&self) -> Option<&str> {
        match self.payment_intent.as_ref()? {
            Value::String(id) => Some(id),
            Value::Object(object) => object.get("id")?.as_str(),
            _ => None,
        }
    }
}

/// What the metadata says was bought, by whom, for how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseRequest {
    pub customer_id: Uuid,
    pub content_id: Uuid,
    pub organization_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    /// `None` only for a free checkout, which is keyed by its session alone.
    pub payment_intent_id: Option<String>,
    pub checkout_session_id: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("checkout session {session} has no metadata `{field}`")]
    Missing {
        session: String,
        field: &'static str,
    },
    #[error("metadata `{field}` is not a UUID: `{value}`")]
    NotUuid { field: &'static str, value: String },
    #[error("metadata `amountPaidCents` is not a non-negative integer: `{0}`")]
    NotAmount(String),
    #[error(
        "metadata amountPaidCents {metadata} differs from the session's amount_total {session}"
    )]
    AmountMismatch { metadata: i64, session: String },
    #[error("metadata currency `{metadata}` differs from the session's currency `{session}`")]
    CurrencyMismatch { metadata: String, session: String },
    #[error("paid checkout session {0} has no payment_intent")]
    NoPaymentIntent(String),
}

/// Longest metadata value quoted back in an error.
const MAX_QUOTED: usize = 80;

fn quoted(value: &str) -> String {
    value.chars().take(MAX_QUOTED).collect()
}

impl PurchaseRequest {
    pub fn from_session(session: &CheckoutSession) -> Result<Self, MetadataError> {
        let empty = HashMap::new();
        let metadata = session.metadata.as_ref().unwrap_or(&empty);
        let field = |name: &'static str| {
            metadata
                .get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| MetadataError::Missing {
                    session: session.id.clone(),
                    field: name,
                })
        };
        let uuid = |name: &'static str| {
            let raw = field(name)?;
            Uuid::parse_str(raw).map_err(|_| MetadataError::NotUuid {
                field: name,
                value: quoted(raw),
            })
        };
        let customer_id = uuid("customerId")?;
        let content_id = uuid("contentId")?;
        let organization_id = uuid("organizationId")?;

        let raw_amount = field("amountPaidCents")?;
        let amount_cents = raw_amount
            .parse::<i64>()
            .ok()
            .filter(|a| (0..=i64::from(i32::MAX)).contains(a))
            .ok_or_else(|| MetadataError::NotAmount(quoted(raw_amount)))?;
        if session.amount_total != Some(amount_cents) {
            return Err(MetadataError::AmountMismatch {
                metadata: amount_cents,
                session: session
                    .amount_total
                    .map_or_else(|| "missing".to_owned(), |a| a.to_string()),
            });
        }

        let currency = field("currency")?;
        let session_currency = session.currency.as_deref().unwrap_or("");
        if !currency.eq_ignore_ascii_case(session_currency) {
            return Err(MetadataError::CurrencyMismatch {
                metadata: quoted(currency),
                session: quoted(session_currency),
            });
        }

        let payment_intent_id = match session.payment_intent_id() {
            Some(id) => Some(id.to_owned()),
            None if session.is_free() => None,
            None => return Err(MetadataError::NoPaymentIntent(session.id.clone())),
        };
        Ok(Self {
            customer_id,
            content_id,
            organization_id,
            amount_cents,
            currency: session_currency.to_ascii_lowercase(),
            payment_intent_id,
            checkout_session_id: session.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(metadata: Value) -> CheckoutSession {
        CheckoutSession::from_object(&json!({
            "id": "cs_1",
            "payment_status": "paid",
            "payment_intent": "pi_1",
            "amount_total": 1999,
            "currency": "usd",
            "metadata": metadata,
        }))
        .unwrap()
    }

    fn good() -> Value {
        json!({
            "customerId": "3f1c2a6e-8d4b-4c1e-9a57-2b6d0e4f8a10",
            "contentId": "5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8",
            "organizationId": "c0ffee00-1234-4abc-8def-000000000001",
            "amountPaidCents": "1999",
            "currency": "USD",
        })
    }

    #[test]
    fn valid_metadata() {
        let request = PurchaseRequest::from_session(&session(good())).unwrap();
        assert_eq!(request.amount_cents, 1999);
        assert_eq!(request.currency, "usd");
        assert_eq!(request.payment_intent_id.as_deref(), Some("pi_1"));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: [(&str, Value, &str); 6] = [
            ("customerId", Value::Null, "customerId"),
            ("contentId", json!("nope"), "contentId"),
            ("amountPaidCents", json!("19.99"), "amountPaidCents"),
            ("amountPaidCents", json!("2000"), "amount_total"),
            ("amountPaidCents", json!("-1"), "amountPaidCents"),
            ("currency", json!("eur"), "currency"),
        ];
        for (key, value, expected) in cases {
            let mut metadata = good();
            if value.is_null() {
                metadata.as_object_mut().unwrap().remove(key);
            } else {
                metadata[key] = value;
            }
            let error = PurchaseRequest::from_session(&session(metadata)).unwrap_err();
            assert!(error.to_string().contains(expected), "{key}: {error}");
        }
    }

    #[test]
    fn expanded_payment_intent() {
        let mut s = session(good());
        s.payment_intent = Some(json!({"id": "pi_x", "object": "payment_intent"}));
        assert_eq!(s.payment_intent_id(), Some("pi_x"));
        s.payment_intent = None;
        assert!(matches!(
            PurchaseRequest::from_session(&s),
            Err(MetadataError::NoPaymentIntent(_))
        ));
    }

    #[test]
    fn a_free_checkout_needs_no_payment_intent_but_a_zero_amount() {
        let mut metadata = good();
        metadata["amountPaidCents"] = json!("0");
        let mut s = session(metadata);
        s.payment_status = Some("no_payment_required".into());
        s.amount_total = Some(0);
        s.payment_intent = None;
        assert!(s.is_free());
        let request = PurchaseRequest::from_session(&s).unwrap();
        assert_eq!((request.amount_cents, request.payment_intent_id), (0, None));

        let mut s = session(good());
        s.payment_status = Some("no_payment_required".into());
        s.amount_total = Some(0);
        s.payment_intent = None;
        let error = PurchaseRequest::from_session(&s).unwrap_err();
        assert!(
            matches!(error, MetadataError::AmountMismatch { metadata: 1999, .. }),
            "{error}"
        );
    }
}
