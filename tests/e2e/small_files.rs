//! Whole small files go through the shared small-file log, whatever brought
//! them: a chunked `/api/store` body that ends small, a form's file field, a tus
//! creation that carries the whole file, the first PATCH of a small tus upload
//! that carries all of it, a one-part Filestack multipart upload. Each is served
//! with identical bytes, completes and replicates like any file, and leaves no
//! upload directory behind; anything that is not a whole small file keeps the
//! part-file path; an acknowledged small file survives a kill and a power cut;
//! a log file goes once nothing in it is owned; the local origin packs small
//! files instead of storing each as a file.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::lossy_fs::LossyFs;
use crate::support::{
    chunk_request, header_value as h, random_bytes, raw_exchange, read_response, sha256_hex,
    spawn_app, spawn_app_in, spawn_app_with, PopProcess, TestApp, MIB,
};

const KIB: usize = 1024;
/// The most a whole file held in memory for the log may have.
const SMALL_FILE_MAX: usize = MIB;
const TUS: (&str, &str) = ("tus-resumable", "1.0.0");
const OCTETS: (&str, &str) = ("content-type", "application/offset+octet-stream");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A body without a length: reqwest sends it chunked, in frames of 7,000 bytes.
fn chunked(bytes: &[u8]) -> reqwest::Body {
    let frames: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(7_000).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(frames))
}

/// `POST /api/store` with a chunked body; returns the JSON answer.
async fn store_chunked(app: &TestApp, name: &str, bytes: &[u8]) -> Value {
    let resp = app
        .http
        .post(app.url(&format!("/api/store/s3?filename={name}")))
        .body(chunked(bytes))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers().get("content-length").is_some(),
        "an answer, not a stream"
    );
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The log files of the part store.
fn log_files(app: &TestApp) -> usize {
    log_files_in(&app.data_dir)
}

/// Served bytes, metadata and final storage of a file that should hold `bytes`.
async fn check_file(app: &TestApp, handle: &str, name: &str, bytes: &[u8]) {
    assert_eq!(
        sha256_hex(&app.download(handle).await),
        sha256_hex(bytes),
        "{name}"
    );
    let meta = app.metadata(handle).await;
    assert_eq!(meta["size"], bytes.len(), "{name}: {meta}");
    assert!(
        matches!(meta["status"].as_str(), Some("InTransit" | "Stored")),
        "{name}: {meta}"
    );
    let stored = app
        .wait_status(handle, "Stored", Duration::from_secs(30))
        .await;
    assert_eq!(stored["sha256"], sha256_hex(bytes), "{name}: {stored}");
    // Still identical once replicated.
    assert_eq!(
        sha256_hex(&app.download(handle).await),
        sha256_hex(bytes),
        "{name}"
    );
}

#[tokio::test]
async fn chunked_and_form_store_bodies_that_end_small_go_to_the_log() {
    let app = spawn_app().await;
    for (i, size) in [1, 16 * KIB, 300 * KIB + 7, SMALL_FILE_MAX]
        .into_iter()
        .enumerate()
    {
        let bytes = random_bytes(size, 500 + i as u64);
        let name = format!("chunked-{size}.bin");
        let answer = store_chunked(&app, &name, &bytes).await;
        assert_eq!(answer["size"], size, "{answer}");
        assert_eq!(answer["filename"], name.as_str());
        let handle = answer["handle"].as_str().unwrap().to_owned();
        check_file(&app, &handle, &name, &bytes).await;
    }

    // A form upload from curl: the file field streams with no size of its own.
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(40 * KIB + 3, 510);
    let path = dir.path().join("photo.jpg");
    std::fs::write(&path, &bytes).unwrap();
    let url = app.url("/api/store/s3");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--fail-with-body", "-F"])
            .arg(format!("fileUpload=@{};type=image/jpeg", path.display()))
            .arg(url)
            .output()
    })
    .await
    .unwrap()
    .expect("run curl");
    assert!(
        output.status.success(),
        "curl: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["filename"], "photo.jpg");
    assert_eq!(answer["type"], "image/jpeg");
    assert_eq!(answer["size"], bytes.len());
    check_file(&app, answer["handle"].as_str().unwrap(), "form", &bytes).await;

    assert_eq!(app.upload_dirs(), 0, "every body went to the log");
    assert!(log_files(&app) >= 1);
}

#[tokio::test]
async fn a_chunked_store_body_past_the_limit_goes_to_a_part_file() {
    let app = spawn_app().await;
    for (i, size) in [SMALL_FILE_MAX + 1, 3 * MIB + 77].into_iter().enumerate() {
        let bytes = random_bytes(size, 520 + i as u64);
        let name = format!("big-{size}.bin");
        let answer = store_chunked(&app, &name, &bytes).await;
        assert_eq!(answer["size"], size, "{answer}");
        check_file(&app, answer["handle"].as_str().unwrap(), &name, &bytes).await;
    }
    assert_eq!(app.upload_dirs(), 2, "each large body got a part file");
}

/// A tus creation request carrying `body` (Content-Length set).
async fn tus_create_with(
    app: &TestApp,
    length: usize,
    body: &[u8],
    extra: &[(&str, String)],
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-length", length.to_string())
        .header(
            "upload-metadata",
            format!("filename {},filetype {}", b64(b"a.txt"), b64(b"text/plain")),
        );
    for (name, value) in extra {
        request = request.header(*name, value);
    }
    request.body(body.to_vec()).send().await.unwrap()
}

/// A tus termination, which must succeed.
async fn tus_terminate(app: &TestApp, url: &str) {
    let resp = app
        .http
        .delete(url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204, "terminating {url}");
}

async fn tus_head(app: &TestApp, url: &str) -> reqwest::Response {
    app.http
        .head(url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap()
}

/// A creation answer for a whole file: complete at creation, HEAD agrees.
async fn check_created_whole(app: &TestApp, created: reqwest::Response, bytes: &[u8]) -> String {
    assert_eq!(created.status(), 201);
    assert_eq!(h(&created, "upload-offset"), bytes.len().to_string());
    let url = h(&created, "location").to_owned();
    let handle = h(&created, "cin-handle").to_owned();
    let state = tus_head(app, &url).await;
    assert_eq!(state.status(), 200);
    assert_eq!(h(&state, "upload-offset"), bytes.len().to_string());
    assert_eq!(h(&state, "upload-length"), bytes.len().to_string());
    check_file(app, &handle, "tus", bytes).await;
    url
}

/// `POST /files/` with a chunked body and `Upload-Checksum` as a trailer.
fn creation_with_trailer(app: &TestApp, body: &[u8], checksum: &str) -> Vec<u8> {
    let host = app.base.trim_start_matches("http://");
    let mut request = format!(
        "POST /files/ HTTP/1.1\r\nhost: {host}\r\ntus-resumable: 1.0.0\r\ncontent-type: application/offset+octet-stream\r\ntransfer-encoding: chunked\r\ntrailer: Upload-Checksum\r\nupload-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    for chunk in body.chunks(7_000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(format!("0\r\nupload-checksum: {checksum}\r\n\r\n").as_bytes());
    request
}

#[tokio::test]
async fn a_tus_creation_carrying_the_whole_small_file_completes_at_once() {
    let app = spawn_app().await;

    let bytes = random_bytes(16 * KIB, 530);
    let url = check_created_whole(
        &app,
        tus_create_with(&app, bytes.len(), &bytes, &[]).await,
        &bytes,
    )
    .await;
    let meta = app
        .metadata(h(&tus_head(&app, &url).await, "cin-handle"))
        .await;
    assert_eq!(meta["filename"], "a.txt");
    assert_eq!(meta["mimetype"], "text/plain");

    // With Upload-Checksum in the head, the largest size the log takes.
    let bytes = random_bytes(SMALL_FILE_MAX, 531);
    let checksum = format!("sha256 {}", b64(&sha2::Sha256::digest(&bytes)));
    let created =
        tus_create_with(&app, bytes.len(), &bytes, &[("upload-checksum", checksum)]).await;
    let url = check_created_whole(&app, created, &bytes).await;

    // Termination of the finished upload deletes the file.
    tus_terminate(&app, &url).await;
    assert!(matches!(
        tus_head(&app, &url).await.status().as_u16(),
        404 | 410
    ));

    // With the checksum as a trailer.
    let bytes = random_bytes(50_000, 532);
    let checksum = format!("sha1 {}", b64(&sha1::Sha1::digest(&bytes)));
    let created = raw_exchange(&app, &creation_with_trailer(&app, &bytes, &checksum)).await;
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    assert_eq!(created.header("upload-offset"), Some("50000"));
    let handle = created.header("cin-handle").unwrap().to_owned();
    check_file(&app, &handle, "trailer", &bytes).await;

    // tus-js-client sending the file with its creation request.
    let bytes = random_bytes(200 * KIB + 9, 533);
    let report = tusjs_upload_during_creation(&app, &bytes).await;
    assert_eq!(
        report["patches"], 0,
        "the creation carried the file: {report}"
    );
    let handle = report["handle"].as_str().expect("Cin-Handle").to_owned();
    check_file(&app, &handle, "tus-js-client", &bytes).await;

    assert_eq!(app.upload_dirs(), 0, "every upload went to the log");

    // Checksums are verified before anything is acknowledged.
    let bytes = random_bytes(10 * KIB, 534);
    let wrong = format!("sha256 {}", b64(&sha2::Sha256::digest(b"other bytes")));
    let refused = tus_create_with(&app, bytes.len(), &bytes, &[("upload-checksum", wrong)]).await;
    assert_eq!(refused.status(), 460);
    let wrong = format!("md5 {}", b64(&md5::Md5::digest(b"other bytes")));
    let refused = raw_exchange(&app, &creation_with_trailer(&app, &bytes, &wrong)).await;
    assert_eq!(refused.status, 460);
    // A body longer than the upload: 413.
    let too_long = tus_create_with(&app, 10, &bytes[..20], &[]).await;
    assert_eq!(too_long.status(), 413);
    assert_eq!(app.metric("cin_uploads_completed_total").await, 4.0);
}

/// Uploads `bytes` with tus-js-client, `uploadDataDuringCreation` on; reports
/// the PATCHes it sent and the handle.
async fn tusjs_upload_during_creation(app: &TestApp, bytes: &[u8]) -> Value {
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/tus");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.bin");
    std::fs::write(&path, bytes).unwrap();
    let script = r#"
import fs from 'node:fs'
import tusPkg from 'tus-js-client'
const { Upload } = tusPkg
const [endpoint, file] = process.argv.slice(1)
const data = fs.readFileSync(file)
let patches = 0
let handle = null
const upload = new Upload(data, {
  endpoint,
  uploadSize: data.length,
  chunkSize: 8 * 1024 * 1024,
  uploadDataDuringCreation: true,
  metadata: { filename: 'js.bin' },
  onAfterResponse(req, res) {
    if (req.getMethod() === 'PATCH') patches++
    if (req.getMethod() === 'POST') handle = res.getHeader('Cin-Handle')
  },
  onError(err) { console.error(String(err)); process.exit(1) },
  onSuccess() { console.log(JSON.stringify({ url: upload.url, handle, patches })) },
})
upload.start()
"#;
    let mut cmd = Command::new("node");
    cmd.current_dir(&tools)
        .args(["--input-type=module", "-e", script])
        .arg(app.url("/files/"))
        .arg(&path);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("start node");
    assert!(
        output.status.success(),
        "tus-js-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

#[tokio::test]
async fn a_tus_creation_whose_body_breaks_off_keeps_what_arrived() {
    // A body that stops coming: after a second the POP counts what arrived and answers.
    let app = spawn_app_with(|c| c.server.body_idle_secs = 1).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    for (i, shut_down) in [false, true].into_iter().enumerate() {
        let bytes = random_bytes(300 * KIB, 540 + i as u64);
        let sent = 123_457;
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /files/ HTTP/1.1\r\nHost: {addr}\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Length: {len}\r\nContent-Length: {len}\r\n\r\n",
            len = bytes.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&bytes[..sent]).await.unwrap();
        if shut_down {
            // The client says it sends no more (it shuts its side down).
            stream.shutdown().await.unwrap();
        } else {
            stream.flush().await.unwrap();
        }
        let created = read_response(&mut stream).await;
        let how = if shut_down { "shut down" } else { "stalled" };
        assert_eq!(
            created.status,
            201,
            "{how}: {}",
            String::from_utf8_lossy(&created.body)
        );
        assert_eq!(
            created.header("upload-offset"),
            Some(sent.to_string().as_str()),
            "{how}"
        );
        let url = created.header("location").unwrap().to_owned();
        drop(stream);

        let state = tus_head(&app, &url).await;
        assert_eq!(h(&state, "upload-offset"), sent.to_string(), "{how}");
        assert_eq!(h(&state, "upload-length"), bytes.len().to_string());
        let handle = h(&state, "cin-handle").to_owned();
        assert_eq!(app.metadata(&handle).await["status"], "Uploading");
        let done = app
            .http
            .patch(&url)
            .header(TUS.0, TUS.1)
            .header(OCTETS.0, OCTETS.1)
            .header("upload-offset", sent.to_string())
            .body(bytes[sent..].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204, "{how}");
        assert_eq!(h(&done, "upload-offset"), bytes.len().to_string());
        check_file(&app, &handle, how, &bytes).await;
    }
    assert_eq!(
        app.upload_dirs(),
        2,
        "the short bodies took the part-file path"
    );
}

/// Starts a Filestack upload of `size` bytes; its upload id and handle.
async fn start_upload(app: &TestApp, filename: &str, size: usize) -> (String, String) {
    let start = app
        .start(json!({"apikey": "k", "filename": filename, "size": size}))
        .await;
    (
        start["upload_id"].as_str().unwrap().to_owned(),
        start["handle"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_one_part_multipart_upload_goes_to_the_log() {
    let app = spawn_app().await;
    for (i, size) in [1, 16 * KIB, 300 * KIB + 7, SMALL_FILE_MAX]
        .into_iter()
        .enumerate()
    {
        let bytes = random_bytes(size, 550 + i as u64);
        let name = format!("one-part-{size}.bin");
        let start = app
            .start(
                json!({"apikey": "k", "filename": name, "size": size, "store": {"location": "s3"}}),
            )
            .await;
        let upload_id = start["upload_id"].as_str().unwrap();
        let handle = start["handle"].as_str().unwrap().to_owned();
        let md5 = format!("\"{}\"", hex::encode(md5::Md5::digest(&bytes)));
        let sent = app.send_chunk(upload_id, 1, None, &bytes).await;
        assert_eq!(sent.status(), 200, "{name}");
        assert_eq!(h(&sent, "etag"), md5, "{name}");
        // A resend of the same bytes (its answer was lost) is acknowledged again.
        let resent = app.send_chunk(upload_id, 1, None, &bytes).await;
        assert_eq!(resent.status(), 200, "{name}");
        assert_eq!(h(&resent, "etag"), md5, "{name}");
        let done = app
            .complete(
                upload_id,
                json!({"parts": [{"part_number": 1, "etag": md5}]}),
            )
            .await;
        assert_eq!(done.status(), 200, "{name}");
        check_file(&app, &handle, &name, &bytes).await;
    }
    assert_eq!(app.upload_dirs(), 0, "every part went to the log");

    // Different bytes for a part in the log are refused, the first ones kept.
    let bytes = random_bytes(20 * KIB, 560);
    let (upload_id, handle) = start_upload(&app, "kept.bin", bytes.len()).await;
    let upload_id = upload_id.as_str();
    assert_eq!(
        app.send_chunk(upload_id, 1, None, &bytes).await.status(),
        200
    );
    let other = random_bytes(20 * KIB, 561);
    assert_eq!(
        app.send_chunk(upload_id, 1, None, &other).await.status(),
        409
    );
    assert_eq!(app.complete(upload_id, json!({})).await.status(), 200);
    check_file(&app, &handle, "kept", &bytes).await;

    // A small file in two parts takes the part-file path.
    let bytes = random_bytes(40 * KIB, 562);
    let (upload_id, handle) = start_upload(&app, "two.bin", bytes.len()).await;
    let upload_id = upload_id.as_str();
    let (a, b) = bytes.split_at(25 * KIB);
    assert_eq!(app.send_chunk(upload_id, 2, None, b).await.status(), 200);
    assert_eq!(app.send_chunk(upload_id, 1, None, a).await.status(), 200);
    assert_eq!(app.complete(upload_id, json!({})).await.status(), 200);
    check_file(&app, &handle, "two parts", &bytes).await;
    assert_eq!(
        app.upload_dirs(),
        1,
        "only the two-part upload has a directory"
    );
}

/// Bytes the part store's log files take on disk (holes excluded).
fn log_allocated(app: &TestApp) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(app.data_dir.join("parts/log"))
        .map(|dir| {
            dir.map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_part_that_fails_its_checksum_frees_its_bytes_in_the_log() {
    let app = spawn_app().await;
    let bytes = random_bytes(768 * KIB, 600);
    let (upload_id, handle) = start_upload(&app, "checked.bin", bytes.len()).await;
    let upload_id = upload_id.as_str();
    // The grant carries the MD5 of the bytes meant; one bit flips on the way.
    let grant: Value = app
        .post_json(
            "/multipart/upload",
            chunk_request(upload_id, 1, None, &bytes),
        )
        .await
        .json()
        .await
        .unwrap();
    let mut corrupted = bytes.clone();
    corrupted[1000] ^= 1;
    let mut put = app.http.put(grant["url"].as_str().unwrap()).body(corrupted);
    for (name, value) in grant["headers"].as_object().unwrap() {
        put = put.header(name, value.as_str().unwrap());
    }
    let refused = put.send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "md5_mismatch", "{body}");
    assert!(log_files(&app) >= 1, "the body went to the log");
    let held = log_allocated(&app);
    assert!(
        held < 64 * KIB as u64,
        "the log holds {held} bytes of a refused body"
    );

    // The bytes meant, sent again, are taken and served.
    let sent = app.send_chunk(upload_id, 1, None, &bytes).await;
    assert_eq!(sent.status(), 200);
    assert_eq!(app.complete(upload_id, json!({})).await.status(), 200);
    check_file(&app, &handle, "checked", &bytes).await;
    assert!(log_allocated(&app) >= bytes.len() as u64);
}

/// Sends a request whose body is a whole small file, holding back its last
/// byte until `meanwhile` has ended the upload; then checks the body went to
/// the log and nothing of it is still held there.
async fn end_upload_while_its_body_streams(
    app: &TestApp,
    head: &str,
    bytes: &[u8],
    meanwhile: impl std::future::Future<Output = ()>,
) {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{head}Host: {addr}\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
    stream.flush().await.unwrap();
    meanwhile.await;
    stream.write_all(&bytes[bytes.len() - 1..]).await.unwrap();
    let answered = read_response(&mut stream).await;
    assert!(
        matches!(answered.status, 404 | 409 | 410),
        "{}: {}",
        answered.status,
        String::from_utf8_lossy(&answered.body)
    );
    assert!(log_files(app) >= 1, "the whole body went to the log");
    let held = log_allocated(app);
    assert!(
        held < 64 * KIB as u64,
        "the log holds {held} bytes of an upload that ended"
    );
    assert_eq!(app.upload_dirs(), 0);
}

#[tokio::test]
async fn a_small_tus_upload_terminated_while_its_patch_streams_owns_nothing_in_the_log() {
    let app = spawn_app().await;
    let bytes = random_bytes(640 * KIB, 610);
    let url = tus_create_empty(&app, bytes.len()).await;
    let path = &url[url.find("/files/").unwrap()..];
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
    );
    end_upload_while_its_body_streams(&app, &head, &bytes, tus_terminate(&app, &url)).await;
}

#[tokio::test]
async fn a_one_part_upload_deleted_while_its_part_streams_owns_nothing_in_the_log() {
    let app = spawn_app().await;
    let bytes = random_bytes(640 * KIB, 611);
    let (upload_id, handle) = start_upload(&app, "deleted.bin", bytes.len()).await;
    let grant: Value = app
        .post_json(
            "/multipart/upload",
            chunk_request(&upload_id, 1, None, &bytes),
        )
        .await
        .json()
        .await
        .unwrap();
    let url = grant["url"].as_str().unwrap();
    let path = &url[url.find("/upload/").unwrap()..];
    let head = format!("PUT {path} HTTP/1.1\r\n");
    let delete = async {
        let deleted = app
            .http
            .delete(app.url(&format!("/api/file/{handle}?key=k")))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), 200);
    };
    end_upload_while_its_body_streams(&app, &head, &bytes, delete).await;
}

/// A tus upload created without a body; its URL.
async fn tus_create_empty(app: &TestApp, length: usize) -> String {
    let created = tus_create_with(app, length, &[], &[]).await;
    assert_eq!(created.status(), 201);
    h(&created, "location").to_owned()
}

async fn tus_patch(app: &TestApp, url: &str, offset: usize, body: &[u8]) -> reqwest::Response {
    app.http
        .patch(url)
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", offset.to_string())
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_small_tus_upload_sent_whole_in_one_patch_goes_to_the_log() {
    let app = spawn_app().await;
    for (i, size) in [1, 16 * KIB, SMALL_FILE_MAX].into_iter().enumerate() {
        let bytes = random_bytes(size, 570 + i as u64);
        let url = tus_create_empty(&app, size).await;
        let done = tus_patch(&app, &url, 0, &bytes).await;
        assert_eq!(done.status(), 204, "{size}");
        assert_eq!(h(&done, "upload-offset"), size.to_string());
        let handle = h(&tus_head(&app, &url).await, "cin-handle").to_owned();
        check_file(&app, &handle, "one patch", &bytes).await;
    }
    assert_eq!(app.upload_dirs(), 0, "every upload went to the log");

    // The same file in two PATCHes goes to a part file, whole.
    let bytes = random_bytes(48 * KIB, 575);
    let url = tus_create_empty(&app, bytes.len()).await;
    let (a, b) = bytes.split_at(20 * KIB);
    assert_eq!(tus_patch(&app, &url, 0, a).await.status(), 204);
    let done = tus_patch(&app, &url, a.len(), b).await;
    assert_eq!(done.status(), 204);
    let handle = h(&tus_head(&app, &url).await, "cin-handle").to_owned();
    check_file(&app, &handle, "two patches", &bytes).await;
    assert_eq!(app.upload_dirs(), 1);
}

#[tokio::test]
async fn a_log_file_is_removed_once_every_file_in_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let mut urls = Vec::new();
    for i in 0..10 {
        let bytes = random_bytes(16 * KIB + i, 580 + i as u64);
        let created = tus_create_with(&app, bytes.len(), &bytes, &[]).await;
        assert_eq!(created.status(), 201);
        // The path: the POP listens on another port after the restart.
        let url = h(&created, "location");
        urls.push(url[url.find("/files/").unwrap()..].to_owned());
    }
    app.stop().await;
    assert_eq!(log_files_in(dir.path()), 1);

    // After a restart the POP writes a new log file and owns the old one's ranges.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let later = random_bytes(30 * KIB, 590);
    let created = tus_create_with(&app, later.len(), &later, &[]).await;
    let later_url = h(&created, "location").to_owned();
    let mut urls: Vec<String> = urls.iter().map(|path| app.url(path)).collect();
    let later_handle = h(&created, "cin-handle").to_owned();
    assert_eq!(log_files_in(dir.path()), 2);
    let last = urls.pop().unwrap();
    for url in urls {
        tus_terminate(&app, &url).await;
    }
    assert_eq!(
        log_files_in(dir.path()),
        2,
        "one file of the old log is still there"
    );
    tus_terminate(&app, &last).await;
    assert_eq!(log_files_in(dir.path()), 1, "the old log file is removed");
    check_file(&app, &later_handle, "in the current log", &later).await;

    // The file being written stays, even with nothing in it owned.
    tus_terminate(&app, &later_url).await;
    assert_eq!(log_files_in(dir.path()), 1);
}

/// Every regular file under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files
}

#[tokio::test]
async fn small_files_are_packed_in_the_local_origin_not_stored_one_file_each() {
    let app = spawn_app().await;
    let mut stored = Vec::new();
    for i in 0..30 {
        let bytes = random_bytes(1 + i * 37_001 % (SMALL_FILE_MAX - 1), 700 + i as u64);
        let handle = app
            .store_raw(&format!("/api/store/s3?filename=f{i}.bin"), bytes.clone())
            .await;
        stored.push((handle, bytes));
    }
    let large = random_bytes(SMALL_FILE_MAX + 1, 730);
    let large_handle = app
        .store_raw("/api/store/s3?filename=large.bin", large.clone())
        .await;
    stored.push((large_handle, large));

    let origin = app.data_dir.join("origin");
    let store = cin_storage::LocalDirStore::open(&origin).unwrap();
    for (handle, bytes) in &stored {
        let meta = app
            .wait_status(handle, "Stored", Duration::from_secs(30))
            .await;
        assert_eq!(meta["sha256"], sha256_hex(bytes));
        // Read as another process sharing the origin reads it.
        let key = meta["key"].as_str().unwrap();
        let got = futures_util::TryStreamExt::try_fold(
            cin_storage::FinalStore::get(&store, "default", key, None)
                .await
                .unwrap(),
            Vec::new(),
            |mut all, piece| async move {
                all.extend_from_slice(&piece);
                Ok(all)
            },
        )
        .await
        .unwrap();
        assert_eq!(sha256_hex(&got), sha256_hex(bytes), "{key}");
    }
    let files = files_under(&origin);
    let packs = files
        .iter()
        .filter(|f| f.starts_with(origin.join(cin_storage::PACK_DIR)))
        .count();
    assert_eq!(packs, 1, "30 small files in one pack: {files:?}");
    assert_eq!(files.len(), 2, "and the large file on its own: {files:?}");
}

fn log_files_in(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("parts/log"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// What the crash test acknowledged: a handle and the seed and size of its bytes.
#[derive(Clone)]
struct Acked {
    what: SmallPath,
    handle: String,
    seed: u64,
    size: usize,
}

/// Sizes mostly of a few KiB, now and then near the limit.
fn crash_size(i: usize) -> usize {
    if i.is_multiple_of(23) {
        900 * KIB + i
    } else {
        1 + (i * 7_919) % (48 * KIB)
    }
}

/// The paths a whole small file may take into the log.
#[derive(Clone, Copy, Debug)]
enum SmallPath {
    TusCreation,
    SizedStore,
    ChunkedStore,
    TusPatch,
    OnePartMultipart,
}

impl SmallPath {
    const ALL: [SmallPath; 5] = [
        SmallPath::TusCreation,
        SmallPath::SizedStore,
        SmallPath::ChunkedStore,
        SmallPath::TusPatch,
        SmallPath::OnePartMultipart,
    ];
}

/// A JSON answer that must have `status`.
async fn answer(resp: reqwest::Response, what: &str, status: u16) -> Result<Value, String> {
    if resp.status() != status {
        return Err(format!("{what}: {}", resp.status()));
    }
    resp.json().await.map_err(|e| format!("{what}: {e}"))
}

/// One small upload on one of the paths; the handle once it is acknowledged.
async fn small_upload(
    http: &reqwest::Client,
    base: &str,
    path: SmallPath,
    bytes: Vec<u8>,
) -> Result<String, String> {
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: reqwest::Error| format!("{what}: {e}")
    };
    let tus_creation = |body: Vec<u8>| {
        http.post(format!("{base}/files/"))
            .header(TUS.0, TUS.1)
            .header(OCTETS.0, OCTETS.1)
            .header("upload-length", bytes.len().to_string())
            .body(body)
            .send()
    };
    let offset_of = |resp: &reqwest::Response| {
        resp.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    match path {
        SmallPath::TusCreation => {
            let resp = tus_creation(bytes.clone())
                .await
                .map_err(fail("tus creation"))?;
            let offset = offset_of(&resp);
            if resp.status() != 201 || offset != bytes.len().to_string() {
                return Err(format!("tus creation: {} at {offset:?}", resp.status()));
            }
            Ok(h(&resp, "cin-handle").to_owned())
        }
        SmallPath::TusPatch => {
            let created = tus_creation(Vec::new())
                .await
                .map_err(fail("tus creation"))?;
            if created.status() != 201 {
                return Err(format!("tus creation: {}", created.status()));
            }
            let handle = h(&created, "cin-handle").to_owned();
            let patched = http
                .patch(h(&created, "location"))
                .header(TUS.0, TUS.1)
                .header(OCTETS.0, OCTETS.1)
                .header("upload-offset", "0")
                .body(bytes.clone())
                .send()
                .await
                .map_err(fail("tus PATCH"))?;
            let offset = offset_of(&patched);
            if patched.status() != 204 || offset != bytes.len().to_string() {
                return Err(format!("tus PATCH: {} at {offset:?}", patched.status()));
            }
            Ok(handle)
        }
        SmallPath::SizedStore | SmallPath::ChunkedStore => {
            let body = match path {
                SmallPath::SizedStore => reqwest::Body::from(bytes.clone()),
                _ => chunked(&bytes),
            };
            let resp = http
                .post(format!("{base}/api/store/s3?filename=c.bin"))
                .body(body)
                .send()
                .await
                .map_err(fail("store"))?;
            let stored = answer(resp, "store", 200).await?;
            stored["handle"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("store: {stored}"))
        }
        SmallPath::OnePartMultipart => {
            let call =
                |path: &str, body: Value| http.post(format!("{base}{path}")).json(&body).send();
            let start = call(
                "/multipart/start",
                json!({"apikey": "k", "filename": "m.bin", "size": bytes.len()}),
            )
            .await
            .map_err(fail("start"))?;
            let start = answer(start, "start", 200).await?;
            let upload_id = start["upload_id"].as_str().unwrap_or_default().to_owned();
            let asked = call(
                "/multipart/upload",
                chunk_request(&upload_id, 1, None, &bytes),
            )
            .await
            .map_err(fail("upload"))?;
            let asked = answer(asked, "upload", 200).await?;
            let mut put = http
                .put(asked["url"].as_str().unwrap_or_default())
                .body(bytes.clone());
            for (name, value) in asked["headers"].as_object().into_iter().flatten() {
                put = put.header(name, value.as_str().unwrap_or_default());
            }
            let put = put.send().await.map_err(fail("PUT"))?;
            if put.status() != 200 {
                return Err(format!("PUT: {}", put.status()));
            }
            let done = call(
                "/multipart/complete",
                json!({"apikey": "k", "upload_id": upload_id}),
            )
            .await
            .map_err(fail("complete"))?;
            let done = answer(done, "complete", 200).await?;
            done["handle"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("complete: {done}"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_small_uploads_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    crash_mid_way(dir.path(), None).await;
}

/// The same on a filesystem that loses what was not synced: a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_small_uploads_survive_a_power_cut() {
    let fs = LossyFs::mount();
    crash_mid_way(fs.path(), Some(&fs)).await;
}

/// 400 small uploads on every path into the log, 64 in flight; mid-way the POP is killed
/// (after a power cut of `fs`, if given) and started again on `data_dir`:
/// every upload that was acknowledged is served with identical bytes.
async fn crash_mid_way(data_dir: &std::path::Path, fs: Option<&LossyFs>) {
    const UPLOADS: usize = 400;
    const IN_FLIGHT: usize = 64;
    let pop = PopProcess::start(data_dir);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    // 64 clients, the uploads taking each path in turn.
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (http, base) = (http.clone(), pop.base.clone());
            let (acked, stop, next) = (acked.clone(), stop.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= UPLOADS || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let (seed, size) = (9_000 + i as u64, crash_size(i));
                    let path = SmallPath::ALL[i % SmallPath::ALL.len()];
                    if let Ok(handle) =
                        small_upload(&http, &base, path, random_bytes(size, seed)).await
                    {
                        acked.lock().unwrap().push(Acked {
                            what: path,
                            handle,
                            seed,
                            size,
                        });
                    }
                }
            })
        })
        .collect();

    // The cut falls mid-way, with requests in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < UPLOADS / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let report = fs.map(|fs| fs.cut().to_string()).unwrap_or_default();
    tokio::task::spawn_blocking(move || pop.kill())
        .await
        .unwrap();
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(60), client).await;
    }
    if let Some(fs) = fs {
        fs.resume();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= UPLOADS / 2 && acked.len() < UPLOADS,
        "the cut fell mid-way: {} of {UPLOADS} acknowledged",
        acked.len()
    );

    let pop = PopProcess::start(data_dir);
    let mut lost = Vec::new();
    for upload in &acked {
        let resp = http
            .get(format!("{}/{}", pop.base, upload.handle))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let expected = random_bytes(upload.size, upload.seed);
        if status != 200 || sha256_hex(&body) != sha256_hex(&expected) {
            lost.push(format!(
                "{:?} {} ({} bytes): {status}, {} bytes served",
                upload.what,
                upload.handle,
                upload.size,
                body.len()
            ));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged small files lost or wrong after the crash:\n  {}\nwhat a power cut threw away:\n{report}",
        lost.len(),
        acked.len(),
        lost.join("\n  ")
    );
    tokio::task::spawn_blocking(move || pop.kill())
        .await
        .unwrap();
}
