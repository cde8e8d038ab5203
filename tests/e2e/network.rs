//! A network of POPs: every name a POP mints says which POP minted it.

use serde_json::{json, Value};

use crate::support::{spawn_app_on_fresh_dir, spawn_app_with};

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
            spawn_app_on_fresh_dir(listener, move |c| {
                c.server.pop_id = (*id).into();
                c.network.secret = SECRET.into();
                c.network.pops = pops;
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
