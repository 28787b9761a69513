//! Building the application from its configuration, and serving it until shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use shared::signature::WebhookSecret;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::config::{Config, ConfigError};
use crate::publisher::{Publisher, PublisherSettings};
use crate::rate_limit::{self, InFlightLimit, IpRateLimit};
use crate::{routes, serve};

#[derive(Clone)]
pub struct AppState {
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub endpoints: Arc<BTreeMap<String, Vec<WebhookSecret>>>,
    pub publisher: Publisher,
    pub tolerance_secs: u64,
    pub max_body_bytes: u64,
    pub body_timeout: Duration,
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    internal_listener: TcpListener,
    internal_router: Router,
    publisher: Publisher,
    shutdown_timeout: Duration,
    header_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {setting} {addr}: {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Application {
    /// Validates the configuration, binds the port and starts connecting to the broker.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let endpoints = config.endpoint_secrets()?;
        let listener = bind("INGEST_ADDR", config.addr).await?;
        let internal_listener = bind("INGEST_METRICS_ADDR", config.metrics_addr).await?;
        let publisher = Publisher::start(PublisherSettings {
            urls: config.broker.amqp_url.clone(),
            topology: config.broker.topology(),
            channels: usize::from(config.publish_channels),
            confirm_timeout: config.confirm_timeout,
        });
        let modes = config.modes.modes();
        tracing::info!(
            endpoints = ?endpoints.keys().collect::<Vec<_>>(),
            live = ?endpoints.keys().filter(|e| modes.is_live(e)).collect::<Vec<_>>(),
            "serving webhook endpoints"
        );
        let state = AppState {
            metrics: shared::metrics::install(),
            endpoints: Arc::new(endpoints),
            publisher: publisher.clone(),
            tolerance_secs: config.tolerance_secs,
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        };
        let internal_router = internal_router(state.clone());
        let router = router(
            state,
            IpRateLimit::per_minute(config.rate_limit_per_minute),
            InFlightLimit::new(config.max_in_flight),
        );
        Ok(Self {
            listener,
            router,
            internal_listener,
            internal_router,
            publisher,
            shutdown_timeout: config.shutdown_timeout,
            header_timeout: config.header_timeout,
        })
    }

    /// The webhook server's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The internal server's address (/metrics, /healthz, /readyz).
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.internal_listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish (each is either confirmed or answered 503), and closes the broker connection.
    /// The internal server answers until the webhook server has drained.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        };
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let internal = tokio::spawn(serve::serve(
            self.internal_listener,
            self.internal_router,
            self.header_timeout,
            async move {
                let _ = drained_rx.await;
            },
        ));
        let server = serve::serve(self.listener, self.router, self.header_timeout, signal);
        let timeout = self.shutdown_timeout;
        tokio::select! {
            () = server => {}
            () = async {
                let _ = stopping_rx.await;
                tokio::time::sleep(timeout).await;
            } => {
                tracing::warn!(?timeout, "in-flight requests did not finish in time; exiting");
            }
        }
        let _ = drained_tx.send(());
        let _ = internal.await;
        self.publisher.close().await;
        tracing::info!("ingest stopped");
    }
}

async fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            setting,
            addr,
            source,
        })
}

/// The internal server's routes: probes and metrics, with no admission control (they are
/// cheap, and a rate limit must never fail an orchestrator's probe).
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .with_state(state)
}

/// The public server's routes: the webhook endpoints only.
pub fn router(
    state: AppState,
    rate_limit: Option<IpRateLimit>,
    in_flight: InFlightLimit,
) -> Router {
    // The body is read by the handler itself under its own size and time limits.
    // Then the cap on requests in flight; the rate limit below refuses a flooding address
    // before it takes a slot.
    let webhook = Router::new()
        .route(
            "/webhooks/stripe/{endpoint}",
            post(routes::receive).fallback(routes::method_not_allowed),
        )
        .layer(DefaultBodyLimit::disable())
        .route_layer(axum::middleware::from_fn_with_state(
            in_flight,
            rate_limit::shed,
        ));
    let mut public = Router::new()
        .merge(webhook)
        .fallback(routes::not_found)
        .with_state(state);
    // Layers added later run first: the count, then the rate limit. Both wrap the fallback
    // too, so that a scanner's random paths count against its limit.
    if let Some(limit) = rate_limit {
        public = public.layer(axum::middleware::from_fn_with_state(
            limit,
            rate_limit::enforce,
        ));
    }
    public
        .layer(axum::middleware::from_fn(routes::count_request))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Answers are logged by the handlers with their reasons; a 5xx here (a 503 while the
        // broker is down) is worth a warning, not an error.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::WARN)))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}
