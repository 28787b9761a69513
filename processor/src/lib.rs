//! Processor: the database side of the pipeline.
//!
//! It consumes the events ingest queued, and for each runs one PostgreSQL transaction that
//! records the event and applies its effect (a paid checkout session becomes a purchase
//! with its revenue-split snapshot and an access grant). Handling is idempotent, so the
//! broker's at-least-once delivery turns into an exactly-once effect. Transient failures
//! retry through delay queues; permanent ones go to the dead-letter queue with the reason.
//!
//! - [`config`]: settings and subcommands; [`worker`]: consuming and settling deliveries;
//! - [`handler`]: what each event type does; [`checkout`]: sessions and their metadata;
//! - [`console`]: the ops console in the browser;
//! - [`db`]: queries and migrations; [`split`]: the revenue split; [`error`]: failure classes;
//! - [`reconcile`]: recovering events webhooks never delivered, from Stripe's Events API.

pub mod bulk;
pub mod checkout;
pub mod config;
pub mod console;
pub mod db;
pub mod dlq;
pub mod error;
pub mod handler;
pub mod http;
pub mod lifecycle;
pub mod ops;
pub mod reconcile;
pub mod split;
pub mod worker;
