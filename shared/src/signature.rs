//! Verification of the `Stripe-Signature` header.
//!
//! The header is `t=<unix seconds>,v1=<hex>[,v1=<hex>…]`. The signed payload is
//! `"{t}.{raw body}"`, HMAC-SHA256 keyed with the whole `whsec_…` string. A request is
//! genuine when any `v1` matches any secret configured for its endpoint (several are
//! active while a secret is being rolled). `v0` and unknown schemes are ignored on
//! purpose: accepting them would allow a downgrade.

use std::fmt;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const SECRET_PREFIX: &str = "whsec_";

/// The secret of Stripe's documented signature example, used by the fixtures and the
/// test-mode defaults. Never acceptable on an endpoint that takes live-mode events.
pub const SAMPLE_SECRET: &str = "whsec_test_secret";

/// Shortest part after `whsec_` of a secret Stripe issues.
const MIN_ISSUED_LEN: usize = 32;

/// Stripe's default tolerance between the signed timestamp and our clock.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// A webhook endpoint secret (`whsec_…`). Never printed.
#[derive(Clone)]
pub struct WebhookSecret(SecretString);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(whsec_***)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret #{position} does not start with `whsec_`")]
    MissingPrefix { position: usize },
    #[error("secret #{position} has nothing after `whsec_`")]
    Empty { position: usize },
    #[error("secret #{position} contains whitespace or control characters")]
    BadCharacters { position: usize },
}

impl WebhookSecret {
    /// Parses one secret; `position` (1-based) only serves the error message, which must
    /// never contain the secret itself.
    pub fn parse(raw: &str, position: usize) -> Result<Self, SecretError> {
        let rest = raw
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix { position })?;
        if rest.is_empty() {
            return Err(SecretError::Empty { position });
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SecretError::BadCharacters { position });
        }
        Ok(Self(SecretString::from(raw.to_owned())))
    }

    /// Whether this is the sample secret of Stripe's docs, the fixtures and the default
    /// configuration: anyone can sign with it.
    pub fn is_sample(&self) -> bool {
        self.0.expose_secret() == SAMPLE_SECRET
    }

    /// Whether it has the shape of a secret Stripe issues: `whsec_` then at least 32
    /// base64 characters (the Dashboard's are 32, the Stripe CLI's 64 hexadecimal digits).
    /// A live endpoint with anything else was most likely configured by hand, by mistake.
    pub fn looks_issued_by_stripe(&self) -> bool {
        let secret = self.0.expose_secret();
        let rest = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        rest.len() >= MIN_ISSUED_LEN
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    }

    /// Parses a comma-separated list (rotation: the old and the new secret).
    pub fn parse_list(raw: &str) -> Result<Vec<Self>, SecretError> {
        raw.split(',')
            .enumerate()
            .map(|(i, s)| Self::parse(s.trim(), i + 1))
            .collect()
    }

    fn mac(&self, timestamp: i64, payload: &[u8]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(self.0.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// Signs a payload the way Stripe does; returns the whole header value.
    /// Used by tests and the dev tool that posts sample events.
    pub fn sign(&self, timestamp: i64, payload: &[u8]) -> String {
        format!(
            "t={timestamp},v1={}",
            hex::encode(self.mac(timestamp, payload))
        )
    }
}

/// Why a signature header was refused. The HTTP layer maps the `Malformed` cases to 400 and
/// the others to 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    #[error("no v1 signature matches a secret configured for this endpoint")]
    NoMatch,
    #[error("signature timestamp is {age_secs}s old, more than the {tolerance_secs}s tolerance")]
    TooOld { age_secs: i64, tolerance_secs: u64 },
    #[error(
        "signature timestamp is {ahead_secs}s in the future, more than the {tolerance_secs}s tolerance"
    )]
    InFuture {
        ahead_secs: i64,
        tolerance_secs: u64,
    },
}

impl SignatureError {
    /// True when the header could not be read at all (as opposed to read and refused).
    pub fn is_malformed(&self) -> bool {
        matches!(self, SignatureError::Malformed(_))
    }
}

/// The parts of a `Stripe-Signature` header that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub v1: Vec<[u8; 32]>,
}

impl SignatureHeader {
    pub fn parse(header: &str) -> Result<Self, SignatureError> {
        if header.is_empty() {
            return Err(SignatureError::Malformed("empty"));
        }
        // Stripe sends no whitespace; a header with some was not written by Stripe.
        if header.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SignatureError::Malformed("contains whitespace"));
        }
        let mut timestamp = None;
        let mut v1 = Vec::new();
        for item in header.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or(SignatureError::Malformed("an element has no `=`"))?;
            match key {
                "t" => {
                    if timestamp.is_some() {
                        return Err(SignatureError::Malformed("more than one timestamp"));
                    }
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(SignatureError::Malformed("timestamp is not a number"));
                    }
                    let t = value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed("timestamp is out of range"))?;
                    timestamp = Some(t);
                }
                "v1" => {
                    let mut sig = [0u8; 32];
                    hex::decode_to_slice(value, &mut sig).map_err(|_| {
                        SignatureError::Malformed("v1 is not 64 hexadecimal characters")
                    })?;
                    v1.push(sig);
                }
                "" => return Err(SignatureError::Malformed("an element has an empty key")),
                // v0 and future schemes: ignored, never accepted.
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(SignatureError::Malformed("no timestamp (t=)"))?;
        Ok(Self { timestamp, v1 })
    }
}

/// Checks `header` for `payload` against `secrets`, with `now` in unix seconds.
pub fn verify(
    header: &str,
    payload: &[u8],
    secrets: &[WebhookSecret],
    tolerance_secs: u64,
    now: i64,
) -> Result<(), SignatureError> {
    let parsed = SignatureHeader::parse(header)?;
    if parsed.v1.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        let expected = secret.mac(parsed.timestamp, payload);
        for candidate in &parsed.v1 {
            // Every pair is compared so that timing does not tell which secret matched.
            matched |= expected.ct_eq(candidate);
        }
    }
    if !bool::from(matched) {
        return Err(SignatureError::NoMatch);
    }
    let tolerance = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
    let age = now.saturating_sub(parsed.timestamp);
    if age > tolerance {
        return Err(SignatureError::TooOld {
            age_secs: age,
            tolerance_secs,
        });
    }
    if -age > tolerance {
        return Err(SignatureError::InFuture {
            ahead_secs: -age,
            tolerance_secs,
        });
    }
    Ok(())
}
