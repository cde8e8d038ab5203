//! Webhooks: every status change of a file (InTransit, Stored, replication failing,
//! expired) is POSTed as JSON to its app's webhook URLs, signed with the app's
//! secret. Deliveries wait in the metadata store until answered with 2xx: at least
//! once, in order per handle and URL, retried with capped exponential backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cin_domain::{FileRecord, Handle, WebhookDelivery};
use cin_storage::{MetadataStore, StorageError};
use rand::Rng;
use serde_json::json;
use tokio::sync::Notify;

use crate::worker::{Worker, WorkerState};

use crate::auth::{sign_policy, Apps};
use crate::config::WebhooksConfig;
use crate::upload::now_ms;

/// Header carrying `sha256=<hex HMAC-SHA256 of the body with the app's secret>`.
pub const SIGNATURE_HEADER: &str = "cin-signature";
/// Header carrying the delivery's sequence number (the same on every retry).
pub const EVENT_ID_HEADER: &str = "cin-event-id";

pub struct Webhooks {
    meta: Arc<dyn MetadataStore>,
    apps: Arc<Apps>,
    public_url: String,
    pop_id: String,
    config: WebhooksConfig,
    http: reqwest::Client,
    wakeup: Notify,
}

impl Webhooks {
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        apps: Arc<Apps>,
        public_url: String,
        pop_id: String,
        config: WebhooksConfig,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .build()
            .unwrap_or_default();
        Webhooks {
            meta,
            apps,
            public_url,
            pop_id,
            config,
            http,
            wakeup: Notify::new(),
        }
    }

    /// Queues `event` about `file` for every webhook of its app. Call it before
    /// writing the status change itself, so the change is never durable without it.
    pub fn enqueue(&self, file: &FileRecord, event: &str) -> Result<(), StorageError> {
        let Some(app_name) = file.app.as_deref() else {
            return Ok(());
        };
        let Some(app) = self.apps.get(app_name) else {
            return Ok(());
        };
        if app.webhooks.is_empty() {
            return Ok(());
        }
        let body = json!({
            "event": event,
            "handle": file.handle,
            "status": file.status.as_str(),
            "url": format!("{}/{}", self.public_url, file.handle),
            "filename": file.filename,
            "mimetype": file.mimetype,
            "size": file.size,
            "container": file.container,
            "key": file.key,
            "sha256": file.sha256,
            "last_error": file.last_error,
            "pop": self.pop_id,
            "timestamp": now_ms(),
        })
        .to_string();
        let deliveries = app
            .webhooks
            .iter()
            .map(|url| WebhookDelivery {
                seq: 0,
                url: url.clone(),
                app: app_name.to_owned(),
                handle: file.handle.clone(),
                body: body.clone(),
                attempts: 0,
                not_before_ms: 0,
                last_error: None,
            })
            .collect();
        self.meta.enqueue_webhooks(deliveries)?;
        self.wakeup.notify_one();
        Ok(())
    }

    /// One pass over the queue; returns how long until the next delivery is due.
    async fn deliver_due(&self) -> Result<Duration, StorageError> {
        let now = now_ms();
        let mut wait = Duration::from_secs(30);
        // A pending delivery holds back later ones for the same handle and URL.
        let mut held: HashSet<(String, Handle)> = HashSet::new();
        for mut delivery in self.meta.webhooks()? {
            let lane = (delivery.url.clone(), delivery.handle.clone());
            if held.contains(&lane) {
                continue;
            }
            if delivery.not_before_ms > now {
                wait = wait.min(Duration::from_millis(delivery.not_before_ms - now));
                held.insert(lane);
                continue;
            }
            match self.post(&delivery).await {
                Ok(()) => {
                    self.meta.remove_webhook(delivery.seq)?;
                    self.meta.flush().await?;
                }
                Err(error) => {
                    delivery.attempts += 1;
                    let delay = self.backoff(delivery.attempts);
                    delivery.not_before_ms = now_ms() + delay.as_millis() as u64;
                    tracing::warn!(url = %delivery.url, handle = %delivery.handle, attempts = delivery.attempts, %error, "webhook delivery failed; will retry");
                    delivery.last_error = Some(error);
                    self.meta.put_webhook(&delivery)?;
                    self.meta.flush().await?;
                    wait = wait.min(delay);
                    held.insert(lane);
                }
            }
        }
        Ok(wait)
    }

    async fn post(&self, delivery: &WebhookDelivery) -> Result<(), String> {
        let secret = self
            .apps
            .get(&delivery.app)
            .map(|a| a.secret.clone())
            .unwrap_or_default();
        let signature = sign_policy(&secret, &delivery.body);
        let response = self
            .http
            .post(&delivery.url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, format!("sha256={signature}"))
            .header(EVENT_ID_HEADER, delivery.seq.to_string())
            .body(delivery.body.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", response.status()))
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let full = self
            .config
            .retry_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.retry_cap_ms)
            .max(1);
        Duration::from_millis(full / 2 + rand::thread_rng().gen_range(0..=full - full / 2))
    }

    /// The background worker that delivers the queue.
    pub fn worker(self: Arc<Self>) -> WebhookWorker {
        WebhookWorker(self)
    }

    pub fn replication_failing_after(&self) -> Duration {
        Duration::from_secs(self.config.replication_failing_after_secs)
    }
}

/// Delivers queued webhooks. A stop cancels a pass mid-delivery: the delivery
/// stays queued and goes out again after a restart (at least once).
pub struct WebhookWorker(Arc<Webhooks>);

#[async_trait::async_trait]
impl Worker for WebhookWorker {
    fn name(&self) -> &'static str {
        "webhooks"
    }

    async fn work(&mut self) -> WorkerState {
        match self.0.deliver_due().await {
            Ok(wait) => WorkerState::Idle(wait),
            Err(e) => {
                tracing::error!(error = %e, "webhook queue unavailable");
                WorkerState::Idle(Duration::from_secs(5))
            }
        }
    }

    async fn wait_for_work(&mut self, idle: Duration) {
        tokio::select! {
            _ = self.0.wakeup.notified() => {}
            _ = tokio::time::sleep(idle) => {}
        }
    }
}
