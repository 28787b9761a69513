//! The event-envelope parser must never panic, and what it accepts must fit the message
//! contract (ids and types usable as AMQP short strings).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::envelope::{EventEnvelope, MAX_FIELD_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = EventEnvelope::parse(data) {
        assert!(!envelope.id.is_empty() && envelope.id.len() <= MAX_FIELD_LEN);
        assert!(!envelope.event_type.is_empty() && envelope.event_type.len() <= MAX_FIELD_LEN);
        assert!(shared::contract::short("id", &envelope.id).is_ok());
        assert!(shared::contract::short("type", &envelope.event_type).is_ok());
        let _ = envelope.object();
    }
});
