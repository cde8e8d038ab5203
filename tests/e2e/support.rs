//! `spawn_app()` and the helpers every end-to-end test shares.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use cin_edge::Config;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An HTTP client for one POP, with the calls tests make.
pub struct Pop {
    pub base: String,
    pub http: reqwest::Client,
}

/// A POP running inside the test process.
pub struct TestApp {
    pub pop: Pop,
    pub data_dir: PathBuf,
    _tmp: Option<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a POP on port 0 with a fresh data directory, after `tweak` adjusts its config.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut app = spawn_app_in(tmp.path(), tweak).await;
    app._tmp = Some(tmp);
    app
}

pub async fn spawn_app_in(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    spawn_app_on(listener, data_dir, tweak)
}

/// Starts a POP on `listener` (bound beforehand when other POPs must know its
/// address), with a fresh data directory.
pub fn spawn_app_on_fresh_dir(
    listener: tokio::net::TcpListener,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut app = spawn_app_on(listener, tmp.path(), tweak);
    app._tmp = Some(tmp);
    app
}

pub fn spawn_app_on(
    listener: tokio::net::TcpListener,
    data_dir: &Path,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = Config::default();
    config.server.data_dir = data_dir.to_path_buf();
    config.server.shutdown_grace_secs = 5;
    config.replicator.retry_base_ms = 50;
    config.replicator.retry_cap_ms = 500;
    // Test machines may have little disk; the watermark test sets its own.
    config.disk.min_free_bytes = 0;
    // No space set aside for the metadata store (the disk tests set their own).
    config.disk.metadata_reserve_bytes = 0;
    tweak(&mut config);
    let scheme = if config.server.tls() { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(cin_edge::run(listener, config, async move {
        let _ = stopped.await;
    }));
    TestApp {
        pop: Pop::new(base),
        data_dir: data_dir.to_path_buf(),
        _tmp: None,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    /// Upload directories under the part store (the small-file log aside).
    pub fn upload_dirs(&self) -> usize {
        std::fs::read_dir(self.data_dir.join("parts"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "log")
            .count()
    }

    /// Shuts the POP down gracefully and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
    }
}

impl std::ops::Deref for TestApp {
    type Target = Pop;
    fn deref(&self) -> &Pop {
        &self.pop
    }
}

impl Pop {
    pub fn new(base: String) -> Pop {
        Pop {
            base,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// `POST /multipart/start` that must succeed.
    pub async fn start(&self, body: Value) -> Value {
        let resp = self.post_json("/multipart/start", body).await;
        assert_eq!(resp.status(), 200, "start failed");
        resp.json().await.expect("start json")
    }

    /// Asks for an upload URL and PUTs `bytes` to it; returns the PUT response.
    pub async fn send_chunk(
        &self,
        upload_id: &str,
        part: u32,
        offset: Option<u64>,
        bytes: &[u8],
    ) -> reqwest::Response {
        let req = chunk_request(upload_id, part, offset, bytes);
        let resp = self.post_json("/multipart/upload", req).await;
        assert_eq!(
            resp.status(),
            200,
            "upload call failed: {}",
            resp.text().await.unwrap_or_default()
        );
        let answer: Value = resp.json().await.expect("upload json");
        let mut put = self
            .http
            .put(answer["url"].as_str().expect("url"))
            .body(bytes.to_vec());
        if let Some(headers) = answer["headers"].as_object() {
            for (k, v) in headers {
                put = put.header(k, v.as_str().expect("header value"));
            }
        }
        put.send().await.expect("put")
    }

    pub async fn complete(&self, upload_id: &str, extra: Value) -> reqwest::Response {
        let mut body = json!({"apikey": "k", "upload_id": upload_id});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.post_json("/multipart/complete", body).await
    }

    pub async fn metadata(&self, handle: &str) -> Value {
        let resp = self
            .http
            .get(self.url(&format!("/{handle}/metadata")))
            .send()
            .await
            .expect("metadata");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("metadata json")
    }

    pub async fn download(&self, handle: &str) -> Vec<u8> {
        let resp = self
            .http
            .get(self.url(&format!("/{handle}")))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 200, "filelink GET");
        resp.bytes().await.expect("body").to_vec()
    }

    /// Polls metadata until `status` is reached (or panics after `timeout`).
    pub async fn wait_status(&self, handle: &str, status: &str, timeout: Duration) -> Value {
        self.wait_metadata(handle, timeout, status, |meta| meta["status"] == status)
            .await
    }

    /// Polls metadata until `ready` holds for it (or panics after `timeout`, naming `what`).
    pub async fn wait_metadata(
        &self,
        handle: &str,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let meta = self.metadata(handle).await;
            if ready(&meta) {
                return meta;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{handle} never reached {what}: {meta}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The sum of every sample of a metric family in `/metrics`.
    pub async fn metric(&self, family: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|line| {
                line.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The sum of the samples of a metric family whose labels include `label`
    /// (e.g. `route="/multipart/upload"`).
    pub async fn metric_with(&self, family: &str, label: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|line| {
                line.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Polls `/metrics` until `family` sums to at least `at_least` (or panics after `timeout`).
    pub async fn wait_metric(&self, family: &str, at_least: f64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.metric(family).await;
            if value >= at_least {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{family} stayed at {value}, below {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until replicating `handle` has failed twice; the file must stay
    /// `InTransit` with the error in its metadata. Returns the metadata.
    pub async fn wait_failing_replication(&self, handle: &str, timeout: Duration) -> Value {
        let meta = self
            .wait_metadata(handle, timeout, "two failed attempts", |m| {
                m["replication"]["attempts"].as_u64().unwrap_or(0) >= 2
            })
            .await;
        assert_eq!(meta["status"], "InTransit");
        assert!(
            meta["replication"]["last_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{meta}"
        );
        meta
    }

    /// `POST` of raw bytes to `/api/store/...` that must succeed; returns the handle.
    pub async fn store_raw(&self, path_and_query: &str, bytes: Vec<u8>) -> String {
        let resp = self
            .http
            .post(self.url(path_and_query))
            .body(bytes)
            .send()
            .await
            .expect("store request");
        assert_eq!(resp.status(), 200, "store failed");
        let body: Value = resp.json().await.expect("store json");
        body["handle"].as_str().expect("handle").to_owned()
    }

    /// Uploads `bytes` in regular mode in parts of `part_size`; returns the handle.
    pub async fn upload_regular(&self, name: &str, bytes: &[u8], part_size: usize) -> String {
        let start = self
            .start(json!({"apikey": "k", "filename": name, "mimetype": "application/octet-stream", "size": bytes.len(), "store": {"location": "S3"}}))
            .await;
        let upload_id = start["upload_id"].as_str().expect("upload_id").to_owned();
        let mut parts = Vec::new();
        for (i, chunk) in bytes.chunks(part_size).enumerate() {
            let resp = self.send_chunk(&upload_id, i as u32 + 1, None, chunk).await;
            assert_eq!(resp.status(), 200);
            let etag = resp.headers()["etag"].to_str().expect("etag").to_owned();
            parts.push(json!({"part_number": i + 1, "etag": etag}));
        }
        let resp = self.complete(&upload_id, json!({"parts": parts})).await;
        assert_eq!(resp.status(), 200);
        let done: Value = resp.json().await.expect("complete json");
        done["handle"].as_str().expect("handle").to_owned()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A POP running as its own process, for tests that kill it.
pub struct PopProcess {
    pub pop: Pop,
    child: Child,
    /// Every line the POP printed on stderr, as it printed them.
    log: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for PopProcess {
    type Target = Pop;
    fn deref(&self) -> &Pop {
        &self.pop
    }
}

impl PopProcess {
    pub fn start(data_dir: &Path) -> PopProcess {
        Self::start_with_env(data_dir, &[])
    }

    /// Starts with extra `CIN__*` configuration variables.
    pub fn start_with_env(data_dir: &Path, env: &[(String, String)]) -> PopProcess {
        Self::try_spawn(Self::command(data_dir, env)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The command that runs a POP on port 0 (for tests that wrap it in another program).
    /// `CIN_TEST_POP_BINARY` runs another build instead (an older one, say, to see
    /// that a test catches what it was written for).
    pub fn command(data_dir: &Path, env: &[(String, String)]) -> Command {
        let binary = std::env::var_os("CIN_TEST_POP_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_cin-edge").into());
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("NO_COLOR", "1")
            .env("CIN__REPLICATOR__RETRY_BASE_MS", "50")
            .env("CIN__REPLICATOR__RETRY_CAP_MS", "500")
            .env("CIN__DISK__MIN_FREE_BYTES", "0")
            .env("CIN__DISK__METADATA_RESERVE_BYTES", "0")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Spawns `command` (a POP, or a program that runs one and passes its stderr
    /// through) and waits until the POP logs its address. On failure, says what it printed.
    pub fn try_spawn(mut command: Command) -> Result<PopProcess, String> {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("could not start cin-edge: {e}"))?;
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut printed = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                if !sent {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let url = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        let _ = tx.send(Ok(url));
                        sent = true;
                    } else if printed.len() < 40 {
                        printed.push(line);
                    }
                }
            }
            if !sent {
                let _ = tx.send(Err(printed.join("\n")));
            }
        });
        let failure = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(base)) => {
                return Ok(PopProcess {
                    pop: Pop::new(base),
                    child,
                    log,
                })
            }
            Ok(Err(printed)) => {
                format!("cin-edge exited without logging its address; it printed:\n{printed}")
            }
            Err(_) => "cin-edge did not log its address within 30 s".to_owned(),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(failure)
    }

    /// The lines the POP has printed on stderr so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the POP has printed a line `matches` accepts, and returns it.
    pub fn wait_for_log(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| matches(l)) {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the POP printed no such line within {timeout:?}; it printed:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The id of the process started (the wrapper, for a wrapped command).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the process to exit; returns whether it exited with 0.
    pub fn terminate(mut self, within: Duration) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "could not signal cin-edge");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cin-edge did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PopProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `/multipart/upload` body asking where to PUT `bytes` (FII when `offset` is given).
pub fn chunk_request(upload_id: &str, part: u32, offset: Option<u64>, bytes: &[u8]) -> Value {
    let mut req = json!({
        "apikey": "k", "upload_id": upload_id, "part": part, "size": bytes.len(),
        "md5": md5_b64(bytes), "store": {"location": "s3"},
    });
    if let Some(offset) = offset {
        req["offset"] = json!(offset);
        req["fii"] = json!(true);
    }
    req
}

/// A response header that must be there, as text.
pub fn header_value<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {resp:?}"))
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn md5_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes))
}

pub const MIB: usize = 1024 * 1024;

pub const S3_ACCESS_KEY: &str = "cinedgetestkey";
pub const S3_SECRET_KEY: &str = "cinedgetestsecret";

/// Which S3 implementation an [`S3Server`] runs: the tests that matter for every
/// service run against both, as the services differ (in how they report a
/// multipart object's checksum, for one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Backend {
    /// s3s-fs: checks SigV4 signatures, keeps objects in a directory.
    S3sFs,
    /// moto's server: another implementation of the S3 API, in memory (a restart empties it).
    Moto,
}

/// A real S3-compatible server on a free port.
pub struct S3Server {
    pub endpoint: String,
    pub backend: S3Backend,
    port: u16,
    root: TempDir,
    child: Option<Child>,
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CIN_TEST_S3S_FS") {
        return PathBuf::from(path);
    }
    let installed =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-tools/bin/s3s-fs");
    assert!(
        installed.exists(),
        "the S3 tests need s3s-fs: run scripts/test (it installs it), or set CIN_TEST_S3S_FS"
    );
    installed
}

fn moto_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CIN_TEST_MOTO") {
        return PathBuf::from(path);
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server");
    assert!(
        installed.exists(),
        "the moto tests need moto's server: run scripts/test (it installs it), or set CIN_TEST_MOTO"
    );
    installed
}

impl S3Server {
    /// s3s-fs.
    pub async fn start() -> S3Server {
        Self::start_backend(S3Backend::S3sFs).await
    }

    pub async fn start_backend(backend: S3Backend) -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            backend,
            port,
            root: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.resume().await;
        server
    }

    /// Starts (again) on the same port (and, for s3s-fs, the same directory).
    pub async fn resume(&mut self) {
        let child = match self.backend {
            S3Backend::S3sFs => Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(self.root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start s3s-fs"),
            // Its request log (stderr) lets tests count requests.
            S3Backend::Moto => Command::new(moto_server_binary())
                .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.request_log()).expect("moto log"))
                .spawn()
                .expect("start moto_server"),
        };
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{:?} did not start on port {}", self.backend, self.port);
    }

    fn request_log(&self) -> PathBuf {
        self.root.path().join("requests.log")
    }

    /// Requests with `method` whose target contains `needle` that the server
    /// answered with 200 (moto only: read from its request log).
    pub fn logged_requests(&self, method: &str, needle: &str) -> usize {
        assert_eq!(self.backend, S3Backend::Moto, "only moto logs its requests");
        let method = format!("\"{method} ");
        std::fs::read_to_string(self.request_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&method) && l.contains(needle) && l.contains("\" 200 "))
            .count()
    }

    /// Stops the server, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An SDK client, configured as it would be for AWS but for the endpoint.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        s3_client(&self.endpoint).await
    }

    pub async fn create_bucket(&self, bucket: &str) {
        create_bucket(&self.endpoint, bucket).await;
    }

    /// A storage profile delivering to `bucket` on this server.
    pub fn profile(&self, bucket: &str) -> cin_edge::config::StorageProfile {
        s3_profile(&self.endpoint, bucket)
    }

    /// `CIN__*` variables that configure storage profile `name` for `bucket` on this server.
    pub fn profile_env(&self, name: &str, bucket: &str) -> Vec<(String, String)> {
        let key =
            |field: &str| format!("CIN__STORAGE__PROFILES__{}__{}", name.to_uppercase(), field);
        vec![
            (key("KIND"), "s3".into()),
            (key("BUCKET"), bucket.into()),
            (key("ENDPOINT"), self.endpoint.clone()),
            (key("FORCE_PATH_STYLE"), "true".into()),
            (key("ACCESS_KEY_ID"), S3_ACCESS_KEY.into()),
            (key("SECRET_ACCESS_KEY"), S3_SECRET_KEY.into()),
            (key("PART_SIZE"), (5 * MIB).to_string()),
            (key("CONCURRENCY"), "1".into()),
        ]
    }

    /// Parts of multipart uploads the server holds (s3s-fs: `.upload_id-{id}.part-{n}` files).
    pub fn uploaded_parts(&self) -> usize {
        assert_eq!(self.backend, S3Backend::S3sFs, "reads s3s-fs's directory");
        std::fs::read_dir(self.root.path())
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| name.starts_with(".upload_id-"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Multipart uploads the server holds open, in any bucket.
    pub async fn open_multipart_uploads(&self) -> Vec<String> {
        match self.backend {
            // s3s-fs does not implement ListMultipartUploads; it keeps one
            // `.upload-{id}.json` file per open upload.
            S3Backend::S3sFs => std::fs::read_dir(self.root.path())
                .expect("s3s-fs root")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with(".upload-") && name.ends_with(".json"))
                .collect(),
            S3Backend::Moto => {
                let client = self.client().await;
                let buckets = client.list_buckets().send().await.expect("list buckets");
                let mut open = Vec::new();
                for bucket in buckets.buckets() {
                    let uploads = client
                        .list_multipart_uploads()
                        .bucket(bucket.name().unwrap_or_default())
                        .send()
                        .await
                        .expect("list multipart uploads");
                    open.extend(
                        uploads
                            .uploads()
                            .iter()
                            .filter_map(|u| u.upload_id().map(str::to_owned)),
                    );
                }
                open
            }
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SDK client for the S3 service at `endpoint` (the test credentials),
/// configured as it would be for AWS but for the endpoint.
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
            None,
            None,
            "test",
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    )
}

pub async fn create_bucket(endpoint: &str, bucket: &str) {
    s3_client(endpoint)
        .await
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("create bucket");
}

/// A storage profile delivering to `bucket` at the S3 service at `endpoint`.
pub fn s3_profile(endpoint: &str, bucket: &str) -> cin_edge::config::StorageProfile {
    cin_edge::config::StorageProfile {
        kind: cin_edge::config::ProfileKind::S3,
        bucket: bucket.to_owned(),
        endpoint: endpoint.to_owned(),
        force_path_style: true,
        access_key_id: S3_ACCESS_KEY.to_owned(),
        secret_access_key: S3_SECRET_KEY.to_owned(),
        part_size: 5 * MIB as u64,
        concurrency: 2,
        ..Default::default()
    }
}

/// An answer read off a raw connection.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `request` as is on a new connection, then reads the answer until the
/// server closes the connection or the answer is complete (by its Content-Length).
pub async fn raw_exchange(app: &TestApp, request: &[u8]) -> RawResponse {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(response) = parse_response(&received) {
            return response;
        }
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no complete answer in time: {:?}",
                    String::from_utf8_lossy(&received)
                )
            });
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    parse_response(&received).unwrap_or_else(|| {
        panic!(
            "the connection closed before a complete answer: {:?}",
            String::from_utf8_lossy(&received)
        )
    })
}

/// The answer in `bytes` once its head and its Content-Length of body are there.
fn parse_response(bytes: &[u8]) -> Option<RawResponse> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = &bytes[head_end + 4..];
    (body.len() >= length).then(|| RawResponse {
        status,
        headers,
        body: body[..length].to_vec(),
    })
}

/// A tmpfs of a fixed size on a fresh directory; unmounted on drop.
pub struct SmallFs {
    dir: TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB, or None (after saying why) where mounting is not permitted.
    pub fn mount(mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(SmallFs { dir }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes an unprivileged writer may still use.
    pub fn free(&self) -> u64 {
        fs4::statvfs(self.path())
            .expect("statvfs")
            .available_space()
    }

    /// Fills the filesystem with a file until only `leave` bytes are free.
    pub fn fill_leaving(&self, leave: u64) -> Filler {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let mut len = self.free().saturating_sub(leave);
        // The file's own extent blocks come out of the free space too: the last
        // bytes may not fit in one allocation.
        loop {
            // SAFETY: posix_fallocate only reads its integer arguments; the file is open for writing.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
            if rc == 0 {
                break;
            }
            assert!(
                rc == libc::ENOSPC && len > 0,
                "filling the filesystem: error {rc}"
            );
            len = len.saturating_sub(64 * 1024);
        }
        if leave == 0 {
            // What the allocation left, written a block at a time until none fits.
            let block = [0u8; 4096];
            let mut at = len;
            while std::os::unix::fs::FileExt::write_at(&file, &block, at).is_ok_and(|n| n > 0) {
                at += block.len() as u64;
            }
            let _ = file.flush();
        }
        Filler { path }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a POP being stopped may still hold files open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A file taking the filesystem's free space; removing it gives the space back.
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    pub fn remove(self) {
        std::fs::remove_file(&self.path).expect("removing the filler");
    }
}
