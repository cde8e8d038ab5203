//! Deleting a file (`DELETE /api/file/{handle}`, tus `DELETE` of a finished
//! upload): gone from the POP and from final storage, reads answer 404 with
//! JSON (`deleted`), a webhook reports it, and only the file's app may do it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use cin_edge::auth::sign_policy;
use cin_edge::config::AppConfig;
use serde_json::{json, Value};

use crate::support::{random_bytes, spawn_app_with, S3Server};

const KEY: &str = "DELKEY";
const SECRET: &str = "delete-secret";

/// Events a webhook receiver was sent: (event, handle).
type Events = Arc<Mutex<Vec<(String, String)>>>;

async fn webhook_receiver() -> (String, Events) {
    let events: Events = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen = events.clone();
    let router = Router::new().route(
        "/hook",
        post(move |body: String| async move {
            let event: Value = serde_json::from_str(&body).expect("webhook JSON");
            seen.lock().expect("events").push((
                event["event"].as_str().unwrap_or_default().to_owned(),
                event["handle"].as_str().unwrap_or_default().to_owned(),
            ));
            axum::http::StatusCode::OK
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, events)
}

fn app_config(hook: &str, require_security: bool) -> AppConfig {
    AppConfig {
        apikey: KEY.into(),
        secret: SECRET.into(),
        webhooks: vec![hook.to_owned()],
        require_security,
        ..Default::default()
    }
}

/// A policy of the app allowing `calls`, as `policy=..&signature=..`.
fn policy(calls: &[&str]) -> String {
    use base64::Engine;
    let policy = json!({"expiry": 4_000_000_000u64, "call": calls}).to_string();
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(policy);
    format!(
        "policy={encoded}&signature={}",
        sign_policy(SECRET, &encoded)
    )
}

async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn object_exists(s3: &S3Server, key: &str) -> bool {
    s3.client()
        .await
        .head_object()
        .bucket("deletes")
        .key(key)
        .send()
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_is_gone_from_the_pop_and_final_storage_and_reported() {
    let s3 = S3Server::start().await;
    s3.create_bucket("deletes").await;
    let (hook, events) = webhook_receiver().await;
    let profile = s3.profile("deletes");
    let app = spawn_app_with(move |c| {
        c.storage.profiles.insert("default".into(), profile);
        c.webhooks.retry_base_ms = 50;
        c.apps.insert("app".into(), app_config(&hook, false));
    })
    .await;
    let bytes = random_bytes(300_000, 101);
    let handle = app
        .store_raw(&format!("/api/store/s3?key={KEY}&filename=d.bin"), bytes)
        .await;
    let meta = app
        .wait_status(&handle, "Stored", Duration::from_secs(30))
        .await;
    let key = meta["key"].as_str().expect("key").to_owned();
    assert!(object_exists(&s3, &key).await, "stored in final storage");

    let url = app.url(&format!("/api/file/{handle}"));
    let no_key = app.http.delete(&url).send().await.expect("delete");
    assert_eq!(no_key.status(), 401);
    let other_key = app
        .http
        .delete(format!("{url}?key=NOTMINE"))
        .send()
        .await
        .expect("delete");
    assert_eq!(other_key.status(), 403);
    let deleted = app
        .http
        .delete(format!("{url}?key={KEY}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 200);
    let body: Value = deleted.json().await.expect("json");
    assert_eq!(body["status"], "Deleted");

    for path in [format!("/{handle}"), format!("/{handle}/metadata")] {
        let read = app.http.get(app.url(&path)).send().await.expect("read");
        // Filestack's answer for a handle that is gone (tus turns it into 410).
        assert_eq!(read.status(), 404, "{path}");
        assert_eq!(read.headers()["content-type"], "application/json");
        let error: Value = read.json().await.expect("json error");
        assert_eq!(error["error"]["code"], "deleted", "{path}");
    }
    let again = app
        .http
        .delete(format!("{url}?key={KEY}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(again.status(), 404);

    // The removal job takes the object out of final storage.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while object_exists(&s3, &key).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the object is still in final storage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("the deleted webhook", || {
        let seen = events.lock().expect("events");
        seen.iter()
            .any(|(event, h)| event == "deleted" && h == &handle)
            .then_some(())
    })
    .await;
    // Local bytes are gone too: nothing of the file is left under the parts.
    assert_eq!(app.upload_dirs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_in_transit_is_deleted_and_not_left_in_final_storage() {
    use crate::fault_proxy::{FaultProxy, Faults};
    let s3 = S3Server::start().await;
    s3.create_bucket("deletes").await;
    // Final storage is unreachable until the switch is pointed at it.
    let switch = FaultProxy::start(Faults::default()).await;
    let mut profile = s3.profile("deletes");
    profile.endpoint = switch.url();
    let app = spawn_app_with(move |c| {
        c.storage.profiles.insert("default".into(), profile);
    })
    .await;
    let handle = app
        .store_raw("/api/store/s3?filename=t.bin", random_bytes(5_000, 102))
        .await;
    let key = app.metadata(&handle).await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(app.metadata(&handle).await["status"], "InTransit");
    let deleted = app
        .http
        .delete(app.url(&format!("/api/file/{handle}?key=any")))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 200);
    switch.set_upstream(&s3.endpoint);
    // Once final storage answers, the removal runs in the delivery's place.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.metric("cin_final_storage_removals_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no removal ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A delivery attempt still retrying when the file was deleted may have
    // written it meanwhile; the removal runs after it and takes it out.
    assert!(
        !object_exists(&s3, &key).await,
        "the deleted file is in final storage"
    );
    assert_eq!(
        app.metric("cin_replicated_bytes_total").await,
        0.0,
        "no delivery counted for a deleted file"
    );
    let meta = app
        .http
        .get(app.url(&format!("/{handle}/metadata")))
        .send()
        .await
        .expect("metadata");
    assert_eq!(meta.status(), 404);
}

#[tokio::test]
async fn an_app_that_requires_security_deletes_only_with_a_remove_policy() {
    let (hook, _) = webhook_receiver().await;
    let app = spawn_app_with(move |c| {
        c.apps.insert("app".into(), app_config(&hook, true));
    })
    .await;
    let handle = app
        .store_raw(
            &format!(
                "/api/store/s3?key={KEY}&filename=s.bin&{}",
                policy(&["store"])
            ),
            random_bytes(1_000, 103),
        )
        .await;
    let url = app.url(&format!("/api/file/{handle}?key={KEY}"));
    let without = app.http.delete(&url).send().await.expect("delete");
    assert!(
        matches!(without.status().as_u16(), 401 | 403),
        "{}",
        without.status()
    );
    let read_only = app
        .http
        .delete(format!("{url}&{}", policy(&["read"])))
        .send()
        .await
        .expect("delete");
    assert_eq!(read_only.status(), 403);
    let allowed = app
        .http
        .delete(format!("{url}&{}", policy(&["remove"])))
        .send()
        .await
        .expect("delete");
    assert_eq!(allowed.status(), 200);
}

#[tokio::test]
async fn a_tus_delete_of_a_finished_upload_deletes_the_file() {
    let app = spawn_app_with(|_| {}).await;
    let created = app
        .http
        .post(app.url("/files/"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "5")
        .header("content-type", "application/offset+octet-stream")
        .body(b"hello".to_vec())
        .send()
        .await
        .expect("tus create with upload");
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let handle = created.headers()["cin-handle"]
        .to_str()
        .expect("handle")
        .to_owned();
    assert_eq!(app.download(&handle).await, b"hello");
    let terminated = app
        .http
        .delete(&location)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("tus DELETE");
    assert_eq!(terminated.status(), 204);
    let read = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), 404);
    let error: Value = read.json().await.expect("json error");
    assert_eq!(error["error"]["code"], "deleted");
}

#[tokio::test]
async fn an_empty_file_is_deleted_like_any_other() {
    // Small files live in the shared segment log; an empty one has a segment of
    // no bytes, which frees nothing.
    let app = spawn_app_with(|_| {}).await;
    let other = random_bytes(1000, 3);
    let kept = app
        .store_raw("/api/store/S3?filename=a.bin", other.clone())
        .await;
    // Content-Length: 0 declares the size, as curl does for an empty file.
    let stored: Value = app
        .http
        .post(app.url("/api/store/S3?filename=empty.txt"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let handle = stored["handle"].as_str().unwrap().to_owned();
    assert_eq!(app.download(&handle).await, Vec::<u8>::new());
    app.wait_status(&handle, "Stored", Duration::from_secs(20))
        .await;
    let deleted = app
        .http
        .delete(app.url(&format!("/api/file/{handle}?key=any")))
        .send()
        .await
        .unwrap();
    let status = deleted.status();
    let body: Value = deleted.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Deleted");
    let read = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 404);
    assert_eq!(app.download(&kept).await, other);
}
