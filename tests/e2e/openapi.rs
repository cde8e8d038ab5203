//! `/openapi.json` tells the truth: schemathesis (run by `scripts/test`) fuzzes
//! every documented operation of a real POP, with every check it has: each
//! answer must be documented, schema-valid requests accepted, invalid ones
//! refused, no server error.

use std::path::PathBuf;
use std::process::Command;

use crate::support::spawn_app_with;

fn openapi_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/openapi")
}

fn schemathesis() -> PathBuf {
    std::env::var("CIN_TEST_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/schemathesis")
        })
}

#[tokio::test]
async fn schemathesis_finds_every_answer_documented() {
    // Small limits, so generated sizes reach them instead of the disk.
    // The admin API on, its key given to schemathesis (schemathesis.toml's [auth]).
    const ADMIN_KEY: &str = "schemathesis-admin-key-0123456789abcdef";
    let app = spawn_app_with(|c| {
        c.uploads.max_file_size = 1 << 20;
        c.admin.key = ADMIN_KEY.into();
    })
    .await;
    let reports = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(schemathesis());
    cmd.current_dir(reports.path())
        .env("PYTHONPATH", openapi_dir())
        .env("NO_COLOR", "1")
        // hooks.py asks the POP about the files it reads.
        .env("CIN_POP_URL", &app.base)
        .env("CIN_ADMIN_KEY", ADMIN_KEY)
        .arg("--config-file")
        .arg(openapi_dir().join("schemathesis.toml"))
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--checks", "all", "--max-examples", "20", "--seed", "1"])
        .args(["--generation-database", "none", "--no-color"]);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run schemathesis (scripts/test installs it)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found answers the document does not give:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every operation it loaded was tested (none skipped for a schema it cannot use).
    let count = |label: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.trim().split('/').next_back())
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{report}"))
    };
    let (selected, tested) = (count("Selected:"), count("Tested:"));
    assert!(
        selected >= 20 && tested == selected,
        "schemathesis tested {tested} of {selected} operations:\n{report}"
    );
}
