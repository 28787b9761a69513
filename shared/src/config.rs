//! Settings both binaries share. Every setting is a flag with an environment fallback and
//! is validated when parsed, so a bad value stops start-up with a message naming it.

use crate::broker::AmqpUrls;
use crate::topology::{DEFAULT_PREFIX, Topology};

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or a comma-separated list of cluster nodes tried in order.
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = parse_amqp_urls
    )]
    pub amqp_url: AmqpUrls,

    /// Prefix of every exchange and queue name (lets several deployments share a broker).
    #[arg(long = "amqp-prefix", env = "AMQP_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub amqp_prefix: String,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(&self.amqp_prefix)
    }
}

fn parse_amqp_urls(raw: &str) -> Result<AmqpUrls, String> {
    AmqpUrls::parse(raw).map_err(|e| e.to_string())
}

fn parse_prefix(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 200
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("AMQP_PREFIX must be 1-200 characters of letters, digits, `.`, `_` or `-`".into())
    }
}

/// Parses a duration such as `5s`, `250ms` or `2m` (humantime syntax).
pub fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| format!("`{raw}` is not a duration: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr. The level comes from RUST_LOG (default `info`).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The webhook endpoints Stripe may post to (`/webhooks/stripe/<endpoint>`); each has its
/// own secrets and may have its own mode.
pub const ENDPOINTS: [&str; 6] = [
    "booking",
    "payment",
    "subscription",
    "connect",
    "customer",
    "dispute",
];

/// Which Stripe mode (live or test) each endpoint accepts. An event of the other mode is
/// acknowledged (Stripe must not retry it) and recorded as `ignored`; it changes nothing.
/// The default is a test-mode system, so a fresh install cannot create real purchases.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModeArgs {
    /// Mode of every endpoint: `true` accepts live-mode events only, `false` test-mode
    /// events only.
    #[arg(long = "stripe-livemode", env = "STRIPE_LIVEMODE", default_value = "false",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub livemode: bool,
    /// Mode of /webhooks/stripe/booking, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-booking", env = "STRIPE_LIVEMODE_BOOKING",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub booking: Option<bool>,
    /// Mode of /webhooks/stripe/payment, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-payment", env = "STRIPE_LIVEMODE_PAYMENT",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub payment: Option<bool>,
    /// Mode of /webhooks/stripe/subscription, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-subscription", env = "STRIPE_LIVEMODE_SUBSCRIPTION",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub subscription: Option<bool>,
    /// Mode of /webhooks/stripe/connect, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-connect", env = "STRIPE_LIVEMODE_CONNECT",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub connect: Option<bool>,
    /// Mode of /webhooks/stripe/customer, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-customer", env = "STRIPE_LIVEMODE_CUSTOMER",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub customer: Option<bool>,
    /// Mode of /webhooks/stripe/dispute, overriding STRIPE_LIVEMODE.
    #[arg(long = "stripe-livemode-dispute", env = "STRIPE_LIVEMODE_DISPUTE",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub dispute: Option<bool>,
}

impl ModeArgs {
    /// The mode each endpoint accepts.
    pub fn modes(&self) -> EndpointModes {
        let overrides = [
            self.booking,
            self.payment,
            self.subscription,
            self.connect,
            self.customer,
            self.dispute,
        ];
        EndpointModes {
            live: ENDPOINTS
                .into_iter()
                .zip(overrides)
                .map(|(endpoint, mode)| (endpoint, mode.unwrap_or(self.livemode)))
                .collect(),
            default: self.livemode,
        }
    }
}

/// The resolved mode of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointModes {
    live: std::collections::BTreeMap<&'static str, bool>,
    /// For an endpoint name outside [`ENDPOINTS`] (a hand-published message).
    default: bool,
}

impl Default for EndpointModes {
    /// Every endpoint in test mode.
    fn default() -> Self {
        ModeArgs::default().modes()
    }
}

impl EndpointModes {
    /// Every endpoint in one mode.
    pub fn all(livemode: bool) -> Self {
        ModeArgs {
            livemode,
            ..ModeArgs::default()
        }
        .modes()
    }

    /// Whether `endpoint` accepts live-mode events (else test-mode ones).
    pub fn is_live(&self, endpoint: &str) -> bool {
        self.live.get(endpoint).copied().unwrap_or(self.default)
    }

    /// Whether any endpoint accepts live-mode events.
    pub fn any_live(&self) -> bool {
        self.live.values().any(|live| *live)
    }

    /// Why an event of mode `event_livemode` is refused on `endpoint`, if it is.
    pub fn mismatch(&self, endpoint: &str, event_livemode: bool) -> Option<&'static str> {
        match (self.is_live(endpoint), event_livemode) {
            (true, false) => Some("test-mode event on a live endpoint"),
            (false, true) => Some("live-mode event on a test-mode endpoint"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        modes: ModeArgs,
    }

    fn modes(args: &[&str]) -> EndpointModes {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .modes
            .modes()
    }

    #[test]
    fn test_mode_by_default_and_overrides_per_endpoint() {
        let default = modes(&[]);
        assert!(!default.any_live());
        assert_eq!(default.mismatch("booking", false), None);
        assert_eq!(
            default.mismatch("booking", true),
            Some("live-mode event on a test-mode endpoint")
        );

        let mixed = modes(&[
            "--stripe-livemode",
            "true",
            "--stripe-livemode-connect",
            "no",
        ]);
        assert!(mixed.is_live("booking") && !mixed.is_live("connect"));
        assert_eq!(
            mixed.mismatch("booking", false),
            Some("test-mode event on a live endpoint")
        );
        assert_eq!(mixed.mismatch("connect", false), None);
        assert!(mixed.is_live("not-an-endpoint"));
    }
}
