//! The HTTP server loop: axum's router on hyper, with what `axum::serve` does not offer.
//!
//! - HTTP/1.1 only. Stripe sends HTTP/1.1; serving HTTP/2 as well meant sniffing the first
//!   bytes with no timer and running an HTTP/2 connection with none either, so a client
//!   that sent nothing, or only the HTTP/2 preface, held a connection for ever. Now the
//!   preface is refused at once like any malformed request.
//! - A header read timeout (`INGEST_HEADER_TIMEOUT`): hyper starts it whenever it waits for
//!   a request head, that is when the connection opens and again after every answer on a
//!   kept-alive connection. So a client that sends nothing, trickles its headers (slowloris)
//!   or leaves a kept-alive connection idle is cut off after that long. (The body has its
//!   own timeout, in the webhook handler.)
//! - Graceful shutdown: stop accepting, let every open connection finish its request (idle
//!   ones are closed at once), then return.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Serves `router` until `shutdown` resolves, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // What `into_make_service_with_connect_info` would add: the rate limit keys on it.
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
