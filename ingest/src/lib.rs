//! Ingest: the HTTP side of the pipeline.
//!
//! It receives Stripe's webhook POSTs, checks the `Stripe-Signature` over the raw body,
//! publishes the body unchanged to RabbitMQ and answers 200 only after the broker's
//! publisher confirm. When the broker cannot take the event it answers 503, so Stripe
//! retries: a 200 always means the event is durably queued. It never touches the database.
//!
//! It listens twice: `INGEST_ADDR` serves the webhooks only, and the internal
//! `INGEST_METRICS_ADDR` (loopback by default) serves `/metrics`, `/healthz` and `/readyz`.
//!
//! - [`config`]: settings; [`startup`]: building the app; [`serve`]: the server loop;
//! - [`routes`]: the handlers; [`error`]: every error answer;
//! - [`publisher`]: confirmed publishing and reconnection; [`rate_limit`]: the per-IP limit
//!   on refused requests and the in-flight cap.

pub mod config;
pub mod error;
pub mod publisher;
pub mod rate_limit;
pub mod routes;
pub mod serve;
pub mod startup;
