//! A fault-injecting TCP proxy for tests and the client benchmark: added latency,
//! a bandwidth cap shared by all connections (one link), connection resets and
//! stalls (no more bytes either way, the sockets left open) in the middle of HTTP
//! request bodies, and blackouts (every connection reset, new ones refused). It reads just enough HTTP/1.1 framing to
//! cut a *request*, and counts the request-body bytes it let through, so tests can
//! measure what a client re-sent.
//!
//! Why not an existing crate: noxious (the Rust port of Toxiproxy) builds, but it
//! decides toxicity per connection, has no reset toxic (limit_data stops at a fixed
//! byte count), does not see requests on keep-alive connections, and counts nothing.

#![allow(dead_code)] // The benchmark uses a different subset than the tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Delay added to data in each direction (a round trip gets twice this).
    pub latency: Duration,
    /// Client-to-server bytes per second, shared by all connections.
    pub bandwidth: Option<u64>,
    /// Share (0..=1) of PUT requests reset after a random number of body bytes.
    pub reset_share: f64,
    /// A link that breaks every this many PUT-body bytes on average (exponential).
    pub reset_every: Option<u64>,
    /// Requests whose path starts with one of these are reset before reaching the server.
    pub reset_paths: Vec<String>,
    /// Share (0..=1) of PUT requests that stall after a random number of body
    /// bytes: nothing more is forwarded either way and both sockets stay open.
    pub stall_share: f64,
    /// PUT requests (by arrival, from 0) that stall halfway through their body.
    pub stall_nth: Vec<usize>,
    /// Until then the link is down: connections are reset, new ones refused.
    pub blackout_until: Option<Instant>,
    pub seed: u64,
}

/// One PUT request seen by the proxy.
#[derive(Debug, Clone)]
pub struct PutRecord {
    /// The request target: `/upload/{id}/{part}?offset=..&size=..`.
    pub target: String,
    pub content_length: u64,
    /// Body bytes delivered to the server.
    pub forwarded: u64,
    pub reset: bool,
}

impl PutRecord {
    /// `(part, offset, size)` of a chunk PUT.
    pub fn chunk(&self) -> Option<(u32, u64, u64)> {
        let (path, query) = self.target.split_once('?')?;
        let part = path.rsplit('/').next()?.parse().ok()?;
        let field = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Some((part, field("offset")?, field("size")?))
    }
}

#[derive(Default)]
struct Counters {
    upstream: AtomicU64,
    downstream: AtomicU64,
    put_body: AtomicU64,
    resets: AtomicU64,
    connections: AtomicU64,
    open: AtomicU64,
}

struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    /// When the shared link is free again (bandwidth cap).
    link_free_at: Mutex<Instant>,
    counters: Counters,
    puts: Mutex<Vec<PutRecord>>,
    /// PUT-body bytes parsed so far, and where the next `reset_every` break falls.
    body_parsed: Mutex<(u64, u64)>,
    stalls: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    fn in_blackout(&self) -> bool {
        lock(&self.faults)
            .blackout_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Waits until `n` more bytes fit through the capped link. The schedule is
    /// exact; the wait is skipped while it is less than a few timer ticks ahead,
    /// since a sleep of a fraction of a millisecond lasts a whole one and would
    /// cap a fast link far below its rate.
    async fn pace(&self, n: usize) {
        let Some(rate) = self.faults().bandwidth.filter(|r| *r > 0) else {
            return;
        };
        let now = Instant::now();
        let done = {
            let mut free = lock(&self.link_free_at);
            let start = (*free).max(now);
            *free = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free
        };
        if done > now + Duration::from_millis(4) {
            tokio::time::sleep_until(done).await;
        }
    }

    fn draw_gap(&self, mean: u64) -> u64 {
        let u: f64 = lock(&self.rng).gen_range(f64::EPSILON..1.0);
        ((-u.ln()) * mean as f64).max(1.0) as u64
    }
}

/// Receive buffer of the proxy's client-side sockets.
const RECV_BUFFER: u32 = 256 * 1024;

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1; connections are refused until [`set_upstream`](Self::set_upstream).
    pub async fn start(faults: Faults) -> FaultProxy {
        // A real path holds about its bandwidth-delay product, not the megabytes
        // a loopback socket would take in: with a small receive buffer, bytes
        // sent into a stalled connection stay unacknowledged at the sender, as
        // on a path that went black.
        let socket = tokio::net::TcpSocket::new_v4().expect("proxy socket");
        socket
            .set_recv_buffer_size(RECV_BUFFER)
            .expect("proxy receive buffer");
        socket
            .bind("127.0.0.1:0".parse().expect("loopback"))
            .expect("bind proxy");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(None),
            rng: Mutex::new(StdRng::seed_from_u64(faults.seed)),
            faults: Mutex::new(faults),
            link_free_at: Mutex::new(Instant::now()),
            counters: Counters::default(),
            puts: Mutex::new(Vec::new()),
            body_parsed: Mutex::new((0, 0)),
            stalls: AtomicU64::new(0),
        });
        shared.reset_break();
        let task = tokio::spawn(accept(listener, shared.clone()));
        FaultProxy { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Points the proxy at a server, given as `http://host:port`.
    pub fn set_upstream(&self, base: &str) {
        let addr = base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream must be http://ip:port");
        *lock(&self.shared.upstream) = Some(addr);
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
        self.shared.reset_break();
    }

    /// Request-body bytes of PUTs delivered to the server.
    pub fn put_body_bytes(&self) -> u64 {
        self.shared.counters.put_body.load(Ordering::SeqCst)
    }

    pub fn upstream_bytes(&self) -> u64 {
        self.shared.counters.upstream.load(Ordering::SeqCst)
    }

    pub fn resets(&self) -> u64 {
        self.shared.counters.resets.load(Ordering::SeqCst)
    }

    /// Requests stalled so far.
    pub fn stalls(&self) -> u64 {
        self.shared.stalls.load(Ordering::SeqCst)
    }

    /// Takes the link down for `duration` from now.
    pub fn black_out(&self, duration: Duration) {
        lock(&self.shared.faults).blackout_until = Some(Instant::now() + duration);
    }

    pub fn connections(&self) -> u64 {
        self.shared.counters.connections.load(Ordering::SeqCst)
    }

    /// Connections still open (a killed client's linger while the proxy drains them).
    pub fn open_connections(&self) -> u64 {
        self.shared.counters.open.load(Ordering::SeqCst)
    }

    pub fn puts(&self) -> Vec<PutRecord> {
        lock(&self.shared.puts).clone()
    }
}

impl Shared {
    fn reset_break(&self) {
        let mean = self.faults().reset_every;
        let mut parsed = lock(&self.body_parsed);
        parsed.1 = match mean {
            Some(mean) => parsed.0 + self.draw_gap(mean),
            None => u64::MAX,
        };
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it ends them all.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.counters.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(handle(client, shared.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Closed,
    Reset,
    Stall,
}

enum Piece {
    /// Bytes to deliver; `Some(i)` when they are body bytes of `puts[i]`.
    Data(Vec<u8>, Option<usize>),
    Eof,
    Reset,
    Stall,
}

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(client: TcpStream, shared: Arc<Shared>) {
    shared.counters.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(shared.clone());
    let Some(addr) = *lock(&shared.upstream) else {
        return;
    };
    if shared.in_blackout() {
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(upstream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = pump(client_read, upstream_write, shared.clone(), Dir::Up);
    let down = pump(upstream_read, client_write, shared.clone(), Dir::Down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // A reset on either side drops both sockets at once (linger 0: RST).
    while !(up_done && down_done) {
        tokio::select! {
            end = &mut up, if !up_done => {
                if end == End::Reset { return; }
                if end == End::Stall {
                    // Nothing more either way; the sockets stay open until the proxy goes.
                    std::future::pending::<()>().await;
                }
                up_done = true;
            }
            end = &mut down, if !down_done => {
                if end != End::Eof { return; }
                down_done = true;
            }
        }
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dir: Dir,
) -> End {
    // Small, so a capped link pushes back on the sender as a real one would, yet
    // enough to keep bandwidth x latency in flight (up to 1 MiB per connection).
    let (tx, mut rx) = mpsc::channel::<(Instant, Piece)>(16);
    let reader = {
        let shared = shared.clone();
        async move {
            let mut parser = Parser::Head(Vec::new());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send((Instant::now(), Piece::Eof)).await;
                        return;
                    }
                    Ok(n) => n,
                };
                let deliver_at = Instant::now() + shared.faults().latency;
                let pieces = match dir {
                    Dir::Up => parser.feed(&buf[..n], &shared),
                    Dir::Down => vec![Piece::Data(buf[..n].to_vec(), None)],
                };
                for piece in pieces {
                    let reset = matches!(piece, Piece::Reset | Piece::Stall);
                    if reset {
                        let _ = from.as_ref().set_zero_linger();
                    }
                    if tx.send((deliver_at, piece)).await.is_err() || reset {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, piece)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if shared.in_blackout() {
                let _ = to.as_ref().set_zero_linger();
                shared.counters.resets.fetch_add(1, Ordering::SeqCst);
                return End::Reset;
            }
            match piece {
                Piece::Stall => {
                    shared.stalls.fetch_add(1, Ordering::SeqCst);
                    return End::Stall;
                }
                Piece::Data(bytes, put) => {
                    for slice in bytes.chunks(16 * 1024) {
                        if dir == Dir::Up {
                            shared.pace(slice.len()).await;
                        }
                        if to.write_all(slice).await.is_err() {
                            return End::Closed;
                        }
                        let n = slice.len() as u64;
                        match dir {
                            Dir::Up => shared.counters.upstream.fetch_add(n, Ordering::SeqCst),
                            Dir::Down => shared.counters.downstream.fetch_add(n, Ordering::SeqCst),
                        };
                        if let Some(i) = put {
                            shared.counters.put_body.fetch_add(n, Ordering::SeqCst);
                            if let Some(record) = lock(&shared.puts).get_mut(i) {
                                record.forwarded += n;
                            }
                        }
                    }
                }
                Piece::Eof => {
                    let _ = to.shutdown().await;
                    return End::Eof;
                }
                Piece::Reset => {
                    let _ = to.as_ref().set_zero_linger();
                    shared.counters.resets.fetch_add(1, Ordering::SeqCst);
                    return End::Reset;
                }
            }
        }
        End::Closed
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        end = &mut writer => end,
        () = &mut reader => (&mut writer).await,
    }
}

/// Just enough of HTTP/1.1 request framing (Content-Length bodies) to cut requests.
enum Parser {
    Head(Vec<u8>),
    Body {
        remaining: u64,
        /// Body bytes still to forward before the reset (or stall), for a request chosen to fail.
        cut_after: Option<u64>,
        /// The chosen failure is a stall, not a reset.
        stall: bool,
        put: Option<usize>,
    },
    /// Framing this parser does not follow (chunked bodies): pass everything through.
    Opaque,
}

impl Parser {
    fn feed(&mut self, mut data: &[u8], shared: &Shared) -> Vec<Piece> {
        let mut out = Vec::new();
        while !data.is_empty() {
            match self {
                Parser::Opaque => {
                    out.push(Piece::Data(data.to_vec(), None));
                    break;
                }
                Parser::Head(buf) => {
                    let had = buf.len();
                    buf.extend_from_slice(data);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > 64 * 1024 {
                            out.push(Piece::Data(std::mem::take(buf), None));
                            *self = Parser::Opaque;
                        }
                        break;
                    };
                    let head_len = end + 4;
                    data = &data[head_len - had..];
                    let head = buf[..head_len].to_vec();
                    match self.start_request(&head, shared) {
                        Some(next) => {
                            out.push(Piece::Data(head, None));
                            *self = next;
                        }
                        None => {
                            out.push(Piece::Reset);
                            return out;
                        }
                    }
                }
                Parser::Body {
                    remaining,
                    cut_after,
                    stall,
                    put,
                } => {
                    let mut n = (*remaining).min(data.len() as u64);
                    let mut reset = false;
                    if let Some(cut) = cut_after {
                        if *cut < n {
                            n = *cut;
                            if *stall {
                                out.push(Piece::Data(data[..n as usize].to_vec(), *put));
                                out.push(Piece::Stall);
                                return out;
                            }
                            reset = true;
                        }
                        *cut -= n;
                    }
                    if put.is_some() {
                        // The link-wide break (reset_every) may fall inside these bytes.
                        let mut parsed = lock(&shared.body_parsed);
                        if parsed.0 + n > parsed.1 {
                            n = parsed.1 - parsed.0;
                            reset = true;
                        }
                        parsed.0 += n;
                    }
                    let take = n as usize;
                    out.push(Piece::Data(data[..take].to_vec(), *put));
                    if reset {
                        if let Some(i) = *put {
                            if let Some(record) = lock(&shared.puts).get_mut(i) {
                                record.reset = true;
                            }
                        }
                        if shared.faults().reset_every.is_some() {
                            shared.reset_break();
                        }
                        out.push(Piece::Reset);
                        return out;
                    }
                    *remaining -= n;
                    data = &data[take..];
                    if *remaining == 0 {
                        *self = Parser::Head(Vec::new());
                    }
                }
            }
        }
        out
    }

    /// Decides a request's fate from its head; `None` resets it at once.
    fn start_request(&self, head: &[u8], shared: &Shared) -> Option<Parser> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let target = request_line.next().unwrap_or_default().to_owned();
        let mut content_length = 0u64;
        let mut chunked = false;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                if name == "content-length" {
                    content_length = value.trim().parse().unwrap_or(0);
                } else if name == "transfer-encoding"
                    && value.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        let faults = shared.faults();
        if faults
            .reset_paths
            .iter()
            .any(|p| target.starts_with(p.as_str()))
        {
            return None;
        }
        if chunked {
            return Some(Parser::Opaque);
        }
        if content_length == 0 {
            return Some(Parser::Head(Vec::new()));
        }
        let mut put = None;
        let mut cut_after = None;
        let mut stall = false;
        if method == "PUT" {
            let mut puts = lock(&shared.puts);
            puts.push(PutRecord {
                target,
                content_length,
                forwarded: 0,
                reset: false,
            });
            put = Some(puts.len() - 1);
            let mut rng = lock(&shared.rng);
            if faults.stall_nth.contains(&(puts.len() - 1)) {
                cut_after = Some(content_length / 2);
                stall = true;
            } else if faults.reset_share > 0.0 && rng.gen_bool(faults.reset_share.min(1.0)) {
                cut_after = Some(rng.gen_range(0..content_length));
            } else if faults.stall_share > 0.0 && rng.gen_bool(faults.stall_share.min(1.0)) {
                cut_after = Some(rng.gen_range(0..content_length));
                stall = true;
            }
        }
        Some(Parser::Body {
            remaining: content_length,
            cut_after,
            stall,
            put,
        })
    }
}
