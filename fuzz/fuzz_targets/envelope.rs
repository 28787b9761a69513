//! The event-envelope parser must never panic, what it accepts must fit the message
//! contract (ids and types usable as AMQP short strings), and ingest's cheaper parse
//! (`EventHead`) must accept exactly what the processor's (`EventEnvelope`) accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::envelope::{EventEnvelope, EventHead, MAX_FIELD_LEN};

fuzz_target!(|data: &[u8]| {
    let head = EventHead::parse(data);
    let full = EventEnvelope::parse(data);
    assert_eq!(head.is_ok(), full.is_ok(), "EventHead and EventEnvelope disagree");
    if let (Ok(envelope), Ok(head)) = (full, head) {
        assert_eq!((&envelope.id, &envelope.event_type), (&head.id, &head.event_type));
        assert!(!envelope.id.is_empty() && envelope.id.len() <= MAX_FIELD_LEN);
        assert!(!envelope.event_type.is_empty() && envelope.event_type.len() <= MAX_FIELD_LEN);
        assert!(shared::contract::short("id", &envelope.id).is_ok());
        assert!(shared::contract::short("type", &envelope.event_type).is_ok());
        let _ = envelope.object();
    }
});
