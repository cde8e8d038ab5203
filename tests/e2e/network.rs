//! A network of POPs: every name a POP mints says which POP minted it.

use serde_json::{json, Value};

use crate::support::spawn_app_with;

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
