//! The processor's small HTTP server: `/metrics` (Prometheus), `/healthz`, `/readyz`, and
//! the sampler that keeps the queue-depth gauges current.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use shared::broker::AmqpUrls;
use shared::topology::Topology;
use tokio_util::sync::CancellationToken;

use crate::dlq;

#[derive(Clone)]
struct HttpState {
    ready: Arc<AtomicBool>,
    metrics: PrometheusHandle,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = HttpState {
        ready,
        metrics: shared::metrics::install(),
    };
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move { s.metrics.render() }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "no such route" })),
            )
        })
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and probes listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        Json(json!({ "status": "ready", "consuming": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not_ready",
                "consuming": false,
                "error": "not consuming from RabbitMQ",
            })),
        )
            .into_response()
    }
}

/// Samples queue depths (work, retry tiers, dead letters) and the age of the oldest dead
/// letter into gauges, every `interval`, on a connection of its own.
pub async fn sample_queues(
    urls: AmqpUrls,
    topology: Topology,
    retry_delays: Vec<Duration>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut queues = vec![topology.work_queue.clone(), topology.dead_queue.clone()];
    queues.extend(
        shared::topology::distinct_delays(&retry_delays)
            .into_iter()
            .map(|d| topology.retry_queue(d)),
    );
    let mut ticker = tokio::time::interval(interval);
    // Skip the immediate first tick: by the next one the processor has declared its queues.
    ticker.tick().await;
    let mut connection = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if connection
            .as_ref()
            .is_none_or(|c: &lapin::Connection| !c.status().connected())
        {
            connection = urls
                .connect(0, "processor queue sampler")
                .await
                .ok()
                .map(|(c, _)| c);
        }
        let Some(conn) = &connection else { continue };
        let Ok(channel) = conn.create_channel().await else {
            continue;
        };
        for queue in &queues {
            if let Some((messages, consumers)) = dlq::depth(&channel, queue).await {
                metrics::gauge!("processor_queue_messages", "queue" => queue.clone())
                    .set(f64::from(messages));
                metrics::gauge!("processor_queue_consumers", "queue" => queue.clone())
                    .set(f64::from(consumers));
            }
        }
        let _ = channel.close(200, "sampled".into()).await;
        // The oldest dead letter is the head of the queue: look at it alone.
        if let Ok(head) = dlq::Snapshot::take(conn, &topology, 1).await {
            let age = head
                .letters
                .first()
                .map_or(0, |l| l.age(Utc::now()).as_secs());
            metrics::gauge!("processor_dead_letter_oldest_age_seconds").set(age as f64);
            let _ = head.release().await;
        }
    }
}
