//! Router-level tests: the state built without a listener, requests driven with
//! `oneshot`, for what a real client cannot produce on the wire.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

async fn router(dir: &std::path::Path) -> axum::Router {
    let mut config = cin_edge::Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.disk.min_free_bytes = 0;
    let state = cin_edge::app::open_state(config).await.expect("state");
    cin_edge::app::router(state)
}

fn tus(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("tus-resumable", "1.0.0")
}

/// A body that fails after some bytes while the request goes on (a proxy or
/// runtime error, not a closed socket): what arrived is kept and reported.
#[tokio::test]
async fn a_body_that_fails_mid_patch_keeps_its_durable_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(dir.path()).await;
    let created = app
        .clone()
        .oneshot(
            tus("POST", "/files/")
                .header("upload-length", "10")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let path = location
        .trim_start_matches("http://127.0.0.1:80")
        .to_owned();

    let failing = futures_util::stream::iter(vec![
        Ok(bytes::Bytes::from_static(b"hello")),
        Err(std::io::Error::other("upstream reset")),
    ]);
    let patched = app
        .clone()
        .oneshot(
            tus("PATCH", &path)
                .header("upload-offset", "0")
                .header("content-type", "application/offset+octet-stream")
                .body(Body::from_stream(failing))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::NO_CONTENT);
    assert_eq!(patched.headers()["upload-offset"], "5");
    let head = app
        .clone()
        .oneshot(tus("HEAD", &path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        head.headers()["upload-offset"],
        "5",
        "the prefix is durable and recorded"
    );

    // Without the tus version header, every tus call is refused the same way.
    let refused = app
        .oneshot(
            Request::builder()
                .method("HEAD")
                .uri(&path)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(refused.headers()["tus-version"], "1.0.0");
}
