//! Masking what must never appear on a console page: secrets (webhook secrets, API keys,
//! tokens, passwords inside URLs), signatures, and card-like numbers (13–19 digits, with or
//! without spaces or dashes between groups).
//!
//! Applied to every piece of event or error text a page shows, and to the JSON download a
//! purge offers. The masking errs on the side of hiding: a 13-digit millisecond timestamp
//! is masked too.

use serde_json::Value;

/// What replaces a hidden value.
pub const HIDDEN: &str = "••••";

/// JSON keys whose string values are secrets whatever they look like.
const SECRET_KEYS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "token",
    "signature",
    "authorization",
    "api_key",
    "apikey",
    "private_key",
    "cookie",
];

/// Prefixes of Stripe (and similar) secrets inside free text.
const SECRET_PREFIXES: &[&str] = &["whsec_", "sk_live_", "sk_test_", "rk_live_", "rk_test_"];

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // `client_secret` is a secret; a `payment_intent` is not.
    SECRET_KEYS.iter().any(|s| key.contains(s))
}

/// A JSON value with secret fields hidden and every string masked as text.
pub fn mask_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let masked = match v {
                        Value::String(s) if is_secret_key(k) && !s.is_empty() => {
                            Value::String(HIDDEN.into())
                        }
                        other => mask_json(other),
                    };
                    (k.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(mask_json).collect()),
        Value::String(s) => Value::String(mask_text(s)),
        Value::Number(n) => {
            let text = n.to_string();
            let masked = mask_text(&text);
            if masked == text {
                value.clone()
            } else {
                Value::String(masked)
            }
        }
        other => other.clone(),
    }
}

/// Raw bytes (an event body) for display: pretty-printed and masked when they are JSON,
/// masked text otherwise. Numbers are masked after printing, so a card number stored as a
/// JSON number is caught too.
pub fn pretty_body(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(json) => {
            let pretty = serde_json::to_string_pretty(&mask_json(&json))
                .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
            mask_text(&pretty)
        }
        Err(_) => mask_text(&String::from_utf8_lossy(bytes)),
    }
}

/// Free text with card-like numbers, secret-looking words, signatures and URL passwords
/// hidden.
pub fn mask_text(text: &str) -> String {
    let text = mask_url_passwords(text);
    let text = mask_signatures(&text);
    let text = mask_secret_words(&text);
    mask_card_numbers(&text)
}

/// `scheme://user:pass@host` → `scheme://user:••••@host`.
fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str(HIDDEN);
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// `t=…,v1=<hex>` (a Stripe-Signature header) → the hex hidden; also `v0=`.
fn mask_signatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (text[i..].starts_with("v1=") || text[i..].starts_with("v0="))
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric());
        if starts {
            let value_start = i + 3;
            let value_end = text[value_start..]
                .find(|c: char| !c.is_ascii_hexdigit())
                .map_or(text.len(), |n| value_start + n);
            out.push_str(&text[i..value_start]);
            if value_end > value_start {
                out.push_str(HIDDEN);
            }
            i = value_end;
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `whsec_abc…` → `whsec_••••`.
fn mask_secret_words(text: &str) -> String {
    let mut out = text.to_owned();
    for prefix in SECRET_PREFIXES {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(pos) = rest.find(prefix) {
            let value_start = pos + prefix.len();
            result.push_str(&rest[..value_start]);
            let value_end = rest[value_start..]
                .find(|c: char| !c.is_ascii_alphanumeric())
                .map_or(rest.len(), |n| value_start + n);
            if value_end > value_start {
                result.push_str(HIDDEN);
            }
            rest = &rest[value_end..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// Runs of 13 to 19 digits, possibly grouped by single spaces or dashes, keep only their
/// last four digits. Longer runs (ids, hashes) are left alone: they are not card numbers.
fn mask_card_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !chars[i - 1].is_ascii_alphanumeric();
        if !(chars[i].is_ascii_digit() && boundary) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // Longest run of digits with single separators between them.
        let mut end = i;
        let mut digits = 0;
        let mut j = i;
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if (chars[j] == ' ' || chars[j] == '-')
                && j + 1 < chars.len()
                && chars[j + 1].is_ascii_digit()
            {
                j += 1;
            } else {
                break;
            }
        }
        let followed_by_word = end < chars.len() && chars[end].is_ascii_alphabetic();
        if (13..=19).contains(&digits) && !followed_by_word {
            let mut seen = 0;
            for &c in &chars[i..end] {
                if c.is_ascii_digit() {
                    seen += 1;
                    out.push(if seen > digits - 4 { c } else { '•' });
                } else {
                    out.push(c);
                }
            }
        } else {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn card_numbers_keep_only_their_last_four_digits() {
        assert_eq!(
            mask_text("card 4242424242424242 ok"),
            "card ••••••••••••4242 ok"
        );
        assert_eq!(mask_text("4000 0566 5566 5556"), "•••• •••• •••• 5556");
        assert_eq!(mask_text("378282246310005"), "•••••••••••0005");
        // Too short or too long to be a card, or part of an id: left alone.
        assert_eq!(mask_text("amount 199900 cents"), "amount 199900 cents");
        assert_eq!(
            mask_text("pi_3Mtw4242424242424242"),
            "pi_3Mtw4242424242424242"
        );
        assert_eq!(
            mask_text("12345678901234567890123"),
            "12345678901234567890123"
        );
    }

    #[test]
    fn secrets_signatures_and_url_passwords_are_hidden() {
        assert_eq!(mask_text("secret whsec_abc123XYZ."), "secret whsec_••••.");
        assert_eq!(mask_text("key sk_live_51Habc"), "key sk_live_••••");
        assert_eq!(
            mask_text(
                "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd"
            ),
            "t=1700000000,v1=••••"
        );
        assert_eq!(
            mask_text("connect postgres://app:hunter2@db:5432/x failed"),
            "connect postgres://app:••••@db:5432/x failed"
        );
        assert_eq!(
            mask_text("amqp://rabbit:5672/%2f"),
            "amqp://rabbit:5672/%2f"
        );
    }

    #[test]
    fn json_secret_fields_and_numbers_are_masked() {
        let body = json!({
            "client_secret": "pi_123_secret_456",
            "payment_intent": "pi_123",
            "card": {"number": 4242424242424242u64, "last4": "4242"},
            "note": "paid with 5555-5555-5555-4444",
        });
        let shown = pretty_body(&serde_json::to_vec(&body).unwrap());
        assert!(
            shown.contains(&format!("\"client_secret\": \"{HIDDEN}\"")),
            "{shown}"
        );
        assert!(shown.contains("\"payment_intent\": \"pi_123\""), "{shown}");
        assert!(!shown.contains("4242424242424242"), "{shown}");
        assert!(shown.contains("••••-••••-••••-4444"), "{shown}");
    }
}
