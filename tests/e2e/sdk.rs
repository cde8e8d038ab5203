//! The official Filestack SDKs (filestack-python 4.0.0, filestack-js 3.x) as
//! shipped, uploading to a POP over HTTPS.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{random_bytes, sha256_hex, MIB};

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

/// The names the SDKs call, all at the POP inside the test's network namespace:
/// the cname's hosts, and those the SDKs use whatever the cname.
const SDK_NAMES: [&str; 6] = [
    "cin.test",
    "upload.cin.test",
    "cdn.cin.test",
    "www.cin.test",
    "www.filestackapi.com",
    "cdn.filestackcontent.com",
];

/// One file an SDK uploads.
struct SdkCase {
    name: &'static str,
    filename: &'static str,
    size: usize,
    intelligent: bool,
    /// Sent as `upload_tags`; complete and metadata give them back.
    tagged: bool,
}

const SDK_CASES: [SdkCase; 4] = [
    SdkCase {
        name: "regular",
        filename: "regular.bin",
        size: 12 * MIB + 5,
        intelligent: false,
        tagged: true,
    },
    SdkCase {
        name: "intelligent",
        filename: "intelligent.bin",
        size: 12 * MIB + 7,
        intelligent: true,
        tagged: true,
    },
    SdkCase {
        name: "empty",
        filename: "empty.bin",
        size: 0,
        intelligent: false,
        tagged: false,
    },
    SdkCase {
        name: "unicode",
        // Not text/plain: filestack-js's download turns such a body into a
        // string of UTF-16 code units, whatever its bytes.
        filename: "résumé 📄 notes.dat",
        size: 1000,
        intelligent: false,
        tagged: false,
    },
];

/// Runs an SDK driver (made by `driver` from the namespace, the CA file and
/// the cases file) against a POP serving HTTPS on 127.0.0.1:443 of a network
/// namespace of the test's own, as `https://cin.test`. Checks every file it
/// uploaded: the bytes its helper read back, the bytes this test reads back,
/// and the metadata its helper got. Returns the driver's results.
fn sdk_over_https(
    cases: &[SdkCase],
    driver: impl FnOnce(&crate::netns::Netns, &std::path::Path, &std::path::Path) -> Command,
) -> Vec<Value> {
    let ns = crate::netns::Netns::create(&SDK_NAMES);
    let dir = tempfile::tempdir().expect("temp dir");
    // 127.0.0.1 too: this test reads metadata at the POP's own address.
    let mut cert_names = SDK_NAMES.to_vec();
    cert_names.push("127.0.0.1");
    let (ca, cert, key) = crate::tls::write_dev_cert(&dir.path().join("certs"), &cert_names);
    let mut listed = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let bytes = random_bytes(case.size, 70 + i as u64);
        let path = dir.path().join(case.filename);
        std::fs::write(&path, &bytes).expect("write case file");
        let tags = case
            .tagged
            .then(|| serde_json::json!({"project": "cin", "case": case.name}));
        listed.push(serde_json::json!({
            "name": case.name, "path": path, "intelligent": case.intelligent, "tags": tags,
        }));
        expected.insert(case.name, (case.filename, bytes, tags));
    }
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&listed).expect("json")).expect("cases");
    let mut driver = driver(&ns, &ca, &cases_file);
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
            let mut app = crate::support::spawn_app_on(listener, &data_dir, |c| {
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
            app.pop.http = http.clone();
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
                // And once in final storage, its checksum is the bytes'.
                let stored = app
                    .wait_status(handle, "Stored", Duration::from_secs(60))
                    .await;
                assert_eq!(stored["sha256"], sha256_hex(&body), "{handle} stored");
                downloads.push(sha256_hex(&body));
            }
            app.stop().await;
            (results, downloads)
        })
    });
    assert_eq!(results.len(), cases.len());
    for (result, downloaded) in results.iter().zip(downloads) {
        let name = result["name"].as_str().expect("case name");
        let (filename, bytes, tags) = &expected[name];
        if let Some(tags) = tags {
            assert_eq!(
                &result["upload_tags"], tags,
                "{name}: complete's upload_tags"
            );
            assert_eq!(
                &result["metadata"]["upload_tags"], tags,
                "{name}: metadata's"
            );
        }
        let sha = sha256_hex(bytes);
        assert_eq!(
            result["content_sha256"], sha,
            "{name}: read back by the SDK"
        );
        assert_eq!(downloaded, sha, "{name}: read back over HTTPS");
        let meta = &result["metadata"];
        assert_eq!(meta["size"], bytes.len(), "{name}: metadata size");
        assert_eq!(meta["filename"], *filename, "{name}: metadata filename");
        // Known once the POP has hashed the whole file (by Stored at the latest).
        if !meta["sha256"].is_null() {
            assert_eq!(meta["sha256"], sha, "{name}: metadata sha256");
        }
    }
    results
}

/// Runs `program script --cname cin.test --cases FILE` in the namespace,
/// trusting the test CA through `ca_variable`, and checks each filelink the
/// SDK built starts with `link_base`.
fn unpatched_sdk(
    program: PathBuf,
    ca_variable: &str,
    script: &str,
    cases: &[SdkCase],
    link_base: &str,
) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/sdk")
        .join(script);
    let results = sdk_over_https(cases, |ns, ca, cases| {
        let mut driver = ns.command(&program);
        driver
            .env(ca_variable, ca)
            .arg(&script)
            .args(["--cname", "cin.test", "--cases"])
            .arg(cases);
        driver
    });
    for result in results {
        let handle = result["handle"].as_str().expect("handle");
        assert_eq!(result["url"], format!("{link_base}/{handle}"));
    }
}

/// filestack-python as shipped: regular and intelligent uploads of several
/// parts, an empty file and a unicode filename, read back with its filelink
/// and metadata helpers.
#[test]
fn filestack_python_sdk_unpatched_over_https() {
    unpatched_sdk(
        python(),
        "REQUESTS_CA_BUNDLE",
        "filestack_cases.py",
        &SDK_CASES,
        "https://cdn.cin.test",
    );
}

/// filestack-js (3.x, Node) as shipped: the same cases but the empty file
/// (the SDK refuses one itself: "Invalid file size - 0"), read back with its
/// metadata and download helpers.
#[test]
fn filestack_js_sdk_unpatched_over_https() {
    let cases: Vec<SdkCase> = SDK_CASES.into_iter().filter(|c| c.size > 0).collect();
    unpatched_sdk(
        "node".into(),
        "NODE_EXTRA_CA_CERTS",
        "js/filestack_cases.mjs",
        &cases,
        "https://cin.test",
    );
}
