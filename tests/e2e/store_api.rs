//! `POST /api/store/{location}`: whole files in one request.

use std::time::Duration;

use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, spawn_app, MIB};

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
