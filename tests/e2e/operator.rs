//! What an operator meets first: `check-config` and the messages of a bad
//! configuration, `serve --help`, the start-up summary and the access log, a
//! data directory already in use, the metrics' help and families, and a storage
//! profile whose store cannot be reached.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::{s3_profile, spawn_app_with, PopProcess};

fn cin_edge(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cin-edge"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run cin-edge")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_config(dir: &Path, toml: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

/// A port nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[server]
listen = "0.0.0.0:9999"

[apps.acme]
apikey = "AcmeKey"
secret = "the-acme-secret-never-printed"

[storage.profiles.customer]
kind = "s3"
bucket = "customer-bucket"
access_key_id = "AKIAEXAMPLE"
secret_access_key = "s3-secret-never-printed"
"#,
    );
    let out = cin_edge(
        &["check-config", "--config", &config],
        &[(
            "CIN__UPLOADS__URL_SIGNING_SECRET",
            "url-secret-never-printed",
        )],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    // What the file and the environment set, over the defaults.
    assert!(stdout.contains("listen = \"0.0.0.0:9999\""), "{stdout}");
    assert!(stdout.contains("bucket = \"customer-bucket\""), "{stdout}");
    assert!(stdout.contains("max_file_size = 5497558138880"), "{stdout}");
    assert!(
        stdout.contains("access_key_id = \"AKIAEXAMPLE\""),
        "{stdout}"
    );
    for secret in [
        "the-acme-secret-never-printed",
        "s3-secret-never-printed",
        "url-secret-never-printed",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    assert_eq!(stdout.matches("\"********\"").count(), 3, "{stdout}");
    // The printed configuration is itself a valid configuration file.
    let printed = write_config(dir.path(), stdout.as_str());
    let again = cin_edge(&["check-config", "--config", &printed], &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn a_bad_environment_variable_is_named_with_its_value() {
    let out = cin_edge(
        &["check-config"],
        &[("CIN__SERVER__LISTEN", "localhost-8080")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("CIN__SERVER__LISTEN"), "{stderr}");
    assert!(stderr.contains("\"localhost-8080\""), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!stderr.contains("Kind::"), "{stderr}");
}

#[test]
fn a_bad_value_in_the_file_is_named_with_the_file_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[uploads]\nmax_file_size = \"big\"\n");
    let out = cin_edge(&["check-config", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("uploads.max_file_size = \"big\" (from {config})")),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
    // A misspelt setting is named, with the ones that exist there.
    let config = write_config(dir.path(), "[server]\nlisen = \"0.0.0.0:1\"\n");
    let out = cin_edge(&["check-config", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{config}: unknown setting server.lisen; the settings here are listen, "
        )),
        "{stderr}"
    );
}

#[test]
fn a_half_configured_storage_profile_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // A profile that forgot its kind would otherwise become a local directory.
    let config = write_config(
        dir.path(),
        "[storage.profiles.acme]\nbucket = \"acme-uploads\"\nregion = \"eu-west-1\"\n",
    );
    let out = cin_edge(&["check-config", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("storage.profiles.acme has no kind"),
        "{stderr}"
    );
    assert!(stderr.contains("kind = \"s3\""), "{stderr}");

    let config = write_config(
        dir.path(),
        "[storage.profiles.acme]\nkind = \"local\"\nendpoint = \"http://10.0.0.9:9000\"\n",
    );
    let out = cin_edge(&["check-config", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is a local profile but sets endpoint"),
        "{stderr}"
    );

    let out = cin_edge(
        &["serve", "--data-dir", &dir.path().display().to_string()],
        &[("CIN__STORAGE__PROFILES__ACME__KIND", "s3")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("without a bucket"), "{stderr}");
    assert!(
        stderr.contains("CIN__STORAGE__PROFILES__ACME__BUCKET"),
        "{stderr}"
    );
}

#[test]
fn the_built_in_default_profile_goes_when_another_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[storage]\ndefault_profile = \"main\"\n[storage.profiles.main]\nkind = \"local\"\npath = \"main-store\"\n",
    );
    let out = cin_edge(&["check-config", "--config", &config], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("[storage.profiles.main]"), "{stdout}");
    assert!(!stdout.contains("[storage.profiles.default]"), "{stdout}");

    // Kept, and adjustable setting by setting, while it is the default.
    let out = cin_edge(
        &["check-config"],
        &[("CIN__STORAGE__PROFILES__DEFAULT__PATH", "/srv/origin")],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("[storage.profiles.default]"), "{stdout}");
    assert!(stdout.contains("path = \"/srv/origin\""), "{stdout}");
}

#[test]
fn serve_help_says_where_configuration_comes_from() {
    let out = cin_edge(&["serve", "--help"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("CIN__SECTION__KEY"), "{stdout}");
    assert!(stdout.contains("CIN__SERVER__LISTEN"), "{stdout}");
    assert!(stdout.contains("config/default.toml"), "{stdout}");
    assert!(stdout.contains("check-config"), "{stdout}");
}

#[test]
fn a_second_pop_on_the_same_data_directory_says_another_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = PopProcess::start(dir.path());
    let out = cin_edge(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir.path().display().to_string(),
        ],
        &[("CIN__DISK__METADATA_RESERVE_BYTES", "0")],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert!(stderr.contains("stop the other cin-edge"), "{stderr}");
    assert!(!stderr.contains("WouldBlock"), "{stderr}");
    assert!(!stderr.contains("Os {"), "{stderr}");
    drop(first);
}

#[tokio::test]
async fn the_log_has_a_start_summary_and_one_plain_access_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let pop = PopProcess::start(dir.path());
    let summary = pop.wait_for_log(Duration::from_secs(10), |l| l.contains("listening on"));
    // The summary's last line: a human log prints the message's lines one by one.
    pop.wait_for_log(Duration::from_secs(10), |l| l.contains("readiness at"));
    let log = pop.log_lines().join("\n");
    assert!(summary.contains(&pop.base), "{log}");
    for part in [
        "data directory:",
        "storage profile \"default\", the default: local:",
        "(ok)",
        "tus at",
        "upload page:",
        "apps: none configured",
    ] {
        assert!(
            log.contains(part),
            "{part:?} missing from the start summary:\n{log}"
        );
    }

    let response = pop
        .http
        .get(pop.url("/healthz?apikey=not-logged"))
        .header("x-request-id", "req-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    let line = pop.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("cin_edge::access") && l.contains("req-1234")
    });
    assert!(line.contains("GET /healthz 200"), "{line}");
    assert!(line.contains("route=/healthz"), "{line}");
    assert!(
        line.contains(&format!("bytes_out={}", body.len())),
        "{line}"
    );
    assert!(line.contains("bytes_in=0"), "{line}");
    assert!(line.contains("complete=true"), "{line}");
    assert!(line.contains(" ms="), "{line}");
    assert!(
        !line.contains("not-logged"),
        "the query is not logged: {line}"
    );

    let stored = pop
        .http
        .post(pop.url("/api/store/s3?filename=a.bin"))
        .header("x-request-id", "req-5678")
        .body(vec![7u8; 12345])
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    let line = pop.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("cin_edge::access") && l.contains("req-5678")
    });
    assert!(line.contains("POST /api/store/s3 200"), "{line}");
    assert!(line.contains("bytes_in=12345"), "{line}");

    // A pipe is not a terminal: no colour codes.
    let log = pop.log_lines().join("\n");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log:\n{log}"
    );
}

/// Every family the README documents, reported from the start.
const DOCUMENTED_FAMILIES: [&str; 30] = [
    "cin_uploads_started_total",
    "cin_uploads_completed_total",
    "cin_uploads_failed_total",
    "cin_bytes_received_total",
    "cin_chunk_failures_total",
    "cin_replication_attempts_total",
    "cin_replication_failures_total",
    "cin_replication_given_up_total",
    "cin_replicated_bytes_total",
    "cin_replication_duration_seconds",
    "cin_replication_queue_depth",
    "cin_replication_lag_seconds",
    "cin_disk_used_bytes",
    "cin_disk_free_bytes",
    "cin_disk_reserved_bytes",
    "cin_data_bytes",
    "cin_cache_evictions_total",
    "cin_files_deleted_total",
    "cin_final_storage_removals_total",
    "cin_orphans_removed_total",
    "cin_orphan_bytes_freed_total",
    "cin_files_missing_local_bytes",
    "cin_event_streams",
    "cin_bodies_receiving",
    "cin_requests_shed_total",
    "cin_connections_closed_total",
    "cin_connections_open",
    "cin_network_relayed_bytes_total",
    "cin_network_origin_unreachable_total",
    "cin_storage_profile_up",
];

#[tokio::test]
async fn every_metric_family_has_help_and_a_type_and_is_there_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let pop = PopProcess::start(dir.path());
    let text = pop.metrics_text().await;
    let mut missing = Vec::new();
    for family in DOCUMENTED_FAMILIES {
        let help = text.contains(&format!("# HELP {family} "));
        let kind = text.contains(&format!("# TYPE {family} "));
        let sample = text.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{family} "))
                    || l.starts_with(&format!("{family}{{"))
                    || l.starts_with(&format!("{family}_count")))
        });
        if !(help && kind && sample) {
            missing.push(format!(
                "{family} (help {help}, type {kind}, sample {sample})"
            ));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}\n{text}");
    // Labelled counters start at 0 for each of their documented label values.
    assert!(
        text.contains("cin_chunk_failures_total{reason=\"md5_mismatch\"} 0"),
        "{text}"
    );
    // Every family the POP reports has help, the HTTP ones included.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no help"
        );
    }
}

#[tokio::test]
async fn an_unreachable_s3_profile_is_reported_failing_and_its_uploads_still_accepted() {
    let port = closed_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let app = spawn_app_with(|c| {
        c.storage
            .profiles
            .insert("acme".into(), s3_profile(&endpoint, "acme-bucket"));
    })
    .await;
    let expected = format!("cannot reach {endpoint}: connection refused");

    // Ready (its default store answers), with the failing profile named.
    let resp = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["storage"]["acme"]["state"], "failing", "{body}");
    assert_eq!(
        body["storage"]["acme"]["message"],
        expected.as_str(),
        "{body}"
    );
    assert_eq!(body["storage"]["default"]["state"], "ok", "{body}");
    assert!(
        body["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains(&expected) && w.contains("\"acme\"")),
        "{body}"
    );
    assert!(
        app.metrics_text()
            .await
            .contains("cin_storage_profile_up{profile=\"acme\"} 0"),
        "{}",
        app.metrics_text().await
    );

    // Uploads for it are accepted and wait here, with the reason in words.
    let handle = app
        .store_raw(
            "/api/store/s3?filename=a.txt&container=acme-bucket",
            b"hello".to_vec(),
        )
        .await;
    let meta = app
        .wait_failing_replication(&handle, Duration::from_secs(30))
        .await;
    assert_eq!(meta["status"], "InTransit", "{meta}");
    assert_eq!(
        meta["replication"]["last_error"],
        expected.as_str(),
        "{meta}"
    );
    assert_eq!(meta["replication"]["store"]["state"], "failing", "{meta}");
    assert_eq!(app.download(&handle).await, b"hello");
}

#[tokio::test]
async fn a_raw_store_takes_its_type_from_the_parameter_then_the_filename() {
    let app = spawn_app_with(|_| {}).await;
    // What curl --data-binary sends when told nothing.
    let form = "application/x-www-form-urlencoded";
    for (query, content_type, expected) in [
        ("filename=notes.txt", Some(form), "text/plain"),
        ("filename=photo.JPG", Some(form), "image/jpeg"),
        ("filename=data.bin", Some(form), "application/octet-stream"),
        ("filename=data.bin", Some("image/png"), "image/png"),
        (
            "filename=notes.txt&mimetype=text/csv",
            Some(form),
            "text/csv",
        ),
        ("filename=clip.webm", None, "video/webm"),
    ] {
        let mut request = app
            .http
            .post(app.url(&format!("/api/store/s3?{query}")))
            .body("a,b\n1,2\n");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["type"], expected,
            "{query} with {content_type:?}: {body}"
        );
        let handle = body["handle"].as_str().unwrap();
        assert_eq!(app.metadata(handle).await["mimetype"], expected, "{query}");
    }
}
