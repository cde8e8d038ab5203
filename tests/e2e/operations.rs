//! What operators rely on: readiness, metrics, request ids, disk limits.

use serde_json::{json, Value};

use crate::support::{random_bytes, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_and_request_ids() {
    let app = spawn_app().await;
    let resp = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 16);
    let resp = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_ne!(
        resp.headers()["x-request-id"].to_str().unwrap(),
        id,
        "ids are per request"
    );
    let resp = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "from-the-load-balancer-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "from-the-load-balancer-42");
}

/// Parses Prometheus text: `name{labels} value` lines; returns the sum of the
/// samples of `name` whose labels contain every `label="value"` pair given.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    let mut total = 0.0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = value.parse().expect("sample value is a number");
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if metric == name && labels.iter().all(|l| label_text.contains(l)) {
            total += value;
        }
    }
    total
}

#[tokio::test]
async fn metrics_count_an_upload() {
    let app = spawn_app().await;
    let before = app.metrics_text().await;
    let bytes = random_bytes(123_456, 90);
    let handle = app.upload_regular("m.bin", &bytes, 100_000).await;
    app.download(&handle).await;
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let after = resp.text().await.unwrap();
    let delta = |name: &str, labels: &[&str]| {
        sample_sum(&after, name, labels) - sample_sum(&before, name, labels)
    };
    assert!(
        delta("cin_uploads_started_total", &["mode=\"regular\""]) >= 1.0,
        "{after}"
    );
    assert!(delta("cin_uploads_completed_total", &["mode=\"regular\""]) >= 1.0);
    assert!(delta("cin_bytes_received_total", &[]) >= bytes.len() as f64);
    assert!(
        delta(
            "cin_http_requests_total",
            &["route=\"/{handle}\"", "status=\"200\""]
        ) >= 1.0
    );
    assert!(
        sample_sum(
            &after,
            "cin_http_request_duration_seconds_count",
            &["route=\"/multipart/start\""]
        ) >= 1.0
    );
    for gauge in [
        "cin_disk_free_bytes",
        "cin_replication_queue_depth",
        "cin_replication_lag_seconds",
    ] {
        assert!(after.contains(gauge), "{gauge} missing");
    }
}

#[tokio::test]
async fn a_full_disk_refuses_new_uploads_and_readiness() {
    // A watermark above any real free space: the disk counts as full.
    let app = spawn_app_with(|c| c.disk.min_free_bytes = u64::MAX / 2).await;
    let resp = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["reasons"][0].as_str().unwrap().contains("watermark"),
        "{body}"
    );
    let resp = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "a", "size": 10}),
        )
        .await;
    assert_eq!(resp.status(), 507);
    assert_eq!(resp.headers()["retry-after"], "60");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_storage");
    let resp = app
        .http
        .post(app.url("/api/store/s3"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 507);
}

#[tokio::test]
async fn accepted_uploads_reserve_their_size() {
    let free = fs4::available_space(std::env::temp_dir()).unwrap();
    // Room for one upload of a third of the free space, not two.
    let watermark = free / 2;
    let app = spawn_app_with(move |c| c.disk.min_free_bytes = watermark).await;
    let size = free / 3;
    let first = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "a", "size": size}),
        )
        .await;
    assert_eq!(first.status(), 200);
    let second = app
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "b", "size": size}),
        )
        .await;
    assert_eq!(
        second.status(),
        507,
        "the first upload's declared size is reserved"
    );
}

#[tokio::test]
async fn an_events_stream_ends_when_its_client_leaves() {
    let app = spawn_app().await;
    let start = app
        .start(json!({"apikey": "k", "filename": "never.bin", "size": 10, "store": {"location": "s3"}}))
        .await;
    let handle = start["handle"].as_str().unwrap().to_owned();
    // The file stays Uploading: only the client's going away can end the stream.
    let resp = app
        .http
        .get(app.url(&format!("/{handle}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    app.wait_metric("cin_event_streams", 1.0, std::time::Duration::from_secs(10))
        .await;
    drop(resp);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.metric("cin_event_streams").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's task outlived its client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_generated_signing_key_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app().await;
    // Answering means the POP has started (and written its key).
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mode = std::fs::metadata(app.data_dir.join("url-signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[tokio::test]
async fn events_stream_shows_uploading_in_transit_stored() {
    use futures_util::StreamExt;

    let app = spawn_app().await;
    let bytes = random_bytes(50_000, 91);
    let start = app
        .start(json!({"apikey": "k", "filename": "live.bin", "size": bytes.len(), "store": {"location": "s3"}}))
        .await;
    let handle = start["handle"].as_str().unwrap().to_owned();
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let resp = app
        .http
        .get(app.url(&format!("/{handle}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();

    let reader = tokio::spawn(async move {
        let mut text = String::new();
        let mut statuses = Vec::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                // Progress events come between the status ones while it uploads.
                if !event.lines().any(|l| l == "event: status") {
                    continue;
                }
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let data: Value = serde_json::from_str(data).unwrap();
                    statuses.push(data["status"].as_str().unwrap().to_owned());
                }
            }
        }
        statuses
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        app.send_chunk(&upload_id, 1, None, &bytes).await.status(),
        200
    );
    assert_eq!(app.complete(&upload_id, json!({})).await.status(), 200);
    let statuses = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
        .await
        .expect("the stream ends after Stored")
        .unwrap();
    assert_eq!(statuses, ["Uploading", "InTransit", "Stored"]);
}

#[tokio::test]
async fn evicting_small_files_frees_their_log_space() {
    use std::os::unix::fs::MetadataExt;

    let app = spawn_app_with(|c| c.cache.max_bytes = 100_000).await;
    let files: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(64 * 1024, 700 + i)).collect();
    let mut handles = Vec::new();
    for (i, bytes) in files.iter().enumerate() {
        let handle = app
            .store_raw(&format!("/api/store/s3?filename=s{i}.bin"), bytes.clone())
            .await;
        app.wait_status(&handle, "Stored", std::time::Duration::from_secs(20))
            .await;
        handles.push(handle);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut cached = 0;
        for handle in &handles {
            if app.metadata(handle).await["local_copy"] == true {
                cached += 1;
            }
        }
        if cached <= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cached} still cached"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let allocated: u64 = std::fs::read_dir(app.data_dir.join("parts/log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(
        allocated < 3 * 64 * 1024,
        "{allocated} bytes of the log are still allocated"
    );
    for (handle, bytes) in handles.iter().zip(&files) {
        assert_eq!(&app.download(handle).await, bytes);
    }
}

#[tokio::test]
async fn the_cache_evicts_least_recently_read_stored_copies() {
    let app = spawn_app_with(|c| c.cache.max_bytes = 250_000).await;
    let files: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(100_000, 100 + i)).collect();
    let mut handles = Vec::new();
    // Two parts each, so each copy has an upload directory (one whole part goes to the log).
    for (i, bytes) in files.iter().enumerate().take(2) {
        let handle = app.upload_regular(&format!("{i}.bin"), bytes, 50_000).await;
        app.wait_status(&handle, "Stored", std::time::Duration::from_secs(20))
            .await;
        handles.push(handle);
    }
    // Reading the first makes the second the least recently used.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(app.download(&handles[0]).await, files[0]);
    let third = app.upload_regular("2.bin", &files[2], 50_000).await;
    app.wait_status(&third, "Stored", std::time::Duration::from_secs(20))
        .await;
    handles.push(third);

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.metadata(&handles[1]).await["local_copy"] == true {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was evicted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(app.metadata(&handles[0]).await["local_copy"], true);
    assert_eq!(app.metadata(&handles[2]).await["local_copy"], true);
    // The bytes go once the eviction is durable, a moment after the record says so.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.upload_dirs() > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the evicted copy's parts were never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.upload_dirs(),
        2,
        "the two cached files keep their parts"
    );
    // The evicted file is still served, from final storage.
    for (handle, bytes) in handles.iter().zip(&files) {
        assert_eq!(&app.download(handle).await, bytes);
    }
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let app = spawn_app().await;
    let resp = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/multipart/start", "post"),
        ("/multipart/upload", "post"),
        ("/upload/{upload_id}/{part}", "put"),
        ("/multipart/commit", "post"),
        ("/multipart/complete", "post"),
        ("/api/store/{location}", "post"),
        ("/api/file/{handle}/metadata", "get"),
        ("/{handle}/metadata", "get"),
        ("/{handle}/events", "get"),
        ("/{handle}", "get"),
        ("/{handle}", "head"),
        ("/api/file/{handle}", "get"),
        ("/api/file/{handle}", "head"),
        ("/{apikey}/{handle}", "get"),
        ("/{apikey}/{handle}", "head"),
        ("/files/", "options"),
        ("/files/", "post"),
        ("/files/{id}", "head"),
        ("/files/{id}", "patch"),
        ("/files/{id}", "delete"),
        ("/", "get"),
        ("/page/app.js", "get"),
        ("/page/app.css", "get"),
        ("/api/files", "get"),
        ("/api/files/{handle}/replication/retry", "post"),
        ("/api/files/{handle}/replication/cancel", "post"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    assert_eq!(
        paths.len(),
        24,
        "a route was added without documenting it, or the other way round"
    );
}
