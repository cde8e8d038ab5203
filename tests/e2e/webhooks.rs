//! Webhooks: signed, retried, at least once, in order per handle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use cin_edge::auth::sign_policy;
use cin_edge::config::AppConfig;
use serde_json::Value;

use crate::support::{random_bytes, spawn_app_with};

#[derive(Default)]
struct Receiver {
    attempts: usize,
    /// (event, handle, signature valid) of accepted deliveries, in arrival order.
    accepted: Vec<(String, String, bool)>,
}

const SECRET: &str = "hook-secret";

async fn receive(
    State(state): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let mut state = state.lock().unwrap();
    state.attempts += 1;
    // The first two attempts fail, as a receiver that is briefly down.
    if state.attempts <= 2 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let signature = headers["cin-signature"].to_str().unwrap().to_owned();
    let valid = signature == format!("sha256={}", sign_policy(SECRET, &body));
    let event: Value = serde_json::from_str(&body).unwrap();
    state.accepted.push((
        event["event"].as_str().unwrap().to_owned(),
        event["handle"].as_str().unwrap().to_owned(),
        valid,
    ));
    StatusCode::OK
}

#[tokio::test]
async fn status_changes_are_delivered_signed_retried_and_in_order() {
    let receiver = Arc::new(Mutex::new(Receiver::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let app = spawn_app_with(move |c| {
        c.webhooks.retry_base_ms = 50;
        c.webhooks.retry_cap_ms = 200;
        c.apps.insert(
            "hooked".into(),
            AppConfig {
                apikey: "HOOKKEY".into(),
                secret: SECRET.into(),
                webhooks: vec![hook_url],
                ..Default::default()
            },
        );
    })
    .await;
    let handle = app
        .store_raw(
            "/api/store/s3?key=HOOKKEY&filename=h.bin",
            random_bytes(10_000, 95),
        )
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if receiver.lock().unwrap().accepted.len() >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = receiver.lock().unwrap();
    assert!(
        state.attempts >= 4,
        "failed attempts were retried: {}",
        state.attempts
    );
    let events: Vec<&str> = state.accepted.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(events, ["InTransit", "Stored"], "in order per handle");
    assert!(
        state
            .accepted
            .iter()
            .all(|(_, h, valid)| h == &handle && *valid),
        "signed with the app secret"
    );
}
