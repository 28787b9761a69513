use chrono::Utc;
use serde_json::{Value, json};
use shared::contract::EventMessage;
use sqlx::PgPool;
use uuid::Uuid;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");

/// The catalog the sample events refer to (see fixtures/stripe).
pub const CUSTOMER: Uuid = Uuid::from_u128(0x3f1c2a6e_8d4b_4c1e_9a57_2b6d0e4f8a10);
pub const CREATOR: Uuid = Uuid::from_u128(0x7a9e4b2c_1d3f_4e5a_8b6c_0f1e2d3c4b5a);
pub const ORGANIZATION: Uuid = Uuid::from_u128(0xc0ffee00_1234_4abc_8def_000000000001);
pub const CONTENT: Uuid = Uuid::from_u128(0x5d2e8f14_6b3a_4c9d_a1e7_93f0b4c2d6e8);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn seed_catalog(pool: &PgPool) {
    sqlx::query("INSERT INTO users (id, email) VALUES ($1, 'buyer@example.com'), ($2, 'creator@example.com')")
        .bind(CUSTOMER)
        .bind(CREATOR)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, 'Sample Org')")
        .bind(ORGANIZATION)
        .execute(pool)
        .await
        .unwrap();
    insert_content(pool, CONTENT).await;
}

pub async fn insert_content(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "INSERT INTO content (id, organization_id, creator_id, title, price_cents) VALUES ($1, $2, $3, 'Sample', 1999)",
    )
    .bind(id)
    .bind(ORGANIZATION)
    .bind(CREATOR)
    .execute(pool)
    .await
    .unwrap();
}

/// The paid-session fixture, with the given event id, payment intent and amount.
pub fn paid_session_body(event_id: &str, payment_intent: &str, amount: i64) -> Vec<u8> {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/events/checkout.session.completed.json"))
            .unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["id"] = json!(event_id);
    let session = &mut event["data"]["object"];
    session["id"] = json!(format!("cs_{payment_intent}"));
    session["payment_intent"] = json!(payment_intent);
    session["amount_total"] = json!(amount);
    session["metadata"]["amountPaidCents"] = json!(amount.to_string());
    serde_json::to_vec(&event).unwrap()
}

pub fn message(body: Vec<u8>) -> EventMessage {
    let envelope = shared::envelope::EventEnvelope::parse(&body).unwrap();
    EventMessage {
        event_id: envelope.id,
        event_type: envelope.event_type,
        endpoint: "booking".into(),
        received_at: Utc::now(),
        attempt: 1,
        body,
    }
}

pub fn edit(body: &[u8], change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(body).unwrap();
    change(&mut event);
    serde_json::to_vec(&event).unwrap()
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

pub async fn event_status(pool: &PgPool, id: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, last_error FROM stripe_events WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

// ---- broker side -------------------------------------------------------------------------

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use processor::worker::{Worker, WorkerSettings};
use shared::broker::{AmqpUrls, publish_confirmed};
use shared::topology::Topology;
use tokio_util::sync::CancellationToken;

pub struct TestWorker {
    pub topology: Topology,
    pub channel: Channel,
    pub settings: WorkerSettings,
    _connection: Connection,
    cancel: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

pub fn settings(prefix: &str, retry_delays: Vec<Duration>, max_attempts: u32) -> WorkerSettings {
    WorkerSettings {
        urls: AmqpUrls::parse(&amqp_url()).unwrap(),
        topology: Topology::new(prefix),
        prefetch: 16,
        concurrency: 4,
        delivery_limit: 5,
        crash_limit: 3,
        modes: shared::config::EndpointModes::default(),
        retry_delays,
        max_attempts,
        shutdown_timeout: Duration::from_secs(10),
        test_hook: None,
        batch: processor::worker::BatchLimits {
            size: 16,
            wait: Duration::from_millis(5),
            partial: 2,
        },
    }
}

pub fn test_prefix() -> String {
    format!("test.{}", Uuid::new_v4().simple())
}

/// A connection of the test's own, with a confirm-mode channel to publish and inspect.
async fn inspection_channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running for these tests (see README)");
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    (connection, channel)
}

/// Declares a test's queues without consuming them: for tests that run the binary.
pub async fn open_broker(settings: WorkerSettings) -> TestWorker {
    let (connection, channel) = inspection_channel().await;
    settings
        .topology
        .declare(&channel, &settings.queue_settings())
        .await
        .unwrap();
    TestWorker {
        topology: settings.topology.clone(),
        channel,
        settings,
        _connection: connection,
        cancel: CancellationToken::new(),
        handle: None,
    }
}

/// Starts a worker on its own queues and waits until it consumes.
pub async fn start_worker(pool: PgPool, settings: WorkerSettings) -> TestWorker {
    let (connection, channel) = inspection_channel().await;
    let worker = Worker::new(pool, settings.clone());
    let ready = worker.ready_flag();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let handle = tokio::spawn(async move { worker.run(token).await });
    wait_for("the worker to consume", || {
        let ready = Arc::clone(&ready);
        async move { ready.load(Ordering::Relaxed) }
    })
    .await;
    TestWorker {
        topology: settings.topology.clone(),
        channel,
        settings,
        _connection: connection,
        cancel,
        handle: Some(handle),
    }
}

impl TestWorker {
    /// Publishes as ingest does.
    pub async fn publish(&self, message: &EventMessage) {
        publish_confirmed(
            &self.channel,
            &self.topology.exchange,
            &message.event_type,
            &message.body,
            message.properties().unwrap(),
        )
        .await
        .unwrap();
    }

    pub async fn take_dead(&self) -> Vec<lapin::message::BasicGetMessage> {
        self.take(&self.topology.dead_queue.clone()).await
    }

    pub async fn take(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let mut messages = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            messages.push(m);
        }
        messages
    }

    /// Messages waiting in a queue (ready, not the unacked ones).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap();
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.cancel.cancel();
        let topology = self.topology.clone();
        let delays = self.settings.retry_delays.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(connection) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                    && let Ok(channel) = connection.create_channel().await
                {
                    let _ = topology.delete(&channel, &delays).await;
                    let _ = connection.close(200, "test over".into()).await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` for up to 20 s.
pub async fn wait_for<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A TCP proxy in front of PostgreSQL that a test can cut and restore, to stand for a
/// database outage without touching the shared server.
pub struct CuttableProxy {
    pub port: u16,
    /// Connections clients opened through the proxy, refused ones included.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<AtomicBool>,
    /// While set, connections are accepted and then left unanswered.
    hang: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CuttableProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let accepting = Arc::clone(&open);
        let hang = Arc::new(AtomicBool::new(false));
        let hanging = Arc::clone(&hang);
        let cuts = cut.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                if hanging.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(client);
                    });
                    continue;
                }
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let mut cut_rx = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            connections,
            open,
            hang,
            cut,
        }
    }

    /// Refuses new connections and breaks the existing ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// A database that does not answer: every connection attempt waits out its timeout.
    pub fn hang(&self) {
        self.hang.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

// ---- the processor binary ----------------------------------------------------------------

/// `DATABASE_URL` for the test's own database (the one `#[sqlx::test]` made).
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_owned();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{db}")
}

/// The `processor` binary with the environment of one test.
pub fn processor(pool: &PgPool, prefix: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .env("DATABASE_URL", database_url(pool))
        .env("AMQP_URL", amqp_url())
        .env("AMQP_PREFIX", prefix)
        .env("PROCESSOR_METRICS_ADDR", "127.0.0.1:0")
        // The work queue's argument as `settings()` declares it: RabbitMQ refuses to
        // redeclare a queue with another one.
        .env("PROCESSOR_DELIVERY_LIMIT", "5")
        .env("RUST_LOG", "warn")
        .env_remove("PROCESSOR_TEST_HOOK");
    command
}

/// Runs an ops command; returns (exit code, stdout).
pub async fn ops(pool: &PgPool, prefix: &str, args: &[&str]) -> (i32, String) {
    let mut command = processor(pool, prefix);
    command.args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

pub async fn ops_json(pool: &PgPool, prefix: &str, args: &[&str]) -> Value {
    let (code, out) = ops(pool, prefix, args).await;
    assert_eq!(code, 0, "{args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

/// Handles one event in its own transaction, every endpoint in test mode (the fixtures'
/// mode).
pub async fn handle(
    pool: &PgPool,
    message: &EventMessage,
) -> Result<processor::handler::Outcome, processor::error::ProcessError> {
    processor::handler::handle(pool, message, &shared::config::EndpointModes::default()).await
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
