//! Shared bytes have owners: terminating or evicting one file never changes what
//! another serves (tus final uploads share their partial uploads' bytes).

use std::time::Duration;

use crate::support::{
    header_value, random_bytes, sha256_hex, spawn_app_in, spawn_app_with, TestApp,
};

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");

/// A complete tus partial upload of `bytes`; returns its URL.
async fn partial(app: &TestApp, bytes: &[u8]) -> String {
    let resp = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header("upload-concat", "partial")
        .header("upload-length", bytes.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    header_value(&resp, "location").to_owned()
}

/// A final upload over `partials`, delivered to `container` (None: the default profile).
async fn final_upload(app: &TestApp, partials: &[&String], container: Option<&str>) -> String {
    use base64::Engine;
    let mut req = app
        .http
        .post(app.url("/files/"))
        .header(TUS.0, TUS.1)
        .header(
            "upload-concat",
            format!(
                "final;{}",
                partials
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    if let Some(container) = container {
        let b64 = base64::engine::general_purpose::STANDARD.encode(container);
        req = req.header("upload-metadata", format!("container {b64}"));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    header_value(&resp, "cin-handle").to_owned()
}

async fn delete(app: &TestApp, url: &str) -> u16 {
    app.http
        .delete(url)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A profile whose store never answers: files delivered to it stay `InTransit`.
fn unreachable_profile(config: &mut cin_edge::Config, bucket: &str) {
    config.storage.profiles.insert(
        "unreachable".into(),
        cin_edge::config::StorageProfile {
            kind: cin_edge::config::ProfileKind::S3,
            bucket: bucket.into(),
            endpoint: "http://127.0.0.1:9".into(),
            force_path_style: true,
            access_key_id: "nobody".into(),
            secret_access_key: "nothing".into(),
            ..Default::default()
        },
    );
}

#[tokio::test]
async fn terminating_a_partial_keeps_the_final_upload_made_of_it() {
    let app = spawn_app_with(|c| {
        unreachable_profile(c, "held-bucket");
    })
    .await;
    let pieces = [random_bytes(70_000, 1), random_bytes(30_000, 2)];
    let first = partial(&app, &pieces[0]).await;
    let second = partial(&app, &pieces[1]).await;
    let handle = final_upload(&app, &[&first, &second], Some("held-bucket")).await;
    let expected = pieces.concat();

    assert_eq!(delete(&app, &first).await, 204);
    let gone = app
        .http
        .head(&first)
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    assert!(
        [404, 410].contains(&gone.status().as_u16()),
        "a terminated partial is gone for its client: {}",
        gone.status()
    );
    assert_eq!(
        sha256_hex(&app.download(&handle).await),
        sha256_hex(&expected),
        "the final upload serves every byte after its partial was terminated"
    );
    let meta = app.metadata(&handle).await;
    assert_eq!(meta["status"], "InTransit");
    assert_eq!(meta["local_copy"], true);

    // The second partial, terminated too: the final still holds both.
    assert_eq!(delete(&app, &second).await, 204);
    assert_eq!(
        sha256_hex(&app.download(&handle).await),
        sha256_hex(&expected)
    );
    assert_eq!(app.upload_dirs(), 2, "the final keeps both partials' bytes");
}

#[tokio::test]
async fn evicting_one_final_keeps_a_sibling_that_shares_its_partial() {
    let app = spawn_app_with(|c| {
        unreachable_profile(c, "held-bucket");
        // Any stored copy is over budget: evicted as soon as it is stored.
        c.cache.max_bytes = 1;
        c.cache.evict_interval_secs = 1;
    })
    .await;
    let shared = random_bytes(80_000, 3);
    let own = random_bytes(20_000, 4);
    let shared_url = partial(&app, &shared).await;
    let own_url = partial(&app, &own).await;
    // One final reaches the local default store (Stored, then evicted); the
    // other waits for a store that never answers.
    let stored = final_upload(&app, &[&shared_url, &own_url], None).await;
    let held = final_upload(&app, &[&shared_url], Some("held-bucket")).await;

    app.wait_metadata(&stored, Duration::from_secs(20), "eviction", |m| {
        m["status"] == "Stored" && m["local_copy"] == false
    })
    .await;
    assert_eq!(
        sha256_hex(&app.download(&held).await),
        sha256_hex(&shared),
        "the file still in transit serves the bytes it shares with the evicted one"
    );
    assert_eq!(app.metadata(&held).await["status"], "InTransit");
    assert_eq!(
        sha256_hex(&app.download(&stored).await),
        sha256_hex(&[shared.clone(), own.clone()].concat()),
        "the evicted file reads from final storage"
    );
    // The partials themselves were never terminated: both keep their bytes.
    assert_eq!(app.upload_dirs(), 2);

    // Once the partial is terminated and its last final gone from the cache,
    // the bytes go; until then they stay.
    assert_eq!(delete(&app, &own_url).await, 204);
    assert_eq!(
        app.upload_dirs(),
        1,
        "a terminated partial no local copy references is freed at once"
    );
    assert_eq!(delete(&app, &shared_url).await, 204);
    assert_eq!(
        app.upload_dirs(),
        1,
        "the held final still needs these bytes"
    );
    assert_eq!(sha256_hex(&app.download(&held).await), sha256_hex(&shared));
}

/// A complete partial upload is never delivered on its own, not even after a
/// restart (which queues complete files that lack a replication job).
#[tokio::test]
async fn a_restart_does_not_queue_partial_uploads_for_final_storage() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let piece = random_bytes(10_000, 5);
    let url = partial(&app, &piece).await;
    let id = url.rsplit('/').next().unwrap().to_owned();
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    // A whole file stored after the restart: the replicator has run its queue.
    let handle = app
        .store_raw("/api/store/s3?filename=after.bin", random_bytes(1000, 6))
        .await;
    app.wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    let head = app
        .http
        .head(app.url(&format!("/files/{id}")))
        .header(TUS.0, TUS.1)
        .send()
        .await
        .unwrap();
    let partial_handle = header_value(&head, "cin-handle").to_owned();
    let meta = app.metadata(&partial_handle).await;
    assert_eq!(meta["status"], "InTransit", "{meta}");
    assert_eq!(meta["replication"]["attempts"], 0, "{meta}");
    app.stop().await;
}
