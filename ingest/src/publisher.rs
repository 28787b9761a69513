//! Publishing events to RabbitMQ with publisher confirms, over a small pool of channels on
//! one connection, reconnecting on its own.
//!
//! Many requests publish at once: a request picks a channel round-robin, clones it (a
//! handle) and awaits its own confirm. No lock is held across an await. A channel that
//! nacks or does not confirm in time is replaced: on RabbitMQ 3.10 a channel can keep
//! nacking after a quorum leader election, and only a new one recovers. A lost connection
//! wakes the supervisor task, which reconnects (trying the next cluster node first) with
//! growing delays; meanwhile publishes fail fast with [`PublishError::NotConnected`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, Event};
use shared::broker::{AmqpUrls, BrokerError, ConfirmError, publish_confirmed};
use shared::contract::{ContractError, EventMessage};
use shared::topology::Topology;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error("RabbitMQ did not confirm the message within {0:?}")]
    ConfirmTimeout(Duration),
    #[error(transparent)]
    Broker(#[from] ConfirmError),
    #[error(transparent)]
    Contract(#[from] ContractError),
}

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub urls: AmqpUrls,
    pub topology: Topology,
    pub channels: usize,
    pub confirm_timeout: Duration,
}

/// Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

struct Shared {
    settings: PublisherSettings,
    live: RwLock<Option<Arc<Live>>>,
    /// Poked when a publish saw the connection fail.
    lost: Notify,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

struct Live {
    connection: Connection,
    channels: Vec<Mutex<Channel>>,
    next: AtomicUsize,
    node: usize,
}

impl Publisher {
    /// Starts the supervisor, which connects in the background: ingest serves `/healthz`
    /// (and 503s) while the broker is still coming up.
    pub fn start(settings: PublisherSettings) -> Self {
        let shared = Arc::new(Shared {
            settings,
            live: RwLock::new(None),
            lost: Notify::new(),
            supervisor: Mutex::new(None),
        });
        let handle = tokio::spawn(supervise(Arc::clone(&shared)));
        *lock(&shared.supervisor) = Some(handle);
        Self { shared }
    }

    /// True while a connection to the broker is up.
    pub fn is_ready(&self) -> bool {
        self.current()
            .is_some_and(|live| live.connection.status().connected())
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.shared
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes `message` and waits for the broker's confirm. `Ok` means the broker has
    /// the message durably in a queue; anything else must be answered with a 5xx.
    pub async fn publish(&self, message: &EventMessage) -> Result<(), PublishError> {
        let live = self.current().ok_or(PublishError::NotConnected)?;
        let slot = live.next.fetch_add(1, Ordering::Relaxed) % live.channels.len();
        let channel = lock(&live.channels[slot]).clone();
        let properties = message.properties()?;
        let timeout = self.shared.settings.confirm_timeout;

        let exchange = self.shared.settings.topology.exchange.as_str();
        let attempt = publish_confirmed(
            &channel,
            exchange,
            &message.event_type,
            &message.body,
            properties,
        );
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, attempt).await;
        let outcome = if matches!(result, Ok(Ok(()))) {
            "ack"
        } else {
            "failed"
        };
        metrics::histogram!("ingest_publish_confirm_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) if !error.channel_suspect() => return Err(error.into()),
            Ok(Err(error)) => PublishError::Broker(error),
            Err(_) => PublishError::ConfirmTimeout(timeout),
        };
        self.replace_channel(&live, slot, &channel).await;
        Err(error)
    }

    /// Swaps a misbehaving channel for a fresh one, unless another request already did.
    async fn replace_channel(&self, live: &Arc<Live>, slot: usize, failed: &Channel) {
        if !live.connection.status().connected() {
            self.shared.lost.notify_one();
            return;
        }
        match open_channel(&live.connection).await {
            Ok(fresh) => {
                let old = {
                    let mut current = lock(&live.channels[slot]);
                    if current.id() != failed.id() {
                        return; // someone else replaced it meanwhile
                    }
                    std::mem::replace(&mut *current, fresh)
                };
                tracing::warn!(channel = old.id(), "replaced a failing publish channel");
                tokio::spawn(async move {
                    let _ = old.close(200, "replaced".into()).await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot open a publish channel; reconnecting");
                self.shared.lost.notify_one();
            }
        }
    }

    /// Closes the connection (after in-flight requests are done) and stops reconnecting.
    pub async fn close(&self) {
        if let Some(handle) = lock(&self.shared.supervisor).take() {
            handle.abort();
        }
        let live = self
            .shared
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(live) = live {
            let _ = live
                .connection
                .close(200, "ingest shutting down".into())
                .await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn open_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn connect(settings: &PublisherSettings, start_node: usize) -> Result<Live, BrokerError> {
    // Named after the prefix so an operator can tell deployments apart in the broker.
    let name = format!("ingest {}", settings.topology.exchange);
    let (connection, node) = settings.urls.connect(start_node, &name).await?;
    let setup = |source| BrokerError::Setup {
        what: "the publish channel setup",
        source,
    };
    let first = open_channel(&connection).await.map_err(setup)?;
    settings
        .topology
        .declare_exchange(&first)
        .await
        .map_err(|source| BrokerError::Setup {
            what: "the exchange declaration",
            source,
        })?;
    let mut channels = vec![Mutex::new(first)];
    for _ in 1..settings.channels {
        channels.push(Mutex::new(open_channel(&connection).await.map_err(setup)?));
    }
    Ok(Live {
        connection,
        channels,
        next: AtomicUsize::new(0),
        node,
    })
}

async fn supervise(shared: Arc<Shared>) {
    let delays = || shared::broker::reconnect_delays(Duration::from_secs(5));
    let mut backoff = delays();
    let mut node = 0;
    loop {
        let live = match connect(&shared.settings, node).await {
            Ok(live) => Arc::new(live),
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?delay, "RabbitMQ unavailable");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        backoff = delays();
        node = live.node;
        tracing::info!(node, "connected to RabbitMQ");
        let mut events = live.connection.events_listener();
        *shared.live.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&live));

        // Wait until the connection is gone, whoever notices first.
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Event::Error(error)) => {
                        tracing::warn!(%error, "RabbitMQ connection error");
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                () = shared.lost.notified() => {}
                _ = check.tick() => {}
            }
            if !live.connection.status().connected() {
                break;
            }
        }
        *shared.live.write().unwrap_or_else(PoisonError::into_inner) = None;
        tracing::warn!(node, "lost the RabbitMQ connection; reconnecting");
        let _ = live.connection.close(320, "reconnecting".into()).await;
        node += 1;
    }
}
