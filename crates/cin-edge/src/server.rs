//! The HTTP listener: accepts connections and serves each on its own task, kept
//! in one set so that shutdown can first drain them (each finishes its request
//! in flight, then closes) and, past the grace period, cancel them.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::worker::stopped;

/// Connections being served.
pub struct Connections(JoinSet<()>);

impl Connections {
    /// Waits up to `grace` for every connection to finish its request in flight;
    /// then cancels the rest (a cancelled upload keeps what it made durable).
    /// Returns how many were cancelled.
    pub async fn drain(mut self, grace: Duration) -> usize {
        let drained =
            tokio::time::timeout(grace, async { while self.0.join_next().await.is_some() {} })
                .await;
        if drained.is_ok() {
            return 0;
        }
        let cancelled = self.0.len();
        self.0.abort_all();
        while self.0.join_next().await.is_some() {}
        cancelled
    }
}

/// Serves `service` on `listener` until `draining` turns true; then stops
/// accepting and asks every open connection to close after its current request.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    mut draining: watch::Receiver<bool>,
) -> Connections
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut connections = JoinSet::new();
    let for_connections = draining.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut draining) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, most likely: give closing connections a moment.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                connections.spawn(serve_connection(stream, service.clone(), for_connections.clone()));
            }
        }
    }
    Connections(connections)
}

async fn serve_connection<S>(
    stream: tokio::net::TcpStream,
    service: S,
    mut draining: watch::Receiver<bool>,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let hyper_service =
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            tower::ServiceExt::oneshot(service.clone(), request.map(Body::new))
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), hyper_service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stopped(&mut draining) => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}
