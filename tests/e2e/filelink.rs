//! The filelink: Range, conditional requests, HEAD, headers, and the answer before completion.

use serde_json::{json, Value};

use crate::support::{random_bytes, spawn_app};

#[tokio::test]
async fn ranges_and_conditional_requests() {
    let app = spawn_app().await;
    let bytes = random_bytes(10_000, 20);
    // Three parts, so ranges cross segment boundaries.
    let handle = app.upload_regular("naïve file.bin", &bytes, 4000).await;
    let url = app.url(&format!("/{handle}"));

    let full = app.http.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    assert_eq!(full.headers()["content-length"], "10000");
    assert_eq!(full.headers()["content-type"], "application/octet-stream");
    let disposition = full.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.contains("filename*=UTF-8''na%C3%AFve%20file.bin"),
        "{disposition}"
    );

    let part = app
        .http
        .get(&url)
        .header("range", "bytes=3990-4010")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 3990-4010/10000");
    assert_eq!(part.bytes().await.unwrap(), &bytes[3990..4011]);

    let suffix = app
        .http
        .get(&url)
        .header("range", "bytes=-100")
        .send()
        .await
        .unwrap();
    assert_eq!(suffix.status(), 206);
    assert_eq!(suffix.bytes().await.unwrap(), &bytes[9900..]);

    let open = app
        .http
        .get(&url)
        .header("range", "bytes=7999-")
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 206);
    assert_eq!(open.bytes().await.unwrap(), &bytes[7999..]);

    let beyond = app
        .http
        .get(&url)
        .header("range", "bytes=10000-")
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */10000");

    let cached = app
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    assert!(cached.bytes().await.unwrap().is_empty());

    let stale = app
        .http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"someotheretag\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 200, "a stale If-Range gets the whole file");
    assert_eq!(stale.bytes().await.unwrap(), bytes);

    let fresh = app
        .http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 206);
    assert_eq!(fresh.bytes().await.unwrap(), &bytes[..10]);

    let head = app.http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "10000");
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn filelink_before_completion_serves_the_parts_as_they_arrive() {
    let app = spawn_app().await;
    let start = app
        .start(json!({"apikey": "k", "filename": "a.bin", "mimetype": "text/plain", "size": 10, "store": {"location": "s3"}}))
        .await;
    let handle = start["handle"].as_str().unwrap();
    let upload_id = start["upload_id"].as_str().unwrap();
    // Declared whole at once, served as the part arrives (before `complete`).
    let resp = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "10");
    assert_eq!(
        app.send_chunk(upload_id, 1, None, b"0123456789")
            .await
            .status(),
        200
    );
    assert_eq!(resp.bytes().await.unwrap(), &b"0123456789"[..]);
    let meta = app.metadata(handle).await;
    assert_eq!(meta["status"], "Uploading");
    assert_eq!(meta["filename"], "a.bin");
    let api_meta: Value = app
        .http
        .get(app.url(&format!("/api/file/{handle}/metadata")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api_meta["handle"], handle);
    assert_eq!(api_meta["size"], 10);
}

#[tokio::test]
async fn the_sdks_download_forms_serve_the_same_bytes_and_dl_makes_an_attachment() {
    let app = spawn_app().await;
    let bytes = random_bytes(70_000, 21);
    let handle = app.upload_regular("report.pdf", &bytes, 30_000).await;
    for path in [
        format!("/{handle}"),
        format!("/api/file/{handle}"),
        format!("/someapikey/{handle}"),
    ] {
        let resp = app.http.get(app.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let disposition = resp.headers()["content-disposition"].to_str().unwrap();
        assert!(disposition.starts_with("inline;"), "{path}: {disposition}");
        assert_eq!(resp.bytes().await.unwrap(), &bytes[..], "{path}");

        let download = app
            .http
            .get(app.url(&format!("{path}?dl=true")))
            .send()
            .await
            .unwrap();
        assert_eq!(download.status(), 200, "{path}?dl=true");
        let disposition = download.headers()["content-disposition"].to_str().unwrap();
        assert!(
            disposition.starts_with("attachment;") && disposition.contains("report.pdf"),
            "{path}?dl=true: {disposition}"
        );
        assert_eq!(download.bytes().await.unwrap(), &bytes[..]);

        // dl is a boolean: anything else is a 400 naming it.
        let odd = app
            .http
            .get(app.url(&format!("{path}?dl=maybe")))
            .send()
            .await
            .unwrap();
        assert_eq!(odd.status(), 400, "{path}?dl=maybe");
        let body: Value = odd.json().await.unwrap();
        assert!(body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("dl"));
    }
    // Two segments that are not a key and a handle are no route.
    let resp = app.http.get(app.url("/some/thing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_found");
}
