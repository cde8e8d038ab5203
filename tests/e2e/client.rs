//! The `cin` client (crate cin-client) against real POPs, through a fault-injecting
//! proxy on 127.0.0.1: resets mid-body, resume after a kill, nearest POP, failover.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cin_client::upload::{Quiet, UploadJob, UploadOptions, Uploader};
use cin_client::{
    rank_pops, FileIdentity, HttpTransport, MemorySource, ProbePolicy, StateDir, StoreOptions,
    TokioClock,
};
use serde_json::Value;

use crate::fault_proxy::{FaultProxy, Faults};
use crate::support::{random_bytes, sha256_hex, spawn_app, spawn_app_with, TestApp, MIB};

/// A POP whose public URL (the one in upload URLs and filelinks) is the proxy, so
/// every byte the client sends crosses it.
async fn pop_behind(faults: Faults) -> (TestApp, FaultProxy) {
    let proxy = FaultProxy::start(faults).await;
    let url = proxy.url();
    let app = spawn_app_with(|c| c.server.public_url = url).await;
    proxy.set_upstream(&app.base);
    (app, proxy)
}

fn uploader(options: UploadOptions) -> Uploader {
    Uploader::new(
        Arc::new(HttpTransport::new("k").expect("http client")),
        Arc::new(TokioClock::new()),
        options,
        Arc::new(Quiet),
    )
}

fn job(bytes: &[u8], pops: Vec<String>) -> UploadJob {
    UploadJob {
        source: Arc::new(MemorySource(bytes.to_vec().into())),
        filename: "client.bin".into(),
        mimetype: "application/octet-stream".into(),
        store: StoreOptions::s3(),
        pops,
        resume: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_survives_a_fifth_of_chunks_reset_mid_body() {
    let (app, proxy) = pop_behind(Faults {
        reset_share: 0.2,
        seed: 20,
        ..Faults::default()
    })
    .await;
    let bytes = random_bytes(64 * MIB, 64);
    let options = UploadOptions {
        seed: Some(1),
        ..UploadOptions::default()
    };
    let report = uploader(options)
        .upload(job(&bytes, vec![proxy.url()]))
        .await
        .expect("upload through the faulty link");

    assert_eq!(
        sha256_hex(&app.download(&report.handle).await),
        sha256_hex(&bytes),
        "the filelink serves exactly the bytes sent"
    );
    let puts = proxy.puts();
    let reset = puts.iter().filter(|p| p.reset).count();
    let resent = proxy.put_body_bytes() - bytes.len() as u64;
    eprintln!(
        "{} chunk PUTs, {reset} reset mid-body, {resent} bytes re-sent, {} failed requests seen by the client",
        puts.len(),
        report.failed_requests
    );
    assert!(reset >= 1, "the proxy must actually have cut requests");
    assert!(report.failed_requests >= reset as u64);
    // Every re-sent byte belongs to a request the proxy cut, and of those only
    // what the POP did not keep (its whole checked blocks) went again: no
    // acknowledged byte went twice.
    let cut: u64 = puts.iter().filter(|p| p.reset).map(|p| p.forwarded).sum();
    assert!(
        resent < cut,
        "re-sent {resent} of the {cut} bytes cut: nothing kept"
    );
    // The stated bound: 40 % of the file. When every request fails with the same
    // odds whatever its size, a cut wastes on average half its chunk, so the
    // expected waste is p/(1-p)/2 = 12.5 % of the file for any chunk size; runs
    // measured 4-28 % (mean ~14 %), big chunks making it vary. 40 % is about the
    // mean plus three standard deviations.
    let bound = bytes.len() as u64 * 2 / 5;
    assert!(resent <= bound, "re-sent {resent} bytes, bound {bound}");
}

/// Runs the `cin` command line in a child process: the test binary itself,
/// re-entered through [`cin_cli_entry_point`] with the arguments in an env var.
/// The child is the exact code of the `cin` binary (its `main` only calls
/// `cli::main_from`) and needs no binary built beforehand.
fn cin(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["client::cin_cli_entry_point", "--exact", "--nocapture"])
        .env(
            "CIN_E2E_CLI_ARGS",
            serde_json::to_string(&[&["cin"], args].concat()).expect("args"),
        )
        .env_remove("CIN_POP")
        .env_remove("CIN_CONFIG")
        .stdin(Stdio::null());
    command
}

/// Not a test: the entry point of the `cin` child processes the tests start.
#[test]
fn cin_cli_entry_point() {
    if let Ok(args) = std::env::var("CIN_E2E_CLI_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).expect("CIN_E2E_CLI_ARGS");
        std::process::exit(cin_client::cli::main_from(args));
    }
}

/// The JSON lines a `cin --json` child printed (the test harness prints its own lines too).
/// Runs `cin` to completion off the async runtime.
async fn run_cin(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cin(&refs).output()
    })
    .await
    .expect("join")
    .expect("run cin")
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn acked_in(state_file: &Path) -> u64 {
    StateDir::load(state_file)
        .ok()
        .flatten()
        .map(|s| s.acked_bytes())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cin_killed_mid_upload_resumes_without_resending_acknowledged_bytes() {
    // A capped link, so the upload is still running when it gets killed.
    let (app, proxy) = pop_behind(Faults {
        bandwidth: Some(6 * MIB as u64),
        ..Faults::default()
    })
    .await;
    let work = tempfile::tempdir().expect("temp dir");
    let file = work.path().join("movie.bin");
    let bytes = random_bytes(24 * MIB, 24);
    std::fs::write(&file, &bytes).expect("write file");
    let state_dir = work.path().join("state");
    let state_file =
        StateDir::new(&state_dir).file_for(&FileIdentity::of(&file).expect("identity"));
    let file_arg = file.to_str().expect("utf-8 path");
    let state_arg = state_dir.to_str().expect("utf-8 path");
    let pop = proxy.url();
    let upload_args = [
        "upload",
        file_arg,
        "--pop",
        &pop,
        "--apikey",
        "k",
        "--state-dir",
        state_arg,
        "--json",
    ];

    let mut child = cin(&upload_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cin");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Killed after its first acknowledged chunks: with several parts in flight
    // and chunks growing to 8 MiB, the next acknowledgments come late in the upload.
    while acked_in(&state_file) < 2 * MIB as u64 {
        assert!(std::time::Instant::now() < deadline, "cin made no progress");
        assert!(
            child.try_wait().expect("child").is_none(),
            "cin ended before it was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL cin");
    child.wait().expect("reap cin");
    // Let the proxy drain what the dead client had already handed it.
    while proxy.open_connections() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy connections never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let recorded = StateDir::load(&state_file)
        .expect("state")
        .expect("the state file survives the kill");
    let acked = recorded.acked_bytes();
    assert!(
        acked >= 2 * MIB as u64 && acked < bytes.len() as u64,
        "{acked}"
    );
    let puts_before = proxy.puts().len();

    let out = run_cin(owned(&[&upload_args[..], &["--resume"]].concat())).await;
    assert!(
        out.status.success(),
        "cin --resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let report = &lines[0];
    assert_eq!(
        report["handle"],
        recorded.handle.as_str(),
        "same upload, same handle"
    );
    assert_eq!(report["resumed"], true);
    assert_eq!(report["skipped_bytes"], acked);

    // No byte the client had recorded as acknowledged crossed the link again.
    for put in &proxy.puts()[puts_before..] {
        let (part, offset, size) = put.chunk().expect("a chunk PUT");
        let ranges = recorded
            .parts
            .get(&part)
            .map(|p| p.acked.clone())
            .unwrap_or_default();
        assert_eq!(
            ranges.overlap(offset, offset + size),
            0,
            "part {part} [{offset}, +{size}) was acknowledged before the kill and sent again"
        );
    }
    // And exactly the rest did (this run had no faults to retry).
    let sent: u64 = proxy.puts()[puts_before..]
        .iter()
        .map(|p| p.forwarded)
        .sum();
    assert_eq!(sent, bytes.len() as u64 - acked);
    assert!(
        !state_file.exists(),
        "state is removed once the upload is complete"
    );

    let handle = report["handle"].as_str().expect("handle").to_owned();
    assert_eq!(sha256_hex(&app.download(&handle).await), sha256_hex(&bytes));

    // `cin wait` then `cin status` see the file through to its final store.
    let waited = run_cin(owned(&[
        "wait",
        &handle,
        "--until",
        "Stored",
        "--timeout",
        "30",
        "--pop",
        &app.base,
        "--json",
    ]))
    .await;
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert_eq!(json_lines(&waited.stdout)[0]["status"], "Stored");
    let status = run_cin(owned(&["status", &handle, "--pop", &app.base])).await;
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("status=Stored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cin_wait_times_out_with_its_own_exit_status() {
    let app = spawn_app().await;
    let start = app
        .start(serde_json::json!({"apikey": "k", "filename": "never.bin", "size": 10, "store": {"location": "s3"}, "fii": true}))
        .await;
    let handle = start["handle"].as_str().expect("handle").to_owned();
    let out = run_cin(owned(&[
        "wait",
        &handle,
        "--until",
        "Stored",
        "--timeout",
        "0.5",
        "--pop",
        &app.base,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(cin_client::cli::EXIT_WAIT_TIMEOUT));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Uploading"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nearest_pop_gets_the_upload() {
    let fast = spawn_app().await;
    let (slow, slow_proxy) = pop_behind(Faults {
        latency: Duration::from_millis(100),
        ..Faults::default()
    })
    .await;
    let pops = vec![slow_proxy.url(), fast.base.clone()];

    let transport = HttpTransport::new("k").expect("http client");
    let ranking = rank_pops(
        &transport,
        &TokioClock::new(),
        &pops,
        &ProbePolicy::default(),
    )
    .await;
    assert_eq!(ranking[0].pop, fast.base);
    let slow_rtt = ranking[1].rtt.expect("the slow POP answers");
    assert!(slow_rtt >= Duration::from_millis(200), "{slow_rtt:?}");

    let bytes = random_bytes(3 * MIB, 3);
    let report = uploader(UploadOptions::default())
        .upload(job(&bytes, pops))
        .await
        .expect("upload");
    assert_eq!(report.pop, fast.base);
    assert_eq!(
        sha256_hex(&fast.download(&report.handle).await),
        sha256_hex(&bytes)
    );
    assert_eq!(slow_proxy.puts().len(), 0, "nothing went to the far POP");
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_fails_over_to_the_next_pop() {
    // The nearest POP answers health checks but its start calls break.
    let (_near, near_proxy) = pop_behind(Faults {
        reset_paths: vec!["/multipart/start".into()],
        ..Faults::default()
    })
    .await;
    let (far, far_proxy) = pop_behind(Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    })
    .await;
    let bytes = random_bytes(2 * MIB, 2);
    let report = uploader(UploadOptions::default())
        .upload(job(&bytes, vec![far_proxy.url(), near_proxy.url()]))
        .await
        .expect("upload fails over");
    assert_eq!(report.pop, far_proxy.url());
    assert!(near_proxy.resets() >= 1, "the near POP was tried first");
    assert_eq!(
        sha256_hex(&far.download(&report.handle).await),
        sha256_hex(&bytes)
    );
}

/// Records every failed exchange the uploader retried.
#[derive(Default)]
struct Failures(std::sync::Mutex<Vec<cin_client::TransportError>>);

impl cin_client::Observer for Failures {
    fn retrying(
        &self,
        _part: u32,
        error: &cin_client::TransportError,
        _next_chunk: u64,
        _delay: Duration,
    ) {
        self.0.lock().unwrap().push(error.clone());
    }
}

/// Deadlines short enough for a test: a chunk's whole exchange may take a
/// minute, but a body that stops moving is abandoned after a second.
fn impatient_options() -> UploadOptions {
    let mut options = UploadOptions {
        seed: Some(3),
        ..UploadOptions::default()
    };
    options.timeouts.min = Duration::from_secs(60);
    options.timeouts.stall_min = Duration::from_secs(1);
    options.timeouts.stall_max = Duration::from_secs(1);
    options.timeouts.answer = Duration::from_secs(2);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_chunks_are_abandoned_and_retried_on_a_fresh_connection() {
    let (app, proxy) = pop_behind(Faults {
        // The first chunk of each of the two parts, and one of their retries.
        stall_nth: vec![0, 1, 3],
        seed: 31,
        ..Faults::default()
    })
    .await;
    let bytes = random_bytes(12 * MIB, 31);
    let failures = Arc::new(Failures::default());
    let uploader = Uploader::new(
        Arc::new(HttpTransport::new("k").expect("http client")),
        Arc::new(TokioClock::new()),
        impatient_options(),
        failures.clone(),
    );
    let report = uploader
        .upload(job(&bytes, vec![proxy.url()]))
        .await
        .expect("upload through a link that stalls");
    assert_eq!(
        sha256_hex(&app.download(&report.handle).await),
        sha256_hex(&bytes)
    );
    let stalls = proxy.stalls();
    assert_eq!(stalls, 3, "the proxy must actually have stalled requests");
    let failures = failures.0.lock().unwrap();
    let abandoned = failures
        .iter()
        .filter(|e| matches!(e, cin_client::TransportError::Stalled(_)))
        .count();
    // Each stall was noticed by its lack of progress, not by the chunk's whole deadline.
    assert_eq!(abandoned as u64, stalls, "{failures:?}");
    assert!(
        !failures
            .iter()
            .any(|e| matches!(e, cin_client::TransportError::Timeout(_))),
        "{failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_survives_a_blackout() {
    let (app, proxy) = pop_behind(Faults {
        // Slow enough that the blackout falls in the middle of the upload.
        bandwidth: Some(16 * MIB as u64),
        seed: 32,
        ..Faults::default()
    })
    .await;
    let bytes = random_bytes(32 * MIB, 32);
    let job = job(&bytes, vec![proxy.url()]);
    let upload = tokio::spawn(async move { uploader(impatient_options()).upload(job).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while proxy.put_body_bytes() < 4 * MIB as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.black_out(Duration::from_secs(3));
    let report = upload
        .await
        .expect("join")
        .expect("upload through a blackout");
    assert!(
        proxy.resets() >= 1,
        "the blackout must have cut connections"
    );
    assert_eq!(
        sha256_hex(&app.download(&report.handle).await),
        sha256_hex(&bytes)
    );
}

/// How many requests a route has answered (in this process: metrics are global).
async fn requests_to(app: &TestApp, route: &str) -> f64 {
    app.metric_with("cin_http_requests_total", &format!("route=\"{route}\""))
        .await
}

/// With the upload grant of the start answer, a chunk is one PUT: no
/// `/multipart/upload` round trip before it. A grant too close to its expiry is
/// not used; the per-chunk call (which renews it) takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chunk_is_one_request_while_the_upload_grant_lasts() {
    let bytes = random_bytes(12 * MIB, 71);
    for (ttl_secs, asks_per_put) in [(3600, 0.0), (5, 1.0)] {
        let app = spawn_app_with(|c| c.uploads.upload_url_ttl_secs = ttl_secs).await;
        let puts_before = requests_to(&app, "/upload/{upload_id}/{part}").await;
        let asks_before = requests_to(&app, "/multipart/upload").await;
        let options = UploadOptions {
            seed: Some(4),
            ..UploadOptions::default()
        };
        let report = uploader(options)
            .upload(job(&bytes, vec![app.base.clone()]))
            .await
            .expect("upload");
        assert_eq!(
            sha256_hex(&app.download(&report.handle).await),
            sha256_hex(&bytes)
        );
        let puts = requests_to(&app, "/upload/{upload_id}/{part}").await - puts_before;
        let asks = requests_to(&app, "/multipart/upload").await - asks_before;
        assert!(puts >= 2.0, "{puts} chunk PUTs");
        assert_eq!(
            asks,
            asks_per_put * puts,
            "ttl {ttl_secs} s: {asks} asks for {puts} PUTs"
        );
    }
}

/// A connection whose bytes the far end stops acknowledging is ended by the
/// kernel (`TCP_USER_TIMEOUT`), and that is a dead connection to retry on a
/// fresh one, not a timeout that would shrink chunks and halve the parts in
/// flight (reqwest reports both as timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_bytes_end_a_connection_as_a_stall_not_a_timeout() {
    use cin_client::transport::{ChunkDeadlines, ChunkRequest, StartRequest, Transport};
    // The first chunk PUT stops being forwarded halfway, the socket left open.
    let (_app, proxy) = pop_behind(Faults {
        stall_nth: vec![0],
        ..Faults::default()
    })
    .await;
    let transport = HttpTransport::new("k").expect("http client");
    let bytes = random_bytes(16 * MIB, 72);
    let started = transport
        .start(
            &proxy.url(),
            &StartRequest {
                filename: "u.bin".into(),
                mimetype: "application/octet-stream".into(),
                size: bytes.len() as u64,
                store: StoreOptions::s3(),
            },
        )
        .await
        .expect("start");
    // Deadlines far beyond the kernel's limit: only the kernel can end this.
    let patient = Duration::from_secs(60);
    let chunk = ChunkRequest::new(started.upload_id, 1, 0, bytes.into());
    let error = transport
        .send_chunk(
            &proxy.url(),
            &chunk,
            ChunkDeadlines {
                total: patient,
                stall: patient,
                answer: patient,
                kernel_limit: Some(Duration::from_secs(1)),
            },
        )
        .await
        .expect_err("the stalled chunk cannot be acknowledged");
    assert!(
        matches!(error, cin_client::TransportError::Stalled(_)),
        "{error}"
    );
    assert_eq!(proxy.stalls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_start_go_to_the_pop_the_location_url_names() {
    // The client reaches the POP through a proxy (say, an anycast address) that
    // cannot carry `complete`; the POP's own address is its location_url.
    let app = spawn_app().await;
    let proxy = FaultProxy::start(Faults {
        reset_paths: vec!["/multipart/complete".into()],
        ..Faults::default()
    })
    .await;
    proxy.set_upstream(&app.base);
    let bytes = random_bytes(3 * MIB + 5, 60);
    let mut options = impatient_options();
    options.retry_deadline = Duration::from_secs(10);
    let report = uploader(options)
        .upload(job(&bytes, vec![proxy.url()]))
        .await
        .expect("complete reaches the POP its location_url names");
    assert_eq!(
        report.pop, app.base,
        "the upload's calls went to its origin"
    );
    assert_eq!(
        sha256_hex(&app.download(&report.handle).await),
        sha256_hex(&bytes)
    );
}
