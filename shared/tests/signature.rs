//! The signature check against vectors made by the official Stripe library
//! (`fixtures/stripe/signature-vectors.json`), and against every way a header can be wrong.

use serde_json::Value;
use shared::signature::{SignatureError, SignatureHeader, WebhookSecret, verify};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");
const TOLERANCE: u64 = 300;

fn secret(raw: &str) -> WebhookSecret {
    WebhookSecret::parse(raw, 1).unwrap()
}

fn vectors() -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/signature-vectors.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn payload_of(vector: &Value) -> Vec<u8> {
    match (vector.get("payload"), vector.get("file")) {
        (Some(Value::String(p)), _) => p.as_bytes().to_vec(),
        (_, Some(Value::String(file))) => std::fs::read(format!("{FIXTURES}/{file}")).unwrap(),
        _ => panic!("vector without payload: {vector}"),
    }
}

fn secrets_of(vector: &Value) -> Vec<String> {
    match (vector.get("secret"), vector.get("secrets")) {
        (Some(Value::String(s)), _) => vec![s.clone()],
        (_, Some(Value::Array(list))) => list
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect(),
        _ => panic!("vector without secret: {vector}"),
    }
}

#[test]
fn every_official_vector_verifies_with_each_of_its_secrets() {
    let vectors = vectors();
    assert!(vectors.len() >= 10, "expected the whole vectors file");
    for vector in &vectors {
        let header = vector["header"].as_str().unwrap();
        let t = vector["timestamp"].as_i64().unwrap();
        let payload = payload_of(vector);
        for raw in secrets_of(vector) {
            // Checked against the signing clock, as the vectors file says.
            assert_eq!(
                verify(header, &payload, &[secret(&raw)], TOLERANCE, t),
                Ok(()),
                "{vector}"
            );
        }
    }
}

#[test]
fn our_signer_produces_the_official_headers() {
    for vector in vectors().iter().filter(|v| v.get("secret").is_some()) {
        let t = vector["timestamp"].as_i64().unwrap();
        let signed = secret(vector["secret"].as_str().unwrap()).sign(t, &payload_of(vector));
        assert_eq!(signed, vector["header"].as_str().unwrap());
    }
}

#[test]
fn documented_example() {
    let header = "t=1492774577,v1=88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a";
    let body = br#"{"id":"evt_test_webhook","object":"event"}"#;
    assert_eq!(
        verify(
            header,
            body,
            &[secret("whsec_test_secret")],
            TOLERANCE,
            1492774577
        ),
        Ok(())
    );
    // One byte of the body changed: refused.
    let tampered = br#"{"id":"evt_test_webhook","object":"event "}"#;
    assert_eq!(
        verify(
            header,
            tampered,
            &[secret("whsec_test_secret")],
            TOLERANCE,
            1492774577
        ),
        Err(SignatureError::NoMatch)
    );
}

#[test]
fn wrong_secret_is_refused() {
    let s = secret("whsec_test_secret");
    let header = s.sign(1000, b"{}");
    assert_eq!(
        verify(&header, b"{}", &[secret("whsec_other")], TOLERANCE, 1000),
        Err(SignatureError::NoMatch)
    );
    // The secret is used whole, prefix included: the bare suffix does not verify.
    assert_eq!(
        verify(
            &header,
            b"{}",
            &[secret("whsec_whsec_test_secret")],
            TOLERANCE,
            1000
        ),
        Err(SignatureError::NoMatch)
    );
}

#[test]
fn rotation_accepts_any_v1_against_any_secret() {
    let old = secret("whsec_old");
    let new = secret("whsec_new");
    let t = 1_764_000_000;
    let sig_old = old.sign(t, b"x");
    let sig_new = new.sign(t, b"x");
    let v1_old = sig_old.split_once(",v1=").unwrap().1;
    let v1_new = sig_new.split_once(",v1=").unwrap().1;
    let both = format!("t={t},v1={v1_new},v1={v1_old}");
    assert_eq!(
        verify(&both, b"x", std::slice::from_ref(&old), TOLERANCE, t),
        Ok(())
    );
    assert_eq!(
        verify(&both, b"x", std::slice::from_ref(&new), TOLERANCE, t),
        Ok(())
    );
    // One header signed by the old secret, endpoint configured with both.
    assert_eq!(
        verify(&sig_old, b"x", &[new.clone(), old.clone()], TOLERANCE, t),
        Ok(())
    );
    assert_eq!(
        verify(&sig_old, b"x", &[new], TOLERANCE, t),
        Err(SignatureError::NoMatch)
    );
}

#[test]
fn v0_and_unknown_schemes_are_never_accepted() {
    let s = secret("whsec_test_secret");
    let t = 1_764_000_000;
    let v1 = s.sign(t, b"x").split_once(",v1=").unwrap().1.to_owned();
    // The right MAC, but under v0: no v1 at all.
    assert_eq!(
        verify(
            &format!("t={t},v0={v1}"),
            b"x",
            std::slice::from_ref(&s),
            TOLERANCE,
            t
        ),
        Err(SignatureError::NoV1Signature)
    );
    assert_eq!(
        verify(
            &format!("t={t},v2={v1}"),
            b"x",
            std::slice::from_ref(&s),
            TOLERANCE,
            t
        ),
        Err(SignatureError::NoV1Signature)
    );
    // Unknown schemes beside a good v1 are ignored.
    assert_eq!(
        verify(
            &format!("t={t},v0=abc,v1={v1},x=y"),
            b"x",
            &[s],
            TOLERANCE,
            t
        ),
        Ok(())
    );
}

#[test]
fn stale_and_future_timestamps_are_refused() {
    let s = secret("whsec_test_secret");
    let t = 1_764_000_000;
    let header = s.sign(t, b"x");
    assert_eq!(
        verify(&header, b"x", std::slice::from_ref(&s), TOLERANCE, t + 300),
        Ok(())
    );
    assert_eq!(
        verify(&header, b"x", std::slice::from_ref(&s), TOLERANCE, t - 300),
        Ok(())
    );
    assert_eq!(
        verify(&header, b"x", std::slice::from_ref(&s), TOLERANCE, t + 301),
        Err(SignatureError::TooOld {
            age_secs: 301,
            tolerance_secs: 300
        })
    );
    assert_eq!(
        verify(&header, b"x", std::slice::from_ref(&s), TOLERANCE, t - 301),
        Err(SignatureError::InFuture {
            ahead_secs: 301,
            tolerance_secs: 300
        })
    );
    // A stale header whose MAC is also wrong reports the MAC: nothing about timing leaks
    // for a forged request.
    assert_eq!(
        verify(&header, b"y", &[s], TOLERANCE, t + 10_000),
        Err(SignatureError::NoMatch)
    );
}

#[test]
fn malformed_headers_are_malformed() {
    let good_hex = "88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a";
    let cases = [
        String::new(),
        "garbage".to_owned(),
        format!("v1={good_hex}"),                        // no timestamp
        format!("t=,v1={good_hex}"),                     // empty timestamp
        format!("t=abc,v1={good_hex}"),                  // not a number
        format!("t=-5,v1={good_hex}"),                   // sign
        format!("t=99999999999999999999,v1={good_hex}"), // out of range
        format!("t=1,t=2,v1={good_hex}"),                // two timestamps
        format!("t=1, v1={good_hex}"),                   // space
        format!(" t=1,v1={good_hex}"),
        format!("t=1,v1={good_hex}\t"),
        "t=1,v1=xyz".to_owned(),                          // not hex
        format!("t=1,v1={}", &good_hex[..62]),            // too short
        format!("t=1,v1={good_hex}00"),                   // too long
        format!("t=1,v1={}", good_hex.replace('a', "g")), // non-hex letter
        format!("t=1,,v1={good_hex}"),                    // empty element
        format!("t=1,={good_hex}"),                       // empty key
        format!("t=1;v1={good_hex}"),                     // wrong separator
    ];
    for header in &cases {
        let result = SignatureHeader::parse(header);
        assert!(
            matches!(result, Err(SignatureError::Malformed(_))),
            "{header:?} gave {result:?}"
        );
        let err = verify(header, b"x", &[secret("whsec_test_secret")], TOLERANCE, 1).unwrap_err();
        assert!(err.is_malformed(), "{header:?} gave {err:?}");
    }
}

#[test]
fn uppercase_hex_is_read() {
    let s = secret("whsec_test_secret");
    let header = s
        .sign(1, b"x")
        .to_uppercase()
        .replace("T=", "t=")
        .replace("V1=", "v1=");
    assert_eq!(verify(&header, b"x", &[s], TOLERANCE, 1), Ok(()));
}

#[test]
fn secrets_are_validated_and_never_printed() {
    assert!(WebhookSecret::parse("sk_live_123", 1).is_err());
    assert!(WebhookSecret::parse("whsec_", 1).is_err());
    assert!(WebhookSecret::parse("whsec_a b", 1).is_err());
    let list = WebhookSecret::parse_list("whsec_one, whsec_two").unwrap();
    assert_eq!(list.len(), 2);
    let err = WebhookSecret::parse_list("whsec_one,oops_secret_value").unwrap_err();
    assert!(err.to_string().contains("#2"));
    assert!(!err.to_string().contains("oops_secret_value"));
    assert!(!format!("{:?}", list[0]).contains("one"));
}

#[test]
fn issued_secrets_are_told_from_samples_and_hand_made_ones() {
    let parse = |raw: &str| WebhookSecret::parse(raw, 1).unwrap();
    let sample = parse(shared::signature::SAMPLE_SECRET);
    assert!(sample.is_sample());
    assert!(!sample.looks_issued_by_stripe());
    // The shapes Stripe issues: the Dashboard's 32 characters, the CLI's 64 hex digits.
    let dashboard = parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    assert!(dashboard.looks_issued_by_stripe() && !dashboard.is_sample());
    assert!(parse(&format!("whsec_{}", "0123456789abcdef".repeat(4))).looks_issued_by_stripe());
    for hand_made in [
        "whsec_rolled_secret_2",
        "whsec_short",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa_w",
        "whsec_test_secret_but_longer_than_32_chars",
    ] {
        assert!(!parse(hand_made).looks_issued_by_stripe(), "{hand_made}");
    }
}
