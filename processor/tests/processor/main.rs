//! The processor against a real PostgreSQL (a fresh database per test, via `#[sqlx::test]`)
//! and, for the worker and end-to-end tests, a real RabbitMQ (own queue names per test).

mod bulk;
mod console;
mod crash;
mod end_to_end;
mod helpers;
mod lifecycle;
mod logs;
mod money;
mod ops;
mod purchases;
mod reconcile;
mod stripe_api_fake;
mod worker;
