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
