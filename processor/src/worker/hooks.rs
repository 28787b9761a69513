//! Test-only ways to crash the processor at chosen moments (the crash tests need them).
//!
//! Compiled only with the `test-hooks` feature: the processor's tests enable it (through a
//! dev-dependency of the crate on itself), release builds do not, so a production binary
//! has no `PROCESSOR_TEST_HOOK` and no code that aborts on purpose.

/// Ways to make the processor die on purpose, as `kill -9` would, at the moments the crash
/// tests need. Set with the hidden `PROCESSOR_TEST_HOOK` variable; never in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestHook {
    /// `crash-on-event:<event id>`: die whenever this event is being handled.
    CrashOnEvent(String),
    /// `crash-after-dead-letter`: die after a dead letter is confirmed, before the ack.
    CrashAfterDeadLetter,
    /// `panic-on-event:<event id>`: the handler panics whenever this event is handled.
    PanicOnEvent(String),
}

impl std::str::FromStr for TestHook {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.split_once(':') {
            Some(("crash-on-event", id)) if !id.is_empty() => Ok(Self::CrashOnEvent(id.to_owned())),
            Some(("panic-on-event", id)) if !id.is_empty() => Ok(Self::PanicOnEvent(id.to_owned())),
            None if raw == "crash-after-dead-letter" => Ok(Self::CrashAfterDeadLetter),
            _ => Err(format!("PROCESSOR_TEST_HOOK: unknown hook `{raw}`")),
        }
    }
}

pub fn crash(reason: &str) -> ! {
    eprintln!("test hook: aborting ({reason})");
    std::process::abort()
}
