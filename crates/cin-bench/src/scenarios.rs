//! The scenarios. Each returns its rows; targets are the ones issue 7 sets.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use cin_client::transport::{ChunkRequest, CompleteRequest, StartRequest};
use cin_client::{
    ByteSource, FileSource, HttpTransport, Quiet, StoreOptions, TokioClock, Transport, UploadJob,
    UploadOptions, UploadReport, Uploader,
};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::pop::{edge_binary, Pop, S3Profile};
use crate::report::{latency_rows, percentile, percentile_rows, Goal, Row};
use crate::s3::{self, S3Server};
use crate::source::{Pattern, PatternSource, MIB};
use crate::Args;

const KIB: u64 = 1024;
/// Bytes per block for the disk ceiling, as `dd bs=8M`.
const BLOCK: u64 = 8 * MIB;

/// What every scenario shares.
pub struct Ctx {
    pub args: Args,
    /// Temporary directory for POP data, files and the disk ceiling.
    pub work: PathBuf,
    pub pattern: Pattern,
    /// Client for direct HTTP calls, configured as the client library's.
    pub http: reqwest::Client,
    /// `limit`'s write+fsync figure in bytes/s, once measured in this run.
    pub disk_limit: Option<f64>,
}

pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?)
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1024 * MIB && bytes & (1024 * MIB - 1) == 0 {
        format!("{} GiB", bytes / (1024 * MIB))
    } else if bytes >= MIB && bytes & (MIB - 1) == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    }
}

impl Ctx {
    /// The POP for a scenario: `--target`, else a child process when asked or when
    /// the scenario reports the POP's memory, else in this process.
    pub(crate) async fn pop(
        &self,
        reports_rss: bool,
        profile: Option<&S3Profile>,
    ) -> anyhow::Result<Pop> {
        if let Some(url) = &self.args.target {
            return Ok(Pop::external(url, self.args.target_pid));
        }
        let mut child = match self.args.pop.as_str() {
            "child" => true,
            "in-process" => false,
            _ => reports_rss,
        };
        if !child && !Pop::in_process_idle(Duration::from_secs(30)).await {
            eprintln!(
                "  an earlier in-process POP is wedged (sled's locks are process-wide): this POP runs as a child process"
            );
            child = true;
        }
        if child {
            let bin = edge_binary(self.args.pop_bin.as_deref())?;
            Pop::child(&bin, &self.work, profile).await
        } else {
            Pop::in_process(&self.work, profile).await
        }
    }

    fn uploader(&self) -> anyhow::Result<Uploader> {
        Ok(Uploader::new(
            Arc::new(HttpTransport::new(self.args.apikey.clone())?),
            Arc::new(TokioClock::new()),
            UploadOptions::default(),
            Arc::new(Quiet),
        ))
    }

    /// How long without a finished request before a run counts as stalled.
    fn stall(&self) -> Duration {
        Duration::from_secs(self.args.stall_s.max(1))
    }

    fn big(&self) -> u64 {
        self.args.size_mib * MIB
    }

    /// Measures the disk ceiling for `size` bytes unless this run already did.
    async fn disk_limit(&mut self) -> anyhow::Result<(f64, Option<Row>)> {
        if let Some(rate) = self.disk_limit {
            return Ok((rate, None));
        }
        let elapsed = write_fsync(&self.work, &self.pattern, self.big()).await?;
        let rate = self.big() as f64 / elapsed.as_secs_f64();
        self.disk_limit = Some(rate);
        Ok((
            rate,
            Some(Row::new(
                "limit",
                format!(
                    "write+fsync {} (8 MiB blocks, one fsync)",
                    size_label(self.big())
                ),
                rate / 1e6,
                "MB/s",
            )),
        ))
    }
}

async fn upload(
    uploader: &Uploader,
    pop: &Pop,
    source: Arc<dyn ByteSource>,
    name: &str,
    store: StoreOptions,
) -> anyhow::Result<UploadReport> {
    uploader
        .upload(UploadJob {
            source,
            filename: name.into(),
            mimetype: "application/octet-stream".into(),
            store,
            pops: vec![pop.base.clone()],
            resume: None,
        })
        .await
        .map_err(|e| anyhow!("upload of {name}: {e}"))
}

/// `sync(1)`, so one scenario's dirty pages are not written back during the next.
pub fn sync_disks() {
    let _ = std::process::Command::new("sync").status();
}

// ---------------------------------------------------------------- limit

/// As `dd bs=8M conv=fsync`: `size` bytes in 8 MiB writes to a new file in `dir`,
/// one fsync at the end.
async fn write_fsync(dir: &Path, pattern: &Pattern, size: u64) -> anyhow::Result<Duration> {
    let path = dir.join("limit.bin");
    let pattern = pattern.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        use std::io::Write;
        sync_disks();
        let began = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        let mut at = 0;
        while at < size {
            let take = (size - at).min(BLOCK);
            file.write_all(&pattern.bytes(at, take))?;
            at += take;
        }
        file.sync_all()?;
        drop(file);
        let elapsed = began.elapsed();
        std::fs::remove_file(&path)?;
        Ok(elapsed)
    })
    .await?
}

/// `count` new files of `size` bytes, each written and fsync'd, by `threads`
/// threads; files per second.
async fn small_fsyncs(dir: &Path, size: u64, count: u64, threads: u64) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new().prefix("fsync.").tempdir_in(dir)?;
    let path = dir.path().to_owned();
    let elapsed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let body = vec![7u8; size as usize];
        let began = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (path, body) = (&path, &body);
                    s.spawn(move || -> std::io::Result<()> {
                        use std::io::Write;
                        for i in (t..count).step_by(threads as usize) {
                            let mut f = std::fs::File::create(path.join(format!("f{i}")))?;
                            f.write_all(body)?;
                            f.sync_all()?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join().map_err(|_| anyhow!("fsync thread panicked"))??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(began.elapsed())
    })
    .await??;
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// A server in this process that reads every request body to the end and drops it.
async fn start_sink() -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    async fn sink(body: axum::body::Body) -> String {
        let mut stream = body.into_data_stream();
        let mut n = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            n += chunk.len();
        }
        n.to_string()
    }
    let app = axum::Router::new().route("/sink", axum::routing::put(sink).post(sink));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((base, stop))
}

pub async fn limit(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    ctx.disk_limit = None;
    let (_, row) = ctx.disk_limit().await?;
    rows.extend(row);

    let (sink, stop) = start_sink().await?;
    let size = ctx.big();
    let began = Instant::now();
    let mut at = 0;
    while at < size {
        let take = (size - at).min(BLOCK);
        let resp = ctx
            .http
            .put(format!("{sink}/sink"))
            .body(ctx.pattern.bytes(at, take))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("sink answered {}", resp.status());
        }
        resp.bytes().await?;
        at += take;
    }
    rows.push(Row::new(
        "limit",
        format!(
            "loopback HTTP, {} in 8 MiB PUTs, body discarded",
            size_label(size)
        ),
        mb_per_s(size, began.elapsed()),
        "MB/s",
    ));

    let (count, small, in_flight) = (
        ctx.args.count,
        ctx.args.small_size_kib * KIB,
        ctx.args.in_flight,
    );
    let url = format!("{sink}/sink");
    let runs = run_many(ctx, "sink", count, in_flight, |i| {
        sink_post(
            ctx.http.clone(),
            url.clone(),
            ctx.pattern.bytes(i * small, small),
        )
    })
    .await?;
    if runs.failed > 0 {
        bail!("{} requests to the sink failed", runs.failed);
    }
    rows.push(Row::new(
        "limit",
        format!(
            "loopback HTTP, {count} POSTs of {}, {in_flight} in flight",
            size_label(small)
        ),
        runs.rate(),
        "req/s",
    ));
    let _ = stop.send(());

    let files = count.min(2000);
    for threads in [1, in_flight as u64] {
        let rate = small_fsyncs(&ctx.work, small, files, threads).await?;
        rows.push(Row::new(
            "limit",
            format!(
                "new {} file + fsync, {threads} thread{} ({files} files)",
                size_label(small),
                if threads == 1 { "" } else { "s" }
            ),
            rate,
            "files/s",
        ));
    }
    Ok(rows)
}

// ---------------------------------------------------------------- single

pub async fn single(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let (disk, mut rows) = {
        let (rate, row) = ctx.disk_limit().await?;
        (rate, row.into_iter().collect::<Vec<_>>())
    };
    sync_disks();
    let pop = ctx.pop(false, None).await?;
    let size = ctx.big();
    let source = Arc::new(PatternSource {
        pattern: ctx.pattern.clone(),
        len: size,
    });
    let began = Instant::now();
    let report = upload(
        &ctx.uploader()?,
        &pop,
        source,
        "single.bin",
        StoreOptions::s3(),
    )
    .await?;
    let elapsed = began.elapsed();
    pop.stop().await;
    let rate = size as f64 / elapsed.as_secs_f64();
    if report.failed_requests > 0 {
        eprintln!(
            "  single: {} requests failed and were retried",
            report.failed_requests
        );
    }
    rows.push(
        Row::new(
            "single",
            format!(
                "one {} upload (cin-client, FII, 8 MiB parts)",
                size_label(size)
            ),
            rate / 1e6,
            "MB/s",
        )
        .with_target(
            ">= 85 % of limit write+fsync",
            Goal::AtLeast(0.85),
            rate / disk,
        ),
    );
    rows.push(Row::new(
        "single",
        "ratio to limit write+fsync",
        100.0 * rate / disk,
        "%",
    ));
    Ok(rows)
}

// ---------------------------------------------------------------- complete-latency

/// Uploads `size` bytes part by part (one 8 MiB chunk per part) through the client
/// library's transport, then times `/multipart/complete` alone.
async fn timed_complete(
    transport: &HttpTransport,
    pop: &Pop,
    pattern: &Pattern,
    size: u64,
) -> anyhow::Result<(Duration, String)> {
    let store = StoreOptions::s3();
    let name = format!("complete-{}.bin", size_label(size).replace(' ', ""));
    let started = transport
        .start(
            &pop.base,
            &StartRequest {
                filename: name.clone(),
                mimetype: "application/octet-stream".into(),
                size,
                store: store.clone(),
            },
        )
        .await?;
    let part_size = 8 * MIB;
    for index in 0..size.div_ceil(part_size) {
        let part = u32::try_from(index + 1)?;
        let start = index * part_size;
        let body = pattern.bytes(start, part_size.min(size - start));
        transport
            .send_chunk(
                &pop.base,
                &ChunkRequest::new(started.upload_id.clone(), part, 0, body),
                cin_client::upload::UploadOptions::default()
                    .timeouts
                    .deadlines(8 * MIB, None, &Default::default(), 0),
            )
            .await?;
    }
    let began = Instant::now();
    let done = transport
        .complete(
            &pop.base,
            &CompleteRequest {
                upload_id: started.upload_id.clone(),
                filename: name,
                mimetype: "application/octet-stream".into(),
                size,
                store,
            },
        )
        .await?;
    Ok((began.elapsed(), done.handle))
}

pub async fn complete_latency(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let pop = ctx.pop(false, None).await?;
    let transport = HttpTransport::new(ctx.args.apikey.clone())?;
    let sizes: Vec<u64> = match &ctx.args.complete_sizes_mib {
        Some(list) => list.clone(),
        None => vec![1, 64.min(ctx.args.size_mib), ctx.args.size_mib],
    };
    let mut sizes: Vec<u64> = sizes.into_iter().map(|m| m * MIB).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for &size in &sizes {
        let mut samples = Vec::new();
        for _ in 0..ctx.args.reps.max(1) {
            let (took, handle) = timed_complete(&transport, &pop, &ctx.pattern, size).await?;
            samples.push(took.as_secs_f64() * 1e3);
            // The local copy to final storage must not overlap the next measurement.
            pop.wait_stored(&ctx.http, &handle, Duration::from_secs(600))
                .await?;
            sync_disks();
        }
        samples.sort_by(f64::total_cmp);
        let median = percentile(&samples, 50.0);
        medians.push((size, median));
        rows.push(Row::new(
            "complete-latency",
            format!(
                "complete, {} file (median of {}; max {:.1} ms)",
                size_label(size),
                samples.len(),
                samples.last().copied().unwrap_or(f64::NAN)
            ),
            median,
            "ms",
        ));
    }
    pop.stop().await;
    if let (Some(&(small, at_small)), Some(&(large, at_large))) = (medians.first(), medians.last())
    {
        if large > small {
            rows.push(
                Row::new(
                    "complete-latency",
                    format!("{} / {} latency", size_label(large), size_label(small)),
                    at_large / at_small,
                    "x",
                )
                .with_target(
                    format!("{} <= 2x {}", size_label(large), size_label(small)),
                    Goal::AtMost(2.0),
                    at_large / at_small,
                ),
            );
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------- concurrent

fn rss_row(scenario: &'static str, what: &str, pop: &Pop, limit_mib: Option<f64>) -> Option<Row> {
    let Some(peak) = pop.peak_rss() else {
        eprintln!("  {scenario}: the POP's memory is unknown (in-process, or --target without --target-pid)");
        return None;
    };
    let row = Row::new(scenario, what, mib(peak), "MiB");
    Some(match limit_mib {
        Some(limit) => row.with_target(format!("< {limit:.0} MiB"), Goal::AtMost(limit), mib(peak)),
        None => row,
    })
}

pub async fn concurrent(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let pop = ctx.pop(true, None).await?;
    let baseline = pop.rss();
    let (count, size) = (ctx.args.concurrent, ctx.args.concurrent_size_mib * MIB);
    let body = ctx.pattern.bytes(0, size);
    let uploader = Arc::new(ctx.uploader()?);
    let began = Instant::now();
    let mut running = JoinSet::new();
    for i in 0..count {
        let (uploader, body) = (uploader.clone(), body.clone());
        let base = pop.base.clone();
        running.spawn(async move {
            let t = Instant::now();
            uploader
                .upload(UploadJob {
                    source: Arc::new(cin_client::MemorySource(body)),
                    filename: format!("concurrent-{i}.bin"),
                    mimetype: "application/octet-stream".into(),
                    store: StoreOptions::s3(),
                    pops: vec![base],
                    resume: None,
                })
                .await
                .map(|_| t.elapsed())
        });
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    let stall = ctx.stall();
    let mut last_ok = Instant::now();
    loop {
        let wait = (last_ok + stall).saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, running.join_next()).await {
            Ok(None) => break,
            Ok(Some(done)) => match done? {
                Ok(took) => {
                    latencies.push(took.as_secs_f64() * 1e3);
                    last_ok = Instant::now();
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("  concurrent: an upload failed: {e}");
                    }
                }
            },
            Err(_) => {
                running.abort_all();
                let rss = pop
                    .peak_rss()
                    .map(|b| format!("; POP peak RSS {:.1} MiB", mib(b)))
                    .unwrap_or_default();
                bail!(
                    "the POP stalled: no upload finished in {stall:?} ({} of {count} had, {failed} failed{rss})",
                    latencies.len()
                );
            }
        }
    }
    let elapsed = began.elapsed();
    let mut rows = vec![Row::new(
        "concurrent",
        format!("{count} x {} at once: aggregate", size_label(size)),
        mb_per_s(latencies.len() as u64 * size, elapsed),
        "MB/s",
    )];
    rows.extend(latency_rows(
        "concurrent",
        "per-upload latency",
        latencies,
        failed as u64,
    ));
    if let Some(base) = baseline {
        rows.push(Row::new(
            "concurrent",
            "POP RSS before the uploads",
            mib(base),
            "MiB",
        ));
    }
    rows.extend(rss_row(
        "concurrent",
        "POP peak RSS (VmHWM)",
        &pop,
        Some(256.0),
    ));
    pop.stop().await;
    Ok(rows)
}

// ---------------------------------------------------------------- memory

pub async fn memory(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    sync_disks();
    let pop = ctx.pop(true, None).await?;
    let size = ctx.args.memory_size_mib.unwrap_or(4 * ctx.args.size_mib) * MIB;
    let source = Arc::new(PatternSource {
        pattern: ctx.pattern.clone(),
        len: size,
    });
    let began = Instant::now();
    let report = upload(
        &ctx.uploader()?,
        &pop,
        source,
        "memory.bin",
        StoreOptions::s3(),
    )
    .await?;
    let elapsed = began.elapsed();
    let mut rows = vec![Row::new(
        "memory",
        format!("one {} upload", size_label(size)),
        mb_per_s(size, elapsed),
        "MB/s",
    )];
    rows.extend(rss_row(
        "memory",
        &format!(
            "POP peak RSS (VmHWM) during the {} upload",
            size_label(size)
        ),
        &pop,
        Some(64.0),
    ));
    // Then the copy to the local origin store, which reads the whole file again.
    if pop.pid.is_some() {
        pop.wait_stored(&ctx.http, &report.handle, Duration::from_secs(1800))
            .await?;
        rows.extend(rss_row(
            "memory",
            "POP peak RSS, replication to the local origin included",
            &pop,
            None,
        ));
    }
    pop.stop().await;
    Ok(rows)
}

// ---------------------------------------------------------------- small

/// The ways `small` sends a file, each measured with the same count and size.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmallPath {
    /// `POST /api/store/s3` with Content-Length.
    Store,
    /// `POST /api/store/s3` with a chunked body (no Content-Length).
    Chunked,
    /// tus creation-with-upload: one `POST /files/` carrying the whole body.
    Tus,
    /// Filestack multipart in one part: start, upload, the PUT, complete.
    Multipart,
}

impl SmallPath {
    fn label(self) -> &'static str {
        match self {
            SmallPath::Store => "/api/store (Content-Length)",
            SmallPath::Chunked => "/api/store (chunked body)",
            SmallPath::Tus => "tus creation-with-upload",
            SmallPath::Multipart => "multipart, one part",
        }
    }

    /// As `--small-paths` spells it; also in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            SmallPath::Store => "store",
            SmallPath::Chunked => "chunked",
            SmallPath::Tus => "tus",
            SmallPath::Multipart => "multipart",
        }
    }
}

/// What a concurrent run measured.
struct Runs {
    /// Milliseconds per successful upload, sorted.
    latencies: Vec<f64>,
    elapsed: Duration,
    failed: u64,
}

impl Runs {
    fn record(&mut self, what: &str, (ms, outcome): (f64, Result<(), String>)) {
        match outcome {
            Ok(()) => self.latencies.push(ms),
            Err(reason) => {
                self.failed += 1;
                // The first few say why; the rest would only repeat it.
                if self.failed <= 3 {
                    eprintln!("  {what}: an upload failed: {reason}");
                }
            }
        }
    }

    fn done(&self) -> usize {
        self.latencies.len() + self.failed as usize
    }

    /// Successful uploads per second.
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `one(0)` .. `one(count - 1)`, `in_flight` at a time, timing each. An upload
/// is a success when its future gives `Ok`; `Err` says briefly what was wrong with
/// the answer. Fails only when no upload finishes for `--stall-s`.
async fn run_many<F, Fut>(
    ctx: &Ctx,
    what: &str,
    count: u64,
    in_flight: usize,
    mut one: F,
) -> anyhow::Result<Runs>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut running = JoinSet::new();
    let mut runs = Runs {
        latencies: Vec::with_capacity(count as usize),
        elapsed: Duration::ZERO,
        failed: 0,
    };
    let stall = ctx.stall();
    let stalled = |runs: &Runs| {
        anyhow!(
            "{what}: the server stalled: no request finished in {stall:?} ({} of {count} had)",
            runs.done()
        )
    };
    let began = Instant::now();
    for i in 0..count {
        let permit = match tokio::time::timeout(stall, gate.clone().acquire_owned()).await {
            Ok(permit) => permit?,
            Err(_) => {
                running.abort_all();
                return Err(stalled(&runs));
            }
        };
        let upload = one(i);
        running.spawn(async move {
            let t = Instant::now();
            let outcome = upload.await;
            drop(permit);
            (t.elapsed().as_secs_f64() * 1e3, outcome)
        });
        // Reap finished tasks as we go so the set stays small.
        while let Some(done) = running.try_join_next() {
            runs.record(what, done?);
        }
    }
    loop {
        match tokio::time::timeout(stall, running.join_next()).await {
            Ok(Some(done)) => runs.record(what, done?),
            Ok(None) => break,
            Err(_) => {
                running.abort_all();
                return Err(stalled(&runs));
            }
        }
    }
    runs.elapsed = began.elapsed();
    runs.latencies.sort_by(f64::total_cmp);
    Ok(runs)
}

/// The answer's headers and body when its status is `want`; otherwise the status
/// and the start of the body, prefixed with `what`.
async fn expect_status(
    sent: reqwest::Result<reqwest::Response>,
    want: u16,
    what: &str,
) -> Result<(reqwest::header::HeaderMap, String), String> {
    let mut resp = sent.map_err(|e| {
        // reqwest's own message leaves out the cause (refused, reset...).
        let mut message = format!("{what}: {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(&format!(": {c}"));
            cause = c.source();
        }
        message
    })?;
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("{what}: reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.as_u16() != want {
        return Err(format!(
            "{what}: {status} (wanted {want}): {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    Ok((headers, text))
}

fn json_answer(text: &str, what: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("{what}: the answer is not JSON ({e}): {text:.200}"))
}

fn str_field<'a>(
    answer: &'a serde_json::Value,
    field: &str,
    what: &str,
) -> Result<&'a str, String> {
    answer[field]
        .as_str()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{what}: no {field} in {answer}"))
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One POST to `limit`'s sink, which answers with the number of bytes it read.
async fn sink_post(http: reqwest::Client, url: String, body: Bytes) -> Result<(), String> {
    let len = body.len();
    let sent = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await;
    let (_, text) = expect_status(sent, 200, "POST to the sink").await?;
    if text.trim() != len.to_string() {
        return Err(format!("the sink read {text} bytes of {len}"));
    }
    Ok(())
}

/// `POST /api/store/s3` of `body`, with Content-Length or (`chunked`) without.
async fn store_upload(
    http: reqwest::Client,
    url: String,
    query: [(&'static str, String); 2],
    body: Bytes,
    chunked: bool,
) -> Result<(), String> {
    let len = body.len() as u64;
    let body = if chunked {
        // A stream of unknown length: hyper sends it with Transfer-Encoding: chunked.
        reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(body)]))
    } else {
        reqwest::Body::from(body)
    };
    let sent = http
        .post(url)
        .query(&query)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await;
    let (_, text) = expect_status(sent, 200, "POST /api/store").await?;
    let answer = json_answer(&text, "POST /api/store")?;
    str_field(&answer, "handle", "POST /api/store")?;
    if answer["size"].as_u64() != Some(len) {
        return Err(format!("POST /api/store: size is not {len} in {answer}"));
    }
    Ok(())
}

/// tus creation-with-upload: the whole body in the creating POST; the answer must
/// be 201 with `Upload-Offset` at the end of it.
async fn tus_upload(
    http: reqwest::Client,
    url: String,
    metadata: String,
    body: Bytes,
) -> Result<(), String> {
    let len = body.len() as u64;
    let sent = http
        .post(url)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", len)
        .header("upload-metadata", metadata)
        .header("content-type", "application/offset+octet-stream")
        .body(body)
        .send()
        .await;
    let (headers, _) = expect_status(sent, 201, "tus POST").await?;
    let offset = headers.get("upload-offset").and_then(|v| v.to_str().ok());
    if offset.and_then(|v| v.parse::<u64>().ok()) != Some(len) {
        return Err(format!("tus POST: Upload-Offset is {offset:?}, not {len}"));
    }
    Ok(())
}

/// The Filestack multipart flow for a one-part file, as its SDKs send it (with the
/// part's MD5): start, upload for part 1, the PUT to the URL (and headers) it
/// returns, complete; the complete answer must name a handle.
async fn multipart_upload(
    http: reqwest::Client,
    base: String,
    apikey: String,
    filename: String,
    body: Bytes,
) -> Result<(), String> {
    use md5::Digest;
    let size = body.len();
    let mimetype = "application/octet-stream";
    let store = serde_json::json!({"location": "s3"});
    let sent = http
        .post(format!("{base}/multipart/start"))
        .json(&serde_json::json!({
            "apikey": apikey, "filename": filename, "mimetype": mimetype,
            "size": size, "store": store,
        }))
        .send()
        .await;
    let (_, text) = expect_status(sent, 200, "/multipart/start").await?;
    let start = json_answer(&text, "/multipart/start")?;
    let upload_id = str_field(&start, "upload_id", "/multipart/start")?;

    let md5 = b64(&md5::Md5::digest(&body));
    let sent = http
        .post(format!("{base}/multipart/upload"))
        .json(&serde_json::json!({
            "apikey": apikey, "upload_id": upload_id, "part": 1, "size": size,
            "md5": md5, "store": store,
        }))
        .send()
        .await;
    let (_, text) = expect_status(sent, 200, "/multipart/upload").await?;
    let grant = json_answer(&text, "/multipart/upload")?;
    let mut put = http
        .put(str_field(&grant, "url", "/multipart/upload")?)
        .body(body);
    if let Some(headers) = grant["headers"].as_object() {
        for (name, value) in headers {
            let value = value
                .as_str()
                .ok_or_else(|| format!("/multipart/upload: header {name} is not a string"))?;
            put = put.header(name.as_str(), value);
        }
    }
    let (headers, _) = expect_status(put.send().await, 200, "PUT of part 1").await?;
    let etag = headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .ok_or("PUT of part 1: no ETag in the answer")?;

    let sent = http
        .post(format!("{base}/multipart/complete"))
        .json(&serde_json::json!({
            "apikey": apikey, "upload_id": upload_id, "filename": filename,
            "mimetype": mimetype, "size": size, "store": store,
            "parts": [{"part_number": 1, "etag": etag}],
        }))
        .send()
        .await;
    let (_, text) = expect_status(sent, 200, "/multipart/complete").await?;
    let done = json_answer(&text, "/multipart/complete")?;
    str_field(&done, "handle", "/multipart/complete")?;
    Ok(())
}

/// `count` uploads of `size` bytes to `pop` by `path`, `in_flight` at a time.
async fn small_path(
    ctx: &Ctx,
    pop: &Pop,
    path: SmallPath,
    count: u64,
    size: u64,
    in_flight: usize,
) -> anyhow::Result<Runs> {
    let (http, pattern, apikey) = (&ctx.http, &ctx.pattern, ctx.args.apikey.as_str());
    let what = path.name();
    let body = |i: u64| pattern.bytes(i * size, size);
    let filename = |i: u64| format!("small-{what}-{i}.bin");
    match path {
        SmallPath::Store | SmallPath::Chunked => {
            let url = format!("{}/api/store/s3", pop.base);
            run_many(ctx, what, count, in_flight, |i| {
                let query = [("filename", filename(i)), ("key", apikey.to_owned())];
                store_upload(
                    http.clone(),
                    url.clone(),
                    query,
                    body(i),
                    path == SmallPath::Chunked,
                )
            })
            .await
        }
        SmallPath::Tus => {
            let url = format!("{}/files/", pop.base);
            // The POP reads the API key from the metadata, as tus clients send it.
            let fixed = format!(
                "filetype {},apikey {}",
                b64(b"application/octet-stream"),
                b64(apikey.as_bytes())
            );
            run_many(ctx, what, count, in_flight, |i| {
                let metadata = format!("filename {},{fixed}", b64(filename(i).as_bytes()));
                tus_upload(http.clone(), url.clone(), metadata, body(i))
            })
            .await
        }
        SmallPath::Multipart => {
            run_many(ctx, what, count, in_flight, |i| {
                multipart_upload(
                    http.clone(),
                    pop.base.clone(),
                    apikey.to_owned(),
                    filename(i),
                    body(i),
                )
            })
            .await
        }
    }
}

pub async fn small(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let (count, size, in_flight) = (
        ctx.args.count,
        ctx.args.small_size_kib * KIB,
        ctx.args.in_flight.max(1),
    );
    if count == 0 || size == 0 {
        bail!("small needs --count and --small-size-kib of at least 1");
    }
    let mut paths: Vec<SmallPath> = Vec::new();
    for &path in &ctx.args.small_paths {
        if !paths.contains(&path) {
            paths.push(path);
        }
    }

    // This disk's sync rate drifts by several times within minutes, so each
    // path is compared with the naive ceiling measured just before it.
    let pop = ctx.pop(false, None).await?;
    let mut rows = Vec::new();
    for path in paths {
        let label = path.label();
        sync_disks();
        let ceiling = match small_fsyncs(&ctx.work, size, count, in_flight as u64).await {
            Ok(rate) => rate,
            Err(e) => {
                pop.stop().await;
                return Err(e);
            }
        };
        rows.push(Row::new(
            "small",
            format!(
                "new {} file + fsync, {in_flight} threads ({count} files), before {label}",
                size_label(size)
            ),
            ceiling,
            "files/s",
        ));
        sync_disks();
        let runs = match small_path(ctx, &pop, path, count, size, in_flight).await {
            Ok(runs) => runs,
            Err(e) => {
                pop.stop().await;
                return Err(e);
            }
        };
        let rate = runs.rate();
        rows.push(
            Row::new(
                "small",
                format!(
                    "{count} x {} via {label}, {in_flight} in flight",
                    size_label(size)
                ),
                rate,
                "uploads/s",
            )
            .with_target(">= 5,000 uploads/s", Goal::AtLeast(5000.0), rate),
        );
        rows.push(
            Row::new(
                "small",
                format!("{label} / new file + fsync"),
                rate / ceiling,
                "x",
            )
            .with_target(
                ">= 1.5x new file + fsync",
                Goal::AtLeast(1.5),
                rate / ceiling,
            ),
        );
        let failed = runs.failed;
        rows.extend(percentile_rows(
            "small",
            &format!("{label} latency"),
            runs.latencies,
            Some(50.0),
        ));
        // Shown even when 0: with several paths, which one failed matters.
        rows.push(Row::new(
            "small",
            format!("{label}: failed uploads"),
            failed as f64,
            "",
        ));
        // This path's dirty pages are not written back during the next one.
        sync_disks();
    }
    pop.stop().await;
    Ok(rows)
}

// ---------------------------------------------------------------- replicate

pub async fn replicate(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    if ctx.args.target.is_some() {
        bail!("replicate configures its own POP and S3 server; it does not run with --target");
    }
    let bin = s3::s3s_fs_binary(ctx.args.s3s_fs.as_deref())?;
    let server = S3Server::start(&bin, &ctx.work).await?;
    let client = server.client().await;
    let bucket = "cin-bench";
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .context("CreateBucket")?;
    let size = ctx.big();
    let (part_size, concurrency) = (
        ctx.args.replicate_part_mib * MIB,
        ctx.args.replicate_concurrency,
    );
    let file = ctx.work.join("replicate.bin");
    ctx.pattern.write_file(&file, size)?;
    sync_disks();

    let began = Instant::now();
    s3::direct_multipart(&client, bucket, "direct.bin", &file, part_size, concurrency).await?;
    let direct = began.elapsed();
    sync_disks();

    let profile = S3Profile {
        name: "bench".into(),
        bucket: bucket.into(),
        endpoint: server.endpoint.clone(),
        access_key: s3::ACCESS_KEY.into(),
        secret_key: s3::SECRET_KEY.into(),
        part_size,
        concurrency,
    };
    let pop = ctx.pop(false, Some(&profile)).await?;
    let store = StoreOptions {
        container: Some(bucket.into()),
        ..StoreOptions::s3()
    };
    let source: Arc<dyn ByteSource> = Arc::new(FileSource::open(&file)?);
    let report = upload(&ctx.uploader()?, &pop, source, "replicate.bin", store).await?;
    let completed = Instant::now();
    let meta = pop
        .wait_stored(&ctx.http, &report.handle, Duration::from_secs(1800))
        .await?;
    let observed = completed.elapsed();
    pop.stop().await;
    let _ = std::fs::remove_file(&file);
    let (Some(from), Some(to)) = (
        meta["replication"]["completed_at"].as_u64(),
        meta["replication"]["stored_at"].as_u64(),
    ) else {
        bail!("no replication times in {meta}");
    };
    let pop_time = Duration::from_millis(to.saturating_sub(from).max(1));
    let direct_rate = mb_per_s(size, direct);
    let pop_rate = mb_per_s(size, pop_time);
    Ok(vec![
        Row::new(
            "replicate",
            format!(
                "SDK direct: multipart, {} parts x{concurrency}, SDK default checksums",
                size_label(part_size)
            ),
            direct_rate,
            "MB/s",
        ),
        Row::new(
            "replicate",
            format!(
                "POP replicator, {} file (stored_at - completed_at)",
                size_label(size)
            ),
            pop_rate,
            "MB/s",
        )
        .with_target(
            ">= 80 % of SDK direct",
            Goal::AtLeast(0.8),
            pop_rate / direct_rate,
        ),
        Row::new(
            "replicate",
            "ratio to SDK direct",
            100.0 * pop_rate / direct_rate,
            "%",
        ),
        Row::new(
            "replicate",
            "complete -> Stored seen by polling",
            observed.as_secs_f64(),
            "s",
        ),
    ])
}
