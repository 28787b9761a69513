//! The ops console: the pipeline in a browser. Served by `processor console`, and by
//! `processor run` when a token is set, on `OPS_CONSOLE_ADDR` (loopback by default).
//!
//! Pages (server-rendered HTML, no external resources, a little vanilla JS):
//! `/` overview, `/dead-letters` (filters as query parameters), `/events/{id}`, `/lookup`,
//! `/audit`, `/login`, and `/jobs/{id}` for a running replay or purge.
//!
//! - [`auth`]: tokens, the session cookie, the same-origin check on every POST;
//! - [`index`]: the PostgreSQL index of the dead-letter queue the list pages read;
//! - [`jobs`]: replays and purges running in the background, with progress;
//! - [`audit`]: the `ops_audit` table; [`mask`]: what never appears unmasked;
//! - [`pages`]: one module per page.

pub mod audit;
pub mod auth;
pub mod index;
pub mod jobs;
pub mod mask;
pub mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use shared::broker::AmqpUrls;
use shared::topology::Topology;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::ConsoleArgs;

/// Everything the console needs to start.
pub struct ConsoleSettings {
    pub addr: SocketAddr,
    pub tokens: auth::Tokens,
    pub index_interval: Duration,
    pub urls: AmqpUrls,
    pub topology: Topology,
    pub retry_delays: Vec<Duration>,
}

impl ConsoleSettings {
    /// Settings from the command line; fails, naming the setting, when no token is set.
    pub fn new(
        args: &ConsoleArgs,
        urls: AmqpUrls,
        topology: Topology,
        retry_delays: Vec<Duration>,
    ) -> Result<Self, String> {
        args.validate()?;
        Ok(Self {
            addr: args.addr,
            tokens: auth::Tokens::new(args.token.as_ref(), args.readonly_token.as_ref()),
            index_interval: args.index_interval,
            urls,
            topology,
            retry_delays,
        })
    }
}

/// The console's shared state.
pub struct Console {
    pub pool: PgPool,
    pub urls: AmqpUrls,
    pub topology: Topology,
    pub retry_delays: Vec<Duration>,
    pub tokens: auth::Tokens,
    /// Held while this process reads the dead-letter queue: a snapshot holds every message
    /// it read, so two at once would each see only part of the queue.
    pub queue_lock: tokio::sync::Mutex<()>,
    pub jobs: jobs::Jobs,
    /// Wakes the indexer for an immediate re-read (after a replay or purge).
    pub reindex: tokio::sync::Notify,
}

pub type AppState = Arc<Console>;

impl Console {
    pub async fn connect(&self, purpose: &str) -> anyhow::Result<lapin::Connection> {
        let (connection, _) = self
            .urls
            .connect(0, &format!("processor console {purpose}"))
            .await?;
        Ok(connection)
    }
}

/// The router, without the listener: tests drive it directly.
pub fn router(console: AppState) -> Router {
    let pages = Router::new()
        .route("/", get(pages::overview::show))
        .route("/dead-letters", get(pages::dead_letters::list))
        .route("/dead-letters/preview", post(pages::dead_letters::preview))
        .route("/dead-letters/replay", post(pages::dead_letters::replay))
        .route("/dead-letters/export", post(pages::dead_letters::export))
        .route("/dead-letters/purge", post(pages::dead_letters::purge))
        .route("/jobs/{id}", get(pages::jobs::show))
        .route("/jobs/{id}/status", get(pages::jobs::status))
        .route("/events/{id}", get(pages::event::show))
        .route("/lookup", get(pages::lookup::show))
        .route("/audit", get(pages::audit::show))
        .route("/logout", post(pages::login::logout))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            auth::require,
        ));
    Router::new()
        .route("/login", get(pages::login::show).post(pages::login::submit))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/static/console.js", get(pages::script))
        .merge(pages)
        .fallback(pages::not_found)
        .layer(middleware::map_response(security_headers))
        .with_state(console)
}

/// No page loads anything from elsewhere, is framed, or is cached.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
             form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Serves the console until `shutdown` is cancelled, keeping the dead-letter index fresh.
pub async fn serve(
    pool: PgPool,
    settings: ConsoleSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let console = Arc::new(Console {
        pool,
        urls: settings.urls,
        topology: settings.topology,
        retry_delays: settings.retry_delays,
        tokens: settings.tokens,
        queue_lock: tokio::sync::Mutex::new(()),
        jobs: jobs::Jobs::default(),
        reindex: tokio::sync::Notify::new(),
    });
    let listener = tokio::net::TcpListener::bind(settings.addr).await?;
    tracing::info!(addr = %settings.addr, "ops console listening");
    tokio::spawn(keep_index(
        console.clone(),
        settings.index_interval,
        shutdown.clone(),
    ));
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Re-reads the dead-letter queue into the index when it changed, every `interval`, and at
/// once when an action asks for it. A re-read that took long (a big queue) spaces the next
/// ones out, so that a queue filling up fast is not held by snapshots most of the time.
async fn keep_index(console: AppState, interval: Duration, shutdown: CancellationToken) {
    let mut force = true;
    loop {
        let pause = match index::refresh(&console, force).await {
            Ok(Some(took)) => interval.max(took * 4),
            Ok(None) => interval,
            Err(error) => {
                tracing::warn!(%error, "could not read the dead-letter queue into the console's index");
                interval
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => force = false,
            () = console.reindex.notified() => force = true,
            () = shutdown.cancelled() => return,
        }
    }
}
