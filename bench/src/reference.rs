//! `ref-ingest`: the smallest receiver that does ingest's job, so that "ingest ÷ reference"
//! says what ingest's own code costs on this machine, measured in the same run.
//!
//! It does only what a webhook must: axum reads the body, `shared::signature::verify`
//! checks the Stripe-Signature (the same HMAC check as ingest's), the body is published
//! persistent and mandatory with a publisher confirm (`shared::broker::publish_confirmed`,
//! `EventMessage::properties`) to a quorum work queue declared like ingest's, and 200
//! `{"received":true}` is answered after the confirm. No logging, rate limit, metrics,
//! envelope parsing, timeouts or reconnection.
//!
//! It runs as a child process (`bench ref-server`, hidden) like ingest, so that it does not
//! share the load generator's process and its CPU is counted apart, and it publishes over
//! as many channels of one connection as ingest does by default (`INGEST_PUBLISH_CHANNELS`,
//! 4), round-robin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use lapin::options::ConfirmSelectOptions;
use serde::Serialize;
use shared::broker::{AmqpUrls, publish_confirmed};
use shared::contract::EventMessage;
use shared::signature::{DEFAULT_TOLERANCE_SECS, WebhookSecret, verify};
use shared::topology::Topology;

use crate::Options;
use crate::drain::{self, EndToEnd};
use crate::load::{self, LoadResult};
use crate::resources::PhaseCost;
use crate::world::World;

/// The endpoint the bench posts to, as ingest serves it.
const ENDPOINT: &str = "booking";
/// Every bench event is a paid checkout; ingest routes by the type it parses, the
/// reference parses nothing and routes by this.
const ROUTING_KEY: &str = "checkout.session.completed";

/// Arguments of the hidden `ref-server` subcommand (given by the bench, not by hand).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Topic exchange to publish to (bound to the reference's quorum queue).
    #[arg(long)]
    pub exchange: String,
    /// Publish channels on the one connection.
    #[arg(long, default_value_t = 4)]
    pub channels: u16,
}

struct Receiver {
    channels: Vec<lapin::Channel>,
    next: AtomicUsize,
    exchange: String,
    secrets: Vec<WebhookSecret>,
}

/// Runs the reference receiver until SIGTERM or Ctrl-C.
pub async fn serve(args: ServerArgs, amqp_url: &str) -> anyhow::Result<()> {
    let urls = AmqpUrls::parse(amqp_url)?;
    let (connection, _) = urls.connect(0, "bench ref-server").await?;
    let mut channels = Vec::new();
    for _ in 0..args.channels.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let receiver = Arc::new(Receiver {
        channels,
        next: AtomicUsize::new(0),
        exchange: args.exchange,
        secrets: vec![WebhookSecret::parse(crate::world::SECRET, 1)?],
    });
    // Bound only once the broker is connected: a 200 on /healthz means ready to publish.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let app = Router::new()
        .route("/webhooks/stripe/{endpoint}", post(receive))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(receiver);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            crate::stop_signal().await;
        })
        .await
        .context("the reference server failed")?;
    let _ = connection.close(200, "ref-server done".into()).await;
    Ok(())
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if endpoint != ENDPOINT {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(signature) = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let now = Utc::now();
    if verify(
        signature,
        &body,
        &receiver.secrets,
        DEFAULT_TOLERANCE_SECS,
        now.timestamp(),
    )
    .is_err()
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let n = receiver.next.fetch_add(1, Ordering::Relaxed);
    let channel = &receiver.channels[n % receiver.channels.len()];
    // The contract's properties need an id; the reference parses nothing, so it makes one.
    let message = EventMessage {
        event_id: format!("ref_{n}"),
        event_type: ROUTING_KEY.to_owned(),
        endpoint,
        received_at: now,
        attempt: 1,
        body: Vec::new(),
    };
    let Ok(properties) = message.properties() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match publish_confirmed(channel, &receiver.exchange, ROUTING_KEY, &body, properties).await {
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"received":true}"#,
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// Publish channels the reference used (ingest's default count).
    pub channels: u16,
    /// Closed loop, the ingest closed loop's generator and settings.
    pub load: LoadResult,
    /// Open loop at the rate of ingest's open loop: the latency ceiling of that figure.
    pub open: Option<LoadResult>,
}

/// Starts the reference on a fresh queue, drives it with the ingest closed loop's
/// generator and settings (`--events` requests, `--in-flight` workers), then, if `open`,
/// with the ingest open loop's (`open_rate(closed rate)` for `--duration`); stops it and
/// deletes its queue so that the next phase starts from the same broker state.
pub async fn measure(
    world: &mut World,
    options: &Options,
    open: bool,
) -> anyhow::Result<(Reference, Vec<PhaseCost>)> {
    on_own_queue(world, "ref", async |world, topology| {
        drive(world, options, topology, open).await
    })
    .await
}

/// Runs `phase` with the reference's queues declared under `<prefix>.<suffix>`, then stops
/// the reference and deletes those queues, whatever the phase's outcome.
async fn on_own_queue<T>(
    world: &mut World,
    suffix: &str,
    phase: impl AsyncFnOnce(&mut World, &Topology) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let prefix = format!("{}.{suffix}", world.prefix);
    let topology = world.declare(&prefix).await?;
    let outcome = phase(world, &topology).await;
    world.stop_reference().await;
    world.delete_topology(&topology).await;
    outcome
}

async fn drive(
    world: &mut World,
    options: &Options,
    topology: &Topology,
    open: bool,
) -> anyhow::Result<(Reference, Vec<PhaseCost>)> {
    world
        .start_reference(&topology.exchange, options.ref_channels)
        .await?;
    let events = world.events("rc", options.events).await?;
    let url = world.reference_url()?;
    let cpu = world.begin_phase();
    let result = load::closed_loop(url.clone(), &events, options.in_flight).await;
    let mut costs = vec![world.end_phase(cpu, "reference closed loop")];
    let mut reference = Reference {
        channels: options.ref_channels,
        load: result?,
        open: None,
    };
    if open {
        let rate = crate::open_rate(options, reference.load.rate);
        let count = crate::open_count(rate, options.duration);
        crate::progress(&format!(
            "reference open loop: {rate:.0}/s for {} ({count} requests)",
            humantime::format_duration(options.duration)
        ));
        let events = world.events("ro", count).await?;
        let cpu = world.begin_phase();
        let result = load::open_loop(url, &events, rate, options.open_max_in_flight, None).await?;
        costs.push(world.end_phase(cpu, "reference open loop"));
        crate::progress(&format!(
            "reference open loop: p99 {:.2} ms, {} not 200",
            result.latency.p99_ms, result.failed
        ));
        reference.open = Some(result);
    }
    Ok((reference, costs))
}

/// The reference pipeline at the e2e rate: the reference receiver publishing to a fresh
/// queue, the reference consumer (`ref_consumer.rs`) writing its purchases, the same open
/// loop and commit poller as `e2e`. What the machine allows the pipeline's latency.
pub async fn end_to_end(
    world: &mut World,
    options: &Options,
) -> anyhow::Result<(EndToEnd, PhaseCost)> {
    on_own_queue(world, "refp", async |world, topology| {
        pipeline(world, options, topology).await
    })
    .await
}

async fn pipeline(
    world: &mut World,
    options: &Options,
    topology: &Topology,
) -> anyhow::Result<(EndToEnd, PhaseCost)> {
    world
        .start_reference(&topology.exchange, options.ref_channels)
        .await?;
    world.start_ref_consumer(&topology.work_queue).await?;
    let count = crate::open_count(options.e2e_rate, options.duration);
    let events = world.events("re", count).await?;
    let url = world.reference_url()?;
    let pool = world.pool()?.clone();
    let cpu = world.begin_phase();
    let result = drain::end_to_end(&pool, url, options, &events).await;
    let cost = world.end_phase(cpu, "reference e2e");
    Ok((result?, cost))
}
