//! `connections`: what idle and stalled clients cost the POP. Health-check
//! latency with thousands of idle keep-alive connections open (against the same
//! figure with none, measured first), the POP's peak memory with 1,000 of them,
//! and how fast a stalled chunk's retry is answered.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use md5::Digest;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::{percentile, Goal, Row};
use crate::scenarios::Ctx;

const SCENARIO: &str = "connections";
/// Idle connections held at each step.
const LEVELS: [usize; 3] = [1_000, 5_000, 10_000];
/// Health checks timed at each step, each on a new connection.
const PROBES: usize = 200;

pub async fn connections(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let own_limit = cin_edge::server::raise_open_file_limit();
    let pop = ctx.pop(true, None).await?;
    let address = pop.base.trim_start_matches("http://").to_owned();
    let mut rows = Vec::new();

    let baseline = probe_health(&pop.base).await?;
    if let Some(peak) = pop.peak_rss() {
        rows.push(Row::new(
            SCENARIO,
            "POP peak RSS (VmHWM) before any idle connection",
            peak as f64 / (1 << 20) as f64,
            "MiB",
        ));
    }
    rows.push(Row::new(
        SCENARIO,
        "healthz p99, no other connections (baseline)",
        baseline,
        "ms",
    ));

    let mut idle: Vec<TcpStream> = Vec::new();
    for level in LEVELS {
        // Leave room for the probes and the POP's own outgoing connections.
        if level as u64 + 512 > own_limit {
            eprintln!("  {level} connections need a higher open-file limit here ({own_limit})");
            break;
        }
        while idle.len() < level {
            idle.push(idle_keep_alive(&address).await?);
        }
        let p99 = probe_health(&pop.base).await?;
        rows.push(
            Row::new(
                SCENARIO,
                format!("healthz p99 with {level} idle keep-alive connections"),
                p99,
                "ms",
            )
            .with_target(
                "< 10x the baseline",
                Goal::AtMost(10.0),
                p99 / baseline.max(0.01),
            ),
        );
        if level == LEVELS[0] {
            if let Some(peak) = pop.peak_rss() {
                rows.push(Row::new(
                    SCENARIO,
                    format!("POP peak RSS (VmHWM) with {level} idle connections"),
                    peak as f64 / (1 << 20) as f64,
                    "MiB",
                ));
            }
        }
    }
    let closed = idle.len() - still_open(&mut idle).await;
    rows.push(Row::new(
        SCENARIO,
        "idle connections the POP closed to admit others",
        closed as f64,
        "connections",
    ));
    drop(idle);

    let retry = stalled_retry(&ctx.http, &pop.base).await?;
    rows.push(Row::new(
        SCENARIO,
        "stalled 1 MiB chunk: its retry answered in",
        retry.as_secs_f64() * 1000.0,
        "ms",
    ));
    pop.stop().await;
    Ok(rows)
}

/// A connection that made one request and now sits idle, as a browser's or an
/// SDK's pooled connection does.
async fn idle_keep_alive(address: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    if !buf[..n].starts_with(b"HTTP/1.1 200") {
        bail!(
            "an idle connection's first request failed: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    Ok(stream)
}

/// How many of `streams` the POP has not closed.
async fn still_open(streams: &mut [TcpStream]) -> usize {
    let mut open = 0;
    for stream in streams {
        let mut buf = [0u8; 1];
        // A closed connection reads end-of-file at once; an open one would wait.
        let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await;
        if read.is_err() {
            open += 1;
        }
    }
    open
}

/// p99 of `PROBES` health checks, each on a new connection, in ms.
async fn probe_health(base: &str) -> anyhow::Result<f64> {
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut latencies = Vec::with_capacity(PROBES);
    for _ in 0..PROBES {
        let began = Instant::now();
        let status = fresh.get(format!("{base}/healthz")).send().await?.status();
        if !status.is_success() {
            bail!("/healthz answered {status}");
        }
        latencies.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(percentile(&latencies, 99.0))
}

/// Sends 100,000 bytes of a 1 MiB chunk and stops, with the connection left
/// open; then times the retry of that chunk on a new connection.
async fn stalled_retry(http: &reqwest::Client, base: &str) -> anyhow::Result<Duration> {
    let chunk = vec![0x5au8; 1 << 20];
    let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&chunk));
    let start = post_json(
        http,
        &format!("{base}/multipart/start"),
        &json!({"apikey": "bench", "filename": "stall.bin", "size": chunk.len(), "store": {"location": "s3"}}),
    )
    .await?;
    let upload_id = start["upload_id"]
        .as_str()
        .context("start gave no upload_id")?;
    let ask = json!({"apikey": "bench", "upload_id": upload_id, "part": 1, "size": chunk.len(), "md5": md5, "store": {"location": "s3"}});
    let answer = post_json(http, &format!("{base}/multipart/upload"), &ask).await?;
    let url = reqwest::Url::parse(answer["url"].as_str().context("no upload url")?)?;
    let mut stalled = TcpStream::connect((
        url.host_str().context("no host")?,
        url.port().context("no port")?,
    ))
    .await?;
    let mut head = format!(
        "PUT {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        url.path(),
        url.query().unwrap_or_default(),
        url.authority(),
        chunk.len()
    );
    for (k, v) in answer["headers"].as_object().into_iter().flatten() {
        head.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap_or_default()));
    }
    head.push_str("\r\n");
    stalled.write_all(head.as_bytes()).await?;
    stalled.write_all(&chunk[..100_000]).await?;
    wait_receiving(http, base).await?;

    let began = Instant::now();
    let answer = post_json(http, &format!("{base}/multipart/upload"), &ask).await?;
    let mut put = http
        .put(answer["url"].as_str().context("no upload url")?)
        .body(chunk);
    for (k, v) in answer["headers"].as_object().into_iter().flatten() {
        put = put.header(k, v.as_str().unwrap_or_default());
    }
    put.send().await?.error_for_status()?;
    let took = began.elapsed();
    drop(stalled);
    Ok(took)
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    Ok(http
        .post(url)
        .json(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Waits until the POP is reading the stalled body.
async fn wait_receiving(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let receiving = text
            .lines()
            .find_map(|l| l.strip_prefix("cin_bodies_receiving "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if receiving >= 1.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the POP never started reading the stalled body");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
