//! The Filestack-style multipart flow in both modes, with JSON and form bodies.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{random_bytes, sha256_hex, spawn_app, MIB};

#[tokio::test]
async fn regular_upload_out_of_order_serves_at_once_then_is_stored() {
    let app = spawn_app().await;
    let bytes = random_bytes(3 * MIB + 12345, 1);
    let start = app
        .start(json!({"apikey": "k", "filename": "report.pdf", "mimetype": "application/pdf", "size": bytes.len(), "store": {"location": "S3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    let handle = start["handle"].as_str().unwrap();
    assert_eq!(handle.len(), 20);
    assert_eq!(start["url"], app.url(&format!("/{handle}")));
    assert_eq!(
        start["location_url"],
        app.base.trim_start_matches("http://")
    );

    let chunks: Vec<&[u8]> = bytes.chunks(MIB).collect();
    let mut parts = Vec::new();
    for i in [3usize, 0, 2, 1] {
        let resp = app
            .send_chunk(upload_id, i as u32 + 1, None, chunks[i])
            .await;
        assert_eq!(resp.status(), 200);
        let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
        assert_eq!(
            etag,
            format!(
                "\"{}\"",
                hex::encode(<md5::Md5 as md5::Digest>::digest(chunks[i]))
            )
        );
        parts.push((i + 1, etag));
    }
    parts.sort();
    let parts: Vec<Value> = parts
        .iter()
        .map(|(n, e)| json!({"part_number": n, "etag": e}))
        .collect();
    let resp = app.complete(upload_id, json!({"parts": parts})).await;
    assert_eq!(resp.status(), 200);
    let done: Value = resp.json().await.unwrap();
    assert_eq!(done["handle"], handle);
    assert_eq!(done["size"], bytes.len());
    assert_eq!(done["filename"], "report.pdf");
    assert!(
        done["status"] == "InTransit" || done["status"] == "Stored",
        "{done}"
    );

    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));

    let meta = app
        .wait_status(handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert_eq!(meta["mimetype"], "application/pdf");
    assert_eq!(meta["size"], bytes.len());
    assert_eq!(meta["container"], "default");
    assert_eq!(meta["location"], "s3");
    let key = meta["key"].as_str().unwrap();
    assert_eq!(key, format!("{handle}_report.pdf"));
    let in_origin = std::fs::read(app.data_dir.join("origin/default").join(key)).unwrap();
    assert_eq!(sha256_hex(&in_origin), sha256_hex(&bytes));
    // Still served (from the local cache) once stored.
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
}

#[tokio::test]
async fn intelligent_ingestion_chunks_at_offsets_in_any_order() {
    let app = spawn_app().await;
    let part_size = 2 * MIB;
    let bytes = random_bytes(2 * part_size + 777, 2);
    let start = app
        .start(json!({"apikey": "k", "filename": "movie.mp4", "mimetype": "video/mp4", "size": bytes.len(), "store": {"location": "s3"}, "fii": true}))
        .await;
    assert_eq!(start["upload_type"], "intelligent_ingestion");
    let upload_id = start["upload_id"].as_str().unwrap();
    let handle = start["handle"].as_str().unwrap();

    for (p, part) in bytes.chunks(part_size).enumerate().rev() {
        // Chunks of 300 KiB, sent last to first, like a client that retried.
        let chunk = 300 * 1024;
        let offsets: Vec<usize> = (0..part.len()).step_by(chunk).collect();
        for &off in offsets.iter().rev() {
            let end = (off + chunk).min(part.len());
            let resp = app
                .send_chunk(upload_id, p as u32 + 1, Some(off as u64), &part[off..end])
                .await;
            assert_eq!(resp.status(), 200);
        }
        let resp = app
            .post_json("/multipart/commit", json!({"apikey": "k", "upload_id": upload_id, "part": p + 1, "size": bytes.len(), "store": {"location": "S3"}}))
            .await;
        assert_eq!(resp.status(), 200);
    }
    let resp = app
        .complete(
            upload_id,
            json!({"fii": true, "filename": "movie.mp4", "size": bytes.len()}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
    let meta = app
        .wait_status(handle, "Stored", Duration::from_secs(20))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
}

#[tokio::test]
async fn form_bodies_are_accepted_like_json() {
    let app = spawn_app().await;
    let bytes = random_bytes(100_000, 3);
    let resp = app
        .http
        .post(app.url("/multipart/start"))
        .form(&[
            ("apikey", "k"),
            ("filename", "f.txt"),
            ("mimetype", "text/plain"),
            ("size", "100000"),
            ("store_location", "s3"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start: Value = resp.json().await.unwrap();
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let resp = app
        .http
        .post(app.url("/multipart/upload"))
        .form(&[
            ("apikey", "k"),
            ("upload_id", upload_id.as_str()),
            ("part", "1"),
            ("size", "100000"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let up: Value = resp.json().await.unwrap();
    let put = app
        .http
        .put(up["url"].as_str().unwrap())
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let etag = put.headers()["etag"].to_str().unwrap().to_owned();
    let resp = app
        .http
        .post(app.url("/multipart/complete"))
        .form(&[
            ("apikey", "k"),
            ("upload_id", upload_id.as_str()),
            ("parts", format!("1:{etag}").as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let done: Value = resp.json().await.unwrap();
    assert_eq!(app.download(done["handle"].as_str().unwrap()).await, bytes);
}

#[tokio::test]
async fn complete_is_idempotent() {
    let app = spawn_app().await;
    let start = app
        .start(json!({"apikey": "k", "filename": "b.bin", "size": 3, "store": {"location": "s3"}}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    assert_eq!(
        app.send_chunk(upload_id, 1, None, b"abc").await.status(),
        200
    );
    let first: Value = app
        .complete(upload_id, json!({}))
        .await
        .json()
        .await
        .unwrap();
    let second: Value = app
        .complete(upload_id, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["handle"], second["handle"]);
    assert_eq!(
        app.download(first["handle"].as_str().unwrap()).await,
        b"abc"
    );
}

#[tokio::test]
async fn chunk_size_hints_shrink_when_bodies_break_off() {
    let app = spawn_app().await;
    let start = app
        .start(json!({"apikey": "k", "filename": "a.bin", "size": 4 * MIB, "store": {"location": "s3"}, "fii": true}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    let ask = |offset: usize| {
        app.post_json(
            "/multipart/upload",
            json!({"upload_id": upload_id, "part": 1, "size": MIB, "offset": offset, "fii": true}),
        )
    };
    let first: Value = ask(0).await.json().await.unwrap();
    assert_eq!(
        first["chunk_size_hint"], MIB,
        "1 MiB before anything is measured"
    );

    // A body that breaks off halfway, as on a dropped connection.
    break_off_put(first["url"].as_str().unwrap(), MIB, &vec![7u8; MIB / 2]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let after: Value = ask(0).await.json().await.unwrap();
    assert_eq!(
        after["chunk_size_hint"],
        MIB / 2,
        "a broken body halves the hint"
    );
    let put = app
        .send_chunk(upload_id, 1, Some(0), &random_bytes(MIB, 5))
        .await;
    assert_eq!(put.status(), 200);
    let header: u64 = put.headers()["cin-chunk-size-hint"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(header >= 32 * 1024 && header <= 8 * MIB as u64, "{header}");
}

/// PUTs `body` to an upload URL granted for a chunk that declared `crc32c`.
async fn put_with_crc32c(
    app: &crate::support::TestApp,
    upload_id: &str,
    offset: usize,
    declared_for: &[u8],
    body: &[u8],
) -> reqwest::Response {
    use base64::Engine;
    let crc = base64::engine::general_purpose::STANDARD
        .encode(crc32c::crc32c(declared_for).to_be_bytes());
    let grant: Value = app
        .post_json(
            "/multipart/upload",
            json!({"apikey": "k", "upload_id": upload_id, "part": 1, "size": body.len(), "offset": offset, "crc32c": crc, "fii": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    app.http
        .put(grant["url"].as_str().unwrap())
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_declared_crc32c_is_verified_instead_of_an_md5() {
    let app = spawn_app().await;
    let bytes = random_bytes(MIB + 4321, 8);
    let start = app
        .start(json!({"apikey": "k", "filename": "c.bin", "size": bytes.len(), "store": {"location": "s3"}, "fii": true}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    let handle = start["handle"].as_str().unwrap();
    let (first, second) = bytes.split_at(MIB);

    // Bytes that do not match their declared CRC32C are refused, and nothing of
    // them counts.
    let mut corrupted = first.to_vec();
    corrupted[1000] ^= 0x40;
    let refused = put_with_crc32c(&app, upload_id, 0, first, &corrupted).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "crc32c_mismatch");

    for (offset, piece) in [(0, first), (MIB, second)] {
        let resp = put_with_crc32c(&app, upload_id, offset, piece, piece).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    let commit = app
        .post_json(
            "/multipart/commit",
            json!({"apikey": "k", "upload_id": upload_id, "part": 1, "size": bytes.len()}),
        )
        .await;
    assert_eq!(commit.status(), 200);
    complete_and_compare(&app, upload_id, handle, "c.bin", &bytes).await;

    // A CRC32C that is not one is refused before any byte is read.
    let malformed = app
        .post_json(
            "/multipart/upload",
            json!({"apikey": "k", "upload_id": upload_id, "part": 1, "size": 10, "crc32c": "not-base64!", "fii": true}),
        )
        .await;
    assert!(malformed.status().is_client_error());
}

/// Sends a PUT to `url` declaring `declared` body bytes, then only `sent`, and
/// closes the connection: a body broken off, as on a dropped connection.
async fn break_off_put(url: &str, declared: usize, sent: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let mut stream = stall_put(url, declared, sent).await;
    stream.shutdown().await.unwrap();
}

/// Sends a PUT to `url` declaring `declared` body bytes, then only `sent`, and
/// nothing more: the connection stays open, as on a path that went silent.
async fn stall_put(url: &str, declared: usize, sent: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let url = reqwest::Url::parse(url).unwrap();
    let mut stream = tokio::net::TcpStream::connect((url.host_str().unwrap(), url.port().unwrap()))
        .await
        .unwrap();
    let head = format!(
        "PUT {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {declared}\r\n\r\n",
        url.path(),
        url.query().unwrap(),
        url.authority(),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// An intelligent-ingestion upload started for its upload grant.
struct GrantedUpload {
    upload_id: String,
    handle: String,
    grant: Value,
}

impl GrantedUpload {
    async fn start(app: &crate::support::TestApp, filename: &str, size: usize) -> Self {
        let start = app
            .start(json!({"apikey": "k", "filename": filename, "size": size, "store": {"location": "s3"}, "fii": true}))
            .await;
        GrantedUpload {
            upload_id: start["upload_id"].as_str().unwrap().to_owned(),
            handle: start["handle"].as_str().unwrap().to_owned(),
            grant: start["upload_grant"].clone(),
        }
    }

    /// The grant's URL for a chunk of `body` at `offset` in `part`.
    fn chunk_url(&self, part: usize, offset: usize, body: &[u8], block: Option<usize>) -> String {
        granted_chunk_url(
            self.grant["url"].as_str().unwrap(),
            self.grant["signature"].as_str().unwrap(),
            self.grant["expires"].as_u64().unwrap(),
            part,
            offset,
            body,
            block,
        )
    }
}

/// Completes an intelligent-ingestion upload and checks its filelink serves `bytes`.
async fn complete_and_compare(
    app: &crate::support::TestApp,
    upload_id: &str,
    handle: &str,
    filename: &str,
    bytes: &[u8],
) {
    let done = app
        .complete(
            upload_id,
            json!({"fii": true, "filename": filename, "size": bytes.len()}),
        )
        .await;
    assert_eq!(done.status(), 200, "{}", done.text().await.unwrap());
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(bytes));
}

/// A chunk URL built from an upload grant (`base` and `signature` of it), with
/// the chunk's CRC32C and, when `block` is given, the CRC32C of every block.
fn granted_chunk_url(
    base: &str,
    signature: &str,
    expires: u64,
    part: usize,
    offset: usize,
    body: &[u8],
    block: Option<usize>,
) -> String {
    use base64::Engine;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut query = vec![
        ("offset", offset.to_string()),
        ("size", body.len().to_string()),
        ("crc32c", b64.encode(crc32c::crc32c(body).to_be_bytes())),
        ("grant", "upload".into()),
        ("expires", expires.to_string()),
        ("signature", signature.to_owned()),
    ];
    if let Some(block) = block {
        let sums: Vec<u8> = body
            .chunks(block)
            .flat_map(|b| crc32c::crc32c(b).to_be_bytes())
            .collect();
        query.push(("block_size", block.to_string()));
        query.push(("block_crc32c", b64.encode(sums)));
    }
    format!(
        "{base}/{part}?{}",
        serde_urlencoded::to_string(query).unwrap()
    )
}

/// The upload grant of the start answer signs any chunk of its upload, and only
/// of its upload: chunks go in one request each, at any part and offset.
#[tokio::test]
async fn an_upload_grant_signs_any_chunk_of_its_upload_and_nothing_else() {
    let app = spawn_app().await;
    let bytes = random_bytes(3 * MIB + 999, 9);
    let part_size = 2 * MIB;
    let start = app
        .start(json!({"apikey": "k", "filename": "g.bin", "size": bytes.len(), "store": {"location": "s3"}, "fii": true}))
        .await;
    let upload_id = start["upload_id"].as_str().unwrap();
    let handle = start["handle"].as_str().unwrap();
    let grant = &start["upload_grant"];
    let base = grant["url"].as_str().unwrap();
    let put = |url: String, body: Vec<u8>| {
        let http = app.http.clone();
        async move { http.put(url).body(body).send().await.unwrap() }
    };
    let signature = grant["signature"].as_str().unwrap();
    let chunk_url = |base: &str, part: usize, offset: usize, body: &[u8], expires: u64| {
        granted_chunk_url(base, signature, expires, part, offset, body, None)
    };
    let expires = grant["expires"].as_u64().unwrap();

    // Bytes that do not match the checksum in the query are refused.
    let mut corrupted = bytes[..MIB].to_vec();
    corrupted[7] ^= 1;
    let resp = put(chunk_url(base, 1, 0, &bytes[..MIB], expires), corrupted).await;
    assert_eq!(resp.status(), 400);

    // Chunks of two parts, out of order, each one PUT.
    let pieces = [
        (2, 0, &bytes[part_size..part_size + MIB]),
        (1, 0, &bytes[..MIB]),
        (1, MIB, &bytes[MIB..part_size]),
        (2, MIB, &bytes[part_size + MIB..]),
    ];
    for (part, offset, piece) in pieces {
        let resp = put(
            chunk_url(base, part, offset, piece, expires),
            piece.to_vec(),
        )
        .await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }

    // Refused: another upload's URL, a later expiry, a chunk past the file's end.
    let other = app
        .start(json!({"apikey": "k", "filename": "o.bin", "size": 10, "store": {"location": "s3"}, "fii": true}))
        .await;
    let other_base = base.replace(upload_id, other["upload_id"].as_str().unwrap());
    let piece = &bytes[..10];
    for (url, status, code) in [
        (
            chunk_url(&other_base, 1, 0, piece, expires),
            403,
            "invalid_signature",
        ),
        (
            chunk_url(base, 1, 0, piece, expires + 1),
            403,
            "invalid_signature",
        ),
        (
            chunk_url(base, 2, 2 * MIB, piece, expires),
            400,
            "over_declared_size",
        ),
    ] {
        let resp = put(url, piece.to_vec()).await;
        assert_eq!(resp.status(), status);
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["code"], code);
    }

    // The per-chunk call renews the grant.
    let renewed: Value = app
        .post_json(
            "/multipart/upload",
            json!({"apikey": "k", "upload_id": upload_id, "part": 1, "size": 10, "fii": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(renewed["upload_grant"]["url"], base);
    assert!(renewed["upload_grant"]["expires"].as_u64().unwrap() >= expires);

    for part in [1, 2] {
        let commit = app
            .post_json(
                "/multipart/commit",
                json!({"apikey": "k", "upload_id": upload_id, "part": part, "size": bytes.len()}),
            )
            .await;
        assert_eq!(commit.status(), 200, "{}", commit.text().await.unwrap());
    }
    complete_and_compare(&app, upload_id, handle, "g.bin", &bytes).await;
}

/// What part 1 of `upload_id` holds, asked with the upload grant.
async fn part_received(app: &crate::support::TestApp, grant: &Value) -> Value {
    let resp = app
        .http
        .get(format!("{}/1", grant["url"].as_str().unwrap()))
        .query(&[
            ("grant", "upload".to_owned()),
            ("expires", grant["expires"].to_string()),
            ("signature", grant["signature"].as_str().unwrap().to_owned()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["received"].clone()
}

/// Waits until part 1 holds exactly `ranges` (the POP records a broken body's
/// kept blocks once it sees the connection close).
async fn wait_received(app: &crate::support::TestApp, grant: &Value, ranges: Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let received = part_received(app, grant).await;
        if received == ranges {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "part 1 holds {received}, not {ranges}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chunk that declares block checksums and breaks off keeps the whole blocks
/// that matched: the client asks what arrived and sends only the rest. A block
/// that does not match is refused with everything after it.
#[tokio::test]
async fn a_broken_chunk_keeps_its_checked_blocks_and_the_rest_completes_it() {
    let app = spawn_app().await;
    let block = 256 * 1024;
    let bytes = random_bytes(MIB, 12);
    let up = GrantedUpload::start(&app, "b.bin", bytes.len()).await;
    let (upload_id, handle, grant) = (up.upload_id.as_str(), up.handle.as_str(), &up.grant);

    // 600 KiB of the chunk, then the connection closes: two whole blocks stay.
    let url = up.chunk_url(1, 0, &bytes, Some(block));
    break_off_put(&url, bytes.len(), &bytes[..600 * 1024]).await;
    wait_received(&app, grant, json!([[0, 2 * block]])).await;

    // The rest, with a flipped byte in its second block: its first block counts.
    let rest = &bytes[2 * block..];
    let mut damaged = rest.to_vec();
    damaged[block + 3] ^= 1;
    let resp = app
        .http
        .put(up.chunk_url(1, 2 * block, rest, Some(block)))
        .body(damaged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "crc32c_mismatch");
    wait_received(&app, grant, json!([[0, 3 * block]])).await;

    // The last block, and the file is whole.
    let last = &bytes[3 * block..];
    let resp = app
        .http
        .put(up.chunk_url(1, 3 * block, last, Some(block)))
        .body(last.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    complete_and_compare(&app, upload_id, handle, "b.bin", &bytes).await;
}

/// Asking what a part holds takes the part over: a write still waiting on a
/// silent connection ends at once (not after the body idle time), keeping its
/// checked blocks, and the answer counts them; the rest completes the file.
#[tokio::test]
async fn asking_what_a_part_holds_ends_a_stalled_write_and_counts_its_blocks() {
    let app = spawn_app().await;
    let block = 256 * 1024;
    let bytes = random_bytes(MIB, 13);
    let up = GrantedUpload::start(&app, "s.bin", bytes.len()).await;
    let (upload_id, handle, grant) = (up.upload_id.as_str(), up.handle.as_str(), &up.grant);
    let url = up.chunk_url(1, 0, &bytes, Some(block));
    let stalled = stall_put(&url, bytes.len(), &bytes[..3 * block + 1000]).await;

    let asked = std::time::Instant::now();
    let received = part_received(&app, grant).await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the question waited for the stalled write"
    );
    // However much the POP had read when asked: whole blocks from 0, at most three.
    let held = match received.as_array().map(Vec::as_slice) {
        Some([]) => 0,
        Some([range]) => range[1].as_u64().unwrap() as usize,
        _ => panic!("part 1 holds {received}"),
    };
    assert!(
        held % block == 0 && held <= 3 * block,
        "part 1 holds {received}"
    );
    drop(stalled);

    let rest = &bytes[held..];
    let resp = app
        .http
        .put(up.chunk_url(1, held, rest, Some(block)))
        .body(rest.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    complete_and_compare(&app, upload_id, handle, "s.bin", &bytes).await;
}

#[tokio::test]
async fn upload_tags_come_back_from_complete_and_metadata_which_selects_attributes() {
    let app = spawn_app().await;
    let started = app
        .start(json!({"apikey": "k", "filename": "t.bin", "size": 5, "mimetype": "application/octet-stream"}))
        .await;
    let upload_id = started["upload_id"].as_str().unwrap().to_owned();
    let handle = started["handle"].as_str().unwrap().to_owned();
    assert_eq!(
        app.send_chunk(&upload_id, 1, None, b"hello").await.status(),
        200
    );
    let refused = app
        .complete(&upload_id, json!({"upload_tags": ["not", "an", "object"]}))
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_upload_tags");

    let completed = app
        .complete(
            &upload_id,
            json!({"upload_tags": {"project": "cin", "n": 3}}),
        )
        .await;
    assert_eq!(completed.status(), 200);
    let completed: Value = completed.json().await.unwrap();
    let tags = json!({"project": "cin", "n": "3"});
    assert_eq!(completed["upload_tags"], tags);
    assert_eq!(app.metadata(&handle).await["upload_tags"], tags);

    let selected: Value = app
        .http
        .get(app.url(&format!(
            "/{handle}/metadata?size=true&filename=true&sha256=false"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(selected, json!({"size": 5, "filename": "t.bin"}));
}
