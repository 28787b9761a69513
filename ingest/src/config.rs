//! Ingest's settings: flags with environment fallbacks, validated at start-up.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::config::{BrokerArgs, LogArgs, ModeArgs, parse_duration};
use shared::signature::{DEFAULT_TOLERANCE_SECS, SecretError, WebhookSecret};

pub use shared::config::ENDPOINTS;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ingest",
    version,
    about = "Receives Stripe webhooks and hands them to RabbitMQ"
)]
pub struct Config {
    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub log: LogArgs,

    /// Address the webhook server listens on (only /webhooks/stripe/<endpoint>).
    #[arg(long, env = "INGEST_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// Address of the internal server for /metrics, /healthz and /readyz. Loopback by
    /// default: metrics and probes are for the operator and the orchestrator, not for
    /// whoever can reach the webhook port.
    #[arg(long, env = "INGEST_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,

    /// Largest accepted difference, in seconds, between a signature's timestamp and now.
    #[arg(long, env = "STRIPE_WEBHOOK_TOLERANCE_SECS", default_value_t = DEFAULT_TOLERANCE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub tolerance_secs: u64,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=64 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Webhook requests handled at once; beyond it ingest answers 503 at once (Stripe
    /// retries) instead of queueing, so an overload cannot grow memory without bound.
    #[arg(long, env = "INGEST_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// Refused webhook requests (bad or missing signature, unknown endpoint) per minute
    /// allowed from one source IP before it is answered 429; validly signed requests never
    /// count. 0 turns the limit off.
    #[arg(long, env = "INGEST_RATE_LIMIT_PER_MINUTE", default_value_t = 1000)]
    pub rate_limit_per_minute: u32,

    /// How long to wait for RabbitMQ's publisher confirm before answering 503.
    #[arg(long, env = "INGEST_CONFIRM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub confirm_timeout: Duration,

    /// How long a client may take to send its request headers before the connection is
    /// closed (slow clients cannot hold connections open). It also bounds idleness: a new
    /// connection, or a kept-alive one after an answer, that sends no complete request head
    /// within this time is closed.
    #[arg(long, env = "INGEST_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a client may take to send its request body before getting 408.
    #[arg(long, env = "INGEST_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// AMQP channels publishes are spread over (all on one connection).
    #[arg(long, env = "INGEST_PUBLISH_CHANNELS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_channels: u16,

    /// On SIGTERM, how long in-flight requests may take to finish before exit.
    #[arg(long, env = "INGEST_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    #[command(flatten)]
    pub secrets: SecretArgs,

    #[command(flatten)]
    pub modes: ModeArgs,
}

impl Config {
    /// The served endpoints and their secrets, after the checks of
    /// [`SecretArgs::endpoint_secrets`] and one more: an endpoint that accepts live-mode
    /// events must have secrets Stripe issued, never the sample secret (anyone could sign
    /// real-looking purchases with it) nor a hand-made one.
    pub fn endpoint_secrets(&self) -> Result<BTreeMap<String, Vec<WebhookSecret>>, ConfigError> {
        let served = self.secrets.endpoint_secrets()?;
        let modes = self.modes.modes();
        for (endpoint, secrets) in &served {
            if !modes.is_live(endpoint) {
                continue;
            }
            let refuse = |position: usize, problem: LiveSecretProblem| ConfigError::LiveSecret {
                variable: secret_variable(endpoint),
                position,
                problem,
                mode_variable: self.modes.variable_of(endpoint),
            };
            for (index, secret) in secrets.iter().enumerate() {
                if secret.is_sample() {
                    return Err(refuse(index + 1, LiveSecretProblem::Sample));
                }
                if !secret.looks_issued_by_stripe() {
                    return Err(refuse(index + 1, LiveSecretProblem::NotIssued));
                }
            }
        }
        Ok(served)
    }
}

fn secret_variable(endpoint: &str) -> String {
    format!("STRIPE_WEBHOOK_SECRET_{}", endpoint.to_uppercase())
}

/// `whsec_…` secrets per endpoint, each a comma-separated list (rotation).
#[derive(Clone, clap::Args)]
pub struct SecretArgs {
    /// Secrets of /webhooks/stripe/booking.
    #[arg(long = "secret-booking", env = "STRIPE_WEBHOOK_SECRET_BOOKING", hide_env_values = true, value_parser = secret)]
    pub booking: Option<SecretString>,
    /// Secrets of /webhooks/stripe/payment.
    #[arg(long = "secret-payment", env = "STRIPE_WEBHOOK_SECRET_PAYMENT", hide_env_values = true, value_parser = secret)]
    pub payment: Option<SecretString>,
    /// Secrets of /webhooks/stripe/subscription.
    #[arg(long = "secret-subscription", env = "STRIPE_WEBHOOK_SECRET_SUBSCRIPTION", hide_env_values = true, value_parser = secret)]
    pub subscription: Option<SecretString>,
    /// Secrets of /webhooks/stripe/connect.
    #[arg(long = "secret-connect", env = "STRIPE_WEBHOOK_SECRET_CONNECT", hide_env_values = true, value_parser = secret)]
    pub connect: Option<SecretString>,
    /// Secrets of /webhooks/stripe/customer.
    #[arg(long = "secret-customer", env = "STRIPE_WEBHOOK_SECRET_CUSTOMER", hide_env_values = true, value_parser = secret)]
    pub customer: Option<SecretString>,
    /// Secrets of /webhooks/stripe/dispute.
    #[arg(long = "secret-dispute", env = "STRIPE_WEBHOOK_SECRET_DISPUTE", hide_env_values = true, value_parser = secret)]
    pub dispute: Option<SecretString>,
}

impl fmt::Debug for SecretArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: Vec<&str> = self
            .by_endpoint()
            .filter(|(_, s)| s.is_some())
            .map(|(e, _)| e)
            .collect();
        write!(f, "SecretArgs {{ set for: {set:?} }}")
    }
}

// Never fails, so clap never echoes a secret in an "invalid value" message; the checks
// happen in `Config::endpoint_secrets`, whose errors name only the variable.
fn secret(raw: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(raw.to_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no webhook endpoint has a secret: set at least one of STRIPE_WEBHOOK_SECRET_BOOKING, \
         _PAYMENT, _SUBSCRIPTION, _CONNECT, _CUSTOMER or _DISPUTE"
    )]
    NoEndpoint,
    #[error("{variable}: {source}")]
    BadSecret {
        variable: String,
        #[source]
        source: SecretError,
    },
    #[error(
        "{variable}: secret #{position} {problem}, but the endpoint accepts live-mode events \
         ({mode_variable}=true): set the endpoint's signing secret from the Stripe Dashboard, \
         or set {mode_variable}=false"
    )]
    LiveSecret {
        variable: String,
        position: usize,
        problem: LiveSecretProblem,
        mode_variable: String,
    },
}

/// Why a secret is refused on a live endpoint; the message never holds the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LiveSecretProblem {
    #[error("is the public sample secret of the docs and tests")]
    Sample,
    #[error("does not look like one Stripe issues (`whsec_` then at least 32 letters and digits)")]
    NotIssued,
}

impl SecretArgs {
    fn by_endpoint(&self) -> impl Iterator<Item = (&'static str, Option<&SecretString>)> {
        ENDPOINTS.into_iter().zip([
            self.booking.as_ref(),
            self.payment.as_ref(),
            self.subscription.as_ref(),
            self.connect.as_ref(),
            self.customer.as_ref(),
            self.dispute.as_ref(),
        ])
    }

    /// The served endpoints and their parsed secrets. An endpoint whose variable is unset or
    /// empty is not served.
    pub fn endpoint_secrets(&self) -> Result<BTreeMap<String, Vec<WebhookSecret>>, ConfigError> {
        let mut served = BTreeMap::new();
        for (endpoint, raw) in self.by_endpoint() {
            let Some(raw) = raw
                .map(|s| s.expose_secret().trim())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let secrets =
                WebhookSecret::parse_list(raw).map_err(|source| ConfigError::BadSecret {
                    variable: secret_variable(endpoint),
                    source,
                })?;
            served.insert(endpoint.to_owned(), secrets);
        }
        if served.is_empty() {
            return Err(ConfigError::NoEndpoint);
        }
        Ok(served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ingest").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn no_secret_is_an_error() {
        let err = parse(&[]).secrets.endpoint_secrets().unwrap_err();
        assert!(matches!(err, ConfigError::NoEndpoint));
    }

    #[test]
    fn malformed_secret_names_the_variable_not_the_value() {
        let config = parse(&["--secret-payment", "whsec_ok,sk_live_oops"]);
        let message = config.secrets.endpoint_secrets().unwrap_err().to_string();
        assert!(
            message.contains("STRIPE_WEBHOOK_SECRET_PAYMENT"),
            "{message}"
        );
        assert!(!message.contains("sk_live_oops"), "{message}");
        assert!(!format!("{config:?}").contains("whsec_ok"));
    }

    const ISSUED: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn test_mode_accepts_any_secret_including_the_sample() {
        let config = parse(&["--secret-booking", "whsec_test_secret,whsec_rolled_2"]);
        assert!(!config.modes.modes().any_live());
        assert_eq!(config.endpoint_secrets().unwrap()["booking"].len(), 2);
    }

    #[test]
    fn a_live_endpoint_refuses_the_sample_secret_naming_both_settings() {
        let config = parse(&[
            "--secret-booking",
            &format!("{ISSUED},whsec_test_secret"),
            "--stripe-livemode",
            "true",
        ]);
        let message = config.endpoint_secrets().unwrap_err().to_string();
        assert!(
            message.contains("STRIPE_WEBHOOK_SECRET_BOOKING"),
            "{message}"
        );
        assert!(message.contains("secret #2"), "{message}");
        assert!(message.contains("sample secret"), "{message}");
        assert!(message.contains("STRIPE_LIVEMODE=true"), "{message}");
        assert!(!message.contains("whsec_test_secret"), "{message}");
        assert!(!message.contains(ISSUED), "{message}");
    }

    #[test]
    fn a_live_endpoint_refuses_a_secret_stripe_did_not_issue() {
        let config = parse(&[
            "--secret-payment",
            "whsec_made_up_by_hand",
            "--stripe-livemode-payment",
            "yes",
        ]);
        let message = config.endpoint_secrets().unwrap_err().to_string();
        assert!(
            message.contains("STRIPE_WEBHOOK_SECRET_PAYMENT"),
            "{message}"
        );
        assert!(
            message.contains("STRIPE_LIVEMODE_PAYMENT=true"),
            "{message}"
        );
        assert!(message.contains("does not look like"), "{message}");
        assert!(!message.contains("made_up"), "{message}");
    }

    #[test]
    fn live_and_test_endpoints_side_by_side() {
        // Live everywhere but booking, which keeps the sample secret in test mode.
        let config = parse(&[
            "--stripe-livemode",
            "true",
            "--stripe-livemode-booking",
            "false",
            "--secret-booking",
            "whsec_test_secret",
            "--secret-payment",
            ISSUED,
        ]);
        let served = config.endpoint_secrets().unwrap();
        assert_eq!(served.keys().collect::<Vec<_>>(), ["booking", "payment"]);
        // An endpoint without a secret is not served, so its mode does not matter.
        let unset = parse(&["--stripe-livemode", "true", "--secret-payment", ISSUED]);
        assert!(unset.endpoint_secrets().is_ok());
    }

    #[test]
    fn only_endpoints_with_secrets_are_served() {
        let config = parse(&[
            "--secret-booking",
            "whsec_a,whsec_b",
            "--secret-dispute",
            "",
        ]);
        let served = config.secrets.endpoint_secrets().unwrap();
        assert_eq!(served.keys().collect::<Vec<_>>(), ["booking"]);
        assert_eq!(served["booking"].len(), 2);
    }
}
