//! Apps, API keys and signed security policies.

use base64::Engine;
use cin_edge::auth::sign_policy;
use cin_edge::config::AppConfig;
use serde_json::{json, Value};

use crate::support::{spawn_app_with, TestApp};

const SECRET: &str = "app-secret-for-tests";

async fn app_with_keys() -> TestApp {
    spawn_app_with(|c| {
        c.apps.insert(
            "open".into(),
            AppConfig {
                apikey: "OPENKEY".into(),
                ..Default::default()
            },
        );
        c.apps.insert(
            "secure".into(),
            AppConfig {
                apikey: "SECUREKEY".into(),
                secret: SECRET.into(),
                require_security: true,
                allowed_profiles: vec!["default".into()],
                ..Default::default()
            },
        );
    })
    .await
}

fn policy(json: Value) -> (String, String) {
    let policy = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string());
    let signature = sign_policy(SECRET, &policy);
    (policy, signature)
}

fn in_an_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

async fn start(app: &TestApp, body: Value) -> (u16, Value) {
    let resp = app.post_json("/multipart/start", body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn keys_are_required_once_apps_exist() {
    let app = app_with_keys().await;
    let (status, body) = start(&app, json!({"filename": "a", "size": 1})).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = start(&app, json!({"apikey": "WHO", "filename": "a", "size": 1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("unknown_apikey"))
    );
    let (status, _) = start(
        &app,
        json!({"apikey": "OPENKEY", "filename": "a", "size": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let resp = app
        .http
        .post(app.url("/api/store/s3?key=WHO"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn policies_valid_expired_tampered_wrong_call_and_limits() {
    let app = app_with_keys().await;
    let base = json!({"apikey": "SECUREKEY", "filename": "a.txt", "size": 10, "store": {"location": "s3", "path": "inbox/"}});
    let with = |p: &(String, String)| {
        let mut body = base.clone();
        body["policy"] = json!(p.0);
        body["signature"] = json!(p.1);
        body
    };
    let (status, body) = start(&app, base.clone()).await;
    assert_eq!(status, 401, "security required: {body}");

    let good = policy(
        json!({"expiry": in_an_hour(), "call": ["pick", "store"], "path": "inbox/.*", "maxSize": 100}),
    );
    let (status, body) = start(&app, with(&good)).await;
    assert_eq!(status, 200, "{body}");

    let expired = policy(json!({"expiry": 1_000_000}));
    let (status, body) = start(&app, with(&expired)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );

    // A bigger maxSize, still signed for the original policy.
    let widened = policy(
        json!({"expiry": in_an_hour(), "call": ["pick", "store"], "path": "inbox/.*", "maxSize": 1_000_000}),
    );
    let tampered = (widened.0, good.1.clone());
    let (status, body) = start(&app, with(&tampered)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{body}"
    );

    let read_only = policy(json!({"expiry": in_an_hour(), "call": ["read"]}));
    let (status, body) = start(&app, with(&read_only)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("calls"),
        "{body}"
    );

    let other_path = policy(json!({"expiry": in_an_hour(), "path": "elsewhere/.*"}));
    let (status, body) = start(&app, with(&other_path)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("path"),
        "{body}"
    );

    let tiny = policy(json!({"expiry": in_an_hour(), "maxSize": 5}));
    let (status, body) = start(&app, with(&tiny)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxSize"),
        "{body}"
    );
}

#[tokio::test]
async fn secure_files_need_a_policy_to_be_read() {
    let app = app_with_keys().await;
    let store = policy(json!({"expiry": in_an_hour(), "call": ["store"]}));
    let resp = app
        .http
        .post(app.url(&format!(
            "/api/store/s3?key=SECUREKEY&filename=s.txt&policy={}&signature={}",
            store.0, store.1
        )))
        .body("secret bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let handle = resp.json::<Value>().await.unwrap()["handle"]
        .as_str()
        .unwrap()
        .to_owned();

    let plain = app
        .http
        .get(app.url(&format!("/{handle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 401);
    let read = policy(json!({"expiry": in_an_hour(), "call": ["read"], "handle": handle}));
    let url = app.url(&format!("/{handle}?policy={}&signature={}", read.0, read.1));
    let resp = app.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "secret bytes");
    let resp = app
        .http
        .get(app.url(&format!(
            "/{handle}/metadata?policy={}&signature={}",
            read.0, read.1
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "a read policy does not allow stat");
    let stat = policy(json!({"expiry": in_an_hour(), "call": ["stat"], "handle": handle}));
    let resp = app
        .http
        .get(app.url(&format!(
            "/{handle}/metadata?policy={}&signature={}",
            stat.0, stat.1
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The live status stream tells what metadata tells, so it asks the same.
    let events = |query: String| {
        app.http
            .get(app.url(&format!("/{handle}/events{query}")))
            .send()
    };
    assert_eq!(events(String::new()).await.unwrap().status(), 401);
    assert_eq!(
        events(format!("?policy={}&signature={}", read.0, read.1))
            .await
            .unwrap()
            .status(),
        403
    );
    let allowed = events(format!("?policy={}&signature={}", stat.0, stat.1))
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let first = allowed.text().await.unwrap();
    assert!(
        first.contains("InTransit") || first.contains("Stored"),
        "{first}"
    );
    let other =
        policy(json!({"expiry": in_an_hour(), "call": ["read"], "handle": "AAAAAAAAAAAAAAAAAAAA"}));
    let resp = app
        .http
        .get(app.url(&format!(
            "/{handle}?policy={}&signature={}",
            other.0, other.1
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "a policy for another handle");
}

#[tokio::test]
async fn tus_creation_checks_keys_from_metadata() {
    let app = app_with_keys().await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let create = |metadata: String| {
        app.http
            .post(app.url("/files/"))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "3")
            .header("upload-metadata", metadata)
            .send()
    };
    assert_eq!(
        create(format!("filename {}", b64("a")))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        create(format!("apikey {}", b64("OPENKEY")))
            .await
            .unwrap()
            .status(),
        201
    );
    let p = policy(json!({"expiry": in_an_hour()}));
    let resp = create(format!(
        "apikey {},policy {},signature {}",
        b64("SECUREKEY"),
        b64(&p.0),
        b64(&p.1)
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
}
