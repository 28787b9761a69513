//! Ingest against a real RabbitMQ. Each test has its own exchange and queues (a random
//! prefix), removed when the test ends.

mod helpers;
mod hostile;
mod publishing;
mod requests;
