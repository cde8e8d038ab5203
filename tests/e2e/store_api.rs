//! `POST /api/store/{location}`: whole files in one request.

use std::time::Duration;

use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, spawn_app, spawn_app_with, MIB};

#[tokio::test]
async fn raw_body_is_stored_and_served() {
    let app = spawn_app().await;
    let bytes = random_bytes(2 * MIB + 3, 10);
    let resp = app
        .http
        .post(app.url("/api/store/S3?key=k&filename=photo.jpg&mimetype=image/jpeg"))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["size"], bytes.len());
    assert_eq!(body["type"], "image/jpeg");
    assert_eq!(body["filename"], "photo.jpg");
    let handle = body["handle"].as_str().unwrap();
    assert_eq!(body["url"], app.url(&format!("/{handle}")));
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
    let meta = app
        .wait_status(handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
}

#[tokio::test]
async fn multipart_field_file_upload_is_stored() {
    let app = spawn_app().await;
    let bytes = random_bytes(300_000, 11);
    let boundary = "cinboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nignored\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"fileUpload\"; filename=\"../../etc/notes.txt\"\r\nContent-Type: text/plain\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let resp = app
        .http
        .post(app.url("/api/store/s3?key=k"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["filename"], "notes.txt",
        "directories are stripped from filenames"
    );
    assert_eq!(body["type"], "text/plain");
    assert_eq!(body["size"], bytes.len());
    assert_eq!(app.download(body["handle"].as_str().unwrap()).await, bytes);
}

/// Runs the real `curl` with `args` (off the runtime's threads); returns the HTTP
/// status, the answer's Content-Type and its body.
async fn curl(args: Vec<String>) -> (u16, String, Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("answer");
        let output = std::process::Command::new("curl")
            .args(["-sS", "-o"])
            .arg(&out)
            .args(["-w", "%{http_code} %{content_type}"])
            .args(&args)
            .output()
            .expect("curl runs (Debian package curl)");
        assert!(
            output.status.success(),
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let written = String::from_utf8(output.stdout).unwrap();
        let (status, content_type) = written.split_once(' ').unwrap_or((&written, ""));
        (
            status.parse().unwrap(),
            content_type.to_owned(),
            std::fs::read(&out).unwrap_or_default(),
        )
    })
    .await
    .unwrap()
}

/// Writes `bytes` to a file named `name` in `dir`; returns curl's `-F` argument for it.
fn form_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    format!("fileUpload=@{}", path.display())
}

#[tokio::test]
async fn a_50_mib_curl_form_is_stored_and_served_byte_for_byte() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(50 * MIB, 12);
    let field = form_file(dir.path(), "big.bin", &bytes);
    let (status, content_type, body) =
        curl(vec!["-F".into(), field, app.url("/api/store/s3?key=k")]).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "application/json");
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["size"], bytes.len(), "{answer}");
    assert_eq!(answer["filename"], "big.bin");
    let handle = answer["handle"].as_str().unwrap();
    assert_eq!(answer["url"], app.url(&format!("/{handle}")));
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
}

/// Checks a 413 `file_too_large` JSON answer.
fn assert_file_too_large(status: u16, content_type: &str, body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, 413, "{text}");
    assert_eq!(content_type, "application/json", "{text}");
    let answer: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(answer["error"]["code"], "file_too_large", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bytes")),
        "{answer}"
    );
}

#[tokio::test]
async fn forms_past_max_file_size_are_413_json() {
    const LIMIT: usize = 256 * 1024;
    let app = spawn_app_with(|c| {
        c.uploads.max_file_size = LIMIT as u64;
        c.apps.insert(
            "small".into(),
            cin_edge::config::AppConfig {
                apikey: "small-key".into(),
                secret: "s".into(),
                max_file_size: (LIMIT / 4) as u64,
                ..Default::default()
            },
        );
        c.apps.insert(
            "full".into(),
            cin_edge::config::AppConfig {
                apikey: "full-key".into(),
                secret: "s".into(),
                ..Default::default()
            },
        );
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The limit is on the file, not on the form around it: a file of exactly the limit fits.
    let exact = random_bytes(LIMIT, 13);
    let field = form_file(dir.path(), "exact.bin", &exact);
    let (status, _, body) = curl(vec![
        "-F".into(),
        field,
        app.url("/api/store/s3?key=full-key"),
    ])
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        sha256_hex(&app.download(answer["handle"].as_str().unwrap()).await),
        sha256_hex(&exact)
    );

    let over = random_bytes(LIMIT + 1, 14);
    let field = form_file(dir.path(), "over.bin", &over);
    // With and without a Content-Length on the form (chunked: the POP finds out while reading).
    for chunked in [false, true] {
        let mut args = vec![
            "-F".to_owned(),
            field.clone(),
            app.url("/api/store/s3?key=full-key"),
        ];
        if chunked {
            args.extend(["-H".into(), "Transfer-Encoding: chunked".into()]);
        }
        let (status, content_type, body) = curl(args).await;
        assert_file_too_large(status, &content_type, &body);
    }
    // An app's own lower limit applies to forms too.
    let quarter = random_bytes(LIMIT / 4 + 1, 15);
    let field = form_file(dir.path(), "quarter.bin", &quarter);
    for chunked in [false, true] {
        let mut args = vec![
            "-F".to_owned(),
            field.clone(),
            app.url("/api/store/s3?key=small-key"),
        ];
        if chunked {
            args.extend(["-H".into(), "Transfer-Encoding: chunked".into()]);
        }
        let (status, content_type, body) = curl(args).await;
        assert_file_too_large(status, &content_type, &body);
    }
    // Nothing of the refused forms stayed on disk (the accepted file is in the
    // small-file log, which needs no directory of its own).
    assert_eq!(app.upload_dirs(), 0, "a refused form left bytes behind");
}
