//! Masking the secrets in connection URLs before they are logged or shown in an error.
//!
//! A URL may carry a password in two places: its user info (`user:pass@host`) and its
//! query, which sqlx reads too (`?password=…`, `?sslpassword=…`). Both are masked. The URL
//! is parsed with the `url` crate rather than split by hand, so an `@` or `?` inside a
//! password cannot move the boundary; a URL that does not parse is not shown at all.

/// The mask put in place of every secret.
pub const MASK: &str = "***";

/// `amqp://user:pass@host/vhost?password=x` → `amqp://user:***@host/vhost?password=***`.
/// Query parameters whose name contains `pass`, `secret` or `token` (any case) are masked;
/// the user name, host, path and other parameters are kept, since they help find a typo.
pub fn url(raw: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(raw) else {
        // Showing part of what could not be parsed could show part of a password.
        return match raw.split_once("://") {
            Some((scheme, _)) if is_scheme(scheme) => format!("{scheme}://{MASK}"),
            _ => MASK.to_owned(),
        };
    };
    if parsed.cannot_be_a_base() {
        // `user:pw@host` parses as scheme `user` and an opaque path holding the password.
        return MASK.to_owned();
    }
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a user info, and those have no password.
        let _ = parsed.set_password(Some(MASK));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_secret_key(&key) {
                    MASK.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `Url` would print the mask percent-encoded in a query; the plain one reads better.
    parsed.to_string().replace("%2A%2A%2A", MASK)
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
}

fn is_scheme(candidate: &str) -> bool {
    !candidate.is_empty()
        && candidate
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_of_the_user_info() {
        assert_eq!(url("amqp://u:secret@a:5672/%2f"), "amqp://u:***@a:5672/%2f");
        assert_eq!(
            url("postgres://app:pw@db.internal:5432/purchases"),
            "postgres://app:***@db.internal:5432/purchases"
        );
        // An `@` in the password (percent-encoded, as URLs require) does not leak its tail.
        assert_eq!(
            url("postgresql://app:p%40ss%3Aword@db/x"),
            "postgresql://app:***@db/x"
        );
    }

    #[test]
    fn masks_password_parameters_of_the_query_in_any_case() {
        for raw in [
            "postgres://app@db/x?password=hunter2",
            "postgres://app@db/x?PassWord=hunter2",
            "postgres://app@db/x?pass=hunter2",
            "postgres://app@db/x?sslmode=verify-full&sslpassword=hunter2",
            "postgres://app@db/x?secret=hunter2",
            "amqps://node-1:5671/%2f?auth_token=hunter2&heartbeat=10",
            "postgres://app:hunter2@db/x?password=hunter2",
            "postgresql:///x?host=/var/run/postgresql&password=hunter2",
        ] {
            let shown = url(raw);
            assert!(!shown.contains("hunter2"), "{raw} → {shown}");
            assert!(shown.contains(MASK), "{raw} → {shown}");
        }
        assert_eq!(
            url("postgres://app@db/x?sslmode=require&password=hunter2&application_name=p"),
            "postgres://app@db/x?sslmode=require&password=***&application_name=p"
        );
        assert_eq!(
            url("amqps://node-1:5671/%2f?heartbeat=10"),
            "amqps://node-1:5671/%2f?heartbeat=10"
        );
    }

    #[test]
    fn keeps_urls_without_secrets_and_hides_what_does_not_parse() {
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert_eq!(url("amqp://b:5673"), "amqp://b:5673");
        assert_eq!(url("amqp://u:pw@[::1"), "amqp://***");
        assert_eq!(url("u:pw@host"), MASK);
    }
}
