//! Replication to a customer's bucket on a real S3-compatible server, read back
//! with `aws-sdk-s3` exactly as against AWS.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    random_bytes, sha256_hex, spawn_app_with, Pop, PopProcess, S3Server, TestApp, MIB,
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
    let server = S3Server::start().await;
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
    assert!(server.open_multipart_uploads().is_empty());
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
            .contains("unreachable"),
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
        server.open_multipart_uploads().len(),
        1,
        "killed in the middle of a multipart upload"
    );

    let pop = PopProcess::start_with_env(dir.path(), &env);
    let meta = pop
        .wait_status(&handle, "Stored", Duration::from_secs(120))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert!(
        server.open_multipart_uploads().is_empty(),
        "no multipart upload is left behind"
    );
    let (stored, _, _) = object_bytes(&server, meta["key"].as_str().unwrap()).await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
}
