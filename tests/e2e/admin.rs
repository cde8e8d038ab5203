//! The operator's admin API and `cin-edge admin`: a paginated, filtered listing
//! of a POP's files, and retry or cancel of a failing replication, against real
//! POPs (an S3 store that is down, then up again; a store that never answers).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cin_domain::Handle;
use cin_edge::Config;
use cin_storage::{JobChange, MetadataStore, SledMetadataStore};
use serde_json::{json, Value};

use crate::support::{random_bytes, spawn_app, spawn_app_in, spawn_app_with, S3Server, TestApp};

const KEY: &str = "admin-key-for-the-tests-0123456789abcdef";
/// A bucket whose store never answers: its files stay `InTransit`, failing.
const HELD: &str = "held-bucket";
const WAIT: Duration = Duration::from_secs(60);

fn with_admin(c: &mut Config) {
    c.admin.key = KEY.into();
}

/// Files for bucket [`HELD`] go to a store at a closed port.
fn held_profile(c: &mut Config) {
    c.storage.profiles.insert(
        "held".into(),
        cin_edge::config::StorageProfile {
            kind: cin_edge::config::ProfileKind::S3,
            bucket: HELD.into(),
            endpoint: "http://127.0.0.1:9".into(),
            force_path_style: true,
            access_key_id: "nobody".into(),
            secret_access_key: "nothing".into(),
            ..Default::default()
        },
    );
}

fn two_apps(c: &mut Config) {
    for (name, apikey) in [("acme", "acme-key"), ("beta", "beta-key")] {
        c.apps.insert(
            name.into(),
            cin_edge::config::AppConfig {
                apikey: apikey.into(),
                secret: "s3cret".into(),
                ..Default::default()
            },
        );
    }
}

async fn get_files(app: &TestApp, query: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/api/files?{query}")))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("list request")
}

/// One page of `GET /api/files?{query}`, which must succeed.
async fn page(app: &TestApp, query: &str) -> Value {
    let resp = get_files(app, query).await;
    let status = resp.status();
    let body: Value = resp.json().await.expect("listing json");
    assert_eq!(status, 200, "{query}: {body}");
    body
}

fn handles_of(page: &Value) -> Vec<String> {
    page["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["handle"].as_str().expect("handle").to_owned())
        .collect()
}

/// Every page of a listing, following `next_cursor`.
async fn pages(app: &TestApp, query: &str) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let answer = page(app, &q).await;
        all.push(handles_of(&answer));
        match answer["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return all,
        }
        assert!(all.len() < 100, "the listing never ends: {all:?}");
    }
}

/// The set of handles a listing gives, over every page.
async fn listed(app: &TestApp, query: &str) -> BTreeSet<String> {
    pages(app, query).await.into_iter().flatten().collect()
}

/// The listing's item for `handle`.
async fn item(app: &TestApp, handle: &str) -> Value {
    let answer = page(app, "limit=1000").await;
    answer["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["handle"] == handle)
        .cloned()
        .unwrap_or_else(|| panic!("{handle} is not listed: {answer}"))
}

async fn action(app: &TestApp, handle: &str, action: &str) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/api/files/{handle}/replication/{action}")))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("action request")
}

/// The answer to an action, which must be `status`.
async fn act(app: &TestApp, handle: &str, verb: &str, status: u16) -> Value {
    let resp = action(app, handle, verb).await;
    let got = resp.status();
    let body: Value = resp.json().await.expect("action json");
    assert_eq!(got, status, "{verb} {handle}: {body}");
    body
}

fn set(handles: impl IntoIterator<Item = impl ToString>) -> BTreeSet<String> {
    handles.into_iter().map(|h| h.to_string()).collect()
}

fn attempts(meta: &Value) -> u64 {
    meta["replication"]["attempts"].as_u64().expect("attempts")
}

#[tokio::test]
async fn the_listing_pages_through_every_file_once_and_filters_by_status_app_and_container() {
    let app = spawn_app_with(|c| {
        with_admin(c);
        two_apps(c);
        held_profile(c);
    })
    .await;
    let mut stored = BTreeSet::new();
    for i in 0..7 {
        let path = format!("/api/store/s3?key=acme-key&filename=s{i}.txt&mimetype=text/plain");
        stored.insert(
            app.store_raw(&path, format!("stored {i}").into_bytes())
                .await,
        );
    }
    let mut held = BTreeSet::new();
    for i in 0..3 {
        let path = format!("/api/store/s3?key=beta-key&filename=h{i}.bin&container={HELD}");
        held.insert(app.store_raw(&path, random_bytes(1000 + i, i as u64)).await);
    }
    let started = app
        .start(json!({"apikey": "acme-key", "filename": "u.bin", "size": 10, "store": {"location": "s3"}}))
        .await;
    let uploading = started["handle"].as_str().expect("handle").to_owned();
    for handle in &stored {
        app.wait_status(handle, "Stored", WAIT).await;
    }
    for handle in &held {
        app.wait_failing_replication(handle, WAIT).await;
    }
    let everything: BTreeSet<String> = stored
        .iter()
        .chain(&held)
        .cloned()
        .chain([uploading.clone()])
        .collect();

    // More files than a page holds: pages are disjoint and together complete,
    // in handle order.
    let stored_pages = pages(&app, "status=Stored&limit=3").await;
    assert_eq!(
        stored_pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 1],
        "{stored_pages:?}"
    );
    let flat: Vec<String> = stored_pages.concat();
    assert_eq!(flat.iter().cloned().collect::<BTreeSet<_>>(), stored);
    assert_eq!(flat.len(), stored.len(), "no file on two pages");
    let every_page = pages(&app, "limit=4").await;
    assert!(every_page.iter().all(|p| p.len() <= 4));
    let all: Vec<String> = every_page.concat();
    assert_eq!(
        all,
        everything.iter().cloned().collect::<Vec<_>>(),
        "every file once, in handle order"
    );
    assert_eq!(listed(&app, "").await, everything, "default page size");

    // Filters.
    assert_eq!(listed(&app, "status=InTransit").await, held);
    assert_eq!(listed(&app, "status=Uploading").await, set([&uploading]));
    assert_eq!(listed(&app, "replication=failing").await, held);
    assert_eq!(
        listed(&app, "status=InTransit&replication=failing&limit=1").await,
        held
    );
    let acme: BTreeSet<String> = stored.iter().cloned().chain([uploading.clone()]).collect();
    assert_eq!(listed(&app, "app=acme").await, acme, "by app name");
    assert_eq!(listed(&app, "app=acme-key").await, acme, "by API key");
    assert_eq!(listed(&app, "app=beta").await, held);
    assert!(listed(&app, "app=nobody").await.is_empty());
    assert!(listed(&app, "status=Stored&app=beta").await.is_empty());
    assert_eq!(listed(&app, &format!("container={HELD}")).await, held);
    assert_eq!(listed(&app, "container=default").await, acme);
    assert_eq!(listed(&app, "older_than=0").await, everything);
    assert!(
        listed(&app, "older_than=86400").await.is_empty(),
        "every file changed status within the day"
    );

    // What an item says.
    let some_stored = stored.iter().next().expect("a stored file");
    let file = item(&app, some_stored).await;
    assert_eq!(file["status"], "Stored");
    assert_eq!(file["app"], "acme");
    assert_eq!(file["container"], "default");
    assert_eq!(file["mimetype"], "text/plain");
    assert_eq!(file["url"], app.url(&format!("/{some_stored}")));
    assert!(file["filename"]
        .as_str()
        .is_some_and(|n| n.starts_with('s')));
    assert_eq!(file["size"], "stored 0".len());
    let (created, updated) = (
        file["created_at"].as_u64().expect("created_at"),
        file["updated_at"].as_u64().expect("updated_at"),
    );
    assert!(created <= updated, "{file}");
    assert_eq!(
        updated,
        app.metadata(some_stored).await["replication"]["stored_at"]
            .as_u64()
            .expect("stored_at"),
        "a stored file last changed when it was stored"
    );
    assert_eq!(file["replication"]["failing"], false);
    assert!(file["replication"]["next_attempt_at"].is_null());
    let some_held = held.iter().next().expect("a held file");
    let file = item(&app, some_held).await;
    assert_eq!(file["status"], "InTransit");
    assert_eq!(file["app"], "beta");
    assert_eq!(file["container"], HELD);
    let replication = &file["replication"];
    assert_eq!(replication["failing"], true, "{file}");
    assert_eq!(replication["cancelled"], false);
    assert_eq!(replication["given_up"], false);
    assert!(attempts(&file) >= 2, "{file}");
    assert!(replication["last_error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert!(replication["next_attempt_at"].is_u64(), "{file}");

    // Parameters that are not what they should be are refused, by name.
    for (query, parameter) in [
        ("status=Lost", "status"),
        ("status=Expired", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("older_than=-5", "older_than"),
        ("older_than=soon", "older_than"),
        ("replication=ok", "replication"),
        ("cursor=not-a-cursor", "cursor"),
        ("container=Not_A_Bucket", "container"),
        ("colour=blue", "colour"),
    ] {
        let resp = get_files(&app, query).await;
        assert_eq!(resp.status(), 400, "{query}");
        let body: Value = resp.json().await.expect("error json");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(parameter), "{query}: {message}");
    }
}

/// Moves a stored record's times back by `by_ms`, as if it had happened then;
/// `stored_too` moves the time it was stored as well.
fn age_record(meta: &SledMetadataStore, handle: &str, by_ms: u64, stored_too: bool) {
    let handle = Handle::parse(handle).expect("handle");
    let mut file = meta.get_file(&handle).expect("read").expect("record");
    file.created_at_ms -= by_ms;
    file.completed_at_ms = file.completed_at_ms.map(|t| t - by_ms);
    if stored_too {
        file.stored_at_ms = file.stored_at_ms.map(|t| t - by_ms);
    }
    meta.put_file(&file, JobChange::Keep).expect("write");
}

#[tokio::test]
async fn older_than_counts_from_the_last_status_change() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), with_admin).await;
    let old = app
        .store_raw("/api/store/s3?filename=old.txt", b"old".to_vec())
        .await;
    let restored = app
        .store_raw("/api/store/s3?filename=restored.txt", b"restored".to_vec())
        .await;
    let fresh = app
        .store_raw("/api/store/s3?filename=fresh.txt", b"fresh".to_vec())
        .await;
    for handle in [&old, &restored, &fresh] {
        app.wait_status(handle, "Stored", WAIT).await;
    }
    app.stop().await;

    // As if `old` was uploaded and stored two days ago, and `restored` was
    // uploaded two days ago but only stored now.
    const TWO_DAYS_MS: u64 = 2 * 86_400_000;
    {
        let meta = SledMetadataStore::open(&dir.path().join("metadata")).expect("metadata");
        age_record(&meta, &old, TWO_DAYS_MS, true);
        age_record(&meta, &restored, TWO_DAYS_MS, false);
        meta.flush().await.expect("flush");
    }
    let app = spawn_app_in(dir.path(), with_admin).await;
    assert_eq!(listed(&app, "older_than=86400").await, set([&old]));
    assert_eq!(
        listed(&app, "older_than=86400&status=Stored").await,
        set([&old])
    );
    assert!(listed(&app, "older_than=259200").await.is_empty());
    assert_eq!(
        listed(&app, "older_than=0").await,
        set([&old, &restored, &fresh])
    );
    let file = item(&app, &restored).await;
    assert!(
        file["updated_at"].as_u64() > file["created_at"].as_u64(),
        "{file}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_admin_api_needs_its_key_and_is_off_without_one() {
    let app = spawn_app_with(with_admin).await;
    let handle = app
        .store_raw("/api/store/s3?filename=a.txt", b"a".to_vec())
        .await;
    let calls = [
        ("GET", "/api/files".to_owned()),
        ("POST", format!("/api/files/{handle}/replication/retry")),
        ("POST", format!("/api/files/{handle}/replication/cancel")),
    ];
    let send = |method: &str, path: &str, auth: Option<String>| {
        let mut request = match method {
            "GET" => app.http.get(app.url(path)),
            _ => app.http.post(app.url(path)),
        };
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    for (method, path) in &calls {
        for (auth, status, code) in [
            (None, 401, "unauthorized"),
            (Some(KEY.to_owned()), 401, "unauthorized"),
            (Some(format!("Basic {KEY}")), 401, "unauthorized"),
            (
                Some("Bearer not-the-key".to_owned()),
                403,
                "admin_key_refused",
            ),
            (Some(format!("Bearer {KEY}x")), 403, "admin_key_refused"),
        ] {
            let resp = send(method, path, auth.clone()).await.expect("request");
            assert_eq!(resp.status(), status, "{method} {path} with {auth:?}");
            let body: Value = resp.json().await.expect("error json");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("admin key")));
        }
    }
    let resp = send("GET", "/api/files", Some(format!("Bearer {KEY}")))
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(handles_of(&body), vec![handle.clone()]);

    // No admin.key: the API is off, whatever the request sends, and says how to turn it on.
    let off = spawn_app().await;
    for (method, path) in &calls {
        for auth in [None, Some(format!("Bearer {KEY}"))] {
            let mut request = match *method {
                "GET" => off.http.get(off.url(path)),
                _ => off.http.post(off.url(path)),
            };
            if let Some(auth) = &auth {
                request = request.header("authorization", auth);
            }
            let resp = request.send().await.expect("request");
            assert_eq!(resp.status(), 404, "{method} {path}");
            let body: Value = resp.json().await.expect("error json");
            assert_eq!(body["error"]["code"], "admin_disabled");
            let message = body["error"]["message"].as_str().expect("message");
            assert!(
                message.contains("admin.key") && message.contains("32"),
                "{message}"
            );
        }
    }

    // A key too short to be a secret is refused at start.
    let mut config = Config::default();
    config.admin.key = "short".into();
    let refused = config
        .validate()
        .expect_err("a short admin key")
        .to_string();
    assert!(
        refused.contains("admin.key") && refused.contains("32"),
        "{refused}"
    );
    config.admin.key = KEY.into();
    assert!(config.validate().is_ok(), "a long enough key is accepted");
}

#[tokio::test]
async fn a_retry_delivers_a_failing_file_at_once_when_its_store_answers_again() {
    const BUCKET: &str = "later-bucket";
    let mut s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let profile = s3.profile(BUCKET);
    s3.stop();
    let app = spawn_app_with(move |c| {
        with_admin(c);
        c.storage.profiles.insert("later".into(), profile);
        // After a failure the next attempt is half an hour away or more.
        c.replicator.retry_base_ms = 3_600_000;
        c.replicator.retry_cap_ms = 3_600_000;
    })
    .await;
    let bytes = random_bytes(300_000, 21);
    let handle = app
        .store_raw(
            &format!("/api/store/s3?filename=later.bin&container={BUCKET}"),
            bytes.clone(),
        )
        .await;
    app.wait_metadata(&handle, WAIT, "a failed attempt", |m| {
        attempts(m) >= 1 && m["replication"]["last_error"].is_string()
    })
    .await;
    let file = item(&app, &handle).await;
    assert_eq!(file["replication"]["failing"], true, "{file}");
    let next = file["replication"]["next_attempt_at"]
        .as_u64()
        .expect("next attempt");
    assert!(
        next > file["updated_at"].as_u64().expect("updated_at") + 1_000_000,
        "the next attempt waits: {file}"
    );

    // Files whose replication is not failing: nothing to retry or cancel.
    let here = app
        .store_raw("/api/store/s3?filename=here.txt", b"here".to_vec())
        .await;
    app.wait_status(&here, "Stored", WAIT).await;
    let started = app
        .start(json!({"apikey": "k", "filename": "u.bin", "size": 10, "store": {"location": "s3"}}))
        .await;
    let uploading = started["handle"].as_str().expect("handle").to_owned();
    for verb in ["retry", "cancel"] {
        for (other, status) in [(&here, "Stored"), (&uploading, "Uploading")] {
            let body = act(&app, other, verb, 409).await;
            assert_eq!(body["error"]["code"], "replication_not_failing");
            assert_eq!(body["error"]["status"], status, "{body}");
            let message = body["error"]["message"].as_str().expect("message");
            assert!(
                message.contains(verb) && message.contains(other.as_str()),
                "{message}"
            );
        }
        let unknown = Handle::generate();
        let body = act(&app, unknown.as_str(), verb, 404).await;
        assert_eq!(body["error"]["code"], "file_not_found");
        act(&app, "not-a-handle", verb, 404).await;
    }

    // The store answers again; a retry delivers the file now, not in half an hour.
    s3.resume().await;
    let body = act(&app, &handle, "retry", 200).await;
    assert_eq!(body["handle"], handle.as_str());
    assert_eq!(body["replication"]["cancelled"], false);
    assert_eq!(body["replication"]["next_attempt_at"], 0, "{body}");
    let meta = app.wait_status(&handle, "Stored", WAIT).await;
    let object = s3
        .client()
        .await
        .get_object()
        .bucket(BUCKET)
        .key(meta["key"].as_str().expect("key"))
        .send()
        .await
        .expect("the object is in the bucket");
    let stored = object
        .body
        .collect()
        .await
        .expect("object bytes")
        .into_bytes();
    assert!(
        stored.as_ref() == bytes.as_slice(),
        "final storage holds the file's bytes"
    );
    let body = act(&app, &handle, "retry", 409).await;
    assert_eq!(body["error"]["status"], "Stored");
    app.stop().await;
}

/// Waits until the replicator has made `cycles` more attempts at `clock` (a
/// file it keeps retrying), then reads `handle`'s attempt count: an attempt
/// `handle` was due would have happened meanwhile.
async fn attempts_after_cycles(app: &TestApp, clock: &str, handle: &str, cycles: u64) -> u64 {
    let from = attempts(&app.metadata(clock).await);
    app.wait_metadata(clock, WAIT, "more attempts", |m| {
        attempts(m) >= from + cycles
    })
    .await;
    attempts(&app.metadata(handle).await)
}

#[tokio::test]
async fn a_cancelled_replication_stops_keeps_the_file_served_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tweak = |c: &mut Config| {
        with_admin(c);
        held_profile(c);
    };
    let app = spawn_app_in(dir.path(), tweak).await;
    let bytes = random_bytes(250_000, 31);
    let path = format!("/api/store/s3?filename=kept.bin&container={HELD}");
    let cancelled = app.store_raw(&path, bytes.clone()).await;
    let clock = app
        .store_raw(
            &format!("/api/store/s3?filename=clock.bin&container={HELD}"),
            random_bytes(1000, 32),
        )
        .await;
    app.wait_failing_replication(&cancelled, WAIT).await;
    app.wait_failing_replication(&clock, WAIT).await;

    let body = act(&app, &cancelled, "cancel", 200).await;
    let replication = &body["replication"];
    assert_eq!(replication["cancelled"], true, "{body}");
    assert_eq!(replication["failing"], true);
    assert!(replication["next_attempt_at"].is_null());
    let cancelled_at = replication["cancelled_at"].clone();
    assert!(cancelled_at.is_u64(), "{body}");
    let at_cancel = attempts(&body);

    // An attempt under way when the cancel came may end; none follows it.
    let settled = attempts_after_cycles(&app, &clock, &cancelled, 3).await;
    assert!(settled <= at_cancel + 1, "{settled} after {at_cancel}");
    let later = attempts_after_cycles(&app, &clock, &cancelled, 3).await;
    assert_eq!(later, settled, "no attempt after the cancel");
    let meta = app.metadata(&cancelled).await;
    assert_eq!(meta["status"], "InTransit");
    assert_eq!(meta["replication"]["failed"], true, "{meta}");
    assert!(meta["replication"]["failure"]
        .as_str()
        .is_some_and(|f| f.contains("cancelled") && f.contains("retry")));
    assert_eq!(
        app.download(&cancelled).await,
        bytes,
        "still served from the POP"
    );
    let failing = listed(&app, "replication=failing").await;
    assert!(failing.contains(&cancelled) && failing.contains(&clock));
    // Cancelling again changes nothing.
    let again = act(&app, &cancelled, "cancel", 200).await;
    assert_eq!(again["replication"]["cancelled_at"], cancelled_at);
    app.stop().await;

    // The cancel is in the job: a restart does not resume the replication.
    let app = spawn_app_in(dir.path(), tweak).await;
    let file = item(&app, &cancelled).await;
    assert_eq!(file["replication"]["cancelled"], true, "{file}");
    assert_eq!(file["replication"]["cancelled_at"], cancelled_at);
    assert_eq!(attempts(&file), later);
    let after_restart = attempts_after_cycles(&app, &clock, &cancelled, 3).await;
    assert_eq!(after_restart, later, "no attempt after the restart");
    assert_eq!(app.download(&cancelled).await, bytes);

    // A retry resumes it.
    let body = act(&app, &cancelled, "retry", 200).await;
    assert_eq!(body["replication"]["cancelled"], false, "{body}");
    app.wait_metadata(&cancelled, WAIT, "attempts again", |m| {
        attempts(m) >= later + 2
    })
    .await;
    let file = item(&app, &cancelled).await;
    assert_eq!(file["replication"]["cancelled"], false);
    assert_eq!(file["replication"]["failing"], true);
    app.stop().await;
}

/// `cin-edge` as the tests build it (or `CIN_TEST_POP_BINARY`).
fn cin_edge() -> Command {
    let binary = std::env::var_os("CIN_TEST_POP_BINARY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cin-edge").into());
    let mut command = Command::new(binary);
    command.env("NO_COLOR", "1").env_remove("CIN_ADMIN_KEY");
    command
}

/// Runs `cin-edge admin ARGS` to its end (off the runtime that serves the POP).
async fn admin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = cin_edge();
    command.arg("admin").args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("cin-edge runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes a POP configuration file with `body` into `dir`.
fn config_file(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

fn port_of(app: &TestApp) -> String {
    app.base.rsplit(':').next().expect("port").to_owned()
}

#[tokio::test]
async fn the_admin_commands_list_retry_cancel_and_check_health() {
    let app = spawn_app_with(|c| {
        with_admin(c);
        held_profile(c);
    })
    .await;
    let stored = app
        .store_raw("/api/store/s3?filename=here.txt", b"here".to_vec())
        .await;
    let held = app
        .store_raw(
            &format!("/api/store/s3?filename=held.bin&container={HELD}"),
            random_bytes(2000, 41),
        )
        .await;
    app.wait_status(&stored, "Stored", WAIT).await;
    app.wait_failing_replication(&held, WAIT).await;
    let dir = tempfile::tempdir().unwrap();
    // Listening on every address: the commands ask on loopback.
    let config = config_file(
        dir.path(),
        &format!(
            "[server]\nlisten = \"0.0.0.0:{}\"\n\n[admin]\nkey = \"{KEY}\"\n",
            port_of(&app)
        ),
    );
    let config = config.to_str().expect("path");

    // Health: 0 against the POP; 1, saying why, against a closed port.
    let out = admin(&["health", "--config", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("http://127.0.0.1:{}/healthz: ok", port_of(&app))),
        "{}",
        stdout(&out)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let closed_url = format!("http://127.0.0.1:{closed}");
    let out = admin(&["health", "--pop", &closed_url], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("no POP answers at {closed_url}"))
            && said.contains("cin-edge serve")
            && said.contains("--pop"),
        "{said}"
    );

    // The listing for people, key and address from the configuration.
    let out = admin(&["list", "--config", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("HANDLE") && lines[0].contains("REPLICATION"),
        "{table}"
    );
    let line_of = |handle: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(handle))
            .unwrap_or_else(|| panic!("{handle} is not in:\n{table}"))
            .to_string()
    };
    let held_line = line_of(&held);
    assert!(
        held_line.contains("InTransit")
            && held_line.contains("failing")
            && held_line.contains(HELD),
        "{held_line}"
    );
    let stored_line = line_of(&stored);
    assert!(
        stored_line.contains("Stored") && stored_line.contains("here.txt"),
        "{stored_line}"
    );
    assert_eq!(lines.last(), Some(&"2 files"), "{table}");

    // Filters; the key from CIN_ADMIN_KEY, the POP from --pop.
    let out = admin(
        &[
            "list",
            "--pop",
            &app.base,
            "--failing",
            "--status",
            "InTransit",
        ],
        &[("CIN_ADMIN_KEY", KEY)],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&held) && !stdout(&out).contains(&stored),
        "{}",
        stdout(&out)
    );
    let out = admin(
        &[
            "list",
            "--config",
            config,
            "--container",
            HELD,
            "--older-than",
            "0",
        ],
        &[],
    )
    .await;
    assert!(
        stdout(&out).contains(&held) && !stdout(&out).contains(&stored),
        "{}",
        stdout(&out)
    );

    // Pages: one without --all (the cursor on stderr), every one with it.
    let out = admin(&["list", "--config", config, "--limit", "1"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("1 file\n"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("more: pass --cursor"),
        "{}",
        stderr(&out)
    );
    let out = admin(
        &[
            "list", "--config", config, "--limit", "1", "--all", "--json",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(set(handles_of(&answer)), set([&stored, &held]));
    assert!(answer["next_cursor"].is_null());

    // Refusals say what to do.
    let out = admin(
        &["list", "--config", config, "--key", "not-the-admin-key"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(said.contains("403") && said.contains("--key"), "{said}");
    let out = admin(&["list", "--config", config, "--status", "Lost"], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("400") && stderr(&out).contains("status"),
        "{}",
        stderr(&out)
    );
    let out = admin(&["list", "--pop", &app.base], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CIN_ADMIN_KEY"), "{}", stderr(&out));

    // Cancel, then retry.
    let cancelled_in = |out: &Output| -> bool {
        let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
        answer["files"]
            .as_array()
            .expect("files")
            .iter()
            .any(|f| f["handle"] == held.as_str() && f["replication"]["cancelled"] == true)
    };
    let out = admin(&["cancel", &held, "--config", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cancelled"), "{}", stdout(&out));
    let out = admin(&["list", "--config", config, "--json"], &[]).await;
    assert!(cancelled_in(&out), "{}", stdout(&out));
    let out = admin(&["list", "--config", config], &[]).await;
    assert!(
        line_of_in(&stdout(&out), &held).contains("cancelled"),
        "{}",
        stdout(&out)
    );
    let out = admin(&["retry", &held, "--config", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("retried"), "{}", stdout(&out));
    let out = admin(&["list", "--config", config, "--json"], &[]).await;
    assert!(!cancelled_in(&out), "{}", stdout(&out));
    let out = admin(&["retry", &stored, "--config", config], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(said.contains("409") && said.contains("Stored"), "{said}");
}

fn line_of_in(table: &str, handle: &str) -> String {
    table
        .lines()
        .find(|l| l.starts_with(handle))
        .unwrap_or_else(|| panic!("{handle} is not in:\n{table}"))
        .to_owned()
}

#[tokio::test]
async fn admin_health_speaks_https_trusting_the_ca_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::tls::write_dev_cert(dir.path(), &["127.0.0.1", "localhost"]);
    let app = {
        let (cert, key) = (cert.clone(), key.clone());
        spawn_app_with(move |c| {
            c.server.tls_cert = cert;
            c.server.tls_key = key;
        })
        .await
    };
    let config = config_file(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            port_of(&app),
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let config = config.to_str().expect("path");
    let healthz = format!("https://127.0.0.1:{}/healthz: ok", port_of(&app));

    let out = admin(&["health", "--config", config], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = stderr(&out);
    assert!(
        said.contains("--ca") && said.contains("--insecure"),
        "{said}"
    );
    let ca = ca.to_str().expect("path");
    let out = admin(&["health", "--config", config, "--ca", ca], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&healthz), "{}", stdout(&out));
    let out = admin(&["health", "--config", config, "--insecure"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&healthz), "{}", stdout(&out));
}
