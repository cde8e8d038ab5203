//! Store from URL: `POST /api/store/{location}` with `url=` (a form, JSON or
//! the query). The POP fetches the file, streaming, within the size and time
//! limits, and never from private, loopback or link-local addresses unless
//! `uploads.fetch_allow` names them.

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::support::{random_bytes, sha256_hex, spawn_app_with, TestApp};

/// A server on 127.0.0.1 with the files the tests fetch; its base URL.
async fn remote(bytes: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let whole = bytes.clone();
    let endless = bytes;
    let router =
        Router::new()
            .route(
                "/files/photo.jpg",
                get(move || async move {
                    ([(header::CONTENT_TYPE, "image/jpeg")], whole).into_response()
                }),
            )
            // No Content-Length: the size is known only as the bytes come.
            .route(
                "/endless",
                get(move || async move {
                    let chunk = axum::body::Bytes::from(endless);
                    let stream = futures_util::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                    axum::body::Body::from_stream(stream)
                }),
            )
            .route(
                "/stalls",
                get(|| async {
                    let stream = futures_util::stream::once(async {
                        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"a few bytes"))
                    })
                    .chain(futures_util::stream::pending());
                    axum::body::Body::from_stream(stream)
                }),
            )
            .route(
                "/to-private",
                get(|| async {
                    (
                        StatusCode::FOUND,
                        [(header::LOCATION, "http://10.0.0.1/secret")],
                    )
                }),
            )
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    base
}

use futures_util::StreamExt;

async fn store_from(app: &TestApp, body: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = body.send().await.expect("store request");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let _ = app;
    (status, resp.json().await.expect("JSON answer"))
}

async fn allowing_loopback(tweak: impl FnOnce(&mut cin_edge::Config)) -> TestApp {
    spawn_app_with(|c| {
        c.uploads.fetch_allow = vec!["127.0.0.1/32".into()];
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn a_url_in_a_form_json_or_the_query_becomes_an_upload_like_any_other() {
    let bytes = random_bytes(1_500_000, 110);
    let base = remote(bytes.clone()).await;
    let app = allowing_loopback(|_| {}).await;
    let url = format!("{base}/files/photo.jpg");
    let store = app.url("/api/store/s3?key=k");
    for (how, request) in [
        ("form", app.http.post(&store).form(&[("url", url.as_str())])),
        ("json", app.http.post(&store).json(&json!({"url": url}))),
        (
            "query",
            app.http.post(format!("{store}&url={}", urlencoding(&url))),
        ),
    ] {
        let (status, answer) = store_from(&app, request).await;
        assert_eq!(status, 200, "{how}: {answer}");
        assert_eq!(answer["filename"], "photo.jpg", "{how}");
        assert_eq!(answer["type"], "image/jpeg", "{how}");
        assert_eq!(answer["size"], bytes.len(), "{how}");
        let handle = answer["handle"].as_str().expect("handle");
        assert_eq!(
            sha256_hex(&app.download(handle).await),
            sha256_hex(&bytes),
            "{how}"
        );
        let meta = app
            .wait_status(handle, "Stored", Duration::from_secs(30))
            .await;
        assert_eq!(meta["sha256"], sha256_hex(&bytes), "{how}");
    }
    // A small form without url= is a file like before (curl's default type).
    let (status, answer) = store_from(
        &app,
        app.http
            .post(&store)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("hello=world"),
    )
    .await;
    assert_eq!(status, 200);
    let handle = answer["handle"].as_str().expect("handle");
    assert_eq!(app.download(handle).await, b"hello=world");
}

fn urlencoding(text: &str) -> String {
    serde_urlencoded::to_string([("u", text)]).expect("encode")[2..].to_owned()
}

#[tokio::test]
async fn private_destinations_are_refused_unless_allowed_and_redirects_are_checked_again() {
    let base = remote(b"secret".to_vec()).await;
    let closed = spawn_app_with(|_| {}).await;
    let store = closed.url("/api/store/s3?key=k");
    let port = base.rsplit(':').next().expect("port");
    for target in [
        format!("{base}/files/photo.jpg"),
        format!("http://localhost:{port}/files/photo.jpg"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::1]/".to_owned(),
        "file:///etc/passwd".to_owned(),
    ] {
        let (status, answer) = store_from(
            &closed,
            closed.http.post(&store).form(&[("url", target.as_str())]),
        )
        .await;
        assert_eq!(status, 400, "{target}: {answer}");
        assert_eq!(answer["error"]["code"], "url_refused", "{target}: {answer}");
    }
    // Allowed at the first hop, refused at the redirect to a private address.
    let open = allowing_loopback(|_| {}).await;
    let store = open.url("/api/store/s3?key=k");
    let target = format!("{base}/to-private");
    let (status, answer) = store_from(
        &open,
        open.http.post(&store).form(&[("url", target.as_str())]),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "url_refused", "{answer}");
    let target = format!("{base}/missing");
    let (status, answer) = store_from(
        &open,
        open.http.post(&store).form(&[("url", target.as_str())]),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "url_fetch_failed", "{answer}");
}

#[tokio::test]
async fn a_fetch_is_bounded_in_size_and_time() {
    let base = remote(random_bytes(64 * 1024, 111)).await;
    let app = allowing_loopback(|c| {
        c.uploads.max_file_size = 1_000_000;
        c.uploads.fetch_timeout_secs = 1;
    })
    .await;
    let store = app.url("/api/store/s3?key=k");
    let target = format!("{base}/endless");
    let (status, answer) = store_from(
        &app,
        app.http.post(&store).form(&[("url", target.as_str())]),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    let target = format!("{base}/stalls");
    let (status, answer) = store_from(
        &app,
        app.http.post(&store).form(&[("url", target.as_str())]),
    )
    .await;
    assert!(status.is_client_error(), "{status}: {answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
    assert_eq!(app.upload_dirs(), 0, "nothing of either is kept");
}
