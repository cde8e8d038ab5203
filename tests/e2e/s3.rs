//! Replication to a customer's bucket on real S3-compatible servers (s3s-fs and
//! moto), read back with `aws-sdk-s3` exactly as against AWS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use cin_edge::config::AppConfig;
use serde_json::{json, Value};

use crate::support::{
    random_bytes, sha256_hex, spawn_app_with, Pop, PopProcess, S3Backend, S3Server, TestApp, MIB,
};

const BUCKET: &str = "customer-bucket";

async fn app_with_customer_bucket(server: &S3Server) -> TestApp {
    let profile = server.profile(BUCKET);
    spawn_app_with(move |c| {
        c.storage.profiles.insert("acme".into(), profile);
    })
    .await
}

async fn object_bytes(
    server: &S3Server,
    key: &str,
) -> (
    Vec<u8>,
    std::collections::HashMap<String, String>,
    Option<String>,
) {
    let object = server
        .client()
        .await
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let metadata = object.metadata().cloned().unwrap_or_default();
    let content_type = object.content_type().map(str::to_owned);
    let bytes = object.body.collect().await.unwrap().into_bytes().to_vec();
    (bytes, metadata, content_type)
}

/// Uploads through the Filestack-style API into the customer's bucket; returns the handle.
async fn upload_to_bucket(pop: &Pop, name: &str, bytes: &[u8]) -> String {
    let start = pop
        .start(
            json!({"apikey": "k", "filename": name, "mimetype": "video/mp4", "size": bytes.len(),
            "store": {"location": "s3", "container": BUCKET, "path": "incoming/"}}),
        )
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    for (i, part) in bytes.chunks(4 * MIB).enumerate() {
        assert_eq!(
            pop.send_chunk(upload_id, i as u32 + 1, None, part)
                .await
                .status(),
            200
        );
    }
    assert_eq!(pop.complete(upload_id, json!({})).await.status(), 200);
    start["handle"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn small_and_multipart_files_reach_the_customer_bucket() {
    small_and_multipart_files_reach(S3Backend::S3sFs).await;
}

#[tokio::test]
async fn small_and_multipart_files_reach_the_customer_bucket_on_moto() {
    small_and_multipart_files_reach(S3Backend::Moto).await;
}

async fn small_and_multipart_files_reach(backend: S3Backend) {
    let server = S3Server::start_backend(backend).await;
    server.create_bucket(BUCKET).await;
    let app = app_with_customer_bucket(&server).await;

    for (size, seed) in [(MIB + 7, 70u64), (13 * MIB + 3, 71)] {
        let bytes = random_bytes(size, seed);
        let handle = upload_to_bucket(&app, "clip one.mp4", &bytes).await;
        let meta = app
            .wait_status(&handle, "Stored", Duration::from_secs(60))
            .await;
        assert_eq!(meta["container"], BUCKET);
        assert_eq!(meta["location"], "s3");
        assert_eq!(meta["sha256"], sha256_hex(&bytes));
        let key = meta["key"].as_str().unwrap();
        assert_eq!(key, format!("incoming/{handle}_clip one.mp4"));

        let (stored, metadata, content_type) = object_bytes(&server, key).await;
        assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
        assert_eq!(metadata.get("sha256"), Some(&sha256_hex(&bytes)));
        assert_eq!(
            metadata.get("filename").map(String::as_str),
            Some("clip one.mp4")
        );
        assert_eq!(
            metadata.get("mimetype").map(String::as_str),
            Some("video/mp4")
        );
        assert_eq!(content_type.as_deref(), Some("video/mp4"));
    }
    assert!(server.open_multipart_uploads().await.is_empty());
}

/// moto reports a multipart object's CRC32 as the composite value without the
/// `-N` part count AWS appends: that is the bytes sent, so one upload stores it.
#[tokio::test]
async fn a_multipart_file_is_stored_on_moto_after_exactly_one_upload() {
    let server = S3Server::start_backend(S3Backend::Moto).await;
    server.create_bucket(BUCKET).await;
    let app = app_with_customer_bucket(&server).await;
    let bytes = random_bytes(12 * MIB, 76);
    let handle = upload_to_bucket(&app, "twelve.bin", &bytes).await;
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(60))
        .await;
    assert_eq!(meta["replication"]["attempts"], 1, "{meta}");
    assert_eq!(meta["replication"]["failed"], false, "{meta}");
    // 12 MiB in 5 MiB parts: three UploadPart requests, none sent again.
    assert_eq!(server.logged_requests("PUT", "partNumber="), 3);
    let (stored, _, _) = object_bytes(&server, meta["key"].as_str().unwrap()).await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert!(server.open_multipart_uploads().await.is_empty());
}

#[tokio::test]
async fn filelink_reads_final_storage_once_the_local_copy_is_gone() {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let app = app_with_customer_bucket(&server).await;
    let bytes = random_bytes(6 * MIB, 72);
    let handle = upload_to_bucket(&app, "a.bin", &bytes).await;
    app.wait_status(&handle, "Stored", Duration::from_secs(60))
        .await;
    std::fs::remove_dir_all(app.data_dir.join("parts")).unwrap();
    assert_eq!(sha256_hex(&app.download(&handle).await), sha256_hex(&bytes));
    let ranged = app
        .http
        .get(app.url(&format!("/{handle}")))
        .header("range", "bytes=4194300-4194310")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap(), &bytes[4194300..4194311]);
}

#[tokio::test]
async fn uploads_for_buckets_no_profile_allows_are_refused_at_start() {
    let server = S3Server::start().await;
    // The profile's bucket does not exist: the store refuses, and start says so.
    let app = app_with_customer_bucket(&server).await;
    let resp = app
        .post_json("/multipart/start", json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3", "container": BUCKET}}))
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_refused");
    let resp = app
        .post_json("/multipart/start", json!({"apikey": "k", "filename": "a", "size": 1, "store": {"location": "s3", "container": "other-bucket"}}))
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "container_not_allowed");
}

#[tokio::test]
async fn an_outage_delays_replication_and_loses_nothing() {
    let mut server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let app = app_with_customer_bucket(&server).await;
    server.stop();

    let bytes = random_bytes(7 * MIB, 73);
    let handle = upload_to_bucket(&app, "during-outage.bin", &bytes).await;
    let meta = app
        .wait_failing_replication(&handle, Duration::from_secs(60))
        .await;
    assert!(
        meta["replication"]["last_error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("cannot reach {}: ", server.endpoint)),
        "{meta}"
    );
    // The POP keeps accepting and serving uploads meanwhile.
    assert_eq!(app.download(&handle).await, bytes);
    let other = app
        .upload_regular("meanwhile.bin", &random_bytes(1000, 74), 1000)
        .await;
    assert_eq!(app.download(&other).await.len(), 1000);

    server.resume().await;
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(60))
        .await;
    assert!(meta["replication"]["last_error"].is_null());
    let (stored, _, _) = object_bytes(&server, meta["key"].as_str().unwrap()).await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
}

#[tokio::test]
async fn a_pop_killed_mid_multipart_resumes_and_leaves_no_orphans() {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let dir = tempfile::tempdir().unwrap();
    let env = server.profile_env("acme", BUCKET);
    let bytes = random_bytes(160 * MIB, 75);

    let pop = PopProcess::start_with_env(dir.path(), &env);
    let resp = pop
        .http
        .post(pop.url(&format!(
            "/api/store/s3?filename=big.bin&container={BUCKET}"
        )))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let handle = resp.json::<Value>().await.unwrap()["handle"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.uploaded_parts() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replication never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pop.kill();
    assert_eq!(
        server.open_multipart_uploads().await.len(),
        1,
        "killed in the middle of a multipart upload"
    );

    let pop = PopProcess::start_with_env(dir.path(), &env);
    let meta = pop
        .wait_status(&handle, "Stored", Duration::from_secs(120))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert!(
        server.open_multipart_uploads().await.is_empty(),
        "no multipart upload is left behind"
    );
    let (stored, _, _) = object_bytes(&server, meta["key"].as_str().unwrap()).await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
}

/// Objects whose key contains this are reported with other checksums by [`lying_proxy`].
const LIE_ABOUT: &str = "corrupted";

/// Forwards every request to `upstream` and answers HeadObject for keys containing
/// [`LIE_ABOUT`] with CRC32 and SHA-256 values that cannot be the bytes sent: a
/// store that holds other bytes. Returns the proxy's endpoint.
async fn lying_proxy(upstream: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let router = Router::new()
        .fallback(forward)
        .with_state((reqwest::Client::new(), upstream));
    tokio::spawn(async move { axum::serve(listener, router).await });
    endpoint
}

async fn forward(
    State((http, upstream)): State<(reqwest::Client, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{upstream}{target}");
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let mut outgoing = http.request(parts.method.clone(), &url).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = outgoing.send().await.unwrap();
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if name != "transfer-encoding" && name != "connection" {
            response = response.header(name, value);
        }
    }
    let lie = parts.method == Method::HEAD && parts.uri.path().contains(LIE_ABOUT);
    let body = answer.bytes().await.unwrap();
    let mut response = response.body(Body::from(body)).unwrap();
    if lie {
        let headers = response.headers_mut();
        for (name, value) in [
            ("x-amz-checksum-crc32", "AAAAAA=="),
            (
                "x-amz-checksum-sha256",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
    }
    response
}

/// Events of accepted webhook deliveries, as `(event, handle)`.
type Received = Arc<Mutex<Vec<(String, String)>>>;

async fn webhook_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = Router::new()
        .route(
            "/hook",
            post(
                |State(received): State<Received>, body: String| async move {
                    let event: Value = serde_json::from_str(&body).unwrap();
                    received.lock().unwrap().push((
                        event["event"].as_str().unwrap_or_default().to_owned(),
                        event["handle"].as_str().unwrap_or_default().to_owned(),
                    ));
                    StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, received)
}

/// A store that keeps answering with other bytes than were sent fails the file's
/// replication visibly after `max_mismatch_attempts`, instead of re-uploading for
/// ever: the file stays InTransit and servable, and neither the running POP nor a
/// restarted one tries again.
#[tokio::test]
async fn a_store_that_reports_other_bytes_fails_the_replication_after_bounded_attempts() {
    let server = S3Server::start_backend(S3Backend::Moto).await;
    server.create_bucket(BUCKET).await;
    let mut profile = server.profile(BUCKET);
    profile.endpoint = lying_proxy(server.endpoint.clone()).await;
    let (hook_url, received) = webhook_receiver().await;
    let data_dir = tempfile::tempdir().unwrap();
    let configure = move |c: &mut cin_edge::Config| {
        c.replicator.max_mismatch_attempts = 2;
        c.webhooks.retry_base_ms = 50;
        c.storage.profiles.insert("acme".into(), profile);
        c.apps.insert(
            "hooked".into(),
            AppConfig {
                apikey: "HOOKKEY".into(),
                webhooks: vec![hook_url],
                ..Default::default()
            },
        );
    };
    let app = crate::support::spawn_app_in(data_dir.path(), configure.clone()).await;
    let bytes = random_bytes(12 * MIB, 77);
    let bad = store_in_bucket(&app, &format!("{LIE_ABOUT}.bin"), bytes.clone()).await;

    let meta = app
        .wait_metadata(&bad, Duration::from_secs(60), "a failed replication", |m| {
            m["replication"]["failed"] == true
        })
        .await;
    assert_eq!(meta["status"], "InTransit");
    assert_eq!(meta["replication"]["attempts"], 2, "{meta}");
    assert!(
        meta["replication"]["failure"]
            .as_str()
            .is_some_and(|f| f.contains("given up")),
        "{meta}"
    );
    assert!(
        meta["replication"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not the bytes sent")),
        "{meta}"
    );
    assert_eq!(app.download(&bad).await, bytes, "still served from the POP");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("cin_replication_given_up_total 1"),
        "{metrics}"
    );
    wait_for_event(&received, "replication_failed", &bad).await;

    // A file the store confirms is stored meanwhile; the failed one is not retried.
    let good = store_in_bucket(&app, "fine.bin", random_bytes(6 * MIB, 78)).await;
    app.wait_status(&good, "Stored", Duration::from_secs(60))
        .await;
    assert_eq!(app.metadata(&bad).await["replication"]["attempts"], 2);

    // Nor after a restart: the replicator's first pass over the queue skips it.
    let creations = server.logged_requests("POST", &format!("{LIE_ABOUT}.bin?uploads"));
    assert_eq!(creations, 2, "one multipart upload per attempt");
    app.stop().await;
    let app = crate::support::spawn_app_in(data_dir.path(), configure).await;
    let after = store_in_bucket(&app, "after.bin", random_bytes(6 * MIB, 79)).await;
    app.wait_status(&after, "Stored", Duration::from_secs(60))
        .await;
    let meta = app.metadata(&bad).await;
    assert_eq!(meta["replication"]["attempts"], 2, "{meta}");
    assert_eq!(meta["replication"]["failed"], true, "{meta}");
    assert_eq!(meta["status"], "InTransit");
    assert_eq!(
        server.logged_requests("POST", &format!("{LIE_ABOUT}.bin?uploads")),
        creations,
        "no upload of the failed file after the restart"
    );
    assert_eq!(
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(event, _)| event == "replication_failed")
            .count(),
        1,
        "one replication_failed event"
    );
    app.stop().await;
}

/// `POST /api/store` into the customer's bucket for app HOOKKEY; returns the handle.
async fn store_in_bucket(pop: &Pop, name: &str, bytes: Vec<u8>) -> String {
    pop.store_raw(
        &format!("/api/store/s3?key=HOOKKEY&filename={name}&container={BUCKET}"),
        bytes,
    )
    .await
}

async fn wait_for_event(received: &Received, event: &str, handle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !received
        .lock()
        .unwrap()
        .iter()
        .any(|(e, h)| e == event && h == handle)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {event} webhook for {handle}: {:?}",
            received.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
