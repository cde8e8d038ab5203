//! Kill the POP (SIGKILL: no shutdown, no flush) and start it again on the same
//! data directory: every acknowledged chunk is still there and pending work resumes.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::support::{random_bytes, sha256_hex, PopProcess, MIB};

#[tokio::test]
async fn acknowledged_chunks_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(4 * MIB + 99, 40);
    let chunk = MIB / 2;
    let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
    let half = pieces.len() / 2;

    let pop = PopProcess::start(dir.path());
    let start = pop
        .start(json!({"apikey": "k", "filename": "big.bin", "size": bytes.len(), "store": {"location": "s3"}, "fii": true}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let handle = start["handle"].as_str().unwrap().to_owned();
    // One part holds everything; chunks at offsets inside it.
    for (i, piece) in pieces.iter().enumerate().take(half) {
        let resp = pop
            .send_chunk(&upload_id, 1, Some((i * chunk) as u64), piece)
            .await;
        assert_eq!(resp.status(), 200);
    }
    pop.kill();

    let pop = PopProcess::start(dir.path());
    assert_eq!(pop.metadata(&handle).await["status"], "Uploading");
    // Resending an acknowledged chunk is still idempotent after the restart.
    assert_eq!(
        pop.send_chunk(&upload_id, 1, Some(0), pieces[0])
            .await
            .status(),
        200
    );
    for (i, piece) in pieces.iter().enumerate().skip(half) {
        let resp = pop
            .send_chunk(&upload_id, 1, Some((i * chunk) as u64), piece)
            .await;
        assert_eq!(resp.status(), 200);
    }
    let resp = pop
        .post_json(
            "/multipart/commit",
            json!({"upload_id": upload_id, "part": 1, "size": bytes.len()}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let resp = pop.complete(&upload_id, json!({"fii": true})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sha256_hex(&pop.download(&handle).await), sha256_hex(&bytes));
    pop.kill();

    // A complete upload still serves after another kill, and replication finishes.
    let pop = PopProcess::start(dir.path());
    assert_eq!(sha256_hex(&pop.download(&handle).await), sha256_hex(&bytes));
    let meta = pop
        .wait_status(&handle, "Stored", Duration::from_secs(30))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
}

#[tokio::test]
async fn pending_replication_runs_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // A plain file where the origin's container directory belongs makes delivery fail.
    let origin = dir.path().join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    std::fs::write(origin.join("default"), b"in the way").unwrap();

    let bytes = random_bytes(MIB + 1, 41);
    let pop = PopProcess::start(dir.path());
    let handle = pop
        .store_raw("/api/store/s3?filename=a.bin", bytes.clone())
        .await;

    // The failure is visible, the file stays InTransit and keeps serving.
    pop.wait_failing_replication(&handle, Duration::from_secs(20))
        .await;
    assert_eq!(pop.download(&handle).await, bytes);
    pop.kill();

    std::fs::remove_file(origin.join("default")).unwrap();
    let pop = PopProcess::start(dir.path());
    let meta = pop
        .wait_status(&handle, "Stored", Duration::from_secs(30))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert!(meta["replication"]["last_error"].is_null(), "{meta}");
    let key = meta["key"].as_str().unwrap();
    assert_eq!(
        std::fs::read(origin.join("default").join(key)).unwrap(),
        bytes
    );
}

#[tokio::test]
async fn a_graceful_restart_keeps_uploads_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(3 * MIB, 42);
    let app = crate::support::spawn_app_in(dir.path(), |_| {}).await;
    let start = app
        .start(json!({"apikey": "k", "filename": "c.bin", "size": bytes.len(), "store": {"location": "s3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let handle = start["handle"].as_str().unwrap().to_owned();
    let parts: Vec<&[u8]> = bytes.chunks(MIB).collect();
    assert_eq!(
        app.send_chunk(&upload_id, 1, None, parts[0]).await.status(),
        200
    );
    app.stop().await;

    let app = crate::support::spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(
        app.send_chunk(&upload_id, 2, None, parts[1]).await.status(),
        200
    );
    assert_eq!(
        app.send_chunk(&upload_id, 3, None, parts[2]).await.status(),
        200
    );
    assert_eq!(app.complete(&upload_id, json!({})).await.status(), 200);
    assert_eq!(app.download(&handle).await, bytes);
    app.wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    app.stop().await;
}

#[tokio::test]
async fn sigterm_mid_upload_drains_and_loses_no_acknowledged_byte() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(3 * MIB, 43);
    let pop = PopProcess::start(dir.path());
    let resp = pop
        .http
        .post(pop.url("/files/"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", bytes.len().to_string())
        .send()
        .await
        .unwrap();
    let url = resp.headers()["location"].to_str().unwrap().to_owned();
    let patch = |offset: usize, body: reqwest::Body| {
        pop.http
            .patch(&url)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(body)
            .send()
    };
    assert_eq!(
        patch(0, bytes[..MIB].to_vec().into())
            .await
            .unwrap()
            .status(),
        204
    );

    // A second chunk trickles in while the POP is told to stop.
    let slow: Vec<Result<Vec<u8>, std::io::Error>> = bytes[MIB..2 * MIB]
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let trickle = futures_util::stream::iter(slow).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        c
    });
    let in_flight = patch(MIB, reqwest::Body::wrap_stream(trickle));
    let (answer, clean_exit) = tokio::join!(in_flight, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::spawn_blocking(move || pop.terminate(Duration::from_secs(20)))
            .await
            .unwrap()
    });
    assert!(clean_exit, "SIGTERM ends the process with status 0");
    assert_eq!(
        answer.unwrap().status(),
        204,
        "the request in flight was allowed to finish"
    );

    let pop = PopProcess::start(dir.path());
    // The restarted POP listens on another port.
    let url = pop.url(&url[url.find("/files/").unwrap()..]);
    let head = pop
        .http
        .head(&url)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["upload-offset"], (2 * MIB).to_string());
    let resp = pop
        .http
        .patch(&url)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", (2 * MIB).to_string())
        .body(bytes[2 * MIB..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let handle = resp.headers()["cin-handle"].to_str().unwrap().to_owned();
    assert_eq!(sha256_hex(&pop.download(&handle).await), sha256_hex(&bytes));
}

#[tokio::test]
async fn small_files_acknowledged_together_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let pop = PopProcess::start(dir.path());
    // Sizes around the small-file limit (1 MiB) and an empty file; many in flight,
    // so acknowledgements share fsyncs.
    let sizes: Vec<usize> = [0, 1, MIB, MIB + 1]
        .into_iter()
        .chain((0..60).map(|i| 1 + (i * 7919) % 70_000))
        .collect();
    let files: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| random_bytes(len, 500 + i as u64))
        .collect();
    let stored: Vec<String> = futures_util::stream::iter(files.iter().enumerate())
        .map(|(i, bytes)| {
            let pop = &pop;
            async move {
                pop.store_raw(&format!("/api/store/s3?filename=f{i}.bin"), bytes.clone())
                    .await
            }
        })
        .buffered(32)
        .collect()
        .await;
    pop.kill();

    let pop = PopProcess::start(dir.path());
    for (handle, bytes) in stored.iter().zip(&files) {
        assert_eq!(
            sha256_hex(&pop.download(handle).await),
            sha256_hex(bytes),
            "{handle} after the kill"
        );
    }
    for (handle, bytes) in stored.iter().zip(&files) {
        let meta = pop
            .wait_status(handle, "Stored", Duration::from_secs(60))
            .await;
        assert_eq!(meta["sha256"], sha256_hex(bytes));
        assert_eq!(meta["size"], bytes.len());
    }
    // This start appends to a log file of its own.
    let later = random_bytes(1000, 599);
    let handle = pop
        .store_raw("/api/store/s3?filename=later.bin", later.clone())
        .await;
    assert_eq!(pop.download(&handle).await, later);
    assert_eq!(
        dir.path().join("parts/log").read_dir().unwrap().count(),
        2,
        "each start writes to a new log file"
    );
}
