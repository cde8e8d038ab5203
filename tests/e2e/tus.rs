//! tus 1.0 at `/files/`: every status code and header of the protocol and its
//! extensions, concatenation, concurrency, interrupted bodies, expiry, and real
//! tus clients (tuspy, tus-js-client).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use reqwest::{Method, Response};
use serde_json::Value;
use sha2::Digest;

use crate::support::{
    header_value as h, md5_b64, random_bytes, raw_exchange, sha256_hex, spawn_app, spawn_app_with,
    TestApp, MIB,
};

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");
const OCTETS: (&str, &str) = ("content-type", "application/offset+octet-stream");

fn b64(s: &str) -> String {
    b64_bytes(s.as_bytes())
}

fn b64_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn create(app: &TestApp, length: usize, metadata: &str) -> String {
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", length.to_string())
        .header("upload-metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    h(&resp, "location").to_owned()
}

async fn patch(app: &TestApp, url: &str, offset: usize, bytes: &[u8]) -> Response {
    app.http
        .patch(url)
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", offset.to_string())
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap()
}

/// A PATCH with `Upload-Checksum: {checksum}`.
async fn patch_checked(
    app: &TestApp,
    url: &str,
    offset: usize,
    bytes: &'static str,
    checksum: String,
) -> Response {
    app.http
        .patch(url)
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", offset.to_string())
        .header("upload-checksum", checksum)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

async fn head(app: &TestApp, url: &str) -> Response {
    app.http
        .head(url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn options_advertises_the_protocol() {
    let app = spawn_app_with(|c| c.uploads.max_file_size = 1 << 30).await;
    let resp = app
        .http
        .request(Method::OPTIONS, app.url("/files/"))
        .send()
        .await
        .unwrap();
    // 200 (the spec allows 204 too; some clients accept only 200).
    assert_eq!(resp.status(), 200);
    assert_eq!(h(&resp, "tus-version"), "1.0.0");
    assert_eq!(h(&resp, "tus-max-size"), (1u64 << 30).to_string());
    let extensions: Vec<&str> = h(&resp, "tus-extension").split(',').collect();
    for ext in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "checksum",
        "checksum-trailer",
        "expiration",
        "concatenation",
        "concatenation-unfinished",
    ] {
        assert!(extensions.contains(&ext), "{ext} missing");
    }
    let algorithms = h(&resp, "tus-checksum-algorithm");
    for alg in ["sha1", "md5", "sha256"] {
        assert!(algorithms.contains(alg));
    }
}

#[tokio::test]
async fn unsupported_versions_get_412_with_tus_version() {
    let app = spawn_app().await;
    let url = create(&app, 10, "").await;
    let requests = [
        app.http
            .post(app.url("/files/"))
            .header("upload-length", "10"),
        app.http
            .post(app.url("/files/"))
            .header("tus-resumable", "0.2.2")
            .header("upload-length", "10"),
        app.http.head(&url),
        app.http
            .patch(&url)
            .header(OCTETS.0, OCTETS.1)
            .header("upload-offset", "0")
            .body("x"),
        app.http.delete(&url),
    ];
    for request in requests {
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 412);
        assert_eq!(h(&resp, "tus-version"), "1.0.0");
    }
    assert_eq!(
        h(&head(&app, &url).await, "upload-offset"),
        "0",
        "nothing was written"
    );
}

#[tokio::test]
async fn create_head_patch_complete_with_filelink() {
    let app = spawn_app().await;
    let bytes = random_bytes(300_000, 80);
    let metadata = format!(
        "filename {},filetype {},container {}",
        b64("report.pdf"),
        b64("application/pdf"),
        b64("default")
    );
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", bytes.len().to_string())
        .header("upload-metadata", &metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(h(&resp, "tus-resumable"), "1.0.0");
    let url = h(&resp, "location").to_owned();
    assert!(url.starts_with(&app.url("/files/")));
    let handle = h(&resp, "cin-handle").to_owned();
    assert_eq!(h(&resp, "cin-filelink"), app.url(&format!("/{handle}")));
    assert!(httpdate::parse_http_date(h(&resp, "upload-expires")).is_ok());
    assert_eq!(app.metadata(&handle).await["status"], "Uploading");

    let first = head(&app, &url).await;
    assert_eq!(first.status(), 200);
    assert_eq!(h(&first, "upload-offset"), "0");
    assert_eq!(h(&first, "upload-length"), bytes.len().to_string());
    assert_eq!(h(&first, "cache-control"), "no-store");
    assert_eq!(h(&first, "upload-metadata"), metadata);

    let resp = patch(&app, &url, 0, &bytes[..100_000]).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(h(&resp, "upload-offset"), "100000");
    assert!(resp.headers().contains_key("upload-expires"));
    let resp = patch(&app, &url, 100_000, &bytes[100_000..]).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(h(&resp, "upload-offset"), bytes.len().to_string());
    assert!(
        !resp.headers().contains_key("upload-expires"),
        "a complete upload does not expire"
    );

    assert_eq!(app.download(&handle).await, bytes);
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["filename"], "report.pdf");
    assert_eq!(meta["mimetype"], "application/pdf");
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
}

#[tokio::test]
async fn patch_errors_415_409_460_413_404() {
    let app = spawn_app_with(|c| c.uploads.max_file_size = 1000).await;
    let url = create(&app, 10, "").await;

    let resp = app
        .http
        .patch(&url)
        .header(TUS.0, TUS.1)
        .header("content-type", "application/octet-stream")
        .header("upload-offset", "0")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);

    assert_eq!(patch(&app, &url, 0, b"abc").await.status(), 204);
    let resp = patch(&app, &url, 0, b"abc").await;
    assert_eq!(resp.status(), 409, "offset mismatch");

    let wrong = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(b"not these"));
    let resp = patch_checked(&app, &url, 3, "defg", format!("sha1 {wrong}")).await;
    assert_eq!(resp.status().as_u16(), 460);
    assert_eq!(
        h(&head(&app, &url).await, "upload-offset"),
        "3",
        "a mismatching chunk is discarded"
    );

    let right = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(b"defg"));
    let resp = patch_checked(&app, &url, 3, "defg", format!("sha256 {right}")).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(h(&resp, "upload-offset"), "7");

    let resp = patch_checked(&app, &url, 7, "hij", "crc32 AAAA".into()).await;
    assert_eq!(resp.status(), 400, "unsupported checksum algorithm");

    let resp = patch(&app, &url, 7, b"hijklmnop").await;
    assert_eq!(resp.status(), 413, "past Upload-Length");
    assert_eq!(h(&head(&app, &url).await, "upload-offset"), "7");

    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", "1001")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413, "above Tus-Max-Size");

    let unknown = app.url(&format!("/files/{}", "Z".repeat(32)));
    assert_eq!(head(&app, &unknown).await.status(), 404);
    assert_eq!(patch(&app, &unknown, 0, b"x").await.status(), 404);
}

#[tokio::test]
async fn method_override_creation_with_upload_and_deferred_length() {
    let app = spawn_app().await;
    // creation-with-upload and creation-defer-length together.
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-defer-length", "1")
        .header(OCTETS.0, OCTETS.1)
        .body("hello ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(h(&resp, "upload-offset"), "6");
    let url = h(&resp, "location").to_owned();
    let handle = h(&resp, "cin-handle").to_owned();
    let state = head(&app, &url).await;
    assert_eq!(h(&state, "upload-defer-length"), "1");
    assert!(!state.headers().contains_key("upload-length"));

    // PATCH through X-HTTP-Method-Override, declaring the length at last.
    let resp = app
        .http
        .post(&url)
        .header("x-http-method-override", "PATCH")
        .header(TUS.0, TUS.1)
        .header(OCTETS.0, OCTETS.1)
        .header("upload-offset", "6")
        .header("upload-length", "11")
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(h(&resp, "upload-offset"), "11");
    assert_eq!(h(&head(&app, &url).await, "upload-length"), "11");
    assert_eq!(app.download(&handle).await, b"hello world");

    // DELETE through the override: termination of an unfinished upload.
    let other = create(&app, 5, "").await;
    let resp = app
        .http
        .post(&other)
        .header("x-http-method-override", "DELETE")
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(head(&app, &other).await.status(), 404);
    // Termination covers finished uploads: the file is deleted.
    let resp = app
        .http
        .delete(&url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(matches!(
        head(&app, &url).await.status().as_u16(),
        404 | 410
    ));
}

#[tokio::test]
async fn concatenation_of_three_partials() {
    let app = spawn_app().await;
    let pieces = [
        random_bytes(100_000, 81),
        random_bytes(1, 82),
        random_bytes(250_000, 83),
    ];
    let mut urls = Vec::new();
    for piece in &pieces {
        let resp = app
            .http
            .post(app.url("/files/"))
            .header(TUS.0, TUS.1)
            .header("upload-concat", "partial")
            .header("upload-length", piece.len().to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let url = h(&resp, "location").to_owned();
        assert_eq!(h(&head(&app, &url).await, "upload-concat"), "partial");
        urls.push(url);
    }
    // Partials finish in any order.
    for i in [2, 0, 1] {
        assert_eq!(patch(&app, &urls[i], 0, &pieces[i]).await.status(), 204);
    }
    let relative: Vec<String> = urls
        .iter()
        .map(|u| u.trim_start_matches(&app.base).to_owned())
        .collect();
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header(
            "upload-concat",
            format!("final;{} {} {}", urls[0], relative[1], urls[2]),
        )
        .header("upload-metadata", format!("filename {}", b64("joined.bin")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let final_url = h(&resp, "location").to_owned();
    let handle = h(&resp, "cin-handle").to_owned();
    let state = head(&app, &final_url).await;
    assert_eq!(h(&state, "upload-offset"), "350001");
    assert_eq!(h(&state, "upload-length"), "350001");
    assert!(h(&state, "upload-concat").starts_with("final;"));
    let expected: Vec<u8> = pieces.concat();
    assert_eq!(
        sha256_hex(&app.download(&handle).await),
        sha256_hex(&expected)
    );
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&expected));
    assert_eq!(meta["filename"], "joined.bin");
    assert_eq!(
        patch(&app, &final_url, 350001, b"x").await.status(),
        403,
        "a final upload cannot be patched"
    );

    // A final upload over an unfinished partial waits for it.
    let open = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-concat", "partial")
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    let open_url = h(&open, "location").to_owned();
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-concat", format!("final;{open_url}"))
        .send()
        .await
        .unwrap();
    // concatenation-unfinished: the final upload waits for the open partial.
    assert_eq!(resp.status(), 201);
    let waiting = h(&resp, "cin-handle").to_owned();
    assert_eq!(app.metadata(&waiting).await["status"], "Uploading");
}

#[tokio::test]
async fn concurrent_patches_never_interleave() {
    // Whichever way they race, the upload holds a prefix of one body only.
    let app = spawn_app().await;
    let a = random_bytes(4 * MIB, 84);
    let b = random_bytes(4 * MIB, 85);
    let url = create(&app, 4 * MIB, "").await;
    let (ra, rb) = tokio::join!(patch(&app, &url, 0, &a), patch(&app, &url, 0, &b));
    // The later PATCH takes the upload over from the earlier, which keeps only
    // what it had received (maybe nothing) and says so in its Upload-Offset;
    // the loser of the offset check gets 409. The client resumes from there.
    let accepted = |r: &reqwest::Response| -> Option<usize> {
        (r.status() == 204).then(|| h(r, "upload-offset").parse().unwrap())
    };
    for r in [&ra, &rb] {
        assert!([204, 409].contains(&r.status().as_u16()), "{}", r.status());
    }
    let winner = match (accepted(&ra), accepted(&rb)) {
        (Some(x), Some(y)) => {
            if x >= y {
                &a
            } else {
                &b
            }
        }
        (Some(_), None) => &a,
        (None, Some(_)) => &b,
        (None, None) => panic!("neither PATCH was accepted"),
    };
    let head_now = head(&app, &url).await;
    let offset: usize = h(&head_now, "upload-offset").parse().unwrap();
    if offset < winner.len() {
        let resp = patch(&app, &url, offset, &winner[offset..]).await;
        assert_eq!(resp.status(), 204);
    }
    let handle = h(&head(&app, &url).await, "cin-handle").to_owned();
    let served = app.download(&handle).await;
    assert_eq!(
        sha256_hex(&served),
        sha256_hex(winner),
        "the file is one body, not a mix"
    );
}

#[tokio::test]
async fn a_patch_cut_off_mid_body_keeps_what_arrived() {
    use tokio::io::AsyncWriteExt;

    let app = spawn_app().await;
    let bytes = random_bytes(2 * MIB, 86);
    let url = create(&app, bytes.len(), "").await;
    let parsed = reqwest::Url::parse(&url).unwrap();
    let mut stream =
        tokio::net::TcpStream::connect((parsed.host_str().unwrap(), parsed.port().unwrap()))
            .await
            .unwrap();
    let request = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        parsed.path(),
        parsed.authority(),
        bytes.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&bytes[..MIB + 12345]).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let offset: usize = loop {
        let offset: usize = h(&head(&app, &url).await, "upload-offset").parse().unwrap();
        if offset > 0 {
            break offset;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing of the cut-off body was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(offset <= MIB + 12345, "{offset}");
    let resp = patch(&app, &url, offset, &bytes[offset..]).await;
    assert_eq!(resp.status(), 204);
    let handle = h(&resp, "cin-handle").to_owned();
    assert_eq!(sha256_hex(&app.download(&handle).await), sha256_hex(&bytes));
}

#[tokio::test]
async fn abandoned_uploads_expire() {
    let app = spawn_app_with(|c| {
        c.uploads.expire_after_secs = 1;
        c.uploads.sweep_interval_secs = 1;
    })
    .await;
    let url = create(&app, 100, "").await;
    assert_eq!(patch(&app, &url, 0, b"some").await.status(), 204);
    let handle = h(&head(&app, &url).await, "cin-handle").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let resp = head(&app, &url).await;
        if resp.status() == 410 {
            break;
        }
        assert_eq!(resp.status(), 200);
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resp = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "expired");
    assert_eq!(patch(&app, &url, 4, b"more").await.status(), 410);
    // The record turns `expired` (durably) before the bytes go, so a crash between
    // the two leaves an orphan that start-up removes, never a record without bytes.
    while app.upload_dirs() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired upload's bytes are gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn browsers_can_read_tus_headers() {
    let app = spawn_app().await;
    let preflight = app
        .http
        .request(Method::OPTIONS, app.url("/files/abc"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PATCH")
        .header(
            "access-control-request-headers",
            "upload-offset,tus-resumable,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert!(h(&preflight, "access-control-allow-methods").contains("PATCH"));
    let resp = app
        .http
        .post(app.url("/files/"))
        .header("origin", "https://app.example")
        .header(TUS.0, TUS.1)
        .header("upload-length", "3")
        .send()
        .await
        .unwrap();
    let exposed = h(&resp, "access-control-expose-headers").to_ascii_lowercase();
    for name in [
        "location",
        "upload-offset",
        "upload-length",
        "tus-resumable",
        "upload-expires",
        "cin-filelink",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
}

fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/tus")
}

fn python() -> PathBuf {
    std::env::var("CIN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        })
}

/// Runs a tus client driver; returns its JSON report.
async fn run_client(mut cmd: Command) -> Value {
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("start the tus client");
    assert!(
        output.status.success(),
        "tus client failed (run scripts/test to install the clients): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the driver prints JSON")
}

async fn check_real_client(app: &TestApp, report: Value, bytes: &[u8]) {
    assert!(
        report["resumed_from"].as_u64().is_some_and(|o| o > 0),
        "the upload was resumed: {report}"
    );
    let handle = report["handle"].as_str().expect("Cin-Handle");
    assert_eq!(report["filelink"], app.url(&format!("/{handle}")));
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(bytes));
    app.wait_status(handle, "Stored", Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn tuspy_uploads_interrupted_and_resumed() {
    let app = spawn_app().await;
    let bytes = random_bytes(5 * MIB + 333, 87);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuspy.bin");
    std::fs::write(&path, &bytes).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(tools_dir().join("tuspy_upload.py"))
        .args([
            "--endpoint",
            &app.url("/files/"),
            "--chunk-size",
            &MIB.to_string(),
        ])
        .args(["--interrupt-after-chunks", "2", "--upload-checksum"])
        .arg("--file")
        .arg(&path);
    let report = run_client(cmd).await;
    check_real_client(&app, report, &bytes).await;
}

#[tokio::test]
async fn tus_js_client_uploads_interrupted_and_resumed() {
    let app = spawn_app().await;
    let bytes = random_bytes(5 * MIB + 777, 88);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tusjs.bin");
    std::fs::write(&path, &bytes).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(tools_dir().join("tusjs_upload.mjs"))
        .args([
            "--endpoint",
            &app.url("/files/"),
            "--chunk-size",
            &MIB.to_string(),
        ])
        .args(["--interrupt-at-fraction", "0.5"])
        .arg("--file")
        .arg(&path);
    let report = run_client(cmd).await;
    check_real_client(&app, report, &bytes).await;
}

#[tokio::test]
async fn what_the_spec_asks_of_creation_and_patch() {
    let app = spawn_app_with(|_| {}).await;
    // creation-with-upload under another Content-Type: 415, nothing created.
    let refused = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", "5")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    assert!(!refused.headers().contains_key("location"));
    assert_eq!(app.upload_dirs(), 0, "nothing was created");
    assert_eq!(app.metric("cin_uploads_started_total").await, 0.0);

    // An empty upload cannot carry a body: 413, nothing created.
    let overfull = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", "0")
        .header("content-type", "application/offset+octet-stream")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(overfull.status(), 413);
    assert_eq!(app.metric("cin_uploads_started_total").await, 0.0);

    // A 409 for a wrong offset says where the upload is.
    let created = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-length", "10")
        .header("content-type", "application/offset+octet-stream")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let url = h(&created, "location").to_owned();
    let mismatch = app
        .http
        .patch(&url)
        .header(TUS.0, TUS.1)
        .header("upload-offset", "3")
        .header("content-type", "application/offset+octet-stream")
        .body("lo wo")
        .send()
        .await
        .unwrap();
    assert_eq!(mismatch.status(), 409);
    assert_eq!(h(&mismatch, "upload-offset"), "5");

    // A final concatenation is as long as its partials: no Upload-Length.
    let final_with_length = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-concat", format!("final;{url}"))
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(final_with_length.status(), 400);
    let body: serde_json::Value = final_with_length.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_length");
}

#[tokio::test]
async fn a_final_upload_made_before_its_partials_finish_completes_when_they_do() {
    let app = spawn_app_with(|_| {}).await;
    let mut partials = Vec::new();
    for _ in 0..2 {
        let created = app
            .http
            .post(app.url("/files/"))
            .header(TUS.0, TUS.1)
            .header("upload-concat", "partial")
            .header("upload-length", "3")
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        partials.push(h(&created, "location").to_owned());
    }
    let final_upload = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header(
            "upload-concat",
            format!("final;{} {}", partials[0], partials[1]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(final_upload.status(), 201);
    let final_url = h(&final_upload, "location").to_owned();
    let handle = h(&final_upload, "cin-handle").to_owned();
    let waiting = head(&app, &final_url).await;
    assert_eq!(waiting.status(), 200);
    assert!(
        !waiting.headers().contains_key("upload-offset"),
        "no offset while its partials upload"
    );
    assert_eq!(h(&waiting, "upload-length"), "6");
    assert_eq!(app.metadata(&handle).await["status"], "Uploading");
    // The second partial first: the final completes with the last of them.
    for (url, piece) in [(&partials[1], "def"), (&partials[0], "abc")] {
        let patched = app
            .http
            .patch(url)
            .header(TUS.0, TUS.1)
            .header("upload-offset", "0")
            .header("content-type", "application/offset+octet-stream")
            .body(piece)
            .send()
            .await
            .unwrap();
        assert_eq!(patched.status(), 204);
    }
    assert_eq!(app.download(&handle).await, b"abcdef");
    let done = head(&app, &final_url).await;
    assert_eq!(h(&done, "upload-offset"), "6");
    app.wait_status(&handle, "Stored", std::time::Duration::from_secs(30))
        .await;
}

/// A tus request with a chunked body whose `Upload-Checksum` is a trailer
/// (or missing though announced, when `trailer` is None), written by hand:
/// HTTP client libraries do not send request trailers.
fn chunked_with_trailer(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    trailer: Option<String>,
) -> Vec<u8> {
    let host = app.base.trim_start_matches("http://");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ntus-resumable: 1.0.0\r\ncontent-type: application/offset+octet-stream\r\ntransfer-encoding: chunked\r\ntrailer: Upload-Checksum\r\nconnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    for chunk in body.chunks(7_000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n");
    if let Some(value) = trailer {
        request.extend_from_slice(format!("upload-checksum: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request
}

#[tokio::test]
async fn checksum_trailer_after_a_chunked_body() {
    let app = spawn_app().await;
    let bytes = random_bytes(50_000, 81);
    let (first, rest) = bytes.split_at(20_000);
    let sha1 = |b: &[u8]| b64_bytes(&sha1::Sha1::digest(b));
    let sha256 = |b: &[u8]| b64_bytes(&sha2::Sha256::digest(b));

    // creation-with-upload: the first 20,000 bytes, checksummed by a trailer.
    let created = raw_exchange(
        &app,
        &chunked_with_trailer(
            &app,
            "POST",
            "/files/",
            &[("upload-length", bytes.len().to_string())],
            first,
            Some(format!("sha256 {}", sha256(first))),
        ),
    )
    .await;
    assert_eq!(
        created.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&created.body)
    );
    assert_eq!(created.header("upload-offset"), Some("20000"));
    let url = created.header("location").unwrap().to_owned();
    let path = url.trim_start_matches(&app.base).to_owned();
    let handle = created.header("cin-handle").unwrap().to_owned();
    let patch_with = async |offset: usize, body: &[u8], trailer: Option<String>| {
        let at = [("upload-offset", offset.to_string())];
        raw_exchange(
            &app,
            &chunked_with_trailer(&app, "PATCH", &path, &at, body, trailer),
        )
        .await
    };

    // A trailer that does not match: 460, and nothing of the body counts.
    let wrong = patch_with(20_000, rest, Some(format!("sha1 {}", sha1(first)))).await;
    assert_eq!(wrong.status, 460);
    assert_eq!(h(&head(&app, &url).await, "upload-offset"), "20000");

    // Announced but never sent: 400, and nothing counts either.
    let missing = patch_with(20_000, rest, None).await;
    assert_eq!(missing.status, 400);
    let error: Value = serde_json::from_slice(&missing.body).unwrap();
    assert_eq!(error["error"]["code"], "checksum_trailer_missing");
    assert_eq!(h(&head(&app, &url).await, "upload-offset"), "20000");

    // An algorithm the POP does not know, named only in the trailer: 400.
    let unknown = patch_with(20_000, rest, Some("crc32 AAAAAA==".into())).await;
    assert_eq!(unknown.status, 400);
    assert_eq!(h(&head(&app, &url).await, "upload-offset"), "20000");

    // The right checksum, under each algorithm the trailer may name.
    let (second, third) = rest.split_at(15_000);
    let ok = patch_with(20_000, second, Some(format!("md5 {}", md5_b64(second)))).await;
    assert_eq!(ok.status, 204);
    assert_eq!(ok.header("upload-offset"), Some("35000"));
    let ok = patch_with(35_000, third, Some(format!("SHA1 {}", sha1(third)))).await;
    assert_eq!(ok.status, 204);
    assert_eq!(ok.header("upload-offset"), Some("50000"));

    assert_eq!(app.download(&handle).await, bytes);
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
}
