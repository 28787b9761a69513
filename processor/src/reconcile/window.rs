//! The time window a reconcile lists: `--since 3d`, or `--from`/`--to` RFC 3339 timestamps.
//! Stripe keeps events for 30 days, so a window reaching further back is refused rather than
//! silently cut short: the operator would believe an older gap had been covered.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// How long Stripe's Events API keeps an event.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The window as given on the command line, resolved against "now" each time it is used
/// (with `--every`, each round lists the `--since` window up to that round's now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowSpec {
    /// The last `since`, up to now.
    Since(Duration),
    /// From `from` to `to` (or now).
    Range {
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
    },
}

/// A resolved window: Stripe's `created[gte]` and `created[lte]`, unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error(
        "give the window to reconcile: --since DURATION (e.g. 3d) or --from RFC3339 [--to RFC3339]"
    )]
    Missing,
    #[error("--since and --from/--to cannot be combined")]
    Both,
    #[error("--to needs --from")]
    ToWithoutFrom,
    #[error("--since must be longer than zero")]
    Empty,
    #[error("--from ({from}) must be before --to ({to})")]
    Reversed { from: String, to: String },
    #[error(
        "the window starts {start}, more than 30 days ago: Stripe keeps events for 30 days, so \
         older events cannot be listed (use --since 30d or less, or a later --from)"
    )]
    BeyondRetention { start: String },
    #[error("--since {0} is too long")]
    TooLong(String),
}

impl WindowSpec {
    /// Builds the spec from the flags, refusing combinations that say two things.
    pub fn from_flags(
        since: Option<Duration>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Self, WindowError> {
        match (since, from, to) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(WindowError::Both),
            (Some(since), None, None) => Ok(Self::Since(since)),
            (None, Some(from), to) => Ok(Self::Range { from, to }),
            (None, None, Some(_)) => Err(WindowError::ToWithoutFrom),
            (None, None, None) => Err(WindowError::Missing),
        }
    }

    /// The window as of `now`, checked against Stripe's retention.
    pub fn resolve(&self, now: DateTime<Utc>) -> Result<Window, WindowError> {
        let (from, to) = match self {
            Self::Since(since) => {
                if since.is_zero() {
                    return Err(WindowError::Empty);
                }
                let span = TimeDelta::from_std(*since).map_err(|_| {
                    WindowError::TooLong(humantime::format_duration(*since).to_string())
                })?;
                let from = now.checked_sub_signed(span).ok_or_else(|| {
                    WindowError::TooLong(humantime::format_duration(*since).to_string())
                })?;
                (from, now)
            }
            Self::Range { from, to } => (*from, to.unwrap_or(now)),
        };
        if from >= to {
            return Err(WindowError::Reversed {
                from: rfc3339(from),
                to: rfc3339(to),
            });
        }
        // RETENTION is a constant that fits; the fallback is never taken.
        let oldest = now - TimeDelta::from_std(RETENTION).unwrap_or(TimeDelta::MAX);
        if from < oldest {
            return Err(WindowError::BeyondRetention {
                start: rfc3339(from),
            });
        }
        Ok(Window { from, to })
    }
}

impl Window {
    /// `created[gte]`: whole seconds, rounded down so the window's first second is in.
    pub fn gte(&self) -> i64 {
        self.from.timestamp()
    }

    /// `created[lte]`: whole seconds (an event's `created` has no fraction).
    pub fn lte(&self) -> i64 {
        self.to.timestamp()
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Parses `--from`/`--to`: RFC 3339, e.g. `2026-12-01T00:00:00Z`.
pub fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("`{raw}` is not an RFC 3339 timestamp (e.g. 2026-12-01T00:00:00Z): {e}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(raw: &str) -> DateTime<Utc> {
        parse_timestamp(raw).unwrap()
    }

    #[test]
    fn since_ends_now_and_may_reach_back_exactly_thirty_days() {
        let now = at("2026-12-03T08:00:00Z");
        let w = WindowSpec::Since(Duration::from_secs(3 * 86400))
            .resolve(now)
            .unwrap();
        assert_eq!((w.from, w.to), (at("2026-11-30T08:00:00Z"), now));
        assert_eq!(w.gte(), at("2026-11-30T08:00:00Z").timestamp());
        assert!(WindowSpec::Since(RETENTION).resolve(now).is_ok());
    }

    #[test]
    fn more_than_thirty_days_is_refused_with_the_reason() {
        let now = at("2026-12-03T08:00:00Z");
        let err = WindowSpec::Since(RETENTION + Duration::from_secs(1))
            .resolve(now)
            .unwrap_err();
        assert!(matches!(err, WindowError::BeyondRetention { .. }));
        assert!(err.to_string().contains("Stripe keeps events for 30 days"));
        let range = WindowSpec::Range {
            from: at("2026-10-01T00:00:00Z"),
            to: Some(at("2026-10-02T00:00:00Z")),
        };
        assert!(matches!(
            range.resolve(now),
            Err(WindowError::BeyondRetention { .. })
        ));
    }

    #[test]
    fn flags_must_say_one_thing() {
        let d = Some(Duration::from_secs(60));
        let t = Some(at("2026-12-01T00:00:00Z"));
        assert_eq!(
            WindowSpec::from_flags(None, None, None),
            Err(WindowError::Missing)
        );
        assert_eq!(WindowSpec::from_flags(d, t, None), Err(WindowError::Both));
        assert_eq!(WindowSpec::from_flags(d, None, t), Err(WindowError::Both));
        assert_eq!(
            WindowSpec::from_flags(None, None, t),
            Err(WindowError::ToWithoutFrom)
        );
        let now = at("2026-12-03T00:00:00Z");
        let reversed = WindowSpec::from_flags(None, Some(now), t).unwrap();
        assert!(matches!(
            reversed.resolve(now),
            Err(WindowError::Reversed { .. })
        ));
        assert_eq!(
            WindowSpec::Since(Duration::ZERO).resolve(now),
            Err(WindowError::Empty)
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            parse_timestamp("2026-12-01T01:00:00+01:00").unwrap(),
            at("2026-12-01T00:00:00Z")
        );
        assert!(
            parse_timestamp("yesterday")
                .unwrap_err()
                .contains("RFC 3339")
        );
    }
}
