//! Every bad input gets a JSON error with the right status, and changes nothing stored.

use serde_json::{json, Value};

use crate::support::{md5_b64, random_bytes, spawn_app, spawn_app_with};

async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(
        !body["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{body}"
    );
    body["error"].clone()
}

async fn start_small(app: &crate::support::TestApp, size: usize) -> (String, String) {
    let start = app
        .start(
            json!({"apikey": "k", "filename": "a.bin", "size": size, "store": {"location": "s3"}}),
        )
        .await;
    (
        start["upload_id"].as_str().unwrap().to_owned(),
        start["handle"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn unknown_uploads_and_handles_are_404() {
    let app = spawn_app().await;
    let unknown = "A".repeat(32);
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": unknown, "part": 1, "size": 3}),
        )
        .await;
    assert_eq!(error_of(resp, 404).await["code"], "upload_not_found");
    let resp = app.complete(&unknown, json!({})).await;
    assert_eq!(error_of(resp, 404).await["code"], "upload_not_found");
    for path in [
        "/AAAAAAAAAAAAAAAAAAAA",
        "/AAAAAAAAAAAAAAAAAAAA/metadata",
        "/api/file/AAAAAAAAAAAAAAAAAAAA/metadata",
        "/not-a-handle",
    ] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(
            error_of(resp, 404).await["code"],
            "file_not_found",
            "{path}"
        );
    }
}

#[tokio::test]
async fn chunks_past_the_declared_size_and_bad_part_numbers_are_400() {
    let app = spawn_app().await;
    let (upload_id, _) = start_small(&app, 100).await;
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": 101}),
        )
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "chunk_out_of_range");
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": 10, "offset": 95, "fii": true}),
        )
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "chunk_out_of_range");
    for part in [0, 10_001, -1] {
        let resp = app
            .post_json(
                "/multipart/upload",
                json!({"upload_id": upload_id, "part": part, "size": 10}),
            )
            .await;
        assert_eq!(
            error_of(resp, 400).await["code"],
            "part_out_of_range",
            "part {part}"
        );
    }
}

#[tokio::test]
async fn md5_mismatch_is_400_and_nothing_is_recorded() {
    let app = spawn_app().await;
    let (upload_id, _) = start_small(&app, 4).await;
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": 4, "md5": md5_b64(b"abcd")}),
        )
        .await;
    let up: Value = resp.json().await.unwrap();
    let mut put = app.http.put(up["url"].as_str().unwrap()).body(&b"abce"[..]);
    for (k, v) in up["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    assert_eq!(
        error_of(put.send().await.unwrap(), 400).await["code"],
        "md5_mismatch"
    );
    let resp = app.complete(&upload_id, json!({})).await;
    assert_eq!(error_of(resp, 400).await["code"], "missing_parts");
    // The right bytes are then accepted at the same place.
    assert_eq!(
        app.send_chunk(&upload_id, 1, None, b"abcd").await.status(),
        200
    );
}

#[tokio::test]
async fn complete_with_missing_parts_names_them() {
    let app = spawn_app().await;
    let bytes = random_bytes(30, 30);
    let (upload_id, handle) = start_small(&app, 30).await;
    assert_eq!(
        app.send_chunk(&upload_id, 1, None, &bytes[..10])
            .await
            .status(),
        200
    );
    assert_eq!(
        app.send_chunk(&upload_id, 3, None, &bytes[20..])
            .await
            .status(),
        200
    );
    let err = error_of(app.complete(&upload_id, json!({})).await, 400).await;
    assert_eq!(err["code"], "missing_parts");
    assert!(
        err["message"].as_str().unwrap().contains("parts 2 "),
        "{err}"
    );
    let err = error_of(
        app.complete(
            &upload_id,
            json!({"parts": [{"part_number": 1, "etag": "x"}]}),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(err["code"], "etag_mismatch");
    assert_eq!(app.metadata(&handle).await["status"], "Uploading");
    let (short_id, _) = start_small(&app, 30).await;
    assert_eq!(
        app.send_chunk(&short_id, 1, None, &bytes[..10])
            .await
            .status(),
        200
    );
    let err = error_of(app.complete(&short_id, json!({})).await, 400).await;
    assert_eq!(err["code"], "size_mismatch");
    assert!(
        err["message"].as_str().unwrap().contains("after part 1"),
        "{err}"
    );
}

#[tokio::test]
async fn oversize_files_are_413() {
    let app = spawn_app_with(|c| c.uploads.max_file_size = 1000).await;
    let resp = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "big", "size": 1001}),
        )
        .await;
    assert_eq!(error_of(resp, 413).await["code"], "file_too_large");
    let resp = app
        .http
        .post(app.url("/api/store/s3?filename=big"))
        .body(vec![0u8; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp, 413).await["code"], "file_too_large");
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let app = spawn_app().await;
    let resp = app
        .http
        .post(app.url("/multipart/start"))
        .header("content-type", "application/json")
        .body("{\"apikey\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp, 400).await["code"], "malformed_json");
    let resp = app
        .post_json("/multipart/start", json!({"apikey": "k", "filename": "a"}))
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "invalid_request");
    let resp = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "a", "size": "lots"}),
        )
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "invalid_request");
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": "../../etc", "part": 1, "size": 1}),
        )
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "invalid_request");
}

#[tokio::test]
async fn path_tricks_never_reach_the_filesystem() {
    let app = spawn_app().await;
    let start = app
        .start(json!({"apikey": "k", "filename": "../../outside/evil.sh", "size": 1, "store": {"location": "s3"}}))
        .await;
    let meta = app.metadata(start["handle"].as_str().unwrap()).await;
    assert_eq!(meta["filename"], "evil.sh");
    assert!(!meta["key"].as_str().unwrap().contains('/'));
    let resp = app
        .post_json("/multipart/start", json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3", "path": "../escape/"}}))
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "invalid_store_path");
    let resp = app
        .post_json("/multipart/start", json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3", "container": "someone-elses-bucket"}}))
        .await;
    assert_eq!(error_of(resp, 403).await["code"], "container_not_allowed");
    let resp = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "dropbox"}}),
        )
        .await;
    assert_eq!(error_of(resp, 400).await["code"], "unsupported_location");
}

#[tokio::test]
async fn altered_or_expired_upload_urls_are_refused() {
    let app = spawn_app_with(|c| c.uploads.upload_url_ttl_secs = 0).await;
    let (upload_id, _) = start_small(&app, 10).await;
    let up: Value = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": 4}),
        )
        .await
        .json()
        .await
        .unwrap();
    let url = up["url"].as_str().unwrap();
    let altered = url.replace("size=4", "size=10");
    let resp = app
        .http
        .put(&altered)
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp, 403).await["code"], "invalid_signature");
    let unsigned = url.split("&signature=").next().unwrap().to_owned() + "&signature=00";
    let resp = app
        .http
        .put(&unsigned)
        .body(vec![1u8; 4])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp, 403).await["code"], "invalid_signature");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let resp = app.http.put(url).body(vec![1u8; 4]).send().await.unwrap();
    assert_eq!(error_of(resp, 403).await["code"], "url_expired");
}

#[tokio::test]
async fn resent_chunks_same_bytes_ok_different_bytes_conflict() {
    let app = spawn_app().await;
    let bytes = random_bytes(8, 31);
    let start = app
        .start(json!({"apikey": "k", "filename": "a.bin", "size": 8, "store": {"location": "s3"}, "fii": true}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    assert_eq!(
        app.send_chunk(upload_id, 1, Some(0), &bytes[..6])
            .await
            .status(),
        200
    );
    assert_eq!(
        app.send_chunk(upload_id, 1, Some(0), &bytes[..6])
            .await
            .status(),
        200,
        "a resend is idempotent"
    );
    // Overlaps acknowledged bytes 4..6 with different bytes.
    let mut tampered = bytes[4..].to_vec();
    tampered[1] ^= 0xff;
    let err = error_of(app.send_chunk(upload_id, 1, Some(4), &tampered).await, 409).await;
    assert_eq!(err["code"], "chunk_conflict");
    assert_eq!(
        app.send_chunk(upload_id, 1, Some(4), &bytes[4..])
            .await
            .status(),
        200
    );
    let resp = app
        .post_json(
            "/multipart/commit",
            json!({"upload_id": upload_id, "part": 1, "size": 8}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.complete(upload_id, json!({"fii": true})).await.status(),
        200
    );
    assert_eq!(app.download(start["handle"].as_str().unwrap()).await, bytes);
    // After completion, no chunk can change the file.
    let resp = app
        .post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": 2, "offset": 0, "fii": true}),
        )
        .await;
    assert_eq!(error_of(resp, 409).await["code"], "upload_complete");
}
