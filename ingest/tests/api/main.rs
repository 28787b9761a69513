//! Ingest against a real RabbitMQ. Each test has its own exchange and queues (a random
//! prefix), removed when the test ends.

mod connections;
mod helpers;
mod hostile;
mod logs;
mod publishing;
mod rate_limit;
mod requests;
