//! The `Stripe-Signature` parser and verifier must never panic, whatever the header and
//! body, and must never accept a header that was not made with the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::signature::{SignatureHeader, WebhookSecret, verify};

fuzz_target!(|data: &[u8]| {
    // First line: the header; the rest: the body.
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    let _ = SignatureHeader::parse(header);
    let Ok(secret) = WebhookSecret::parse("whsec_fuzz_secret", 1) else {
        return;
    };
    let now = 1_764_000_000;
    if verify(header, body, &[secret.clone()], 300, now).is_ok() {
        // Only a correct MAC can pass: recompute it and compare.
        let parsed = SignatureHeader::parse(header).expect("verified headers parse");
        let expected = secret.sign(parsed.timestamp, body);
        let expected_v1 = expected
            .split_once(",v1=")
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        assert!(
            header.to_ascii_lowercase().contains(&expected_v1),
            "accepted a forged header"
        );
    }
});
