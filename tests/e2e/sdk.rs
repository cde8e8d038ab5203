//! The official Filestack Python SDK (filestack-python 4.0.0) uploading to the POP.
//! The driver script points the SDK at the POP by rewriting its https:// URLs to
//! http:// (see tests/sdk/filestack_upload.py); the POP serves plain HTTP here.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, spawn_app, MIB};

fn python() -> PathBuf {
    if let Ok(python) = std::env::var("CIN_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "the SDK tests need a Python with filestack-python: run scripts/test, or set CIN_TEST_PYTHON"
    );
    venv
}

async fn sdk_upload(intelligent: bool, seed: u64) {
    let app = spawn_app().await;
    let bytes = random_bytes(20 * MIB + 4321, seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdk-upload.bin");
    std::fs::write(&path, &bytes).unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/sdk/filestack_upload.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg("--pop")
        .arg(&app.base)
        .arg("--file")
        .arg(&path);
    if intelligent {
        cmd.arg("--intelligent");
    }
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "SDK upload failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("driver prints JSON");
    let handle = result["handle"].as_str().expect("handle");
    assert_eq!(sha256_hex(&app.download(handle).await), sha256_hex(&bytes));
    let meta = app
        .wait_status(handle, "Stored", Duration::from_secs(60))
        .await;
    assert_eq!(meta["sha256"], sha256_hex(&bytes));
    assert_eq!(meta["filename"], "sdk-upload.bin");
}

#[tokio::test]
async fn filestack_python_sdk_regular_mode() {
    sdk_upload(false, 50).await;
}

#[tokio::test]
async fn filestack_python_sdk_intelligent_mode() {
    sdk_upload(true, 51).await;
}

/// The names the SDK calls, all at the POP inside the test's network namespace.
const SDK_NAMES: [&str; 4] = [
    "cin.test",
    "upload.cin.test",
    "cdn.cin.test",
    "www.filestackapi.com",
];

/// filestack-python as shipped, over HTTPS to a POP on 127.0.0.1:443 of a
/// network namespace of the test's own: regular and intelligent uploads of
/// several parts, an empty file and a unicode filename, read back with the
/// SDK's filelink and metadata helpers and again by this test.
#[test]
fn filestack_python_sdk_unpatched_over_https() {
    let ns = crate::netns::Netns::create(&SDK_NAMES);
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = crate::tls::write_dev_cert(&dir.path().join("certs"), &SDK_NAMES);
    let cases = [
        ("regular", "regular.bin", 12 * MIB + 5, false),
        ("intelligent", "intelligent.bin", 12 * MIB + 7, true),
        ("empty", "empty.bin", 0, false),
        ("unicode", "résumé 📄 notes.txt", 1000, false),
    ];
    let mut listed = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for (i, (name, filename, size, intelligent)) in cases.iter().enumerate() {
        let bytes = random_bytes(*size, 70 + i as u64);
        let path = dir.path().join(filename);
        std::fs::write(&path, &bytes).expect("write case file");
        listed.push(serde_json::json!({"name": name, "path": path, "intelligent": intelligent}));
        expected.insert(name.to_string(), (filename.to_string(), bytes));
    }
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&listed).expect("json")).expect("cases");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/sdk/filestack_cases.py");
    let mut driver = ns.command(python());
    driver
        .env("REQUESTS_CA_BUNDLE", &ca)
        .arg(script)
        .args(["--cname", "cin.test", "--cases"])
        .arg(&cases_file);
    let data_dir = dir.path().join("pop");

    let (results, downloads) = ns.run(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:443")
                .await
                .expect("bind 127.0.0.1:443 in the namespace");
            let app = crate::support::spawn_app_on(listener, &data_dir, |c| {
                c.server.tls_cert = cert;
                c.server.tls_key = key;
                c.server.public_url = "https://cin.test".into();
            });
            let output = tokio::task::spawn_blocking(move || driver.output())
                .await
                .expect("driver task")
                .expect("the driver runs");
            assert!(
                output.status.success(),
                "the SDK failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let results: Vec<Value> =
                serde_json::from_slice(&output.stdout).expect("the driver prints JSON");
            // Read back by this test too, through the POP's public name.
            let pem = std::fs::read(&ca).expect("CA");
            let http = reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"))
                .resolve("cin.test", "127.0.0.1:443".parse().expect("addr"))
                .build()
                .expect("client");
            let mut downloads = Vec::new();
            for result in &results {
                let handle = result["handle"].as_str().expect("handle");
                let body = http
                    .get(format!("https://cin.test/{handle}"))
                    .send()
                    .await
                    .expect("download")
                    .bytes()
                    .await
                    .expect("body");
                downloads.push(sha256_hex(&body));
            }
            app.stop().await;
            (results, downloads)
        })
    });
    assert_eq!(results.len(), cases.len());
    for (result, downloaded) in results.iter().zip(downloads) {
        let name = result["name"].as_str().expect("case name");
        let (filename, bytes) = &expected[name];
        let sha = sha256_hex(bytes);
        assert_eq!(
            result["content_sha256"], sha,
            "{name}: the SDK's get_content"
        );
        assert_eq!(downloaded, sha, "{name}: read back over HTTPS");
        let handle = result["handle"].as_str().expect("handle");
        assert_eq!(result["url"], format!("https://cdn.cin.test/{handle}"));
        let meta = &result["metadata"];
        assert_eq!(meta["size"], bytes.len(), "{name}: metadata size");
        assert_eq!(
            meta["filename"],
            filename.as_str(),
            "{name}: metadata filename"
        );
        assert_eq!(meta["sha256"], sha, "{name}: metadata sha256");
    }
}
