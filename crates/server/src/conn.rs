//! The accept loop: HTTP/1.1 connections served by hyper with the limits a server facing many
//! tenants needs, which `axum::serve` does not offer:
//!
//! - **a connection cap** ([`Limits::max_connections`]): past it the listener stops accepting until
//!   a connection closes (the kernel's backlog holds the rest), so no flood of sockets exhausts the
//!   process's file descriptors;
//! - **a header read timeout** ([`Limits::header_timeout`]): a client that opens a connection and
//!   trickles its request head (slowloris), or leaves a kept-alive connection idle, is closed when
//!   it runs out, so stalled sockets never hold the capacity real clients need;
//! - the body read timeout is a middleware (`routes`), since hyper reads bodies on the handler's
//!   demand;
//! - **graceful shutdown**: on the stop signal the loop stops accepting and every open connection
//!   finishes its request in flight, then closes (hyper-util's `GracefulShutdown`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a client has to send a request's head (line and headers), from when the connection is
    /// waiting for one.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` turns true, then lets open connections finish.
pub(crate) async fn serve(listener: TcpListener, app: Router, limits: Limits, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            () = stopped(&mut stop) => break,
        };
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                // A transient accept failure (out of descriptors, a reset connection): go on.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection's error (reset, timed out head) concerns that client only.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
