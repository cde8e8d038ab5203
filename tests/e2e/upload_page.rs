//! The upload page at `/`: served with its credentials and types, off when
//! `[page] enabled = false`, and used in headless Chromium the way a person
//! would (tests/browser/upload_page.mjs): pick a file, reload mid-upload, pick
//! it again, see it resume and end `Stored`; a video's preview plays from its
//! filelink while it uploads (tests/browser/page_preview.mjs).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cin_edge::config::AppConfig;
use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, spawn_app_with, MIB};

/// The key of the app the browser uploads for; the page's URL passes it.
const PAGE_KEY: &str = "PAGEKEY";

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// `target/screenshots`, where a person looks at what the page showed.
fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("screenshots")
}

/// Runs the browser driver; returns its JSON report.
async fn run_driver(mut cmd: Command) -> Value {
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("start node");
    assert!(
        output.status.success(),
        "the browser driver failed (run scripts/test to install playwright-core and chromium): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the driver prints JSON")
}

#[tokio::test]
async fn a_person_uploads_through_the_page_reloads_it_and_the_upload_resumes() {
    let app = spawn_app_with(|c| {
        // With an app, uploads need its key: the page must send it.
        c.apps.insert(
            "page".into(),
            AppConfig {
                apikey: PAGE_KEY.into(),
                ..Default::default()
            },
        );
        // A stale key in the config: the page's ?apikey= overrides it.
        c.page.apikey = "STALEKEY".into();
    })
    .await;
    let size = 50 * MIB;
    let bytes = random_bytes(size, 4242);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site-survey.bin");
    std::fs::write(&path, &bytes).unwrap();
    let shots = screenshot_dir();
    for name in ["mid", "reloaded", "done", "mobile"] {
        let _ = std::fs::remove_file(shots.join(format!("upload-page-{name}.png")));
    }

    let mut cmd = Command::new("node");
    cmd.arg(browser_dir().join("upload_page.mjs"))
        .args([
            "--base",
            &app.base,
            "--query",
            &format!("?apikey={PAGE_KEY}"),
        ])
        // 50 MiB at 6 MiB/s: about 9 s, so the reload lands mid-upload.
        .args([
            "--throughput",
            &(6 * MIB).to_string(),
            "--reload-at",
            "0.35",
        ])
        .arg("--file")
        .arg(&path)
        .arg("--screenshots")
        .arg(&shots);
    let report = run_driver(cmd).await;

    let handle = report["handle"].as_str().expect("the row's handle");
    assert_eq!(
        report["filelink"],
        app.url(&format!("/{handle}")),
        "{report}"
    );
    // The filelink is there as soon as the upload exists, long before its bytes.
    assert_eq!(report["early_filelink"], report["filelink"], "{report}");
    let size = size as u64;
    let offset = |name: &str| {
        report[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {report}"))
    };
    assert!(offset("early_offset") < size / 4, "{report}");
    // Reloaded mid-upload; after the reload the page showed what the POP had,
    // and picking the file again resumed from there, not from 0.
    let before = offset("offset_before_reload");
    assert!(before > 0 && before < size, "{report}");
    assert!(offset("restored_offset") >= before, "{report}");
    let resumed = offset("resumed_from");
    assert!(resumed >= before && resumed < size, "{report}");
    assert!(
        report["restored_message"]
            .as_str()
            .is_some_and(|m| m.contains("pick or drop the same file to resume")),
        "{report}"
    );
    assert!(
        report["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Resumed at")),
        "{report}"
    );
    assert_eq!(report["picked_with_keyboard"], true);
    // The status moved live from the event stream.
    assert_eq!(report["status"], "Stored", "{report}");
    let history: Vec<&str> = report["status_history"]
        .as_array()
        .expect("status history")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(history.first(), Some(&"Uploading"), "{report}");
    assert_eq!(history.last(), Some(&"Stored"), "{report}");
    assert!(
        report["page_errors"].as_array().is_some_and(Vec::is_empty),
        "the page threw: {report}"
    );
    assert!(
        report["mobile_scroll_width"]
            .as_u64()
            .is_some_and(|w| w <= 375),
        "nothing is wider than a 375 px screen: {report}"
    );

    // One upload, every byte sent about once: the resume did not start over.
    assert_eq!(app.metric("cin_uploads_started_total").await, 1.0);
    let received = app.metric("cin_bytes_received_total").await;
    assert!(
        received >= size as f64 && received < size as f64 * 1.25,
        "the POP received {received} bytes for a file of {size}"
    );
    assert!(
        app.metric_with("cin_http_requests_total", "method=\"HEAD\"")
            .await
            >= 1.0,
        "the page asked the POP for the offset"
    );
    let meta = app
        .wait_status(handle, "Stored", Duration::from_secs(30))
        .await;
    assert_eq!(meta["filename"], "site-survey.bin");
    assert_eq!(meta["size"], size);
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
    for name in ["mid", "reloaded", "done", "mobile"] {
        let shot = shots.join(format!("upload-page-{name}.png"));
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 0),
            "{shot:?} was saved"
        );
    }
}

#[tokio::test]
async fn the_page_is_served_with_its_types_and_its_credentials_kept_inside_it() {
    let app = spawn_app_with(|c| {
        c.page.apikey = "</script><script>alert(1)</script>".into();
        c.page.policy = "eyJjYWxsIjpbInN0b3JlIl19".into();
    })
    .await;
    let resp = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |resp: &reqwest::Response, name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&resp, "cache-control"), "no-cache");
    assert!(header(&resp, "content-security-policy").contains("script-src 'self'"));
    let html = resp.text().await.unwrap();
    assert!(!html.contains("alert(1)</script>"), "{html}");
    let block = html
        .split_once(r#"<script type="application/json" id="cin-config">"#)
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(block, _)| block)
        .expect("the config block");
    let config: Value = serde_json::from_str(block).unwrap();
    assert_eq!(config["apikey"], "</script><script>alert(1)</script>");
    assert_eq!(config["policy"], "eyJjYWxsIjpbInN0b3JlIl19");
    assert_eq!(config["signature"], "");

    for (path, content_type) in [
        ("/page/app.js", "text/javascript; charset=utf-8"),
        ("/page/app.css", "text/css; charset=utf-8"),
    ] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(header(&resp, "content-type"), content_type, "{path}");
        assert_eq!(header(&resp, "cache-control"), "no-cache", "{path}");
        let etag = header(&resp, "etag");
        assert!(etag.starts_with('"'), "{path}: {etag:?}");
        assert!(!resp.bytes().await.unwrap().is_empty());
        let again = app
            .http
            .get(app.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
}

#[tokio::test]
async fn with_the_page_off_the_root_is_no_route() {
    let app = spawn_app_with(|c| c.page.enabled = false).await;
    for path in ["/", "/page/app.js", "/page/app.css"] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
        if path == "/" {
            assert_eq!(body["error"]["code"], "route_not_found");
        }
    }
}

#[tokio::test]
async fn the_preview_of_a_video_plays_while_it_uploads() {
    let app = spawn_app_with(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // 20 s of WebM.
    let (video, _) = crate::play_while_uploading::make_video(
        dir.path(),
        "walkthrough.webm",
        20,
        crate::play_while_uploading::WEBM,
    );
    let path = dir.path().join("walkthrough.webm");
    // The upload takes about 8 s, whatever size the encoder made.
    let rate = (video.len() / 8).max(20_000);
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(browser_dir().join("page_preview.mjs"))
        .arg(&app.base)
        .arg(&path)
        .arg(&shots)
        .arg(rate.to_string());
    let report = run_driver(cmd).await;
    assert!(
        report["frames_while_uploading"].as_u64().unwrap_or(0) >= 25,
        "the preview showed frames while the file uploaded: {report}"
    );
    assert_eq!(report["status_while_playing"], "Uploading", "{report}");
    assert_eq!(report["ended"], true, "{report}");
    assert_eq!(report["final_status"], "Stored", "{report}");
    let handle = report["handle"].as_str().expect("handle");
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&video));
    assert!(shots.join("upload-page-preview.png").exists());
}
