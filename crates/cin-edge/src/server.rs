//! The HTTP listener: accepts connections and serves each on its own task, kept
//! in one set so that shutdown can first drain them (each finishes its request
//! in flight, then closes) and, past the grace period, cancel them.
//!
//! No peer can hold the POP: a request head must arrive in time, a body read
//! waits at most the body idle time (see [`crate::body::IdleBody`]), an idle
//! keep-alive connection is closed, a response the client stops reading is
//! dropped, and the number of connections is bounded (below the open-file limit)
//! with the longest-idle connection giving way to a new one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::body::IdleBody;
use crate::observability::names;
use crate::worker::stopped;

/// The listener's deadlines and limits, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub head_timeout: Duration,
    pub body_idle: Duration,
    pub keep_alive: Duration,
    pub max_connections: usize,
}

/// Descriptors kept for everything but client connections: part files, the
/// metadata store, final-store and webhook connections.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Connections past the limit that are still answered (503, or health checks),
/// so that an operator's probe gets through a POP whose connections are all busy.
const OVERFLOW_CONNECTIONS: usize = 64;

/// Paths answered even past the connection limit.
pub const ALWAYS_SERVED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl ServerLimits {
    /// Lowers `max_connections` to what the open-file limit allows, after
    /// raising that limit as far as the process may.
    pub fn fitted_to_descriptors(mut self) -> Self {
        let descriptors = raise_open_file_limit();
        let fits = descriptors
            .saturating_sub(RESERVED_DESCRIPTORS + OVERFLOW_CONNECTIONS as u64)
            .max(1);
        if (self.max_connections as u64) > fits {
            tracing::warn!(
                configured = self.max_connections,
                open_file_limit = descriptors,
                serving = fits,
                "server.max_connections lowered to fit the open-file limit; raise it (LimitNOFILE=, ulimit -n) to serve more"
            );
            self.max_connections = fits as usize;
        }
        self
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

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
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    mut draining: watch::Receiver<bool>,
) -> Connections
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let registry = Arc::new(Registry::new(limits));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut draining) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => {
                        // An answer's head and a small body leave at once, not
                        // 40 ms apart (Nagle's algorithm against a delayed ACK).
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY could not be set");
                        }
                        stream
                    }
                    Err(e) => {
                        // Out of descriptors, most likely: give closing connections a moment.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(connection) = registry.admit() else {
                    metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => "over_limit").increment(1);
                    drop(stream);
                    continue;
                };
                connections.spawn(serve_connection(
                    stream,
                    service.clone(),
                    connection,
                    tls.clone(),
                    draining.clone(),
                ));
            }
        }
    }
    Connections(connections)
}

/// Every open connection, for the limit and for choosing which one gives way.
struct Registry {
    limits: ServerLimits,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

impl Registry {
    fn new(limits: ServerLimits) -> Self {
        Registry {
            limits,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers a new connection. At the limit, the longest-idle connection is
    /// told to close; when none is idle the new one is served as overflow
    /// (health checks only), and past the overflow it is refused.
    fn admit(self: &Arc<Self>) -> Option<Connection> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let regular = open.values().filter(|c| !c.overflow).count();
        let overflow = if regular < self.limits.max_connections {
            false
        } else if let Some(idlest) = open
            .values()
            .filter(|c| !c.overflow && c.is_waiting_for_a_request())
            .filter(|c| !c.evict.is_cancelled())
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire))
        {
            idlest.evict.cancel();
            false
        } else if open.len() - regular < OVERFLOW_CONNECTIONS {
            true
        } else {
            return None;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let state = Arc::new(ConnectionState {
            overflow,
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now),
            // A new connection owes its first head from the moment it opens.
            head_started_ms: AtomicU64::new(now),
            write_blocked_since_ms: AtomicU64::new(NEVER),
            waited_for_request: AtomicBool::new(false),
            changed: Notify::new(),
            evict: CancellationToken::new(),
        });
        open.insert(id, state.clone());
        metrics::gauge!(names::CONNECTIONS_OPEN).set(open.len() as f64);
        Some(Connection {
            id,
            registry: self.clone(),
            state,
        })
    }
}

const NEVER: u64 = u64::MAX;

/// What the connection's own task needs to know to enforce its deadlines.
struct ConnectionState {
    /// Served past the limit: only health checks get through.
    overflow: bool,
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection opened).
    idle_since_ms: AtomicU64,
    /// When the first byte of the next request head arrived, or NEVER.
    head_started_ms: AtomicU64,
    /// Since when a write has been waiting for the peer to read, or NEVER.
    write_blocked_since_ms: AtomicU64,
    /// A read found nothing more to read while no request was in flight. Until
    /// then a new connection's request may be sitting unread in its socket, so
    /// it is not idle, only not yet looked at.
    waited_for_request: AtomicBool,
    /// Wakes the connection's task to look at its deadlines again.
    changed: Notify,
    /// Tells the connection to close (it is idle and a new one needs its place).
    evict: CancellationToken,
}

impl ConnectionState {
    /// Idle: no request in flight, and none waiting unread.
    fn is_waiting_for_a_request(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.waited_for_request.load(Ordering::Acquire)
    }
}

/// A registered connection; leaving the registry when dropped.
struct Connection {
    id: u64,
    registry: Arc<Registry>,
    state: Arc<ConnectionState>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&self.id);
        metrics::gauge!(names::CONNECTIONS_OPEN).set(open.len() as f64);
    }
}

impl Connection {
    /// The earliest moment this connection must be closed at, and why; None
    /// while a request is in flight and nothing waits on the peer.
    fn deadline(&self) -> Option<(u64, &'static str)> {
        let limits = &self.registry.limits;
        let state = &self.state;
        let blocked = state.write_blocked_since_ms.load(Ordering::Acquire);
        if blocked != NEVER {
            return Some((blocked + ms(limits.body_idle), "write_stalled"));
        }
        if state.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = state.head_started_ms.load(Ordering::Acquire);
        if head != NEVER {
            return Some((head + ms(limits.head_timeout), "head_timeout"));
        }
        let idle = state.idle_since_ms.load(Ordering::Acquire);
        Some((idle + ms(limits.keep_alive), "idle"))
    }

    /// Waits until the connection's deadline passes (or forever if it has none).
    async fn expired(&self) -> &'static str {
        loop {
            let changed = self.state.changed.notified();
            match self.deadline() {
                Some((at, reason)) => {
                    let now = self.registry.now_ms();
                    if now >= at {
                        return reason;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

async fn serve_connection<S>(
    stream: TcpStream,
    service: S,
    connection: Connection,
    tls: Option<TlsAcceptor>,
    draining: watch::Receiver<bool>,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let Some(acceptor) = tls else {
        return serve_http(stream, false, service, connection, draining).await;
    };
    // The handshake is part of the first request head: it has the head's time.
    let head_timeout = connection.registry.limits.head_timeout;
    let handshake = tokio::select! {
        shaken = tokio::time::timeout(head_timeout, acceptor.accept(stream)) => shaken,
        _ = connection.state.evict.cancelled() => {
            metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => "evicted").increment(1);
            return;
        }
    };
    match handshake {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_http(stream, h2, service, connection, draining).await;
        }
        Ok(Err(e)) => {
            metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => "tls_handshake").increment(1);
            tracing::debug!(error = %e, "a TLS handshake failed");
        }
        Err(_) => {
            metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => "head_timeout").increment(1);
        }
    }
}

/// Serves HTTP/1.1 (or HTTP/2, as ALPN chose) on `io` until the connection
/// ends, its deadline passes, it is evicted, or the POP drains.
async fn serve_http<IO, S>(
    io: IO,
    h2: bool,
    service: S,
    connection: Connection,
    mut draining: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let state = connection.state.clone();
    let registry = connection.registry.clone();
    let body_idle = registry.limits.body_idle;
    let max_connections = registry.limits.max_connections;
    let io = TrackedIo {
        inner: io,
        state: state.clone(),
        registry: registry.clone(),
    };
    let hyper_service =
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let in_flight = InFlight::start(state.clone(), registry.clone());
            let refused = state.overflow && !ALWAYS_SERVED.contains(&request.uri().path());
            let request = request.map(|b| Body::new(IdleBody::new(b, body_idle)));
            let answered = tower::ServiceExt::oneshot(service.clone(), request);
            async move {
                let response = if refused {
                    metrics::counter!(names::REQUESTS_SHED, "reason" => "connections").increment(1);
                    over_limit_response(max_connections)
                } else {
                    answered.await?
                };
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(TrackedBody {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        });
    // The same watch over either protocol's connection (their types differ).
    macro_rules! drive {
        ($served:expr) => {{
            let served = $served;
            tokio::pin!(served);
            tokio::select! {
                _ = served.as_mut() => return,
                reason = connection.expired() => {
                    metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
                    tracing::debug!(reason, "closing a connection");
                    return;
                }
                _ = connection.state.evict.cancelled() => {
                    metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => "evicted").increment(1);
                    return;
                }
                _ = stopped(&mut draining) => served.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = served => {}
                reason = connection.expired() => {
                    metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
                }
            }
        }};
    }
    if h2 {
        drive!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), hyper_service)
        );
    } else {
        drive!(hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), hyper_service)
            .with_upgrades());
    }
}

fn over_limit_response(max_connections: usize) -> Response {
    let body = serde_json::json!({
        "error": {
            "code": "overloaded",
            "message": format!(
                "this POP is serving its maximum of {max_connections} connections, all busy; try again in a moment"
            ),
        }
    });
    let mut response = (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(body),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Counts a request in flight from its head until its response body is done.
struct InFlight {
    state: Arc<ConnectionState>,
    registry: Arc<Registry>,
}

impl InFlight {
    fn start(state: Arc<ConnectionState>, registry: Arc<Registry>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_started_ms.store(NEVER, Ordering::Release);
        state.waited_for_request.store(false, Ordering::Release);
        state.changed.notify_one();
        InFlight { state, registry }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state
                .idle_since_ms
                .store(self.registry.now_ms(), Ordering::Release);
        }
        self.state.changed.notify_one();
    }
}

/// A response body that keeps its request counted until it is sent or dropped.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket, noting when a request head starts arriving and
/// when writes wait on a peer that does not read.
struct TrackedIo<IO> {
    inner: IO,
    state: Arc<ConnectionState>,
    registry: Arc<Registry>,
}

impl<IO> TrackedIo<IO> {
    fn note_write<T>(&self, result: &Poll<io::Result<T>>) {
        let blocked = &self.state.write_blocked_since_ms;
        match result {
            Poll::Pending => {
                if blocked.load(Ordering::Acquire) == NEVER {
                    blocked.store(self.registry.now_ms(), Ordering::Release);
                    self.state.changed.notify_one();
                }
            }
            Poll::Ready(_) => {
                if blocked.load(Ordering::Acquire) != NEVER {
                    blocked.store(NEVER, Ordering::Release);
                    self.state.changed.notify_one();
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let state = &self.state;
        if result.is_pending() && state.in_flight.load(Ordering::Acquire) == 0 {
            state.waited_for_request.store(true, Ordering::Release);
        }
        if buf.filled().len() > before
            && state.in_flight.load(Ordering::Acquire) == 0
            && state.head_started_ms.load(Ordering::Acquire) == NEVER
        {
            state
                .head_started_ms
                .store(self.registry.now_ms(), Ordering::Release);
            state.changed.notify_one();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
