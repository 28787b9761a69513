//! The processor against a real PostgreSQL (a fresh database per test, via `#[sqlx::test]`)
//! and, for the worker and end-to-end tests, a real RabbitMQ (own queue names per test).

mod crash;
mod end_to_end;
mod helpers;
mod lifecycle;
mod logs;
mod ops;
mod purchases;
mod worker;
