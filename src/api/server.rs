//! The HTTP server loop: accepts TCP connections and serves the router on
//! them with the bounds a public service needs, which `axum::serve` does
//! not set.
//!
//! - At most `max_connections` connections at once; one over the cap is
//!   closed at once (the client sees a reset, not a hang).
//! - A request's headers must arrive within `header_read_timeout`, and an
//!   idle keep-alive connection is closed after the same time (hyper starts
//!   that timer whenever it waits for a request head).
//! - HTTP/1.1 only (with upgrades for WebSockets), as before.
//! - Every request carries the peer's address (`ConnectInfo<SocketAddr>`).
//! - On shutdown the listener closes and connections finish their
//!   requests; the caller bounds how long that may take.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long StacyVM's own HTTP clients (replica to replica, control plane
/// to worker) keep an idle pooled connection: well below the 20 s default
/// of `server.header_read_timeout` after which a server closes it.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl ServerLimits {
    pub fn from_config(server: &crate::config::ServerConfig) -> ServerLimits {
        ServerLimits {
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout.0,
        }
    }
}

/// Serves `router` on `listener` until `signal` completes, then stops
/// accepting and waits for the open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let stopping = CancellationToken::new();
    let connections = TaskTracker::new();
    let refused = AtomicU64::new(0);
    tokio::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin; the listener itself stays open.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let n = refused.fetch_add(1, Ordering::Relaxed);
            // Logged on the first refusal and every 1000th after it.
            if n.is_multiple_of(1000) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused = n + 1,
                    "connection refused: server.max_connections reached"
                );
            }
            drop(stream);
            continue;
        };
        // Small writes (stream frames, short answers) leave at once:
        // without TCP_NODELAY, Nagle and the peer's delayed ACK add ~40 ms
        // to an exec through a remote worker.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set (best effort)");
        }
        let service = router.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let stopping = stopping.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stopping.cancelled() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The peer address a request came from, when the server loop recorded it
/// (tests that call the router directly have none).
pub fn peer(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}
