//! Every byte accounted for against the disk: an upload never holds more than its
//! declared size, uploads of unknown size stop at the free-space watermark, a full
//! disk answers 507 (never 500) and keeps what was acknowledged, idle uploads give
//! their reserved room back, and a POP killed on a full disk starts again.
//!
//! The disk tests run on a small tmpfs each test mounts for itself (tmpfs counts
//! free space exactly); mounting needs root, so they are skipped, saying so, where
//! it is not permitted.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::support::{
    chunk_request, header_value, random_bytes, sha256_hex, spawn_app_in, spawn_app_with, Pop,
    PopProcess, SmallFs, TestApp, MIB,
};

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");
const OCTETS: (&str, &str) = ("content-type", "application/offset+octet-stream");
const DEADLINE: Duration = Duration::from_secs(30);

/// A directory outside the small filesystem for the local final store, so that
/// replication does not take the disk space the tests account for.
fn origin_outside() -> TempDir {
    tempfile::tempdir().expect("origin dir")
}

async fn spawn_on(
    fs: &SmallFs,
    origin: &TempDir,
    tweak: impl FnOnce(&mut cin_edge::Config),
) -> TestApp {
    let origin = origin.path().to_path_buf();
    spawn_app_in(&fs.path().join("data"), move |c| {
        if let Some(p) = c.storage.profiles.get_mut("default") {
            p.path = origin;
        }
        tweak(c);
    })
    .await
}

/// The bytes of every file under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.expect("dir entry"))
        .map(|e| {
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                bytes_under(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

async fn start(pop: &Pop, size: usize, fii: bool) -> reqwest::Response {
    let mut body = json!({"apikey": "k", "filename": "f.bin", "mimetype": "application/octet-stream", "size": size, "store": {"location": "S3"}});
    if fii {
        body["fii"] = json!(true);
    }
    pop.post_json("/multipart/start", body).await
}

async fn start_ok(pop: &Pop, size: usize, fii: bool) -> String {
    let resp = start(pop, size, fii).await;
    assert_eq!(resp.status(), 200, "start of {size} bytes");
    let body: Value = resp.json().await.unwrap();
    body["upload_id"].as_str().unwrap().to_owned()
}

/// `/multipart/upload`, then the PUT of `bytes`; returns the PUT's answer.
async fn put_chunk(
    pop: &Pop,
    upload_id: &str,
    part: u32,
    offset: Option<u64>,
    bytes: &[u8],
) -> reqwest::Response {
    let resp = pop
        .post_json(
            "/multipart/upload",
            chunk_request(upload_id, part, offset, bytes),
        )
        .await;
    assert_eq!(resp.status(), 200, "upload call");
    let answer: Value = resp.json().await.unwrap();
    let mut put = pop
        .http
        .put(answer["url"].as_str().unwrap())
        .body(bytes.to_vec());
    for (k, v) in answer["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    put.send().await.expect("put")
}

async fn complete(pop: &Pop, upload_id: &str) -> Value {
    let resp = pop
        .post_json(
            "/multipart/complete",
            json!({"apikey": "k", "upload_id": upload_id, "filename": "f.bin", "mimetype": "application/octet-stream", "store": {"location": "S3"}}),
        )
        .await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "complete: {body}");
    body
}

/// A 507 with a JSON `insufficient_storage` error and `Retry-After`.
async fn assert_insufficient_storage(resp: reqwest::Response, what: &str) {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{what}: expected 507, got {status}: {body}"
    );
    assert!(
        retry_after.is_some_and(|v| v.parse::<u64>().is_ok()),
        "{what}: 507 without Retry-After: {body}"
    );
    let body: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(
        body["error"]["code"], "insufficient_storage",
        "{what}: {body}"
    );
}

async fn tus_create(pop: &Pop, length: Option<usize>) -> String {
    let mut req = pop.http.post(pop.url("/files/")).header(TUS.0, TUS.1);
    req = match length {
        Some(len) => req.header("upload-length", len.to_string()),
        None => req.header("upload-defer-length", "1"),
    };
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201, "tus create");
    header_value(&resp, "location").to_owned()
}

async fn tus_patch(pop: &Pop, url: &str, offset: usize, body: reqwest::Body) -> reqwest::Response {
    pop.http
        .patch(url)
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", offset.to_string())
        .body(body)
        .send()
        .await
        .expect("PATCH")
}

async fn tus_offset(pop: &Pop, url: &str) -> u64 {
    let resp = pop
        .http
        .head(url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "HEAD");
    header_value(&resp, "upload-offset").parse().unwrap()
}

/// A body of `total` bytes sent in 256 KiB frames, with no Content-Length.
fn endless_body(total: usize) -> reqwest::Body {
    let frame = Bytes::from(vec![0x5a; 256 * 1024]);
    let frames = (0..total / frame.len()).map(move |_| Ok::<_, std::io::Error>(frame.clone()));
    reqwest::Body::wrap_stream(futures_util::stream::iter(frames))
}

async fn store(pop: &Pop, bytes: &[u8]) -> String {
    pop.store_raw("/api/store/s3?filename=earlier.bin", bytes.to_vec())
        .await
}

async fn serves(pop: &Pop, handle: &str, bytes: &[u8]) {
    assert_eq!(
        sha256_hex(&pop.download(handle).await),
        sha256_hex(bytes),
        "{handle} serves its bytes"
    );
}

/// Polls `/readyz` until it answers `status`.
async fn wait_ready(pop: &Pop, status: u16) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let resp = pop.http.get(pop.url("/readyz")).send().await.unwrap();
        let got = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or_default();
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed {got}, not {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn disk_full_an_upload_never_holds_more_than_its_declared_size() {
    let app = spawn_app_with(|_| {}).await;
    let declared = 100_000;
    let bytes = random_bytes(declared, 41);

    // Regular mode: the whole file as part 1, then more parts beyond it.
    let upload = start_ok(&app, declared, false).await;
    assert_eq!(
        put_chunk(&app, &upload, 1, None, &bytes).await.status(),
        200
    );
    let over = put_chunk(&app, &upload, 2, None, &bytes).await;
    assert_eq!(over.status(), 400, "a part past the declared size");
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"]["code"], "over_declared_size", "{body}");
    assert_eq!(
        put_chunk(&app, &upload, 3, None, &bytes[..10])
            .await
            .status(),
        400
    );
    // A resend of acknowledged bytes brings nothing new: still accepted.
    assert_eq!(
        put_chunk(&app, &upload, 1, None, &bytes).await.status(),
        200
    );
    let upload_dir = app.data_dir.join("parts").join(&upload);
    assert!(
        bytes_under(&upload_dir) <= declared as u64,
        "{} bytes on disk for a {declared}-byte upload",
        bytes_under(&upload_dir)
    );
    let done = complete(&app, &upload).await;
    serves(&app, done["handle"].as_str().unwrap(), &bytes).await;

    // Parts arriving at the same time: together they may not pass the size either.
    let upload = start_ok(&app, declared, false).await;
    let part = &bytes[..40_000];
    let answers =
        futures_util::future::join_all((1..=4u32).map(|n| put_chunk(&app, &upload, n, None, part)))
            .await;
    let accepted = answers.iter().filter(|r| r.status() == 200).count();
    let refused = answers.iter().filter(|r| r.status() == 400).count();
    assert_eq!((accepted, refused), (2, 2), "80,000 of 100,000 bytes fit");
    let upload_dir = app.data_dir.join("parts").join(&upload);
    assert!(bytes_under(&upload_dir) <= declared as u64);

    // Intelligent ingestion: chunks of different parts add up too.
    let upload = start_ok(&app, declared, true).await;
    let fii = |part, offset, range: std::ops::Range<usize>| {
        let app = &app;
        let upload = &upload;
        let chunk = bytes[range].to_vec();
        async move { put_chunk(app, upload, part, Some(offset), &chunk).await }
    };
    assert_eq!(fii(1, 0, 0..60_000).await.status(), 200);
    assert_eq!(fii(2, 0, 0..60_000).await.status(), 400);
    assert_eq!(fii(2, 0, 0..40_000).await.status(), 200);
    // Resending part of an acknowledged chunk is allowed; one byte more is not.
    assert_eq!(fii(1, 20_000, 20_000..60_000).await.status(), 200);
    assert_eq!(fii(1, 20_000, 20_000..60_001).await.status(), 400);
    let upload_dir = app.data_dir.join("parts").join(&upload);
    assert!(bytes_under(&upload_dir) <= declared as u64);
}

#[tokio::test]
async fn disk_full_unknown_sizes_stop_at_the_watermark() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let origin = origin_outside();
    let min_free = 16 * MIB as u64;
    let app = spawn_on(&fs, &origin, |c| {
        c.disk.min_free_bytes = min_free;
        c.disk.metadata_reserve_bytes = 4 * MIB as u64;
    })
    .await;
    let earlier = random_bytes(2 * MIB, 1);
    let earlier_handle = store(&app, &earlier).await;
    let small = random_bytes(10_000, 2);
    let small_handle = store(&app, &small).await;

    // An upload of known size holds its room while unknown sizes grow.
    let reserved_size = 12 * MIB;
    let reserved_bytes = random_bytes(reserved_size, 3);
    let reserved = start_ok(&app, reserved_size, false).await;

    let slack = 2 * MIB as u64;
    let (dirs_before, free_before) = (app.upload_dirs(), fs.free());
    let resp = app
        .http
        .post(app.url("/api/store/s3?filename=chunked.bin"))
        .body(endless_body(64 * MIB))
        .send()
        .await
        .expect("store request");
    assert_insufficient_storage(resp, "a chunked /api/store past the watermark").await;
    // It was read up to the watermark, then none of it was kept.
    assert_eq!(
        app.upload_dirs(),
        dirs_before,
        "the refused body left nothing"
    );
    assert!(
        fs.free() + slack >= free_before,
        "{} of {free_before} bytes free",
        fs.free()
    );

    let deferred = tus_create(&app, None).await;
    let resp = tus_patch(&app, &deferred, 0, endless_body(64 * MIB)).await;
    assert_insufficient_storage(resp, "a deferred-length PATCH past the watermark").await;
    let kept = tus_offset(&app, &deferred).await;
    // What arrived before the watermark stays, durable; what the disk has left
    // covers the reserved upload and the watermark (give or take a write batch).
    assert!(kept > 0, "the prefix before the watermark is kept");
    assert!(
        fs.free() + slack >= min_free + reserved_size as u64,
        "{} bytes free after the deferred upload (kept {kept})",
        fs.free()
    );

    // The reserved upload still has its room.
    for (i, part) in reserved_bytes.chunks(4 * MIB).enumerate() {
        let resp = put_chunk(&app, &reserved, i as u32 + 1, None, part).await;
        assert_eq!(resp.status(), 200, "part {} of the reserved upload", i + 1);
    }
    let done = complete(&app, &reserved).await;
    serves(&app, done["handle"].as_str().unwrap(), &reserved_bytes).await;
    serves(&app, &earlier_handle, &earlier).await;
    serves(&app, &small_handle, &small).await;
    drop(app);
}

#[tokio::test]
async fn disk_full_no_space_answers_507_and_keeps_what_was_acknowledged() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let origin = origin_outside();
    // No watermark and no reserve: the writes themselves run out of space.
    let app = spawn_on(&fs, &origin, |c| {
        c.disk.min_free_bytes = 0;
        c.disk.metadata_reserve_bytes = 0;
    })
    .await;
    let earlier = random_bytes(MIB, 4);
    let earlier_handle = store(&app, &earlier).await;

    let size = 8 * MIB;
    let multipart_bytes = random_bytes(size, 5);
    let multipart = start_ok(&app, size, false).await;
    assert_eq!(
        put_chunk(&app, &multipart, 1, None, &multipart_bytes[..4 * MIB])
            .await
            .status(),
        200
    );
    let tus_bytes = random_bytes(size, 6);
    let tus = tus_create(&app, Some(size)).await;
    let resp = tus_patch(&app, &tus, 0, tus_bytes[..4 * MIB].to_vec().into()).await;
    assert_eq!(resp.status(), 204);

    // Room for one write batch, not for a 4 MiB chunk.
    let filler = fs.fill_leaving(MIB as u64 + MIB as u64 / 2);
    let resp = put_chunk(&app, &multipart, 2, None, &multipart_bytes[4 * MIB..]).await;
    assert_insufficient_storage(resp, "a part on a full disk").await;
    let resp = tus_patch(&app, &tus, 4 * MIB, tus_bytes[4 * MIB..].to_vec().into()).await;
    assert_insufficient_storage(resp, "a PATCH on a full disk").await;
    assert_eq!(tus_offset(&app, &tus).await, 4 * MIB as u64);
    let resp = app
        .http
        .post(app.url("/api/store/s3?filename=small.bin"))
        .body(vec![1u8; 500_000])
        .send()
        .await
        .unwrap();
    assert_insufficient_storage(resp, "a small file on a full disk").await;
    let resp = start(&app, size, false).await;
    assert_insufficient_storage(resp, "a start on a full disk").await;
    serves(&app, &earlier_handle, &earlier).await;

    // Space returns: the uploads continue from what was acknowledged.
    filler.remove();
    let resp = put_chunk(&app, &multipart, 2, None, &multipart_bytes[4 * MIB..]).await;
    assert_eq!(resp.status(), 200);
    let done = complete(&app, &multipart).await;
    serves(&app, done["handle"].as_str().unwrap(), &multipart_bytes).await;
    let resp = tus_patch(&app, &tus, 4 * MIB, tus_bytes[4 * MIB..].to_vec().into()).await;
    assert_eq!(resp.status(), 204);
    let handle = header_value(
        &app.http
            .head(&tus)
            .header(TUS.0, TUS.1)
            .send()
            .await
            .unwrap(),
        "cin-handle",
    )
    .to_owned();
    serves(&app, &handle, &tus_bytes).await;
    drop(app);
}

#[tokio::test]
async fn disk_full_idle_reservations_are_released_and_taken_again() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let origin = origin_outside();
    let min_free = 8 * MIB as u64;
    let app = spawn_on(&fs, &origin, |c| {
        c.disk.min_free_bytes = min_free;
        c.disk.metadata_reserve_bytes = 4 * MIB as u64;
        c.disk.reservation_idle_secs = 1;
    })
    .await;
    let size = 12 * MIB;
    let bytes = random_bytes(size, 7);
    let first = start_ok(&app, size, false).await;
    assert_eq!(
        put_chunk(&app, &first, 1, None, &bytes[..4 * MIB])
            .await
            .status(),
        200
    );
    // Started uploads take the room until a new one is refused.
    let mut started = 1;
    loop {
        let resp = start(&app, size, false).await;
        if resp.status() == StatusCode::INSUFFICIENT_STORAGE {
            break;
        }
        assert_eq!(resp.status(), 200);
        started += 1;
        assert!(
            started < 10,
            "a 64 MiB disk took {started} uploads of 12 MiB"
        );
    }
    assert!(started >= 2);

    // Nothing arrives for them: their room is given back to new uploads.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let resp = start(&app, size, false).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle uploads still hold their room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first upload comes back: its remaining 8 MiB must fit again, or 507.
    let filler = fs.fill_leaving(min_free + 4 * MIB as u64);
    let resp = put_chunk(&app, &first, 2, None, &bytes[4 * MIB..4 * MIB + 64 * 1024]).await;
    assert_insufficient_storage(resp, "a returning upload without room").await;
    filler.remove();
    for (i, part) in bytes.chunks(4 * MIB).enumerate().skip(1) {
        let resp = put_chunk(&app, &first, i as u32 + 1, None, part).await;
        assert_eq!(resp.status(), 200, "part {} after coming back", i + 1);
    }
    let done = complete(&app, &first).await;
    serves(&app, done["handle"].as_str().unwrap(), &bytes).await;
    drop(app);
}

#[tokio::test]
async fn disk_full_a_pop_killed_on_a_full_disk_starts_and_serves() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let origin = origin_outside();
    let data_dir = fs.path().join("data");
    let env = vec![
        (
            "CIN__DISK__MIN_FREE_BYTES".to_owned(),
            (2 * MIB).to_string(),
        ),
        (
            "CIN__DISK__METADATA_RESERVE_BYTES".to_owned(),
            (4 * MIB).to_string(),
        ),
        (
            "CIN__STORAGE__PROFILES__DEFAULT__PATH".to_owned(),
            origin.path().display().to_string(),
        ),
    ];
    let pop = PopProcess::start_with_env(&data_dir, &env);
    let big = random_bytes(3 * MIB, 8);
    let big_handle = store(&pop, &big).await;
    let small = random_bytes(10_000, 9);
    let small_handle = store(&pop, &small).await;
    pop.wait_status(&big_handle, "Stored", DEADLINE).await;

    let filler = fs.fill_leaving(0);
    pop.kill();

    let pop = PopProcess::try_spawn(PopProcess::command(&data_dir, &env))
        .unwrap_or_else(|e| panic!("the POP does not start on a full disk: {e}"));
    serves(&pop, &big_handle, &big).await;
    serves(&pop, &small_handle, &small).await;
    let not_ready = wait_ready(&pop, 503).await;
    assert!(
        not_ready["reasons"].to_string().contains("disk"),
        "{not_ready}"
    );
    let resp = pop
        .http
        .post(pop.url("/api/store/s3?filename=late.bin"))
        .body(vec![1u8; 10_000])
        .send()
        .await
        .unwrap();
    assert_insufficient_storage(resp, "an upload on a full disk").await;

    filler.remove();
    wait_ready(&pop, 200).await;
    let later = random_bytes(MIB, 10);
    let later_handle = store(&pop, &later).await;
    serves(&pop, &later_handle, &later).await;
    serves(&pop, &big_handle, &big).await;
    drop(pop);
}
