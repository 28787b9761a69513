use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use ingest::config::Config;
use ingest::startup::Application;
use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use shared::signature::WebhookSecret;
use shared::topology::{QueueSettings, Topology};

pub const SECRET: &str = "whsec_test_secret";
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/events/{name}")).unwrap()
}

/// A minimal valid event with a fresh id.
pub fn event(event_type: &str) -> (String, Vec<u8>) {
    let id = format!("evt_test{}", uuid::Uuid::new_v4().simple());
    let body = format!(
        r#"{{"id":"{id}","object":"event","type":"{event_type}","data":{{"object":{{}}}}}}"#
    );
    (id, body.into_bytes())
}

pub fn sign(body: &[u8]) -> String {
    sign_at(body, chrono::Utc::now().timestamp())
}

pub fn sign_at(body: &[u8], t: i64) -> String {
    WebhookSecret::parse(SECRET, 1).unwrap().sign(t, body)
}

/// A well-formed, current signature made with a secret ingest does not know (401).
pub fn sign_wrongly(body: &[u8]) -> String {
    WebhookSecret::parse("whsec_not_the_endpoint_secret", 1)
        .unwrap()
        .sign(chrono::Utc::now().timestamp(), body)
}

pub struct TestApp {
    /// The webhook server.
    pub base: String,
    /// The internal server: /metrics, /healthz, /readyz.
    pub internal: String,
    pub client: reqwest::Client,
    pub topology: Topology,
    pub channel: Channel,
    _connection: Connection,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub struct Options {
    pub amqp_url: String,
    pub declare_queues: bool,
    pub extra_args: Vec<String>,
    pub wait_ready: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            amqp_url: amqp_url(),
            declare_queues: true,
            extra_args: Vec::new(),
            wait_ready: true,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let prefix = format!("test.{}", uuid::Uuid::new_v4().simple());
    let mut args = vec![
        "ingest".to_owned(),
        "--addr=127.0.0.1:0".to_owned(),
        "--metrics-addr=127.0.0.1:0".to_owned(),
        format!("--amqp-url={}", options.amqp_url),
        format!("--amqp-prefix={prefix}"),
        format!("--secret-booking={SECRET}"),
        "--confirm-timeout=3s".to_owned(),
    ];
    args.extend(options.extra_args);
    let config = Config::try_parse_from(args).unwrap();

    // The inspection side uses the machine's broker even when ingest is pointed elsewhere.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running for these tests (see README)");
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(&prefix);
    if options.declare_queues {
        topology
            .declare(
                &channel,
                &QueueSettings {
                    delivery_limit: 5,
                    retry_delays: vec![],
                },
            )
            .await
            .unwrap();
    }

    let app = Application::build(&config).await.unwrap();
    let base = format!("http://{}", app.local_addr().unwrap());
    let internal = format!("http://{}", app.metrics_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let test_app = TestApp {
        base,
        internal,
        client: reqwest::Client::new(),
        topology,
        channel,
        _connection: connection,
        shutdown: Some(tx),
        server: Some(server),
    };
    if options.wait_ready {
        test_app.wait_ready().await;
    }
    test_app
}

impl TestApp {
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            let response = self
                .client
                .get(format!("{}/readyz", self.internal))
                .send()
                .await
                .unwrap();
            if response.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ingest did not become ready");
    }

    pub async fn post(
        &self,
        endpoint: &str,
        body: Vec<u8>,
        signature: Option<String>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/webhooks/stripe/{endpoint}", self.base))
            .header("content-type", "application/json; charset=utf-8")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        request.send().await.unwrap()
    }

    /// Posts a correctly signed body to the booking endpoint.
    pub async fn post_signed(&self, body: Vec<u8>) -> reqwest::Response {
        let signature = sign(&body);
        self.post("booking", body, Some(signature)).await
    }

    /// Takes every message waiting in the work queue.
    pub async fn queued(&self) -> Vec<lapin::message::BasicGetMessage> {
        let mut messages = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.topology.work_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            messages.push(message);
        }
        messages
    }

    /// Stops the server the way SIGTERM does and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Remove this test's queues and exchanges, even when the test failed.
        remove_topology(self.topology.clone());
    }
}

/// Removes a test's queues and exchanges on the machine's broker; usable from `Drop`.
pub fn remove_topology(topology: Topology) {
    on_broker(move |channel| async move {
        let _ = topology.delete(&channel, &[]).await;
    });
}

/// Removes one exchange (what a binary run declares when no queue was made for it).
pub fn remove_exchange(name: String) {
    on_broker(move |channel| async move {
        let _ = channel
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    });
}

/// Runs `work` on a channel of its own, on a thread of its own: callable from `Drop`, inside
/// or outside a runtime.
fn on_broker<F, Fut>(work: F)
where
    F: FnOnce(Channel) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
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
                work(channel).await;
                let _ = connection.close(200, "test over".into()).await;
            }
        });
    })
    .join();
}

pub async fn error_of(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("error bodies are JSON");
    body["error"]
        .as_str()
        .expect("error bodies have an `error` string")
        .to_owned()
}

// ---- the ingest binary -------------------------------------------------------------------

/// Removes the exchange a binary run declared (its name is the prefix), when the test ends,
/// even when it failed.
pub struct BrokerLeftovers(pub String);

impl Drop for BrokerLeftovers {
    fn drop(&mut self) {
        remove_exchange(self.0.clone());
    }
}

/// A free port on the loopback address (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ingest binary, started with only `args` as its environment (plus its two listen
/// addresses and a fresh prefix); stdout and stderr are piped. Returns the child, the
/// webhook server's and the internal server's base URLs.
pub fn ingest_binary(args: &[(&str, String)]) -> (Child, String, String, BrokerLeftovers) {
    ingest_binary_with(args, |_| {})
}

/// [`ingest_binary`], with a last say on the command (its stdio, say).
pub fn ingest_binary_with(
    args: &[(&str, String)],
    adjust: impl FnOnce(&mut Command),
) -> (Child, String, String, BrokerLeftovers) {
    let (port, internal_port) = (free_port(), free_port());
    let prefix = format!("test.{}", uuid::Uuid::new_v4().simple());
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("INGEST_ADDR", format!("127.0.0.1:{port}"))
        .env("INGEST_METRICS_ADDR", format!("127.0.0.1:{internal_port}"))
        .env("AMQP_PREFIX", &prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in args {
        command.env(key, value);
    }
    adjust(&mut command);
    (
        command.spawn().unwrap(),
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{internal_port}"),
        BrokerLeftovers(prefix),
    )
}

/// Waits until the internal server at `internal` answers /healthz.
pub async fn wait_healthy(client: &reqwest::Client, internal: &str) {
    for _ in 0..100 {
        if client
            .get(format!("{internal}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ingest binary did not start");
}

/// SIGTERM, then waits for the exit; returns the stderr read so far (empty when it was not
/// piped).
pub fn terminate(child: &mut Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = std::mem::replace(child, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}
