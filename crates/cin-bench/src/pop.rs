//! The POP under test: in this process (`cin_edge::run` on port 0), a child
//! process (the `cin-edge` binary, so its memory is its own), or one already
//! running elsewhere (`--target`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cin_edge::config::{ProfileKind, StorageProfile};
use cin_edge::Config;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;

/// In-process POPs whose thread has not ended yet.
static LIVE_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

pub struct Pop {
    /// e.g. `http://127.0.0.1:41234`
    pub base: String,
    /// The POP's own process, when it has one (child or `--target-pid`).
    pub pid: Option<u32>,
    inner: Inner,
    _data: Option<TempDir>,
}

enum Inner {
    InProcess {
        stop: Option<oneshot::Sender<()>>,
        finished: Option<oneshot::Receiver<anyhow::Result<()>>>,
    },
    Child(Child),
    External,
}

/// An S3 storage profile for the replication scenario, in both forms a POP takes
/// configuration in.
#[derive(Debug, Clone)]
pub struct S3Profile {
    pub name: String,
    pub bucket: String,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub part_size: u64,
    pub concurrency: usize,
}

impl S3Profile {
    pub fn apply(&self, config: &mut Config) {
        config.storage.profiles.insert(
            self.name.clone(),
            StorageProfile {
                kind: ProfileKind::S3,
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
                force_path_style: true,
                access_key_id: self.access_key.clone(),
                secret_access_key: self.secret_key.clone(),
                part_size: self.part_size,
                concurrency: self.concurrency,
                ..Default::default()
            },
        );
    }

    fn env(&self) -> Vec<(String, String)> {
        let key = |field: &str| {
            format!(
                "CIN__STORAGE__PROFILES__{}__{field}",
                self.name.to_uppercase()
            )
        };
        vec![
            (key("KIND"), "s3".into()),
            (key("BUCKET"), self.bucket.clone()),
            (key("ENDPOINT"), self.endpoint.clone()),
            (key("FORCE_PATH_STYLE"), "true".into()),
            (key("ACCESS_KEY_ID"), self.access_key.clone()),
            (key("SECRET_ACCESS_KEY"), self.secret_key.clone()),
            (key("PART_SIZE"), self.part_size.to_string()),
            (key("CONCURRENCY"), self.concurrency.to_string()),
        ]
    }
}

impl Pop {
    /// A POP inside this process with built-in defaults and a fresh data directory
    /// under `work`. It gets its own runtime (as the `cin-edge` binary has), so a
    /// POP that stalls its worker threads cannot stall the benchmark's clock.
    pub async fn in_process(work: &Path, profile: Option<&S3Profile>) -> anyhow::Result<Pop> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Pop::in_process_on(listener, work, |config| {
            if let Some(profile) = profile {
                profile.apply(config);
            }
        })
        .await
    }

    /// [`Pop::in_process`] on `listener`, with `configure` applied to its config.
    pub async fn in_process_on(
        listener: std::net::TcpListener,
        work: &Path,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Pop> {
        let data = tempfile::Builder::new().prefix("pop.").tempdir_in(work)?;
        let mut config = Config::default();
        config.server.data_dir = data.path().to_path_buf();
        config.server.shutdown_grace_secs = 5;
        configure(&mut config);
        listener.set_nonblocking(true)?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel::<anyhow::Result<()>>();
        LIVE_IN_PROCESS.fetch_add(1, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("pop".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("pop-worker")
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            cin_edge::run(listener, config, async move {
                                let _ = stopped.await;
                            })
                            .await
                        })
                    });
                LIVE_IN_PROCESS.fetch_sub(1, Ordering::SeqCst);
                let _ = done.send(result);
            })?;
        let pop = Pop {
            base,
            pid: None,
            inner: Inner::InProcess {
                stop: Some(stop),
                finished: Some(finished),
            },
            _data: Some(data),
        };
        pop.wait_healthy().await?;
        Ok(pop)
    }

    /// `bin serve --listen 127.0.0.1:0 --data-dir DIR` with built-in defaults.
    pub async fn child(
        bin: &Path,
        work: &Path,
        profile: Option<&S3Profile>,
    ) -> anyhow::Result<Pop> {
        let data = tempfile::Builder::new().prefix("pop.").tempdir_in(work)?;
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("NO_COLOR", "1")
            .envs(profile.map(S3Profile::env).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("child stderr")?;
        let (tx, rx) = mpsc::channel();
        // Keeps draining the log so the POP never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let url = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
            }
        });
        let pid = child.id();
        let base = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .map_err(|_| anyhow!("{} did not log its address", bin.display()));
        // Built before checking `base` so a POP that failed to start is killed on drop.
        let mut pop = Pop {
            base: String::new(),
            pid: Some(pid),
            inner: Inner::Child(child),
            _data: Some(data),
        };
        pop.base = base?;
        pop.wait_healthy().await?;
        Ok(pop)
    }

    /// Waits up to `patience` for every earlier in-process POP to end. sled keeps
    /// some locks process-wide, so a POP wedged in sled wedges any later one.
    pub async fn in_process_idle(patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        while LIVE_IN_PROCESS.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub fn external(base: &str, pid: Option<u32>) -> Pop {
        Pop {
            base: base.trim_end_matches('/').to_owned(),
            pid,
            inner: Inner::External,
            _data: None,
        }
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = http.get(format!("{}/healthz", self.base)).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the POP at {} never became healthy", self.base);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident set (VmHWM) of the POP's process, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        proc_status_kib(self.pid?, "VmHWM:").map(|k| k * 1024)
    }

    /// Resident set now (VmRSS), in bytes.
    pub fn rss(&self) -> Option<u64> {
        proc_status_kib(self.pid?, "VmRSS:").map(|k| k * 1024)
    }

    pub async fn metadata(&self, http: &reqwest::Client, handle: &str) -> anyhow::Result<Value> {
        let resp = http
            .get(format!("{}/{handle}/metadata", self.base))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("metadata of {handle}: {}", resp.status());
        }
        Ok(resp.json().await?)
    }

    /// Polls metadata until the file is `Stored`; returns its metadata.
    pub async fn wait_stored(
        &self,
        http: &reqwest::Client,
        handle: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let meta = self.metadata(http, handle).await?;
            if meta["status"] == "Stored" {
                return Ok(meta);
            }
            if Instant::now() > deadline {
                bail!("{handle} not Stored after {timeout:?}: {meta}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        match &mut self.inner {
            Inner::InProcess { stop, finished } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(finished) = finished.take() {
                    match tokio::time::timeout(Duration::from_secs(30), finished).await {
                        Ok(Ok(Err(e))) => eprintln!("  the POP stopped with an error: {e:#}"),
                        Ok(_) => {}
                        // Its threads are left behind; the process exit ends them.
                        Err(_) => eprintln!("  the POP did not stop within 30 s (stalled?)"),
                    }
                }
            }
            Inner::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Inner::External => {}
        }
    }
}

impl Drop for Pop {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::InProcess { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
            Inner::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Inner::External => {}
        }
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `cin-edge` binary: `explicit`, else beside this binary (same profile), else
/// target/release, else target/debug.
pub fn edge_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("cin-edge"));
        }
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    candidates.push(target.join("release/cin-edge"));
    candidates.push(target.join("debug/cin-edge"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!("no cin-edge binary found: cargo build --release -p cin-edge, or pass --pop-bin")
    })
}
