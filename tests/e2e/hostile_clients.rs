//! Clients that stop sending without closing, send their heads a byte at a
//! time, or just hold connections open: none of them may jam the POP. Raw
//! sockets, because a client library would not behave this badly.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{random_bytes, sha256_hex, spawn_app_with, PopProcess, TestApp};

const MIB: usize = 1 << 20;
const TUS: (&str, &str) = ("tus-resumable", "1.0.0");

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes the connection (or `limit` passes: then panics).
/// Returns what arrived.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the POP kept the connection open for {limit:?}"
    );
    received
}

/// Sends a chunk's head and the first `sent` of its `bytes`, then nothing: the
/// connection stays open, as when a mobile network drops a flow silently.
async fn stall_chunk_put(url: &str, headers: &Value, bytes: &[u8], sent: usize) -> TcpStream {
    let url = reqwest::Url::parse(url).unwrap();
    let mut stream = TcpStream::connect((url.host_str().unwrap(), url.port().unwrap()))
        .await
        .unwrap();
    let mut head = format!(
        "PUT {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        url.path(),
        url.query().unwrap(),
        url.authority(),
        bytes.len()
    );
    for (k, v) in headers.as_object().into_iter().flatten() {
        head.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&bytes[..sent]).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

async fn upload_url(app: &TestApp, upload_id: &str, part: u32, bytes: &[u8]) -> Value {
    let ask = crate::support::chunk_request(upload_id, part, None, bytes);
    let resp = app.post_json("/multipart/upload", ask).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// A client whose retries give up after the body idle time, as a real one would.
fn impatient_client(idle_secs: u64) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(idle_secs))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_stalled_chunk_gives_way_to_its_retry() {
    const IDLE: u64 = 20;
    let app = spawn_app_with(|c| c.server.body_idle_secs = IDLE).await;
    let bytes = random_bytes(3 * MIB, 1);
    let start = app
        .start(json!({"apikey": "k", "filename": "stall.bin", "size": bytes.len(), "store": {"location": "s3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();

    let part1 = &bytes[..MIB];
    let answer = upload_url(&app, upload_id, 1, part1).await;
    let mut stalled = stall_chunk_put(
        answer["url"].as_str().unwrap(),
        &answer["headers"],
        part1,
        100_000,
    )
    .await;
    // The POP is reading the stalled body (and holds the part) once it counts it.
    app.wait_metric("cin_bodies_receiving", 1.0, Duration::from_secs(10))
        .await;

    // The retry of the same chunk, on a new connection, must not wait behind it.
    let client = impatient_client(IDLE);
    let retried = Instant::now();
    let answer = upload_url(&app, upload_id, 1, part1).await;
    let mut put = client
        .put(answer["url"].as_str().unwrap())
        .body(part1.to_vec());
    for (k, v) in answer["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    let resp = put
        .send()
        .await
        .expect("the retry was kept waiting behind the stalled chunk");
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let etag1 = resp.headers()["etag"].to_str().unwrap().to_owned();
    println!(
        "retry of the stalled chunk answered in {:?}",
        retried.elapsed()
    );

    // The stalled request was ended and told why.
    let answered = read_until_closed(&mut stalled, Duration::from_secs(IDLE)).await;
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 409"), "{answered}");
    assert!(answered.contains("superseded"), "{answered}");

    // The rest of the upload goes through and the file is the client's bytes.
    let mut etags = vec![etag1];
    for (i, part) in bytes.chunks(MIB).enumerate().skip(1) {
        let resp = app.send_chunk(upload_id, i as u32 + 1, None, part).await;
        assert_eq!(resp.status(), 200);
        etags.push(resp.headers()["etag"].to_str().unwrap().to_owned());
    }
    let parts: Vec<String> = etags
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{}:{}", i + 1, e.trim_matches('"')))
        .collect();
    let done = app
        .complete(
            upload_id,
            json!({"filename": "stall.bin", "size": bytes.len(), "parts": parts.join(";")}),
        )
        .await;
    assert_eq!(done.status(), 200, "{}", done.text().await.unwrap());
    let done: Value = done.json().await.unwrap();
    let handle = done["handle"].as_str().unwrap();
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
}

#[tokio::test]
async fn a_stalled_body_is_ended_after_the_idle_time() {
    let app = spawn_app_with(|c| c.server.body_idle_secs = 1).await;
    let bytes = random_bytes(MIB, 2);
    let start = app
        .start(json!({"apikey": "k", "filename": "s.bin", "size": bytes.len(), "store": {"location": "s3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    let answer = upload_url(&app, upload_id, 1, &bytes).await;
    let mut stalled = stall_chunk_put(
        answer["url"].as_str().unwrap(),
        &answer["headers"],
        &bytes,
        100_000,
    )
    .await;
    let answered = read_until_closed(&mut stalled, Duration::from_secs(30)).await;
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("body_stalled"), "{answered}");
    // Nothing of the refused chunk counts; the chunk sent whole does.
    let resp = app.send_chunk(upload_id, 1, None, &bytes).await;
    assert_eq!(resp.status(), 200);
}

async fn tus_create(app: &TestApp, len: usize) -> String {
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", len.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap();
    reqwest::Url::parse(&app.base)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_stalled_patch_gives_way_to_the_client_that_resumes() {
    const IDLE: u64 = 20;
    let app = spawn_app_with(|c| c.server.body_idle_secs = IDLE).await;
    let bytes = random_bytes(2 * MIB, 3);
    let url = tus_create(&app, bytes.len()).await;
    let parsed = reqwest::Url::parse(&url).unwrap();
    let mut stalled = TcpStream::connect((parsed.host_str().unwrap(), parsed.port().unwrap()))
        .await
        .unwrap();
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        parsed.path(),
        parsed.authority(),
        bytes.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&bytes[..100_000]).await.unwrap();
    stalled.flush().await.unwrap();
    app.wait_metric("cin_bodies_receiving", 1.0, Duration::from_secs(10))
        .await;

    // A resuming tus client asks for the offset first: it must not wait, and
    // it sees what the stalled PATCH delivered.
    let client = impatient_client(IDLE);
    let resp = client
        .head(&url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .expect("HEAD was kept waiting behind the stalled PATCH");
    assert_eq!(resp.status(), 200);
    let offset: usize = resp.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(offset <= 100_000, "{offset}");
    let resp = client
        .patch(&url)
        .header(TUS.0, TUS.1)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", offset.to_string())
        .body(bytes[offset..].to_vec())
        .send()
        .await
        .expect("the resumed PATCH was kept waiting");
    assert_eq!(resp.status(), 204);
    let handle = resp.headers()["cin-handle"].to_str().unwrap().to_owned();
    assert_eq!(sha256_hex(&app.download(&handle).await), sha256_hex(&bytes));
    drop(stalled);
}

#[tokio::test]
async fn slow_heads_are_closed() {
    let app = spawn_app_with(|c| c.server.head_timeout_secs = 1).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        slow.push(stream);
    }
    // One byte now and then, never the whole head.
    let trickle = async {
        for _ in 0..20 {
            for stream in &mut slow {
                let _ = stream.write_all(b"o").await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), trickle)
        .await
        .ok();
    for stream in &mut slow {
        let answered = read_until_closed(stream, Duration::from_secs(30)).await;
        assert!(
            answered.is_empty() || answered.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answered)
        );
    }
    app.wait_metric(
        "cin_connections_closed_total{reason=\"head_timeout\"}",
        50.0,
        Duration::from_secs(10),
    )
    .await;
    // The POP still answers.
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let app = spawn_app_with(|c| c.server.keep_alive_secs = 1).await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut stream, Duration::from_secs(30)).await;
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(
        !answered.to_ascii_lowercase().contains("connection: close"),
        "the response itself kept the connection alive: {answered}"
    );
    app.wait_metric(
        "cin_connections_closed_total{reason=\"idle\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
}

/// Starts a stalled `/api/store` body: the connection has a request in flight.
async fn busy_connection(app: &TestApp) -> TcpStream {
    let mut stream = TcpStream::connect(addr(app)).await.unwrap();
    stream
        .write_all(b"POST /api/store/s3?key=k&filename=b.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n0123456789")
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn past_the_connection_limit_the_pop_answers_503_and_health_stays_reachable() {
    let app = spawn_app_with(|c| c.server.max_connections = 4).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        busy.push(busy_connection(&app).await);
    }
    app.wait_metric("cin_bodies_receiving", 4.0, Duration::from_secs(10))
        .await;

    // Connections are not pooled here: each request comes on a new one.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let refused = fresh
        .post(app.url("/multipart/start"))
        .json(&json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["content-type"], "application/json");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = fresh.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    // When a busy connection goes, its place is free again.
    drop(busy.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = fresh
            .post(app.url("/multipart/start"))
            .json(&json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3"}}))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn past_the_body_writer_limit_uploads_get_503() {
    let app = spawn_app_with(|c| c.server.max_body_writers = 1).await;
    let _busy = busy_connection(&app).await;
    app.wait_metric("cin_bodies_receiving", 1.0, Duration::from_secs(10))
        .await;
    let resp = impatient_client(30)
        .post(app.url("/api/store/s3?key=k&filename=c.bin"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// With the open-file limit at 1,024, 1,100 idle connections must not starve
/// health checks or uploads: the longest-idle connections give way.
#[tokio::test]
async fn idle_connections_cannot_exhaust_the_pop() {
    // This process holds 1,100 connections too.
    cin_edge::server::raise_open_file_limit();
    let dir = tempfile::tempdir().unwrap();
    let mut command = PopProcess::command(dir.path(), &[]);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: 1024,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let pop = PopProcess::try_spawn(command).unwrap_or_else(|e| panic!("{e}"));
    let address = pop.base.trim_start_matches("http://").to_owned();
    let baseline_kib = vm_hwm_kib(pop.pid());
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let health = fresh.get(pop.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let bytes = random_bytes(300_000, 4);
    let stored: Value = fresh
        .post(pop.url("/api/store/s3?key=k&filename=idle.bin"))
        .body(bytes.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let served = fresh
        .get(stored["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&served), sha256_hex(&bytes));
    let evicted = pop
        .metric("cin_connections_closed_total{reason=\"evicted\"}")
        .await;
    assert!(evicted > 0.0, "no idle connection gave way");
    println!(
        "1,100 idle connections: VmHWM {} KiB (at start {baseline_kib} KiB), {evicted} evicted",
        vm_hwm_kib(pop.pid())
    );
    drop(idle);
}
