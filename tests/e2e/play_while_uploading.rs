//! The filelink of a file still uploading serves the bytes received so far,
//! contiguous from the first, and then the rest as it arrives: with the
//! declared length (`Content-Length`, `Content-Range: bytes a-b/TOTAL`), or
//! chunked while a tus upload has not declared its length. Metadata and
//! `/events` say how many bytes are there. Real players (ffmpeg) decode a
//! video while it uploads.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Response;
use serde_json::Value;

use crate::support::{header_value as h, random_bytes, spawn_app_with, Pop};

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");
const OCTETS: (&str, &str) = ("content-type", "application/offset+octet-stream");

/// A tus upload of `length` bytes (None: deferred); returns (upload URL, handle).
async fn create(app: &Pop, length: Option<usize>, filetype: &str) -> (String, String) {
    use base64::Engine;
    let filetype = base64::engine::general_purpose::STANDARD.encode(filetype);
    let request = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-metadata", format!("filetype {filetype}"));
    let request = match length {
        Some(n) => request.header("upload-length", n.to_string()),
        None => request.header("upload-defer-length", "1"),
    };
    let created = request.send().await.unwrap();
    assert_eq!(created.status(), 201);
    (
        h(&created, "location").to_owned(),
        h(&created, "cin-handle").to_owned(),
    )
}

async fn patch(app: &Pop, url: &str, offset: usize, bytes: &[u8], length: Option<usize>) {
    let mut request = app
        .http
        .patch(url)
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", offset.to_string());
    if let Some(n) = length {
        request = request.header("upload-length", n.to_string());
    }
    let resp = request.body(bytes.to_vec()).send().await.unwrap();
    assert_eq!(resp.status(), 204, "{:?}", resp.text().await);
}

/// Reads exactly `n` more bytes of a streaming answer.
async fn read_exactly(resp: &mut Response, buffer: &mut Vec<u8>, n: usize) {
    let target = buffer.len() + n;
    while buffer.len() < target {
        let chunk = resp.chunk().await.unwrap().expect("the body ended early");
        buffer.extend_from_slice(&chunk);
    }
    assert_eq!(buffer.len(), target, "no more than what arrived was served");
}

#[tokio::test]
async fn the_filelink_serves_an_upload_as_it_arrives() {
    let app = spawn_app_with(|_| {}).await;
    let bytes = random_bytes(300_000, 90);
    let (url, handle) = create(&app, Some(bytes.len()), "application/octet-stream").await;
    patch(&app, &url, 0, &bytes[..100_000], None).await;

    let meta = app.metadata(&handle).await;
    assert_eq!(meta["status"], "Uploading");
    assert_eq!(meta["received"], 100_000);

    let head = app
        .http
        .head(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(h(&head, "content-length"), "300000");
    assert_eq!(h(&head, "cache-control"), "no-store");

    // The whole file, declared whole: the first 100,000 bytes now, the rest as it comes.
    let mut whole = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(h(&whole, "content-length"), "300000");
    let mut read = Vec::new();
    read_exactly(&mut whole, &mut read, 100_000).await;

    // A range past what arrived answers at once with the real total, and waits.
    let tail = app
        .http
        .get(app.url(&format!("/{handle}")))
        .header("range", "bytes=250000-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(h(&tail, "content-range"), "bytes 250000-299999/300000");

    patch(&app, &url, 100_000, &bytes[100_000..200_000], None).await;
    read_exactly(&mut whole, &mut read, 100_000).await;
    patch(&app, &url, 200_000, &bytes[200_000..], None).await;
    let rest = whole.bytes().await.unwrap();
    read.extend_from_slice(&rest);
    assert_eq!(read, bytes);
    assert_eq!(tail.bytes().await.unwrap(), &bytes[250_000..]);
}

#[tokio::test]
async fn a_deferred_length_upload_is_served_chunked_until_it_ends() {
    let app = spawn_app_with(|_| {}).await;
    let bytes = random_bytes(120_000, 91);
    let (url, handle) = create(&app, None, "application/octet-stream").await;
    patch(&app, &url, 0, &bytes[..50_000], None).await;
    let mut growing = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(growing.status(), 200);
    assert!(
        !growing.headers().contains_key("content-length"),
        "no length is declared yet"
    );
    let mut read = Vec::new();
    read_exactly(&mut growing, &mut read, 50_000).await;
    patch(&app, &url, 50_000, &bytes[50_000..], Some(bytes.len())).await;
    read.extend_from_slice(&growing.bytes().await.unwrap());
    assert_eq!(read, bytes);
}

#[tokio::test]
async fn a_read_that_waits_too_long_for_new_bytes_ends_unfinished() {
    let app = spawn_app_with(|c| c.uploads.play_idle_secs = 1).await;
    let bytes = random_bytes(20_000, 92);
    let (url, handle) = create(&app, Some(bytes.len()), "application/octet-stream").await;
    patch(&app, &url, 0, &bytes[..5_000], None).await;
    let waited = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 200);
    // It ends broken, not as a complete (short) file.
    assert!(waited.bytes().await.is_err());
    // Asked again from where it stopped, with the rest uploaded, it completes.
    patch(&app, &url, 5_000, &bytes[5_000..], None).await;
    let again = app
        .http
        .get(app.url(&format!("/{handle}")))
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(again.bytes().await.unwrap(), &bytes[5_000..]);
}

#[tokio::test]
async fn events_report_the_bytes_received() {
    let app = spawn_app_with(|_| {}).await;
    let bytes = random_bytes(40_000, 93);
    let (url, handle) = create(&app, Some(bytes.len()), "application/octet-stream").await;
    let mut events = app
        .http
        .get(app.url(&format!("/{handle}/events")))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    let mut until = async |needle: &str, seen: &mut String| {
        while !seen.contains(needle) {
            let chunk = events.chunk().await.unwrap().expect("the stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    until("\"received\":0", &mut seen).await;
    patch(&app, &url, 0, &bytes[..10_000], None).await;
    until("\"received\":10000", &mut seen).await;
    patch(&app, &url, 10_000, &bytes[10_000..], None).await;
    until("\"InTransit\"", &mut seen).await;
    assert!(seen.contains("event: progress"), "{seen}");
    assert!(seen.contains("\"size\":40000"), "{seen}");
}

/// ffmpeg's arguments for a WebM (VP8) test video, encoded fast.
pub const WEBM: &[&str] = &[
    "-c:v",
    "libvpx",
    "-b:v",
    "2M",
    "-deadline",
    "realtime",
    "-cpu-used",
    "8",
];

/// A test video of `seconds` at 25 frames a second, made by ffmpeg: `(bytes, frames)`.
pub fn make_video(
    dir: &std::path::Path,
    name: &str,
    seconds: u64,
    codec: &[&str],
) -> (Vec<u8>, u64) {
    let path = dir.join(name);
    let frames = seconds * 25;
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-f", "lavfi", "-i"])
        .arg("testsrc=size=320x240:rate=25")
        .args(["-frames:v", &frames.to_string()])
        .args(codec)
        .arg(&path)
        .status()
        .expect("ffmpeg (scripts/test installs it)");
    assert!(status.success());
    (std::fs::read(&path).unwrap(), frames)
}

/// Uploads `bytes` over tus at about `bytes_per_sec`, as a slow link would.
async fn upload_slowly(app: &Pop, url: &str, bytes: &[u8], bytes_per_sec: usize) {
    let chunk = bytes_per_sec / 4;
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + chunk).min(bytes.len());
        patch(app, url, offset, &bytes[offset..end], None).await;
        offset = end;
        // Pacing of the client's link, not a wait for the server.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// ffmpeg decodes every frame from the filelink while the upload goes on;
/// returns the seconds from the upload's first byte to ffmpeg's first frame.
async fn ffmpeg_decodes_while_uploading(mimetype: &str, name: &str, codec: &[&str]) -> f64 {
    let app = spawn_app_with(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // 10 s of video: at 60 KB/s its upload takes several seconds.
    let (video, frames) = make_video(dir.path(), name, 10, codec);
    let (url, handle) = create(&app, Some(video.len()), mimetype).await;
    let started = Instant::now();
    // About 60 KB/s: the upload takes several seconds.
    let uploading = {
        let (pop, url, video) = (Pop::new(app.base.clone()), url.clone(), video.clone());
        tokio::spawn(async move { upload_slowly(&pop, &url, &video, 60_000).await })
    };
    let (first_frame_tx, first_frame_rx) = tokio::sync::oneshot::channel::<f64>();
    let link = app.url(&format!("/{handle}"));
    let decoding = tokio::task::spawn_blocking(move || {
        let mut ffmpeg = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-nostats",
                "-progress",
                "pipe:1",
                "-i",
                &link,
            ])
            .args(["-f", "null", "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ffmpeg");
        let progress = BufReader::new(ffmpeg.stdout.take().expect("stdout"));
        let mut first_frame_tx = Some(first_frame_tx);
        let mut last_frame = 0u64;
        for line in progress.lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("frame=") {
                last_frame = n.trim().parse().unwrap_or(last_frame);
                if last_frame > 0 {
                    if let Some(tx) = first_frame_tx.take() {
                        let _ = tx.send(started.elapsed().as_secs_f64());
                    }
                }
            }
        }
        (ffmpeg.wait_with_output().expect("ffmpeg ran"), last_frame)
    });
    let first_frame = first_frame_rx.await.ok();
    let status_at_first_frame = app.metadata(&handle).await["status"].clone();
    let (output, last_frame) = decoding.await.unwrap();
    assert!(
        output.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(last_frame, frames, "every frame was decoded");
    assert_eq!(
        status_at_first_frame, "Uploading",
        "the first frame was decoded while the file was uploading"
    );
    uploading.await.unwrap();
    first_frame.expect("a frame was decoded")
}

#[tokio::test]
async fn ffmpeg_decodes_a_webm_while_it_uploads() {
    let first = ffmpeg_decodes_while_uploading(
        "video/webm",
        "clip.webm",
        &["-c:v", "libvpx", "-b:v", "300k"],
    )
    .await;
    eprintln!("webm: first frame {first:.2} s after the first byte");
}

#[tokio::test]
async fn ffmpeg_decodes_a_faststart_mp4_while_it_uploads() {
    let first = ffmpeg_decodes_while_uploading(
        "video/mp4",
        "clip.mp4",
        &["-c:v", "libx264", "-b:v", "300k", "-movflags", "+faststart"],
    )
    .await;
    eprintln!("mp4: first frame {first:.2} s after the first byte");
}

/// A `<video>` in headless Chromium plays the filelink to the end while the
/// file uploads at `bytes_per_sec`; returns the seconds from the upload's first
/// byte to the first frame shown.
async fn chromium_plays_while_uploading(
    mimetype: &str,
    name: &str,
    codec: &[&str],
    bytes_per_sec: usize,
) -> f64 {
    let app = spawn_app_with(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (video, _) = make_video(dir.path(), name, 20, codec);
    let (url, handle) = create(&app, Some(video.len()), mimetype).await;
    let driver = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/browser/video_while_uploading.mjs");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let link = app.url(&format!("/{handle}"));
    let player = tokio::task::spawn_blocking(move || {
        let mut node = std::process::Command::new("node")
            .arg(driver)
            .arg(&link)
            .arg("120")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node (scripts/test installs playwright-core)");
        let stdout = BufReader::new(node.stdout.take().expect("stdout"));
        for line in stdout.lines().map_while(Result::ok) {
            if let Ok(report) = serde_json::from_str(&line) {
                let _ = lines_tx.send(report);
            }
        }
        node.wait_with_output().expect("the driver ran")
    });
    let next = async |lines: &mut tokio::sync::mpsc::UnboundedReceiver<Value>| {
        lines.recv().await.unwrap_or(Value::Null)
    };
    assert_eq!(next(&mut lines).await["ready"], true, "the player opened");
    let first_byte_ms = unix_ms();
    let uploading = {
        let (pop, url, video) = (Pop::new(app.base.clone()), url.clone(), video.clone());
        tokio::spawn(async move { upload_slowly(&pop, &url, &video, bytes_per_sec).await })
    };
    let first = next(&mut lines).await;
    let status_at_first_frame = app.metadata(&handle).await["status"].clone();
    let ended = next(&mut lines).await;
    let output = player.await.unwrap();
    assert!(
        output.status.success(),
        "the player failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let first_frame_ms = first["first_frame_at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no first frame: {first}"));
    assert_eq!(
        status_at_first_frame, "Uploading",
        "the first frame was shown while the file was uploading"
    );
    assert_eq!(ended["ended"], true, "{ended}");
    let (played, duration) = (
        ended["current_time"].as_f64().unwrap_or(0.0),
        ended["duration"].as_f64().unwrap_or(f64::MAX),
    );
    assert!(
        played >= duration - 0.1 && duration >= 19.0,
        "played to the end: {ended}"
    );
    uploading.await.unwrap();
    assert_eq!(app.download(&handle).await, video);
    first_frame_ms.saturating_sub(first_byte_ms) as f64 / 1000.0
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test]
async fn chromium_plays_a_webm_while_it_uploads() {
    // 20 s of video sent at 1 MB/s: the measure of how soon a viewer sees it.
    let first = chromium_plays_while_uploading("video/webm", "clip.webm", WEBM, 1_000_000).await;
    eprintln!("webm in Chromium: first frame {first:.2} s after the first byte, at 1 MB/s");
}

#[tokio::test]
async fn chromium_plays_a_faststart_mp4_while_it_uploads() {
    let first = chromium_plays_while_uploading(
        "video/mp4",
        "clip.mp4",
        &[
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-b:v",
            "2M",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
        ],
        1_000_000,
    )
    .await;
    eprintln!("mp4 in Chromium: first frame {first:.2} s after the first byte, at 1 MB/s");
}
