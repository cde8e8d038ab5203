//! Power cuts. The POP's data directory lives on [`LossyFs`], which keeps only
//! what was synced; a SIGKILL alone keeps the page cache, so it never catches a
//! missing fsync. Mixed uploads run concurrently, every acknowledgment (2xx) is
//! recorded with the bytes it acknowledged, then at a random moment the power
//! goes: the filesystem freezes and falls back to its durable state, the POP is
//! killed, and a new POP on the same directory must still have everything it
//! acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::lossy_fs::LossyFs;
use crate::support::{chunk_request, random_bytes, sha256_hex, PopProcess, MIB};

const TRIALS: u64 = 6;
const KIB: usize = 1024;
/// Small `/api/store` bodies (below 1 MiB) go to the shared log; larger ones get a file.
const SMALL_FILE_LIMIT: usize = MIB;

#[test]
fn power_cut_filesystem_keeps_only_what_was_synced() {
    let fs = LossyFs::mount();
    let root = fs.path();
    let d = root.join("d");
    let sync_dir = |dir: &Path| File::open(dir).unwrap().sync_all().unwrap();
    std::fs::create_dir(&d).unwrap();
    std::fs::create_dir(root.join("e")).unwrap();
    sync_dir(root);

    let mut kept = File::create(d.join("kept")).unwrap();
    kept.write_all(b"durable").unwrap();
    kept.sync_data().unwrap();
    std::fs::write(d.join("old"), b"old").unwrap();
    File::open(d.join("old")).unwrap().sync_all().unwrap();
    let holes = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.join("holes"))
        .unwrap();
    (&holes).write_all(&[7u8; 8192]).unwrap();
    let fallocate = |mode: i32, offset: i64, len: i64| {
        // SAFETY: plain integer arguments on an open descriptor.
        let rc = unsafe { libc::fallocate(holes.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    fallocate(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .unwrap();
    let unsupported = fallocate(libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096).unwrap_err();
    assert_eq!(unsupported.raw_os_error(), Some(libc::EOPNOTSUPP));
    holes.sync_all().unwrap();
    sync_dir(&d);

    // None of what follows is durable.
    kept.write_all(b" and more").unwrap();
    // SAFETY: plain integer arguments on an open descriptor.
    let rc = unsafe {
        libc::sync_file_range(
            kept.as_raw_fd(),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    assert_eq!(rc, 0);
    std::fs::rename(d.join("old"), d.join("renamed")).unwrap();
    let mut fresh = File::create(d.join("fresh")).unwrap();
    fresh.write_all(b"synced, but not its entry").unwrap();
    fresh.sync_all().unwrap();
    File::create(root.join("e/new"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::remove_file(d.join("holes")).unwrap();

    let report = fs.cut();
    let lost = report.to_string();
    for path in ["d/kept", "d/renamed", "d/fresh", "e/new", "d/holes"] {
        assert!(lost.contains(path), "{path} not in the report:\n{lost}");
    }
    let frozen = std::fs::metadata(&d).unwrap_err();
    assert_eq!(
        frozen.raw_os_error(),
        Some(libc::EIO),
        "frozen after the cut"
    );
    fs.resume();

    assert_eq!(std::fs::read(d.join("kept")).unwrap(), b"durable");
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"old");
    assert!(!d.join("renamed").exists());
    assert!(!d.join("fresh").exists());
    assert_eq!(std::fs::read_dir(root.join("e")).unwrap().count(), 0);
    let mut expected = vec![0u8; 4096];
    expected.extend_from_slice(&[7u8; 4096]);
    assert_eq!(std::fs::read(d.join("holes")).unwrap(), expected);
    let fsyncs = fs.fsyncs();
    assert_eq!(fsyncs.get("d"), Some(&1), "{fsyncs:?}");
    assert_eq!(fsyncs.get("d/kept"), Some(&1), "{fsyncs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_loses_nothing_acknowledged() {
    let mut failed = Vec::new();
    for seed in 1..=TRIALS {
        let outcome = trial(seed).await;
        eprintln!("{}", outcome.summary);
        if !outcome.losses.is_empty() {
            failed.push(format!(
                "trial {seed}: {} acknowledged things lost or wrong:\n  {}\n\
                 what the cut threw away:\n{}\nfsyncs seen before the cut: {}",
                outcome.losses.len(),
                outcome.losses.join("\n  "),
                outcome.cut_report,
                outcome.fsyncs
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {TRIALS} power-cut trials lost acknowledged data:\n\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

struct TrialOutcome {
    summary: String,
    losses: Vec<String>,
    cut_report: String,
    fsyncs: String,
}

async fn trial(seed: u64) -> TrialOutcome {
    let fs = LossyFs::mount();
    let pop = PopProcess::start(fs.path());
    let client = Client::new(pop.base.clone());
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = StdRng::seed_from_u64(seed);
    let workers: Vec<_> = [
        Workload::Regular { cut_off: false },
        Workload::Regular { cut_off: true },
        Workload::Fii { cut_off: false },
        Workload::Fii { cut_off: true },
        Workload::Store { large: false },
        Workload::Store { large: false },
        Workload::Store { large: true },
        Workload::Tus { cut_off: false },
        Workload::Tus { cut_off: true },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, workload)| {
        let worker = Worker {
            client: client.clone(),
            ledger: ledger.clone(),
            stop: stop.clone(),
            rng: StdRng::seed_from_u64(seed * 1000 + i as u64),
            seed: seed * 1_000_000 + i as u64 * 10_000,
        };
        tokio::spawn(worker.run(workload))
    })
    .collect();

    // The moment of the cut: after a random number of acknowledgments, plus a
    // random delay so it falls anywhere inside a request, not just between two.
    let target = rng.gen_range(4..60);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ledger.acks.load(Ordering::SeqCst) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..25))).await;
    // No new requests from here on; answers to those in flight still count.
    stop.store(true, Ordering::SeqCst);
    let report = fs.cut();
    let fsyncs = summarize_fsyncs(&fs.fsyncs());
    tokio::task::spawn_blocking(move || pop.kill())
        .await
        .expect("kill");
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
    }
    fs.resume();

    let uploads = ledger.uploads.lock().unwrap().clone();
    let acks = ledger.acks.load(Ordering::SeqCst);
    let errors = ledger.errors.lock().unwrap().clone();
    let mut losses = Vec::new();
    match PopProcess::try_spawn(PopProcess::command(fs.path(), &[])) {
        Ok(pop) => {
            let client = Client::new(pop.base.clone());
            for upload in uploads.iter().filter(|u| u.started || u.complete) {
                if let Err(loss) = verify(&client, upload).await {
                    losses.push(format!("{}: {loss}", upload.describe()));
                }
            }
            tokio::task::spawn_blocking(move || pop.kill())
                .await
                .expect("kill");
        }
        Err(e) => losses.push(format!("the POP did not start again after the cut: {e}")),
    }
    let complete = uploads.iter().filter(|u| u.complete).count();
    let mut summary = format!(
        "trial {seed}: cut after {acks} acknowledgments ({} uploads acknowledged, {complete} complete): {} lost",
        uploads.iter().filter(|u| u.started || u.complete).count(),
        losses.len()
    );
    if !errors.is_empty() {
        summary.push_str(&format!(
            "\n  requests refused before the cut (not counted as losses):\n    {}",
            errors.join("\n    ")
        ));
    }
    let mut cut_report = report.lost;
    if cut_report.len() > 40 {
        let more = cut_report.len() - 40;
        cut_report.truncate(40);
        cut_report.push(format!("... and {more} more"));
    }
    TrialOutcome {
        summary,
        losses,
        cut_report: format!("  {}", cut_report.join("\n  ")),
        fsyncs,
    }
}

/// Per-directory totals of fsyncs; the metadata store's files by name.
fn summarize_fsyncs(fsyncs: &BTreeMap<String, u64>) -> String {
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for (path, n) in fsyncs {
        let key = if path.starts_with("metadata") || !path.contains('/') {
            path.clone()
        } else {
            // parts/{upload}/{part} and the like: count per top-level kind.
            let first = path.split('/').next().unwrap_or_default();
            format!("{first}/**")
        };
        *totals.entry(key).or_default() += n;
    }
    if !fsyncs.keys().any(|p| p == "metadata/db") {
        totals.insert("metadata/db".into(), 0);
    }
    totals
        .iter()
        .map(|(p, n)| format!("{p}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that a new POP still has what `upload` had acknowledged.
async fn verify(client: &Client, upload: &Upload) -> Result<(), String> {
    let handle = if upload.complete {
        upload.handle.clone()
    } else {
        match upload.flow {
            Flow::Regular => finish_regular(client, upload).await?,
            Flow::Fii => finish_fii(client, upload).await?,
            Flow::Tus => finish_tus(client, upload).await?,
            // A store is acknowledged whole or not at all.
            Flow::Store => return Ok(()),
        }
    };
    let served = client
        .download(&handle)
        .await
        .map_err(|e| format!("filelink {handle}: {e}"))?;
    if sha256_hex(&served) != sha256_hex(&upload.bytes) {
        return Err(format!(
            "filelink {handle} serves {} bytes that differ from the {} uploaded",
            served.len(),
            upload.bytes.len()
        ));
    }
    let status = client
        .status(&handle)
        .await
        .map_err(|e| format!("metadata of {handle}: {e}"))?;
    if status != "InTransit" && status != "Stored" {
        return Err(format!("{handle} has status {status}"));
    }
    Ok(())
}

/// Sends the parts that were not acknowledged and completes: the file must be whole.
async fn finish_regular(client: &Client, upload: &Upload) -> Result<String, String> {
    let mut parts = Vec::new();
    for (i, bytes) in upload.bytes.chunks(upload.part_size).enumerate() {
        let part = i as u32 + 1;
        let etag = match upload.parts.get(&part) {
            Some(etag) => etag.clone(),
            None => client
                .chunk(&upload.upload_id, part, None, bytes)
                .await
                .map_err(|e| format!("resending unacknowledged part {part}: {e}"))?,
        };
        parts.push(json!({"part_number": part, "etag": etag}));
    }
    let acked: Vec<_> = upload.parts.keys().collect();
    let done = client
        .post_json(
            "/multipart/complete",
            json!({"apikey": "k", "upload_id": upload.upload_id, "parts": parts}),
        )
        .await
        .map_err(|e| format!("complete (parts {acked:?} were acknowledged): {e}"))?;
    handle_of(&done)
}

/// Sends the chunks that were not acknowledged, commits every part and completes.
async fn finish_fii(client: &Client, upload: &Upload) -> Result<String, String> {
    for (i, part_bytes) in upload.bytes.chunks(upload.part_size).enumerate() {
        let part = i as u32 + 1;
        for (j, chunk) in part_bytes.chunks(upload.chunk_size).enumerate() {
            let offset = (j * upload.chunk_size) as u64;
            if !upload.chunks.contains(&(part, offset)) {
                client
                    .chunk(&upload.upload_id, part, Some(offset), chunk)
                    .await
                    .map_err(|e| format!("resending unacknowledged chunk {part}@{offset}: {e}"))?;
            }
        }
        let acked: Vec<_> = upload.chunks.iter().filter(|c| c.0 == part).collect();
        client
            .post_json(
                "/multipart/commit",
                json!({"apikey": "k", "upload_id": upload.upload_id, "part": part, "size": upload.bytes.len()}),
            )
            .await
            .map_err(|e| {
                format!("commit of part {part} (chunks (part, offset) {acked:?} were acknowledged): {e}")
            })?;
    }
    let done = client
        .post_json(
            "/multipart/complete",
            json!({"apikey": "k", "upload_id": upload.upload_id, "fii": true}),
        )
        .await
        .map_err(|e| format!("complete: {e}"))?;
    handle_of(&done)
}

/// The offset must not have gone back; the rest is sent from there.
async fn finish_tus(client: &Client, upload: &Upload) -> Result<String, String> {
    let offset = client
        .tus_head(&upload.upload_id)
        .await
        .map_err(|e| format!("HEAD (offset {} was acknowledged): {e}", upload.tus_offset))?;
    if offset < upload.tus_offset {
        return Err(format!(
            "HEAD reports offset {offset}, but {} was acknowledged",
            upload.tus_offset
        ));
    }
    if offset < upload.bytes.len() as u64 {
        client
            .tus_patch(&upload.upload_id, offset, &upload.bytes[offset as usize..])
            .await
            .map_err(|e| format!("PATCH of the rest from {offset}: {e}"))?;
    }
    Ok(upload.handle.clone())
}

fn handle_of(answer: &Value) -> Result<String, String> {
    answer["handle"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no handle in {answer}"))
}

#[derive(Clone, Copy, Debug)]
enum Flow {
    Regular,
    Fii,
    Store,
    Tus,
}

/// One upload and what the POP acknowledged of it.
#[derive(Clone)]
struct Upload {
    flow: Flow,
    /// Parts (or PATCHes) whose first attempt was a body cut off mid-way.
    cut_off: bool,
    bytes: Arc<Vec<u8>>,
    part_size: usize,
    /// Intelligent ingestion: the chunk size inside each part.
    chunk_size: usize,
    /// The multipart upload id, or the tus upload's path.
    upload_id: String,
    handle: String,
    /// `start` (or tus creation) was acknowledged.
    started: bool,
    /// Regular multipart: acknowledged parts and their ETags.
    parts: BTreeMap<u32, String>,
    /// Intelligent ingestion: acknowledged chunks as (part, offset inside it).
    chunks: BTreeSet<(u32, u64)>,
    /// tus: the acknowledged offset.
    tus_offset: u64,
    /// The whole file was acknowledged (complete, last PATCH, or store).
    complete: bool,
}

impl Upload {
    fn new(flow: Flow, cut_off: bool, bytes: Vec<u8>, part_size: usize, chunk_size: usize) -> Self {
        Upload {
            flow,
            cut_off,
            bytes: Arc::new(bytes),
            part_size,
            chunk_size,
            upload_id: String::new(),
            handle: String::new(),
            started: false,
            parts: BTreeMap::new(),
            chunks: BTreeSet::new(),
            tus_offset: 0,
            complete: false,
        }
    }

    fn describe(&self) -> String {
        let size = self.bytes.len();
        let what = match self.flow {
            Flow::Regular => format!(
                "multipart upload {} ({size} bytes, parts of {}, acknowledged parts {:?}{})",
                self.upload_id,
                self.part_size,
                self.parts.keys().collect::<Vec<_>>(),
                if self.complete { ", completed" } else { "" }
            ),
            Flow::Fii => format!(
                "intelligent-ingestion upload {} ({size} bytes, parts of {}, chunks of {}, {} chunks acknowledged{})",
                self.upload_id,
                self.part_size,
                self.chunk_size,
                self.chunks.len(),
                if self.complete { ", completed" } else { "" }
            ),
            Flow::Store => format!(
                "/api/store of {size} bytes ({})",
                if size < SMALL_FILE_LIMIT {
                    "small-file log"
                } else {
                    "a file of its own"
                }
            ),
            Flow::Tus => format!(
                "tus upload {} ({size} bytes, offset {} acknowledged{})",
                self.upload_id,
                self.tus_offset,
                if self.complete { ", completed" } else { "" }
            ),
        };
        let retried = if self.cut_off {
            ", first attempts of chunks cut off and retried"
        } else {
            ""
        };
        format!("{what}{retried}, handle {}", self.handle)
    }
}

#[derive(Default)]
struct Ledger {
    uploads: Mutex<Vec<Upload>>,
    acks: AtomicUsize,
    /// Refusals before the cut: not losses, but worth a look.
    errors: Mutex<Vec<String>>,
}

impl Ledger {
    fn add(&self, upload: Upload) -> usize {
        let mut uploads = self.uploads.lock().unwrap();
        uploads.push(upload);
        uploads.len() - 1
    }

    /// Records an acknowledgment.
    fn ack(&self, index: usize, change: impl FnOnce(&mut Upload)) {
        change(&mut self.uploads.lock().unwrap()[index]);
        self.acks.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug)]
enum Workload {
    Regular { cut_off: bool },
    Fii { cut_off: bool },
    Store { large: bool },
    Tus { cut_off: bool },
}

struct Worker {
    client: Client,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    rng: StdRng,
    seed: u64,
}

impl Worker {
    /// Uploads one file after another until stopped; any failure ends the file
    /// in hand (after the cut, every request fails).
    async fn run(mut self, workload: Workload) {
        while !self.stop.load(Ordering::SeqCst) {
            self.seed += 1;
            let result = match workload {
                Workload::Regular { cut_off } => self.regular(cut_off).await,
                Workload::Fii { cut_off } => self.fii(cut_off).await,
                Workload::Store { large } => self.store(large).await,
                Workload::Tus { cut_off } => self.tus(cut_off).await,
            };
            if let Err(e) = result {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                self.ledger
                    .errors
                    .lock()
                    .unwrap()
                    .push(format!("{workload:?}: {e}"));
                // The power may be off already; don't spin on a dead POP.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn stopped(&self) -> Result<(), String> {
        if self.stop.load(Ordering::SeqCst) {
            Err("stopped".into())
        } else {
            Ok(())
        }
    }

    async fn regular(&mut self, cut_off: bool) -> Result<(), String> {
        let part_size = self.rng.gen_range(200 * KIB..900 * KIB);
        let size = part_size * self.rng.gen_range(1..4) + self.rng.gen_range(1..part_size);
        let upload = Upload::new(
            Flow::Regular,
            cut_off,
            random_bytes(size, self.seed),
            part_size,
            0,
        );
        let bytes = upload.bytes.clone();
        let index = self.ledger.add(upload);
        let start = self
            .client
            .post_json(
                "/multipart/start",
                json!({"apikey": "k", "filename": "r.bin", "size": size, "store": {"location": "s3"}}),
            )
            .await?;
        let upload_id = start["upload_id"].as_str().unwrap_or_default().to_owned();
        let handle = start["handle"].as_str().unwrap_or_default().to_owned();
        self.ledger.ack(index, |u| {
            u.upload_id = upload_id.clone();
            u.handle = handle;
            u.started = true;
        });
        let mut parts = Vec::new();
        for (i, part_bytes) in bytes.chunks(part_size).enumerate() {
            self.stopped()?;
            let part = i as u32 + 1;
            if cut_off {
                self.client
                    .cut_off_chunk(&upload_id, part, None, part_bytes)
                    .await?;
            }
            let etag = self
                .client
                .chunk_retrying(&upload_id, part, None, part_bytes)
                .await?;
            parts.push(json!({"part_number": part, "etag": etag}));
            self.ledger.ack(index, |u| {
                u.parts.insert(part, etag);
            });
        }
        self.stopped()?;
        self.client
            .post_json(
                "/multipart/complete",
                json!({"apikey": "k", "upload_id": upload_id, "parts": parts}),
            )
            .await?;
        self.ledger.ack(index, |u| u.complete = true);
        Ok(())
    }

    async fn fii(&mut self, cut_off: bool) -> Result<(), String> {
        let part_size = MIB;
        let chunk_size = self.rng.gen_range(64 * KIB..400 * KIB);
        let size = part_size * self.rng.gen_range(0..2) + self.rng.gen_range(KIB..part_size);
        let upload = Upload::new(
            Flow::Fii,
            cut_off,
            random_bytes(size, self.seed),
            part_size,
            chunk_size,
        );
        let bytes = upload.bytes.clone();
        let index = self.ledger.add(upload);
        let start = self
            .client
            .post_json(
                "/multipart/start",
                json!({"apikey": "k", "filename": "f.bin", "size": size, "store": {"location": "s3"}, "fii": true}),
            )
            .await?;
        let upload_id = start["upload_id"].as_str().unwrap_or_default().to_owned();
        let handle = start["handle"].as_str().unwrap_or_default().to_owned();
        self.ledger.ack(index, |u| {
            u.upload_id = upload_id.clone();
            u.handle = handle;
            u.started = true;
        });
        for (i, part_bytes) in bytes.chunks(part_size).enumerate() {
            let part = i as u32 + 1;
            for (j, chunk) in part_bytes.chunks(chunk_size).enumerate() {
                self.stopped()?;
                let offset = (j * chunk_size) as u64;
                // The first chunk of a part creates its file: cut that one off.
                if cut_off && j == 0 {
                    self.client
                        .cut_off_chunk(&upload_id, part, Some(offset), chunk)
                        .await?;
                }
                self.client
                    .chunk_retrying(&upload_id, part, Some(offset), chunk)
                    .await?;
                self.ledger.ack(index, |u| {
                    u.chunks.insert((part, offset));
                });
            }
            self.client
                .post_json(
                    "/multipart/commit",
                    json!({"apikey": "k", "upload_id": upload_id, "part": part, "size": size}),
                )
                .await?;
        }
        self.stopped()?;
        self.client
            .post_json(
                "/multipart/complete",
                json!({"apikey": "k", "upload_id": upload_id, "fii": true}),
            )
            .await?;
        self.ledger.ack(index, |u| u.complete = true);
        Ok(())
    }

    async fn store(&mut self, large: bool) -> Result<(), String> {
        let size = if large {
            self.rng.gen_range(SMALL_FILE_LIMIT + 1..5 * MIB / 2)
        } else {
            self.rng.gen_range(0..900 * KIB)
        };
        let upload = Upload::new(Flow::Store, false, random_bytes(size, self.seed), size, 0);
        let bytes = upload.bytes.clone();
        let index = self.ledger.add(upload);
        let answer = self.client.store(bytes.to_vec()).await?;
        let handle = handle_of(&answer)?;
        self.ledger.ack(index, |u| {
            u.handle = handle;
            u.complete = true;
        });
        Ok(())
    }

    async fn tus(&mut self, cut_off: bool) -> Result<(), String> {
        let size = self.rng.gen_range(300 * KIB..2 * MIB);
        let upload = Upload::new(Flow::Tus, cut_off, random_bytes(size, self.seed), size, 0);
        let bytes = upload.bytes.clone();
        let index = self.ledger.add(upload);
        let (path, handle) = self.client.tus_create(size).await?;
        self.ledger.ack(index, |u| {
            u.upload_id = path.clone();
            u.handle = handle;
            u.started = true;
        });
        let mut offset = 0;
        while offset < size {
            self.stopped()?;
            let end = (offset + self.rng.gen_range(100 * KIB..600 * KIB)).min(size);
            let acked = if cut_off {
                self.client
                    .cut_off_patch(&path, offset as u64, &bytes[offset..end])
                    .await?;
                self.client.tus_resume(&path, &bytes, end).await?
            } else {
                self.client
                    .tus_patch(&path, offset as u64, &bytes[offset..end])
                    .await?
            };
            offset = acked as usize;
            self.ledger.ack(index, |u| {
                u.tus_offset = acked;
                u.complete = acked == size as u64;
            });
        }
        Ok(())
    }
}

/// Plain calls to one POP that report failures instead of panicking.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: String) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Client { base, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn answer(resp: reqwest::Response) -> Result<Value, String> {
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{status}, body: {e}"))?;
        if !status.is_success() {
            return Err(format!("{status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{status}, not JSON ({e}): {text}"))
    }

    pub async fn post_json(&self, path: &str, body: Value) -> Result<Value, String> {
        let resp = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        Self::answer(resp)
            .await
            .map_err(|e| format!("POST {path}: {e}"))
    }

    /// `/multipart/upload`: the signed URL and headers for one chunk.
    pub async fn chunk_url(
        &self,
        upload_id: &str,
        part: u32,
        offset: Option<u64>,
        bytes: &[u8],
    ) -> Result<Value, String> {
        self.post_json(
            "/multipart/upload",
            chunk_request(upload_id, part, offset, bytes),
        )
        .await
    }

    /// One chunk; returns its ETag once acknowledged.
    pub async fn chunk(
        &self,
        upload_id: &str,
        part: u32,
        offset: Option<u64>,
        bytes: &[u8],
    ) -> Result<String, String> {
        let answer = self.chunk_url(upload_id, part, offset, bytes).await?;
        self.put_chunk(&answer, bytes).await
    }

    /// PUTs a chunk's bytes to the URL `/multipart/upload` answered; returns the ETag.
    pub async fn put_chunk(&self, answer: &Value, bytes: &[u8]) -> Result<String, String> {
        let mut put = self
            .http
            .put(answer["url"].as_str().unwrap_or_default())
            .body(bytes.to_vec());
        if let Some(headers) = answer["headers"].as_object() {
            for (k, v) in headers {
                put = put.header(k, v.as_str().unwrap_or_default());
            }
        }
        let resp = put.send().await.map_err(|e| format!("PUT chunk: {e}"))?;
        let status = resp.status();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("PUT chunk: {status}: {text}"));
        }
        Ok(etag)
    }

    /// A retry right after a cut-off attempt may find it still being torn down:
    /// try again for a while.
    pub async fn chunk_retrying(
        &self,
        upload_id: &str,
        part: u32,
        offset: Option<u64>,
        bytes: &[u8],
    ) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.chunk(upload_id, part, offset, bytes).await {
                Ok(etag) => return Ok(etag),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) if e.contains("error sending request") => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A chunk PUT whose body stops half-way: the head says `Content-Length: N`,
    /// fewer bytes follow, then the connection closes.
    pub async fn cut_off_chunk(
        &self,
        upload_id: &str,
        part: u32,
        offset: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), String> {
        let answer = self.chunk_url(upload_id, part, offset, bytes).await?;
        let url = reqwest::Url::parse(answer["url"].as_str().unwrap_or_default())
            .map_err(|e| format!("chunk URL: {e}"))?;
        let mut head = format!(
            "PUT {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            url.path(),
            url.query().unwrap_or_default(),
            url.authority(),
            bytes.len()
        );
        if let Some(headers) = answer["headers"].as_object() {
            for (k, v) in headers {
                head.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap_or_default()));
            }
        }
        head.push_str("\r\n");
        send_cut_off(&url, &head, bytes).await
    }

    /// A PATCH whose body stops half-way.
    pub async fn cut_off_patch(&self, path: &str, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url(path)).map_err(|e| format!("tus URL: {e}"))?;
        let head = format!(
            "PATCH {} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\n\
             Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n\
             Content-Length: {}\r\n\r\n",
            url.path(),
            url.authority(),
            bytes.len()
        );
        send_cut_off(&url, &head, bytes).await
    }

    pub async fn store(&self, bytes: Vec<u8>) -> Result<Value, String> {
        let resp = self
            .http
            .post(self.url("/api/store/s3?filename=s.bin"))
            .body(bytes)
            .send()
            .await
            .map_err(|e| format!("POST /api/store: {e}"))?;
        Self::answer(resp)
            .await
            .map_err(|e| format!("POST /api/store: {e}"))
    }

    /// Creates a tus upload; returns its path (`/files/...`) and handle.
    pub async fn tus_create(&self, size: usize) -> Result<(String, String), String> {
        let resp = self
            .http
            .post(self.url("/files/"))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", size.to_string())
            .send()
            .await
            .map_err(|e| format!("tus creation: {e}"))?;
        if resp.status() != 201 {
            return Err(format!("tus creation: {}", resp.status()));
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let location = header("location");
        let path = location
            .find("/files/")
            .map(|i| location[i..].to_owned())
            .ok_or_else(|| format!("tus creation: location {location}"))?;
        Ok((path, header("cin-handle")))
    }

    /// A PATCH; returns the acknowledged offset.
    pub async fn tus_patch(&self, path: &str, offset: u64, bytes: &[u8]) -> Result<u64, String> {
        let resp = self
            .http
            .patch(self.url(path))
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(bytes.to_vec())
            .send()
            .await
            .map_err(|e| format!("PATCH: {e}"))?;
        let status = resp.status();
        let acked = resp
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        match acked {
            Some(acked) if status == 204 => Ok(acked),
            _ => Err(format!(
                "PATCH: {status}: {}",
                resp.text().await.unwrap_or_default()
            )),
        }
    }

    /// After a broken PATCH: asks where the upload stands (the POP keeps what
    /// arrived) and sends the rest up to `end` from there, again while the broken
    /// request may still hold the upload.
    pub async fn tus_resume(&self, path: &str, bytes: &[u8], end: usize) -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let from = self.tus_head(path).await? as usize;
            if from >= end {
                return Ok(from as u64);
            }
            match self.tus_patch(path, from as u64, &bytes[from..end]).await {
                Ok(acked) => return Ok(acked),
                Err(e) if Instant::now() > deadline || e.contains("error sending request") => {
                    return Err(e)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub async fn tus_head(&self, path: &str) -> Result<u64, String> {
        let resp = self
            .http
            .head(self.url(path))
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        resp.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .filter(|_| status == 200)
            .ok_or_else(|| format!("{status} without Upload-Offset"))
    }

    pub async fn download(&self, handle: &str) -> Result<Vec<u8>, String> {
        let resp = self
            .http
            .get(self.url(&format!("/{handle}")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| format!("{status}: {e}"))?;
        if status != 200 {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(body.to_vec())
    }

    pub async fn status(&self, handle: &str) -> Result<String, String> {
        let resp = self
            .http
            .get(self.url(&format!("/{handle}/metadata")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let meta = Self::answer(resp).await?;
        Ok(meta["status"].as_str().unwrap_or_default().to_owned())
    }
}

/// Sends `head` and half of `body` on a new connection, then closes it.
async fn send_cut_off(url: &reqwest::Url, head: &str, body: &[u8]) -> Result<(), String> {
    let host = url.host_str().unwrap_or("127.0.0.1");
    let mut stream = tokio::net::TcpStream::connect((host, url.port().unwrap_or(80)))
        .await
        .map_err(|e| format!("connecting for a cut-off request: {e}"))?;
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("sending a cut-off request: {e}"))?;
    stream
        .write_all(&body[..body.len() / 2])
        .await
        .map_err(|e| format!("sending a cut-off request: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("sending a cut-off request: {e}"))?;
    Ok(())
}

/// The local final store is the only copy once the cache evicted the POP's own:
/// every directory it made for the object must survive a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_file_whose_local_copy_was_evicted_survives_a_power_cut() {
    let fs = LossyFs::mount();
    let env = [
        ("CIN__CACHE__MAX_BYTES".to_owned(), "1".to_owned()),
        ("CIN__CACHE__EVICT_INTERVAL_SECS".to_owned(), "1".to_owned()),
    ];
    let pop = PopProcess::start_with_env(fs.path(), &env);
    let bytes = random_bytes(300_000, 77);
    // Two directories deep inside the store's container: three new directories.
    let handle = pop
        .store_raw("/api/store/s3?filename=deep.bin&path=a/b/", bytes.clone())
        .await;
    pop.wait_metadata(&handle, Duration::from_secs(20), "eviction", |m| {
        m["status"] == "Stored" && m["local_copy"] == false
    })
    .await;
    let report = fs.cut();
    tokio::task::spawn_blocking(move || pop.kill())
        .await
        .expect("kill");
    fs.resume();

    let pop = PopProcess::start_with_env(fs.path(), &env);
    let resp = pop
        .http
        .get(pop.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let served = resp.bytes().await.unwrap();
    assert!(
        status == 200 && sha256_hex(&served) == sha256_hex(&bytes),
        "the stored file answered {status} with {} bytes after the cut; lost:\n  {}",
        served.len(),
        report.lost.join("\n  ")
    );
    tokio::task::spawn_blocking(move || pop.kill())
        .await
        .expect("kill");
}
