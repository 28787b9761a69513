//! Code that both binaries need and that must agree on both sides of the queue.
//!
//! - [`signature`]: the `Stripe-Signature` check, exactly as Stripe specifies it.
//! - [`envelope`]: lenient parsing of Stripe's event envelope.
//! - [`contract`]: the message contract between ingest and processor (properties, headers).
//! - [`topology`]: exchange and queue names and their declaration.
//! - [`broker`]: connecting to RabbitMQ (one URL or a comma-separated list of nodes).
//! - [`redact`]: masking the secrets of connection URLs before they are shown.
//! - [`config`], [`telemetry`] and [`shutdown`]: settings, logging and the stop signal
//!   common to both binaries.

pub mod broker;
pub mod config;
pub mod contract;
pub mod envelope;
pub mod metrics;
pub mod redact;
pub mod shutdown;
pub mod signature;
pub mod telemetry;
pub mod topology;
