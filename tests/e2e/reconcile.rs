//! Reconciliation at start: bytes a crash left without an owner are collected
//! (and their disk blocks given back), bytes still owned are kept and serve
//! exactly, and a file whose local bytes are gone is reported and never served
//! as a truncated 200.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cin_domain::{Handle, UploadId};
use cin_edge::config::{ProfileKind, StorageProfile};
use cin_edge::Config;
use cin_storage::{JobChange, MetadataStore, SledMetadataStore};
use serde_json::{json, Value};

use crate::support::{random_bytes, sha256_hex, spawn_app_in, Pop, MIB};

/// A bucket on a final store that never answers: files sent there stay `InTransit`.
const STUCK_BUCKET: &str = "stuck-bucket";

fn configure(config: &mut Config) {
    config.storage.profiles.insert(
        "stuck".into(),
        StorageProfile {
            kind: ProfileKind::S3,
            bucket: STUCK_BUCKET.into(),
            // Nothing listens on the discard port: every request is refused.
            endpoint: "http://127.0.0.1:9".into(),
            force_path_style: true,
            access_key_id: "unused".into(),
            secret_access_key: "unused".into(),
            ..Default::default()
        },
    );
}

/// Uploads `bytes` in regular mode; returns (handle, upload id).
async fn upload(
    pop: &Pop,
    name: &str,
    bytes: &[u8],
    part_size: usize,
    container: Option<&str>,
) -> (String, String) {
    let mut store = json!({"location": "S3"});
    if let Some(container) = container {
        store["container"] = json!(container);
    }
    let start = pop
        .start(json!({"apikey": "k", "filename": name, "mimetype": "application/octet-stream", "size": bytes.len(), "store": store}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let mut parts = Vec::new();
    for (i, chunk) in bytes.chunks(part_size).enumerate() {
        let resp = pop.send_chunk(&upload_id, i as u32 + 1, None, chunk).await;
        assert_eq!(resp.status(), 200);
        let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
        parts.push(json!({"part_number": i + 1, "etag": etag}));
    }
    let resp = pop
        .complete(&upload_id, json!({"parts": parts, "store": store}))
        .await;
    assert_eq!(resp.status(), 200);
    let done: Value = resp.json().await.unwrap();
    (done["handle"].as_str().unwrap().to_owned(), upload_id)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
}

/// The value of one sample in Prometheus text (0 when absent).
fn sample(metrics: &str, name: &str, label: Option<&str>) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| match label {
            None => *series == name,
            Some(label) => series.starts_with(&format!("{name}{{")) && series.contains(label),
        })
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0.0)
}

/// Opens the metadata store of a stopped POP (opening waits for the lock its
/// last handles release a moment after it stopped).
fn open_metadata(data_dir: &Path) -> SledMetadataStore {
    SledMetadataStore::open(&data_dir.join("metadata")).expect("open the metadata store")
}

#[tokio::test]
async fn a_start_collects_orphans_and_reports_files_that_lost_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let parts = data.join("parts");
    let app = spawn_app_in(data, configure).await;

    let kept = random_bytes(300_000, 1);
    let stored_lost = random_bytes(300_000, 2);
    let transit_lost = random_bytes(300_000, 3);
    let small_a = random_bytes(100_000, 4);
    let small_evicted = random_bytes(600_000, 5);
    let small_b = random_bytes(100_000, 6);
    let in_progress = random_bytes(200_000, 7);

    let (kept_handle, kept_upload) = upload(&app, "kept.bin", &kept, 150_000, None).await;
    let (stored_handle, stored_upload) =
        upload(&app, "stored.bin", &stored_lost, 150_000, None).await;
    let (transit_handle, transit_upload) = upload(
        &app,
        "transit.bin",
        &transit_lost,
        100_000,
        Some(STUCK_BUCKET),
    )
    .await;
    // One after the other, so they lie in the small-file log in this order.
    let mut small = Vec::new();
    for (name, bytes) in [
        ("a.bin", &small_a),
        ("evicted.bin", &small_evicted),
        ("b.bin", &small_b),
    ] {
        let handle = app
            .store_raw(
                &format!("/api/store/s3?key=k&filename={name}"),
                bytes.clone(),
            )
            .await;
        small.push(handle);
    }
    let start = app
        .start(json!({"apikey": "k", "filename": "later.bin", "size": in_progress.len(), "store": {"location": "s3"}}))
        .await;
    let progress_upload = start["upload_id"].as_str().unwrap().to_owned();
    let progress_handle = start["handle"].as_str().unwrap().to_owned();
    let resp = app
        .send_chunk(&progress_upload, 1, None, &in_progress[..100_000])
        .await;
    assert_eq!(resp.status(), 200);
    for handle in [
        &kept_handle,
        &stored_handle,
        &small[0],
        &small[1],
        &small[2],
    ] {
        app.wait_status(handle, "Stored", Duration::from_secs(30))
            .await;
    }
    assert_eq!(app.metadata(&transit_handle).await["status"], "InTransit");
    app.stop().await;

    // What crashes leave behind, planted while the POP is stopped.
    let logs: Vec<PathBuf> = std::fs::read_dir(parts.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1, "one start wrote small files: {logs:?}");
    let log = &logs[0];
    let referenced_log_len = std::fs::metadata(log).unwrap().len();
    assert_eq!(referenced_log_len, 800_000);
    // An append whose record was never written.
    {
        let mut file = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        file.write_all(&random_bytes(2 * MIB, 8)).unwrap();
        file.sync_all().unwrap();
    }
    // An upload directory no record names (its start never got recorded).
    let orphan_dir = parts.join(UploadId::generate().as_str());
    write_file(&orphan_dir.join("00001"), &random_bytes(MIB, 9));
    // A log file none of whose ranges is referenced.
    let orphan_log = parts.join("log/0000000000");
    write_file(&orphan_log, &random_bytes(MIB, 10));
    // Copies into the local final store a crash interrupted.
    let temp_files = [
        data.join(format!("origin/default/.incoming-{}", UploadId::generate())),
        data.join(format!(
            "origin/default/in/a/dir/.incoming-{}",
            UploadId::generate()
        )),
    ];
    for path in &temp_files {
        write_file(path, &random_bytes(MIB, 11));
    }
    // An eviction whose record was flushed before its log range was freed.
    {
        let meta = open_metadata(data);
        let handle = Handle::parse(&small[1]).unwrap();
        let mut file = meta.get_file(&handle).unwrap().unwrap();
        file.evicted_at_ms = Some(1);
        meta.put_file(&file, JobChange::Keep).unwrap();
        meta.flush().await.unwrap();
    }
    // Local bytes lost: a part of a file in transit and of a stored one.
    std::fs::remove_file(parts.join(format!("{transit_upload}/00002"))).unwrap();
    std::fs::remove_file(parts.join(format!("{stored_upload}/00002"))).unwrap();
    let log_allocated_before = allocated(log);
    assert!(log_allocated_before >= 800_000 + 2 * MIB as u64);

    let app = spawn_app_in(data, configure).await;
    // The first answer comes after reconciliation.
    let transit_meta = app.metadata(&transit_handle).await;

    assert!(!orphan_dir.exists(), "the orphan upload directory is gone");
    assert!(!orphan_log.exists(), "the unreferenced log file is gone");
    for path in &temp_files {
        assert!(!path.exists(), "{} is gone", path.display());
    }
    for upload in [
        &kept_upload,
        &stored_upload,
        &transit_upload,
        &progress_upload,
    ] {
        assert!(parts.join(upload).exists(), "{upload} is still needed");
    }
    assert_eq!(
        std::fs::metadata(log).unwrap().len(),
        referenced_log_len,
        "the unrecorded append is cut off"
    );
    let freed = log_allocated_before - allocated(log);
    assert!(
        freed >= 2 * MIB as u64 + 600_000 - 16 * 1024,
        "the log gave back {freed} bytes of {log_allocated_before}"
    );

    // Every file that still has its bytes serves them exactly.
    for (handle, bytes) in [
        (&kept_handle, &kept),
        (&small[0], &small_a),
        (&small[1], &small_evicted),
        (&small[2], &small_b),
        (&stored_handle, &stored_lost),
    ] {
        assert_eq!(
            sha256_hex(&app.download(handle).await),
            sha256_hex(bytes),
            "{handle}"
        );
    }
    let resp = app
        .send_chunk(&progress_upload, 2, None, &in_progress[100_000..])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.complete(&progress_upload, json!({})).await.status(),
        200
    );
    assert_eq!(
        sha256_hex(&app.download(&progress_handle).await),
        sha256_hex(&in_progress)
    );

    // The file in transit that lost bytes is reported, not served truncated.
    assert_eq!(transit_meta["status"], "InTransit");
    assert_eq!(transit_meta["local_bytes_missing"], true, "{transit_meta}");
    assert_eq!(transit_meta["local_copy"], false);
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = app
            .http
            .request(method.clone(), app.url(&format!("/{transit_handle}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503, "{method}");
        if method == reqwest::Method::GET {
            assert!(resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"));
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "local_copy_incomplete", "{body}");
        }
    }
    // The stored one is served from final storage (above) and reported too.
    let stored_meta = app.metadata(&stored_handle).await;
    assert_eq!(stored_meta["status"], "Stored");
    assert_eq!(stored_meta["local_bytes_missing"], true);
    assert_eq!(
        app.metadata(&kept_handle).await["local_bytes_missing"],
        false
    );

    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(&metrics, "cin_files_missing_local_bytes", None),
        2.0,
        "{metrics}"
    );
    let removed = |kind: &str| {
        sample(
            &metrics,
            "cin_orphans_removed_total",
            Some(&format!("kind=\"{kind}\"")),
        )
    };
    assert_eq!(removed("upload_dir"), 1.0, "{metrics}");
    assert_eq!(removed("log_file"), 1.0);
    assert_eq!(removed("log_file_trimmed"), 1.0);
    assert_eq!(removed("temp_file"), 2.0);
    assert!(
        sample(&metrics, "cin_orphan_bytes_freed_total", None)
            >= (5 * MIB + 600_000 - 64 * 1024) as f64,
        "{metrics}"
    );
    app.stop().await;
}

/// An upload in progress whose acknowledged part file was lost while the POP was
/// down: completing it must not succeed over the missing bytes; the client is
/// asked for them again and the file comes out whole.
#[tokio::test]
async fn acknowledged_parts_lost_while_stopped_are_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(200_000, 31);
    let (first, second) = bytes.split_at(100_000);
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let start = app
        .start(json!({"apikey": "k", "filename": "p.bin", "size": bytes.len(), "store": {"location": "s3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    for (part, piece) in [(1, first), (2, second)] {
        assert_eq!(
            app.send_chunk(&upload_id, part, None, piece).await.status(),
            200
        );
    }
    app.stop().await;
    std::fs::remove_file(dir.path().join("parts").join(&upload_id).join("00002")).unwrap();

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let refused = app.complete(&upload_id, json!({})).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_parts", "{body}");
    assert_eq!(
        app.send_chunk(&upload_id, 2, None, second).await.status(),
        200
    );
    let done = app.complete(&upload_id, json!({})).await;
    assert_eq!(done.status(), 200);
    let handle = done.json::<Value>().await.unwrap()["handle"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sha256_hex(&app.download(&handle).await), sha256_hex(&bytes));
    app.stop().await;
}

/// A crash between a partial upload's new reference and the final upload's
/// record leaves a reference to nothing; at start it is dropped, so terminating
/// the partial frees its bytes.
#[tokio::test]
async fn references_to_final_uploads_that_were_never_written_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let resp = app
        .http
        .post(app.url("/files/"))
        .header("tus-resumable", "1.0.0")
        .header("upload-concat", "partial")
        .header("upload-length", "5")
        .header("content-type", "application/offset+octet-stream")
        .body("abcde")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let url = crate::support::header_value(&resp, "location").to_owned();
    let upload_id = UploadId::parse(url.rsplit('/').next().unwrap()).unwrap();
    app.stop().await;
    {
        let meta = open_metadata(dir.path());
        let handle = meta.handle_for_upload(&upload_id).unwrap().unwrap();
        let mut partial = meta.get_file(&handle).unwrap().unwrap();
        partial.referenced_by.push(Handle::generate());
        meta.put_file(&partial, JobChange::Keep).unwrap();
        meta.flush().await.unwrap();
    }

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let deleted = app
        .http
        .delete(app.url(&format!("/files/{upload_id}")))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        app.upload_dirs(),
        0,
        "nothing needs the partial's bytes any more"
    );
    app.stop().await;
}
