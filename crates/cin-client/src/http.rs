//! [`Transport`] over HTTP, speaking the POP's Filestack-compatible multipart API.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::adaptive::PROGRESS_PIECE;
use crate::error::{ClientError, TransportError};
use crate::policy::{Call, Security, SignedPolicy};
use crate::transport::{
    ChunkAck, ChunkDeadlines, ChunkRequest, CompleteRequest, Completed, StartRequest, Started,
    Transport, UploadGrant, CHECK_BLOCK,
};

/// Header by which a POP suggests its preferred largest chunk, in bytes.
pub const CHUNK_SIZE_HINT_HEADER: &str = "cin-chunk-size-hint";

/// How long sent bytes of a control call (start, complete, a question) may go
/// unacknowledged before its connection is dead. Chunks have their own limit,
/// from [`ChunkDeadlines::kernel_limit`].
const CONTROL_UNACKNOWLEDGED: Duration = Duration::from_secs(2);

/// Small control calls (start, complete, metadata) get this long.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// A grant this close to its expiry is renewed rather than used: the chunk
/// might arrive after it (or the clocks differ a little).
const GRANT_MARGIN_SECS: u64 = 120;

/// A `Retry-After` longer than this is taken as this: the retry deadline, not
/// the POP, bounds how long an upload waits.
const MAX_RETRY_AFTER_SECS: u64 = 300;

#[derive(Debug, Clone)]
pub struct HttpTransport {
    http: reqwest::Client,
    /// Clients for chunks by their limit on unacknowledged bytes (none: the
    /// kernel's own), each with its connection pool; see [`ChunkDeadlines::kernel_limit`].
    chunk_clients: Arc<Mutex<HashMap<Option<Duration>, reqwest::Client>>>,
    apikey: String,
    /// Policies for apps that require security.
    security: Security,
    /// Upload grants by upload id, from start and upload answers.
    grants: Arc<Mutex<HashMap<String, UploadGrant>>>,
}

impl HttpTransport {
    pub fn new(apikey: impl Into<String>) -> Result<Self, ClientError> {
        Ok(HttpTransport {
            http: client(Some(CONTROL_UNACKNOWLEDGED))
                .map_err(|e| ClientError::Invalid(format!("cannot build the HTTP client: {e}")))?,
            chunk_clients: Arc::default(),
            apikey: apikey.into(),
            security: Security::None,
            grants: Arc::default(),
        })
    }

    /// Sends policies as `security` says, on every call that needs one.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The query naming the policy for `call` on `handle`, if one is sent.
    fn policy_query(&self, call: Call, handle: &str) -> Vec<(&'static str, String)> {
        match self.security.for_call(call, Some(handle)) {
            Some(SignedPolicy { policy, signature }) => {
                vec![("policy", policy), ("signature", signature)]
            }
            None => Vec::new(),
        }
    }

    /// `GET /api/file/{handle}`, from byte `from` on (a `Range` request when
    /// `from` > 0). The answer's status is 200, 206 or 416; its body streams,
    /// with no deadline of its own (a file still uploading arrives as it does).
    pub async fn get_file(
        &self,
        pop: &str,
        handle: &str,
        from: u64,
    ) -> Result<reqwest::Response, TransportError> {
        let mut request = self
            .http
            .get(url(pop, &format!("/api/file/{handle}")))
            .query(&self.policy_query(Call::Read, handle));
        if from > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        // The answer's head, and an error's body, get the control deadline;
        // a file's body does not (see above), so no request-wide timeout.
        let resp = tokio::time::timeout(CONTROL_TIMEOUT, request.send())
            .await
            .map_err(|_| TransportError::Timeout(CONTROL_TIMEOUT))?
            .map_err(|e| from_reqwest(e, CONTROL_TIMEOUT))?;
        if resp.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        tokio::time::timeout(CONTROL_TIMEOUT, check(resp, CONTROL_TIMEOUT))
            .await
            .map_err(|_| TransportError::Timeout(CONTROL_TIMEOUT))?
    }

    /// `DELETE /api/file/{handle}?key=`: the POP's answer (`handle`, `status`).
    pub async fn delete_file(&self, pop: &str, handle: &str) -> Result<Value, TransportError> {
        let mut query = vec![("key", self.apikey.clone())];
        query.extend(self.policy_query(Call::Remove, handle));
        let request = self
            .http
            .delete(url(pop, &format!("/api/file/{handle}")))
            .query(&query);
        json_answer(request, CONTROL_TIMEOUT).await
    }

    /// The client whose connections end when sent bytes go unacknowledged for `limit`.
    fn chunk_client(&self, limit: Option<Duration>) -> Result<reqwest::Client, TransportError> {
        let mut clients = self.chunk_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&limit) {
            return Ok(client.clone());
        }
        let built = client(limit)
            .map_err(|e| TransportError::Network(format!("cannot build the HTTP client: {e}")))?;
        clients.insert(limit, built.clone());
        Ok(built)
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, HashMap<String, UploadGrant>> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember_grant(&self, upload_id: &str, grant: Option<UploadGrant>) {
        if let Some(grant) = grant {
            self.grants().insert(upload_id.to_owned(), grant);
        }
    }

    /// The chunk's URL from the upload grant, while that is fresh.
    fn granted_url(&self, chunk: &ChunkRequest) -> Option<String> {
        let grant = self.grants().get(&chunk.upload_id).cloned()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now + GRANT_MARGIN_SECS >= grant.expires {
            return None;
        }
        let query = serde_urlencoded::to_string([
            ("offset", chunk.offset.to_string()),
            ("size", chunk.body.len().to_string()),
            ("crc32c", chunk.crc32c.clone()),
            ("grant", "upload".to_owned()),
            ("expires", grant.expires.to_string()),
            ("signature", grant.signature),
        ])
        .ok()?;
        Some(format!(
            "{}/{}?{query}&{}",
            grant.url,
            chunk.part,
            block_query(chunk)
        ))
    }

    /// Asks the POP for the chunk's URL (and a fresh upload grant).
    async fn ask_for_url(
        &self,
        pop: &str,
        chunk: &ChunkRequest,
        timeout: Duration,
    ) -> Result<(String, Value), TransportError> {
        let body = json!({
            "apikey": self.apikey,
            "upload_id": chunk.upload_id,
            "part": chunk.part,
            "size": chunk.body.len(),
            "crc32c": chunk.crc32c,
            "offset": chunk.offset,
            "fii": true,
            "store": {"location": "s3"},
        });
        let (grant, _): (Value, _) = self
            .post(url(pop, "/multipart/upload"), body, timeout)
            .await?;
        // The block sums ride along unsigned: the POP checks them against the bytes.
        let put_url = grant["url"]
            .as_str()
            .map(|url| format!("{url}&{}", block_query(chunk)))
            .ok_or_else(|| TransportError::Protocol(format!("no upload url in {grant}")))?;
        self.remember_grant(
            &chunk.upload_id,
            serde_json::from_value(grant["upload_grant"].clone()).ok(),
        );
        Ok((put_url, grant))
    }

    async fn post<T: DeserializeOwned>(
        &self,
        url: String,
        body: Value,
        timeout: Duration,
    ) -> Result<(T, reqwest::header::HeaderMap), TransportError> {
        let resp = self
            .http
            .post(url)
            .json(&body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| from_reqwest(e, timeout))?;
        let resp = check(resp, timeout).await?;
        let headers = resp.headers().clone();
        let value = resp
            .json::<T>()
            .await
            .map_err(|e| match from_reqwest(e, timeout) {
                TransportError::Network(m) => TransportError::Protocol(m),
                other => other,
            })?;
        Ok((value, headers))
    }
}

/// The query naming a chunk's block checksums.
fn block_query(chunk: &ChunkRequest) -> String {
    serde_urlencoded::to_string([
        ("block_size", CHECK_BLOCK.to_string()),
        ("block_crc32c", chunk.block_crc32c.clone()),
    ])
    .unwrap_or_default()
}

fn url(pop: &str, path: &str) -> String {
    format!("{}{}", pop.trim_end_matches('/'), path)
}

/// A client. Bytes the peer does not acknowledge for `unacknowledged` mean a
/// dead path: the kernel, which sees every acknowledgment, ends the
/// connection, so the request is retried at once on a fresh one.
fn client(unacknowledged: Option<Duration>) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        // A POP that does not accept a connection in 5 s is down or far away:
        // better to fail fast and retry (or fail over) than to wait.
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("cin/", env!("CARGO_PKG_VERSION")));
    if let Some(limit) = unacknowledged {
        builder = builder.tcp_user_timeout(limit);
    }
    builder.build()
}

/// reqwest's own message hides the cause ("error sending request"); the chain names it.
fn from_reqwest(e: reqwest::Error, timeout: Duration) -> TransportError {
    let mut chain = std::iter::successors(std::error::Error::source(&e), |cause| cause.source());
    // The kernel ended a connection whose bytes went unacknowledged: a dead
    // path, not a slow one (reqwest would call it a timeout too).
    if chain.any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    }) {
        return TransportError::Stalled(CONTROL_UNACKNOWLEDGED);
    }
    if e.is_timeout() {
        return TransportError::Timeout(timeout);
    }
    let mut message = e.to_string();
    // rustls reading a plain HTTP answer where a TLS record should be: the
    // message names the record type it choked on, nothing a user can act on.
    let plain_http = std::iter::successors(std::error::Error::source(&e), |cause| cause.source())
        .any(|cause| cause.to_string().contains("InvalidContentType"));
    if plain_http {
        return TransportError::PlainHttp {
            url: e.url().map(|u| u.to_string()).unwrap_or_default(),
        };
    }
    // No connection at all: the innermost cause ("Connection refused") and
    // where, rather than the client library's layers.
    if e.is_connect() {
        let cause = std::iter::successors(std::error::Error::source(&e), |cause| cause.source())
            .last()
            .map(|cause| cause.to_string())
            .unwrap_or_else(|| message.clone());
        let at = e
            .url()
            .map(|u| format!("{}://{}", u.scheme(), u.authority()))
            .unwrap_or_default();
        return TransportError::Network(format!(
            "cannot connect to {at}: {cause} (is a POP running there?)"
        ));
    }
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    TransportError::Network(message)
}

/// Sends a small control request within `timeout` and reads its JSON answer.
async fn json_answer(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<Value, TransportError> {
    let resp = request
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| from_reqwest(e, timeout))?;
    let resp = check(resp, timeout).await?;
    resp.json()
        .await
        .map_err(|e| TransportError::Protocol(e.to_string()))
}

/// Turns a non-2xx answer into its `{"error": {"code", "message"}}`.
async fn check(
    resp: reqwest::Response,
    timeout: Duration,
) -> Result<reqwest::Response, TransportError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)));
    let answered_at = resp.url().clone();
    let text = resp.text().await.map_err(|e| from_reqwest(e, timeout))?;
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    let pop_code = error.and_then(|e| e["code"].as_str());
    // A 404 that is no answer of the POP's API (or its own "no such route"):
    // the URL's path is wrong, which no handle or retry can fix.
    if status == reqwest::StatusCode::NOT_FOUND && pop_code.is_none_or(|c| c == "route_not_found") {
        let mut url = answered_at;
        url.set_query(None);
        return Err(TransportError::WrongPath {
            url: url.to_string(),
        });
    }
    let code = pop_code
        .map(str::to_owned)
        .unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let message = error
        .and_then(|e| e["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| text.chars().take(200).collect());
    Err(TransportError::Status {
        status: status.as_u16(),
        code,
        message,
        retry_after,
    })
}

fn hint_header(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get(CHUNK_SIZE_HINT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &u64| n > 0)
}

/// When a request body last made progress, and when it was all handed over.
#[derive(Clone)]
struct Progress(Arc<Mutex<(Instant, Option<Instant>)>>);

impl Progress {
    fn new() -> Self {
        Progress(Arc::new(Mutex::new((Instant::now(), None))))
    }

    fn get(&self) -> (Instant, Option<Instant>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn moved(&self, finished: bool) {
        let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        p.0 = now;
        if finished {
            p.1 = Some(now);
        }
    }

    /// Resolves once the body has made no progress for `deadlines.stall`, or no
    /// answer came `deadlines.answer` after the whole body was sent; gives how
    /// long it waited.
    async fn stalled(&self, deadlines: ChunkDeadlines) -> Duration {
        loop {
            let (last, finished) = self.get();
            let (since, allowed) = match finished {
                Some(at) => (at, deadlines.answer),
                None => (last, deadlines.stall),
            };
            if since.elapsed() >= allowed {
                return allowed;
            }
            tokio::time::sleep_until((since + allowed).into()).await;
        }
    }
}

/// A chunk's bytes in [`PROGRESS_PIECE`]s; the connection taking one is progress.
struct Pieces {
    rest: Bytes,
    progress: Progress,
}

impl Stream for Pieces {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(PROGRESS_PIECE as usize);
        let piece = self.rest.split_to(n);
        // The last piece handed over: from now on the answer is awaited.
        let finished = self.rest.is_empty();
        self.progress.moved(finished);
        Poll::Ready(Some(Ok(piece)))
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn start(&self, pop: &str, req: &StartRequest) -> Result<Started, TransportError> {
        let mut body = json!({
            "apikey": self.apikey,
            "filename": req.filename,
            "mimetype": req.mimetype,
            "size": req.size,
            "store": req.store,
            "fii": true,
        });
        if let Some(signed) = self.security.for_call(Call::Store, None) {
            body["policy"] = json!(signed.policy);
            body["signature"] = json!(signed.signature);
        }
        let (started, _): (Started, _) = self
            .post(url(pop, "/multipart/start"), body, CONTROL_TIMEOUT)
            .await?;
        self.remember_grant(&started.upload_id, started.upload_grant.clone());
        Ok(started)
    }

    async fn send_chunk(
        &self,
        pop: &str,
        chunk: &ChunkRequest,
        deadlines: ChunkDeadlines,
    ) -> Result<ChunkAck, TransportError> {
        let timeout = deadlines.total;
        let began = Instant::now();
        let granted = self.granted_url(chunk);
        let from_grant = granted.is_some();
        let (put_url, answer) = match granted {
            Some(put_url) => (put_url, Value::Null),
            None => self.ask_for_url(pop, chunk, deadlines.answer).await?,
        };
        let progress = Progress::new();
        let client = self.chunk_client(deadlines.kernel_limit)?;
        let mut put = client
            .put(&put_url)
            // The body streams in pieces so that its progress shows; the length
            // is declared so it is not sent chunked.
            .header(reqwest::header::CONTENT_LENGTH, chunk.body.len())
            .body(reqwest::Body::wrap_stream(Pieces {
                rest: chunk.body.clone(),
                progress: progress.clone(),
            }));
        if let Some(headers) = answer["headers"].as_object() {
            for (name, value) in headers {
                if let Some(value) = value.as_str() {
                    put = put.header(name.as_str(), value);
                }
            }
        }
        // The whole exchange shares one deadline.
        let left = timeout
            .saturating_sub(began.elapsed())
            .max(Duration::from_millis(1));
        let resp = tokio::select! {
            sent = put.timeout(left).send() => sent.map_err(|e| match from_reqwest(e, timeout) {
                TransportError::Stalled(_) => TransportError::Stalled(deadlines.kernel_limit.unwrap_or(timeout)),
                other => other,
            })?,
            // Dropping the request drops its connection: the retry gets a fresh one.
            stalled = progress.stalled(deadlines) => return Err(TransportError::Stalled(stalled)),
        };
        let resp = match check(resp, timeout).await {
            // Refused by signature or expiry: the next attempt asks for a URL,
            // which renews the grant.
            Err(TransportError::Status { status: 403, .. }) if from_grant => {
                self.grants().remove(&chunk.upload_id);
                return Err(TransportError::Status {
                    status: 403,
                    code: "url_expired".into(),
                    message: "the upload grant was refused; asking for a new one".into(),
                    retry_after: None,
                });
            }
            other => other?,
        };
        let hint = hint_header(resp.headers())
            .or_else(|| answer["chunk_size_hint"].as_u64().filter(|&n| n > 0));
        let answer_wait = progress.get().1.map(|handed_over| handed_over.elapsed());
        // Read the (tiny) body so the connection goes back to the pool.
        resp.bytes().await.map_err(|e| from_reqwest(e, timeout))?;
        Ok(ChunkAck {
            size_hint: hint,
            answer_wait,
        })
    }

    async fn received(
        &self,
        _pop: &str,
        upload_id: &str,
        part: u32,
        timeout: Duration,
    ) -> Result<Vec<(u64, u64)>, TransportError> {
        // Asked with the upload grant; without one there is nothing to ask with.
        let Some(grant) = self.grants().get(upload_id).cloned() else {
            return Ok(Vec::new());
        };
        let request = self.http.get(format!("{}/{part}", grant.url)).query(&[
            ("grant", "upload".to_owned()),
            ("expires", grant.expires.to_string()),
            ("signature", grant.signature),
        ]);
        let answer = json_answer(request, timeout).await?;
        let ranges = answer["received"]
            .as_array()
            .map(|ranges| {
                ranges
                    .iter()
                    .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ranges)
    }

    async fn complete(
        &self,
        pop: &str,
        req: &CompleteRequest,
    ) -> Result<Completed, TransportError> {
        let body = json!({
            "apikey": self.apikey,
            "upload_id": req.upload_id,
            "filename": req.filename,
            "mimetype": req.mimetype,
            "size": req.size,
            "store": req.store,
            "fii": true,
        });
        let (done, _) = self
            .post(url(pop, "/multipart/complete"), body, CONTROL_TIMEOUT)
            .await?;
        // A complete upload takes no more chunks: its grant need not be kept.
        self.grants().remove(&req.upload_id);
        Ok(done)
    }

    async fn metadata(&self, pop: &str, handle: &str) -> Result<Value, TransportError> {
        let request = self
            .http
            .get(url(pop, &format!("/api/file/{handle}/metadata")))
            .query(&self.policy_query(Call::Stat, handle));
        json_answer(request, CONTROL_TIMEOUT).await
    }

    async fn probe(&self, pop: &str, timeout: Duration) -> Result<(), TransportError> {
        let resp = self
            .http
            .get(url(pop, "/healthz"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| from_reqwest(e, timeout))?;
        let resp = check(resp, timeout).await?;
        resp.bytes().await.map_err(|e| from_reqwest(e, timeout))?;
        Ok(())
    }
}
