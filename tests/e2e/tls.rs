//! HTTPS in the POP: HTTP/2 and HTTP/1.1 by ALPN, filelinks on the https
//! scheme, a certificate replaced without a restart, the handshake bounded by
//! the head's deadline, and a certificate that does not load named at start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, spawn_app_with, TestApp};

/// A development CA and certificate for 127.0.0.1 and localhost, written to `dir`.
pub fn write_dev_cert(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let made = cin_edge::tls::dev_certificate(&names).expect("development certificate");
    std::fs::create_dir_all(dir).expect("certificate dir");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, made.ca_pem).expect("ca.pem");
    std::fs::write(&paths.1, made.cert_pem).expect("cert.pem");
    std::fs::write(&paths.2, made.key_pem).expect("key.pem");
    paths
}

/// A client that trusts only the CA in `ca` (no system roots).
fn trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("read CA");
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A POP serving HTTPS with a fresh development certificate in `dir`; its
/// client trusts that certificate's CA.
async fn tls_app(dir: &Path, tweak: impl FnOnce(&mut cin_edge::Config)) -> (TestApp, PathBuf) {
    let (ca, cert, key) = write_dev_cert(dir, &["127.0.0.1", "localhost"]);
    let mut app = spawn_app_with(|c| {
        c.server.tls_cert = cert;
        c.server.tls_key = key;
        tweak(c);
    })
    .await;
    assert!(app.base.starts_with("https://"), "{}", app.base);
    app.pop.http = trusting(&ca);
    (app, ca)
}

/// `curl` over HTTP/2 (or 1.1): the body and the HTTP version it spoke.
fn curl(ca: &Path, http2: bool, args: &[&str]) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let body = dir.path().join("body");
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(ca)
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(["--write-out", "%{http_version}", "--output"])
        .arg(&body)
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        std::fs::read(&body).expect("curl body"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_http2_and_http1_with_identical_bytes_and_https_filelinks() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (app, ca) = tls_app(certs.path(), |_| {}).await;
    let bytes = random_bytes(3_000_001, 60);
    let file = certs.path().join("upload.bin");
    std::fs::write(&file, &bytes).expect("write upload");
    let upload = format!("@{}", file.display());
    let store_url = app.url("/api/store/s3?filename=upload.bin");
    let (answer, version) = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || curl(&ca, true, &["--data-binary", &upload, &store_url])
    })
    .await
    .expect("curl task");
    assert_eq!(version, "2", "ALPN chose HTTP/2");
    let answer: Value = serde_json::from_slice(&answer).expect("JSON answer");
    let handle = answer["handle"].as_str().expect("handle").to_owned();
    assert_eq!(answer["url"], app.url(&format!("/{handle}")));

    for http2 in [true, false] {
        let link = app.url(&format!("/{handle}"));
        let ca = ca.clone();
        let (got, version) = tokio::task::spawn_blocking(move || curl(&ca, http2, &[&link]))
            .await
            .expect("curl task");
        assert_eq!(version, if http2 { "2" } else { "1.1" });
        assert_eq!(sha256_hex(&got), sha256_hex(&bytes));
    }
    // The multipart API names this POP's https host in location_url.
    let started = app
        .start(serde_json::json!({"apikey": "k", "filename": "a.bin", "size": 3, "mimetype": "application/octet-stream"}))
        .await;
    let host = app.base.trim_start_matches("https://");
    assert_eq!(started["location_url"], host);
    assert_eq!(
        sha256_hex(&app.download(&handle).await),
        sha256_hex(&bytes),
        "reqwest over HTTP/1.1 too"
    );
}

#[tokio::test]
async fn a_new_certificate_is_served_without_a_restart() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (app, _) = tls_app(certs.path(), |c| c.server.tls_reload_secs = 1).await;
    // A second CA: a client trusting only it is refused until its certificate is served.
    let next = tempfile::tempdir().expect("temp dir");
    let (next_ca, next_cert, next_key) = write_dev_cert(next.path(), &["127.0.0.1"]);
    let next_client = trusting(&next_ca);
    assert!(
        next_client.get(app.url("/healthz")).send().await.is_err(),
        "the new CA is trusted before its certificate is in place"
    );
    std::fs::copy(&next_key, certs.path().join("key.pem")).expect("replace key");
    std::fs::copy(&next_cert, certs.path().join("cert.pem")).expect("replace cert");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = next_client.get(app.url("/healthz")).send().await {
            assert_eq!(resp.status(), 200);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Connections made with the old CA's trust now fail: the old certificate is gone.
    assert!(app.http.get(app.url("/healthz")).send().await.is_err());
}

#[tokio::test]
async fn a_connection_that_never_starts_its_handshake_is_closed_after_the_head_time() {
    use tokio::io::AsyncReadExt;
    let certs = tempfile::tempdir().expect("temp dir");
    let (app, _) = tls_app(certs.path(), |c| c.server.head_timeout_secs = 1).await;
    let mut socket = tokio::net::TcpStream::connect(app.base.trim_start_matches("https://"))
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut buf))
        .await
        .expect("the POP closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Others are still served.
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
}

#[tokio::test]
async fn a_certificate_that_does_not_load_stops_the_start_naming_the_file() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (_, cert, _) = write_dev_cert(certs.path(), &["127.0.0.1"]);
    let missing = certs.path().join("no-such-key.pem");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let data = tempfile::tempdir().expect("temp dir");
    let mut config = cin_edge::Config::default();
    config.server.data_dir = data.path().to_path_buf();
    config.server.tls_cert = cert;
    config.server.tls_key = missing.clone();
    let error = cin_edge::run(listener, config, std::future::pending::<()>())
        .await
        .expect_err("the POP does not start");
    let message = format!("{error:#}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
}
