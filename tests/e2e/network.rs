//! A network of POPs: every name a POP mints says which POP minted it.

use serde_json::{json, Value};

use crate::support::{random_bytes, sha256_hex, spawn_app_on_fresh_dir, spawn_app_with};

#[tokio::test]
async fn every_name_a_pop_mints_begins_with_its_id() {
    let app = spawn_app_with(|c| c.server.pop_id = "eu".into()).await;
    let started = app
        .start(json!({"apikey": "k", "filename": "a.bin", "size": 3, "mimetype": "application/octet-stream"}))
        .await;
    let handle = started["handle"].as_str().expect("handle");
    let upload_id = started["upload_id"].as_str().expect("upload id");
    assert!(handle.starts_with("eu") && handle.len() == 20, "{handle}");
    assert!(
        upload_id.starts_with("eu") && upload_id.len() == 32,
        "{upload_id}"
    );

    let stored = app
        .store_raw("/api/store/s3?filename=a.txt", b"abc".to_vec())
        .await;
    assert!(stored.starts_with("eu"), "{stored}");
    assert!(
        stored.chars().all(|c| c.is_ascii_alphanumeric()),
        "{stored}"
    );
    let meta: Value = app.metadata(&stored).await;
    assert_eq!(meta["pop"], "eu");

    let tus = app
        .http
        .post(app.url("/files/"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "3")
        .send()
        .await
        .expect("tus create");
    assert_eq!(tus.status(), 201);
    let filelink = tus.headers()["cin-filelink"].to_str().expect("filelink");
    let tus_handle = filelink.rsplit('/').next().expect("handle in the filelink");
    assert!(tus_handle.starts_with("eu"), "{filelink}");
}

#[test]
fn a_pop_id_that_is_not_two_alphanumerics_is_refused() {
    for bad in ["", "e", "local", "e-"] {
        let mut config = cin_edge::Config::default();
        config.server.pop_id = bad.into();
        let error = config.validate().expect_err(bad);
        assert!(
            error.contains("server.pop_id") && error.contains("2 characters of [A-Za-z0-9]"),
            "{error}"
        );
    }
    cin_edge::Config::default()
        .validate()
        .expect("the default POP id is valid");
}

const SECRET: &str = "a network secret of 32 characters";

/// POPs with these ids on loopback, each listing all of them (and, with
/// `absent`, POPs that are listed but not running).
async fn network(ids: &[&str], absent: &[&str]) -> Vec<crate::support::TestApp> {
    network_with(ids, absent, |_, _| {}).await
}

/// [`network`], with `tweak` applied to each POP's config (given its id).
async fn network_with(
    ids: &[&str],
    absent: &[&str],
    tweak: impl Fn(&str, &mut cin_edge::Config),
) -> Vec<crate::support::TestApp> {
    let mut listeners = Vec::new();
    for _ in ids.iter().chain(absent) {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    let pops: Vec<cin_edge::config::NetworkPop> = ids
        .iter()
        .chain(absent)
        .zip(&listeners)
        .map(|(id, l)| cin_edge::config::NetworkPop {
            id: (*id).into(),
            url: format!("http://{}", l.local_addr().expect("addr")),
        })
        .collect();
    // The absent POPs' ports are closed: calls to them are refused.
    let running = listeners.drain(..ids.len()).collect::<Vec<_>>();
    drop(listeners);
    ids.iter()
        .zip(running)
        .map(|(id, listener)| {
            let pops = pops.clone();
            spawn_app_on_fresh_dir(listener, |c| {
                c.server.pop_id = (*id).into();
                c.network.secret = SECRET.into();
                c.network.pops = pops;
                tweak(id, c);
            })
        })
        .collect()
}

#[tokio::test]
async fn any_pop_answers_metadata_for_a_handle_another_pop_minted() {
    let pops = network(&["aa", "bb", "cc"], &[]).await;
    let (a, b, c) = (&pops[0], &pops[1], &pops[2]);
    let started = a
        .start(json!({"apikey": "k", "filename": "u.bin", "size": 10, "mimetype": "application/octet-stream"}))
        .await;
    let uploading = started["handle"].as_str().expect("handle").to_owned();
    let stored = a
        .store_raw("/api/store/s3?filename=s.txt", b"stored".to_vec())
        .await;
    for handle in [&uploading, &stored] {
        let at_origin = a.metadata(handle).await;
        for other in [b, c] {
            let resp = other
                .http
                .get(other.url(&format!("/{handle}/metadata")))
                .send()
                .await
                .expect("metadata");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["cin-pop"], "aa");
            let answer: Value = resp.json().await.expect("json");
            for field in ["handle", "filename", "size", "pop", "mimetype"] {
                assert_eq!(answer[field], at_origin[field], "{field}");
            }
            assert!(answer["status"].is_string());
        }
    }
    assert_eq!(a.metadata(&uploading).await["status"], "Uploading");
    let unknown = format!("aa{}", &uploading[2..].chars().rev().collect::<String>());
    let resp = b
        .http
        .get(b.url(&format!("/{unknown}/metadata")))
        .send()
        .await
        .expect("metadata");
    assert_eq!(resp.status(), 404, "the origin's 404 is passed on");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "file_not_found");
}

#[tokio::test]
async fn an_unreachable_origin_gets_503_with_retry_after_naming_it() {
    let pops = network(&["bb"], &["zz"]).await;
    let b = &pops[0];
    let resp = b
        .http
        .get(b.url("/zz345678901234567890/metadata"))
        .send()
        .await
        .expect("metadata");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "origin_unreachable");
    assert_eq!(body["error"]["origin"], "zz");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("POP zz"), "{message}");
}

#[tokio::test]
async fn a_forged_internal_call_is_refused() {
    let pops = network(&["aa"], &[]).await;
    let a = &pops[0];
    let handle = a
        .store_raw("/api/store/s3?filename=s.txt", b"secret".to_vec())
        .await;
    let path = format!("/internal/files/{handle}/metadata");
    let expires = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 30)
        .to_string();
    for (expires, signature) in [
        (None, None),
        (Some(expires.as_str()), None),
        (Some(expires.as_str()), Some("00".repeat(32))),
        (Some("1"), Some("00".repeat(32))),
    ] {
        let mut req = a.http.get(a.url(&path));
        if let Some(e) = expires {
            req = req.header("cin-internal-expires", e);
        }
        if let Some(s) = signature {
            req = req.header("cin-internal-signature", s);
        }
        let resp = req.send().await.expect("internal call");
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "internal_call_refused");
        assert!(body.get("handle").is_none());
    }
}

/// `bytes` uploaded at `base` by cin's uploader (Filestack multipart): the handle.
async fn cin_upload(base: &str, name: &str, bytes: &[u8]) -> String {
    use cin_client::upload::{Quiet, UploadJob, UploadOptions, Uploader};
    use cin_client::{HttpTransport, MemorySource, StoreOptions, TokioClock};
    use std::sync::Arc;

    Uploader::new(
        Arc::new(HttpTransport::new("k").expect("http client")),
        Arc::new(TokioClock::new()),
        UploadOptions::default(),
        Arc::new(Quiet),
    )
    .upload(UploadJob {
        source: Arc::new(MemorySource(bytes.to_vec().into())),
        filename: name.into(),
        mimetype: "application/octet-stream".into(),
        store: StoreOptions::s3(),
        pops: vec![base.to_owned()],
        resume: None,
    })
    .await
    .expect("multipart upload")
    .handle
}

/// A tus upload of `length` bytes created at `pop`: its `Location` and handle.
async fn tus_create(pop: &crate::support::TestApp, length: usize) -> (String, String) {
    let created = pop
        .http
        .post(pop.url("/files/"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", length.to_string())
        .send()
        .await
        .expect("tus create");
    assert_eq!(created.status(), 201);
    let header = |name: &str| created.headers()[name].to_str().expect("header").to_owned();
    (header("location"), header("cin-handle"))
}

/// A tus `PATCH` of `piece` at `offset` to `url`, sent by `pop`'s client.
async fn tus_patch(
    pop: &crate::support::TestApp,
    url: &str,
    offset: usize,
    piece: &[u8],
) -> reqwest::Response {
    pop.http
        .patch(url)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", offset.to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(piece.to_vec())
        .send()
        .await
        .expect("tus PATCH")
}

/// `bytes[start..end]`, read from `pop` with a `Range` request.
async fn assert_range(
    pop: &crate::support::TestApp,
    handle: &str,
    bytes: &[u8],
    (start, end): (usize, usize),
) -> reqwest::header::HeaderMap {
    let ranged = pop
        .http
        .get(pop.url(&format!("/{handle}")))
        .header("range", format!("bytes={start}-{}", end - 1))
        .send()
        .await
        .expect("range read");
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes {start}-{}/{}", end - 1, bytes.len()).as_str()
    );
    let headers = ranged.headers().clone();
    assert_eq!(
        ranged.bytes().await.expect("range body").as_ref(),
        &bytes[start..end]
    );
    headers
}

/// Files delivered to it stay `InTransit` at their origin: replication never succeeds.
fn held_in_transit(config: &mut cin_edge::Config) {
    config.storage.profiles.insert(
        "held".into(),
        cin_edge::config::StorageProfile {
            kind: cin_edge::config::ProfileKind::S3,
            bucket: "held".into(),
            endpoint: "http://127.0.0.1:9".into(),
            force_path_style: true,
            access_key_id: "nobody".into(),
            secret_access_key: "nothing".into(),
            ..Default::default()
        },
    );
    config.storage.default_profile = "held".into();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_in_transit_at_its_origin_reads_the_same_at_every_pop() {
    let pops = network_with(&["aa", "bb", "cc"], &[], |_, c| held_in_transit(c)).await;
    let (a, b, c) = (&pops[0], &pops[1], &pops[2]);
    let whole = random_bytes(2_500_000, 41);
    let stored = a
        .store_raw("/api/store/s3?filename=w.bin", whole.clone())
        .await;
    let chunked = random_bytes(9 * 1024 * 1024 + 17, 42);
    let multipart = cin_upload(&a.base, "m.bin", &chunked).await;
    for (handle, bytes) in [(&stored, &whole), (&multipart, &chunked)] {
        assert_eq!(a.metadata(handle).await["status"], "InTransit");
        for other in [b, c] {
            let full = other
                .http
                .get(other.url(&format!("/{handle}")))
                .send()
                .await
                .expect("read at another POP");
            assert_eq!(full.status(), 200);
            assert_eq!(full.headers()["cin-pop"], "aa");
            assert_eq!(
                full.headers()["content-length"],
                bytes.len().to_string().as_str()
            );
            assert_eq!(
                sha256_hex(&full.bytes().await.expect("body")),
                sha256_hex(bytes)
            );
            assert_range(other, handle, bytes, (1000, 2_000_000)).await;
            let head = other
                .http
                .head(other.url(&format!("/{handle}")))
                .send()
                .await
                .expect("HEAD at another POP");
            assert_eq!(head.status(), 200);
            let etag = head.headers()["etag"].clone();
            let unchanged = other
                .http
                .get(other.url(&format!("/{handle}")))
                .header("if-none-match", etag)
                .send()
                .await
                .expect("conditional read");
            assert_eq!(unchanged.status(), 304);
            assert_eq!(other.metadata(handle).await["status"], "InTransit");
        }
    }
}

#[tokio::test]
async fn status_events_of_a_file_at_another_pop_come_through() {
    let pops = network_with(&["aa", "bb"], &[], |_, c| held_in_transit(c)).await;
    let (a, b) = (&pops[0], &pops[1]);
    let started = a
        .start(json!({"apikey": "k", "filename": "e.bin", "size": 3, "mimetype": "application/octet-stream"}))
        .await;
    let handle = started["handle"].as_str().expect("handle").to_owned();
    let upload_id = started["upload_id"].as_str().expect("upload id").to_owned();
    let mut stream = b
        .http
        .get(b.url(&format!("/{handle}/events")))
        .send()
        .await
        .expect("events at B");
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["cin-pop"], "aa");
    let mut seen = String::new();
    let mut next_event = async || {
        let chunk = stream.chunk().await.expect("event").expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        seen.clone()
    };
    assert!(next_event().await.contains("\"Uploading\""));
    assert_eq!(
        a.send_chunk(&upload_id, 1, None, b"abc").await.status(),
        200
    );
    assert_eq!(a.complete(&upload_id, json!({})).await.status(), 200);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !next_event().await.contains("\"InTransit\"") {
        assert!(tokio::time::Instant::now() < deadline, "{seen}");
    }
}

/// `url` with its scheme and host replaced by `base`'s.
fn at(base: &str, url: &str) -> String {
    let path = url.splitn(4, '/').nth(3).unwrap_or_default();
    format!("{base}/{path}")
}

#[tokio::test]
async fn chunks_of_one_upload_sent_to_two_pops_complete_at_the_origin() {
    let pops = network(&["aa", "bb"], &[]).await;
    let (a, b) = (&pops[0], &pops[1]);
    let parts: Vec<Vec<u8>> = (0..4u64)
        .map(|i| random_bytes(300_000 + i as usize, 50 + i))
        .collect();
    let whole = parts.concat();
    let started = a
        .start(json!({"apikey": "k", "filename": "two.bin", "size": whole.len(), "mimetype": "application/octet-stream"}))
        .await;
    let upload_id = started["upload_id"].as_str().expect("upload id").to_owned();
    let mut etags = Vec::new();
    for (i, bytes) in parts.iter().enumerate() {
        // Alternately at A and at B, as a client that DNS moved would.
        let pop = [a, b][i % 2];
        let asked = pop
            .post_json(
                "/multipart/upload",
                crate::support::chunk_request(&upload_id, i as u32 + 1, None, bytes),
            )
            .await;
        assert_eq!(asked.status(), 200);
        let asked: Value = asked.json().await.expect("upload answer");
        let mut put = pop
            .http
            .put(at(&pop.base, asked["url"].as_str().expect("url")));
        for (name, value) in asked["headers"].as_object().into_iter().flatten() {
            put = put.header(name.as_str(), value.as_str().unwrap_or_default());
        }
        let put = put.body(bytes.clone()).send().await.expect("chunk PUT");
        assert_eq!(put.status(), 200, "part {} at {}", i + 1, pop.base);
        if i % 2 == 1 {
            assert_eq!(put.headers()["cin-pop"], "aa", "answered by the origin");
        }
        etags.push(format!(
            "{}:{}",
            i + 1,
            put.headers()["etag"].to_str().expect("etag")
        ));
    }
    let completed = b
        .complete(&upload_id, json!({"parts": etags.join(";")}))
        .await;
    assert_eq!(completed.status(), 200);
    let completed: Value = completed.json().await.expect("complete answer");
    let handle = completed["handle"].as_str().expect("handle");
    assert_eq!(sha256_hex(&a.download(handle).await), sha256_hex(&whole));
    assert_eq!(sha256_hex(&b.download(handle).await), sha256_hex(&whole));

    // tus: created at A, continued at B.
    let (location, tus_handle) = tus_create(a, 6).await;
    assert!(location.starts_with(&a.base), "{location} names the origin");
    for (offset, piece) in [(0, &b"abc"[..]), (3, &b"def"[..])] {
        let patched = tus_patch(b, &at(&b.base, &location), offset, piece).await;
        assert_eq!(patched.status(), 204);
        assert_eq!(
            patched.headers()["upload-offset"],
            (offset + 3).to_string().as_str()
        );
    }
    assert_eq!(b.download(&tus_handle).await, b"abcdef");
}

#[tokio::test]
async fn a_chunk_for_an_unreachable_origin_gets_503_naming_it() {
    let pops = network(&["bb"], &["zz"]).await;
    let b = &pops[0];
    let resp = b
        .http
        .put(b.url("/upload/zz345678901234567890123456789012/1?offset=0&size=3"))
        .body(b"abc".to_vec())
        .send()
        .await
        .expect("chunk PUT");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["origin"], "zz");
}

#[tokio::test]
async fn a_stored_file_is_served_by_every_pop_after_its_origin_is_gone() {
    // One final store for the network: a directory every POP reaches.
    let store = tempfile::tempdir().expect("shared store");
    let shared = store.path().to_path_buf();
    let mut pops = network_with(&["aa", "bb", "cc"], &[], |_, c| {
        if let Some(profile) = c.storage.profiles.get_mut("default") {
            profile.path = shared.clone();
        }
    })
    .await;
    let bytes = random_bytes(1_500_000, 70);
    let handle = pops[0]
        .store_raw("/api/store/s3?filename=kept.bin", bytes.clone())
        .await;
    let at_origin = pops[0]
        .wait_status(&handle, "Stored", std::time::Duration::from_secs(20))
        .await;
    pops.remove(0).stop().await;
    for other in &pops {
        let meta = other.metadata(&handle).await;
        assert_eq!(meta["status"], "Stored");
        assert_eq!(meta["pop"], "aa", "the origin is named");
        for field in ["handle", "size", "sha256", "filename", "mimetype", "key"] {
            assert_eq!(meta[field], at_origin[field], "{field}");
        }
        assert_eq!(
            sha256_hex(&other.download(&handle).await),
            sha256_hex(&bytes)
        );
        assert_range(other, &handle, &bytes, (100, 200)).await;
        // The status stream says Stored and ends, without the origin.
        let events = other
            .http
            .get(other.url(&format!("/{handle}/events")))
            .send()
            .await
            .expect("events");
        assert_eq!(events.status(), 200);
        let text = events.text().await.expect("the stream ends");
        assert!(text.contains("\"Stored\""), "{text}");
    }
    // Not stored anywhere and its origin gone: 503 naming the origin.
    let never = format!("aa{}", &handle[2..].chars().rev().collect::<String>());
    let resp = pops[0]
        .http
        .get(pops[0].url(&format!("/{never}/metadata")))
        .send()
        .await
        .expect("metadata");
    assert_eq!(resp.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_seaweedfs_cluster_a_file_survives_a_dead_volume_server_and_its_origin() {
    let mut cluster = crate::seaweedfs::SeaweedCluster::start().await;
    cluster.create_bucket("network").await;
    let profile = cluster.profile("network");
    let mut pops = network_with(&["aa", "bb", "cc"], &[], |_, c| {
        c.storage.profiles.insert("default".into(), profile.clone());
    })
    .await;
    let bytes = random_bytes(24 * crate::support::MIB, 80);
    let handle = pops[0]
        .store_raw("/api/store/s3?filename=big.bin", bytes.clone())
        .await;
    // Replication starts as the upload completes: a volume server dies under it.
    cluster.kill_volume(1);
    let meta = pops[0]
        .wait_status(&handle, "Stored", std::time::Duration::from_secs(120))
        .await;
    let key = meta["key"].as_str().expect("key");
    let object = cluster
        .client()
        .await
        .get_object()
        .bucket("network")
        .key(key)
        .send()
        .await
        .expect("the object is in the cluster");
    let stored = object
        .body
        .collect()
        .await
        .expect("object body")
        .into_bytes();
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
    assert_eq!(meta["sha256"], sha256_hex(&bytes));

    pops.remove(0).stop().await;
    for other in &pops {
        let answer = other.metadata(&handle).await;
        assert_eq!(answer["status"], "Stored");
        assert_eq!(answer["pop"], "aa");
        assert_eq!(
            sha256_hex(&other.download(&handle).await),
            sha256_hex(&bytes)
        );
    }
}

#[tokio::test]
async fn while_its_origin_is_down_a_file_in_transit_gets_503_and_once_back_is_served() {
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a_addr = a_listener.local_addr().expect("addr");
    let b_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let pops = vec![
        cin_edge::config::NetworkPop {
            id: "aa".into(),
            url: format!("http://{a_addr}"),
        },
        cin_edge::config::NetworkPop {
            id: "bb".into(),
            url: format!("http://{}", b_listener.local_addr().expect("addr")),
        },
    ];
    let configure = |id: &str, pops: Vec<cin_edge::config::NetworkPop>| {
        let id = id.to_owned();
        move |c: &mut cin_edge::Config| {
            c.server.pop_id = id;
            c.network.secret = SECRET.into();
            c.network.pops = pops;
            held_in_transit(c);
        }
    };
    let a_dir = tempfile::tempdir().expect("A's data");
    let a = crate::support::spawn_app_on(a_listener, a_dir.path(), configure("aa", pops.clone()));
    let b = spawn_app_on_fresh_dir(b_listener, configure("bb", pops.clone()));
    let bytes = random_bytes(200_000, 90);
    let handle = a
        .store_raw("/api/store/s3?filename=t.bin", bytes.clone())
        .await;
    assert_eq!(a.metadata(&handle).await["status"], "InTransit");
    a.stop().await;

    let down = b
        .http
        .get(b.url(&format!("/{handle}")))
        .send()
        .await
        .expect("read at B");
    assert_eq!(down.status(), 503);
    assert!(down.headers().contains_key("retry-after"));
    let body: Value = down.json().await.expect("json");
    assert_eq!(body["error"]["origin"], "aa");

    // A back, on its address and with its data: B serves the file again.
    let listener = tokio::net::TcpListener::bind(a_addr)
        .await
        .expect("A's address again");
    let _a = crate::support::spawn_app_on(listener, a_dir.path(), configure("aa", pops));
    assert_eq!(sha256_hex(&b.download(&handle).await), sha256_hex(&bytes));
}

/// A POP of the network (as listed) that accepts connections and then, for each
/// request head it reads, sends `answer` and nothing more, holding the
/// connection open. With an empty `answer` it never answers at all.
async fn silent_pop(answer: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if socket.write_all(answer).await.is_err() {
                    return;
                }
                // Held open, read no more: the peer's bytes pile up unread.
                std::future::pending::<()>().await;
                drop(socket);
            });
        }
    });
    url
}

/// A POP `bb` that lists `zz` at `zz_url`, with a short body idle time.
async fn pop_beside(zz_url: String) -> crate::support::TestApp {
    network_with(&["bb"], &["zz"], move |_, c| {
        c.server.body_idle_secs = 1;
        for pop in &mut c.network.pops {
            if pop.id == "zz" {
                pop.url = zz_url.clone();
            }
        }
    })
    .await
    .remove(0)
}

#[tokio::test]
async fn a_forwarded_request_its_origin_never_answers_gets_503_after_the_idle_time() {
    let b = pop_beside(silent_pop(b"").await).await;
    let patient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client");
    let resp = patient
        .put(b.url("/upload/zz345678901234567890123456789012/1?offset=0&size=3"))
        .body(b"abc".to_vec())
        .send()
        .await
        .expect("B answers before the client gives up");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["origin"], "zz");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("sent no answer for 1 s"), "{message}");
}

#[tokio::test]
async fn an_answer_its_origin_stops_sending_is_ended_after_the_idle_time() {
    let stalls = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"handle\": ";
    let b = pop_beside(silent_pop(stalls).await).await;
    let patient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client");
    let handle = "zz345678901234567890";
    let read = patient
        .get(b.url(&format!("/{handle}")))
        .send()
        .await
        .expect("the head comes through");
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["cin-pop"], "zz");
    let cut = read.bytes().await.expect_err("the body is cut short");
    assert!(!cut.is_timeout(), "B ended the body, not the client: {cut}");
    let meta = patient
        .get(b.url(&format!("/{handle}/metadata")))
        .send()
        .await
        .expect("B answers before the client gives up");
    assert_eq!(meta.status(), 503);
    let body: Value = meta.json().await.expect("json");
    assert_eq!(body["error"]["origin"], "zz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pops_on_a_seaweedfs_cluster_serve_a_file_in_transit_and_after_its_origin_is_gone() {
    use crate::fault_proxy::{FaultProxy, Faults};

    let cluster = crate::seaweedfs::SeaweedCluster::start().await;
    cluster.create_bucket("network").await;
    let profile = cluster.profile("network");
    // A reaches the cluster through a switch that refuses connections until it
    // is pointed at the cluster: A's replicator is paused meanwhile.
    let switch = FaultProxy::start(Faults::default()).await;
    let switch_url = switch.url();
    let mut pops = network_with(&["aa", "bb", "cc"], &[], |id, c| {
        let mut profile = profile.clone();
        if id == "aa" {
            profile.endpoint = switch_url.clone();
        }
        c.storage.profiles.insert("default".into(), profile);
        c.replicator.retry_base_ms = 100;
        c.replicator.retry_cap_ms = 300;
    })
    .await;

    let multipart = random_bytes(9 * crate::support::MIB + 17, 90);
    let multipart_handle = cin_upload(&pops[0].base, "m.bin", &multipart).await;
    let tus = random_bytes(3_000_017, 91);
    let (location, tus_handle) = tus_create(&pops[0], tus.len()).await;
    for (offset, piece) in [(0, &tus[..1_000_000]), (1_000_000, &tus[1_000_000..])] {
        let patched = tus_patch(&pops[0], &location, offset, piece).await;
        assert_eq!(patched.status(), 204);
    }
    let files = [(multipart_handle, &multipart), (tus_handle, &tus)];
    let range = (777, 1_000_777);
    for (handle, bytes) in &files {
        for pop in &pops {
            assert_eq!(pop.metadata(handle).await["status"], "InTransit");
            assert_eq!(sha256_hex(&pop.download(handle).await), sha256_hex(bytes));
            assert_range(pop, handle, bytes, range).await;
        }
    }

    // Every read at B and C so far came through them from A.
    let relayed = pops[1]
        .metric_with(
            "cin_network_relayed_bytes_total",
            "direction=\"from_origin\"",
        )
        .await;
    let read_elsewhere: usize = files.iter().map(|(_, b)| 2 * (b.len() + 1_000_000)).sum();
    assert!(
        relayed >= read_elsewhere as f64,
        "{relayed} < {read_elsewhere}"
    );

    switch.set_upstream(&profile.endpoint);
    for (handle, bytes) in &files {
        let meta = pops[0]
            .wait_status(handle, "Stored", std::time::Duration::from_secs(60))
            .await;
        assert_eq!(meta["sha256"], sha256_hex(bytes));
        // Once a read from A says Stored, B and C read from final storage.
        for pop in &pops[1..] {
            assert_eq!(sha256_hex(&pop.download(handle).await), sha256_hex(bytes));
            let again = assert_range(pop, handle, bytes, range).await;
            assert!(
                !again.contains_key("cin-pop"),
                "still relayed from A after it said Stored"
            );
        }
    }
    pops.remove(0).stop().await;
    for (handle, bytes) in &files {
        for pop in &pops {
            let meta = pop.metadata(handle).await;
            assert_eq!(meta["status"], "Stored");
            assert_eq!(meta["pop"], "aa");
            assert_eq!(sha256_hex(&pop.download(handle).await), sha256_hex(bytes));
            assert_range(pop, handle, bytes, range).await;
        }
    }
}

#[tokio::test]
async fn a_file_deleted_at_another_pop_is_deleted_at_its_origin_and_gone_everywhere() {
    let store = tempfile::tempdir().expect("shared store");
    let shared = store.path().to_path_buf();
    let pops = network_with(&["aa", "bb"], &[], |_, c| {
        if let Some(profile) = c.storage.profiles.get_mut("default") {
            profile.path = shared.clone();
        }
    })
    .await;
    let (a, b) = (&pops[0], &pops[1]);
    let bytes = random_bytes(20_000, 75);
    let handle = a
        .store_raw("/api/store/s3?filename=gone.bin", bytes.clone())
        .await;
    a.wait_status(&handle, "Stored", std::time::Duration::from_secs(20))
        .await;
    assert_eq!(b.download(&handle).await, bytes, "B reads it first");
    let deleted = b
        .http
        .delete(b.url(&format!("/api/file/{handle}?key=k")))
        .send()
        .await
        .expect("delete at B");
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.headers()["cin-pop"], "aa", "deleted at the origin");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while a.metric("cin_final_storage_removals_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no removal ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for pop in [a, b] {
        let read = pop
            .http
            .get(pop.url(&format!("/{handle}")))
            .send()
            .await
            .expect("read");
        assert_eq!(read.status(), 404, "{}", pop.base);
        let error: Value = read.json().await.expect("json");
        assert_eq!(error["error"]["code"], "deleted", "{}", pop.base);
    }
}
