//! Storage profiles turned into live final stores, and the rule that maps an
//! upload's `store` options onto one of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cin_domain::StoreOptions;
use cin_storage::{FinalStore, FinalStoreError, LocalDirStore, S3Settings, S3Store};

use crate::config::{ProfileKind, StorageConfig, StorageProfile};
use crate::upload::UploadError;
use crate::worker::{Worker, WorkerState};

/// A profile and the store it opened.
pub struct Destination {
    pub name: String,
    pub profile: StorageProfile,
    pub store: Arc<dyn FinalStore>,
    /// What the last probe or replication attempt found.
    health: RwLock<Health>,
}

/// How a profile's final store is doing, as the last probe or replication attempt
/// found it. Uploads for a failing store are still accepted (they wait here, and
/// are delivered once it answers); uploads for a refusing store are turned away at
/// start, since its credentials or bucket need the operator first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Ok,
    /// It cannot be reached (or answers 5xx): `message` says what and why.
    Failing {
        message: String,
        since_ms: u64,
    },
    /// It answers, and refuses requests (bad credentials, missing bucket).
    Refusing {
        message: String,
        since_ms: u64,
    },
}

impl Health {
    pub fn label(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Ok => "ok",
            Health::Failing { .. } => "failing",
            Health::Refusing { .. } => "refusing",
        }
    }

    pub fn message(&self) -> Option<&str> {
        match self {
            Health::Failing { message, .. } | Health::Refusing { message, .. } => Some(message),
            Health::Unknown | Health::Ok => None,
        }
    }
}

/// How long a probe of a final store may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Destination {
    pub fn health(&self) -> Health {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the store refuses requests, if it does.
    pub fn refusal(&self) -> Option<String> {
        match self.health() {
            Health::Refusing { message, .. } => Some(message),
            _ => None,
        }
    }

    /// Records what a request to the store found: a success, or a failure that
    /// says something about the store rather than about one file.
    pub fn record(&self, outcome: Result<(), &FinalStoreError>) {
        let now = crate::upload::now_ms();
        let next = match outcome {
            Ok(()) => Health::Ok,
            Err(FinalStoreError::Rejected(reason)) => Health::Refusing {
                message: reason.clone(),
                since_ms: now,
            },
            Err(e @ (FinalStoreError::Unreachable(_) | FinalStoreError::Local(_))) => {
                Health::Failing {
                    message: e.to_string(),
                    since_ms: now,
                }
            }
            // About one object's bytes, not the store.
            Err(_) => return,
        };
        let mut health = self.health.write().unwrap_or_else(|p| p.into_inner());
        let next = match (&*health, next) {
            // A failure that goes on keeps the time it began.
            (Health::Failing { since_ms, .. }, Health::Failing { message, .. }) => {
                Health::Failing {
                    message,
                    since_ms: *since_ms,
                }
            }
            (Health::Refusing { since_ms, .. }, Health::Refusing { message, .. }) => {
                Health::Refusing {
                    message,
                    since_ms: *since_ms,
                }
            }
            (_, next) => next,
        };
        if *health != next {
            match &next {
                Health::Ok if *health == Health::Unknown => {}
                Health::Ok => tracing::info!(profile = %self.name, "final store answers again"),
                Health::Failing { message, .. } => {
                    tracing::warn!(profile = %self.name, %message, "final store failing; uploads for it wait here until it answers")
                }
                Health::Refusing { message, .. } => {
                    tracing::warn!(profile = %self.name, %message, "final store refuses requests; new uploads for it are turned away")
                }
                Health::Unknown => {}
            }
            *health = next;
        }
    }

    /// Asks the store whether it answers and accepts requests.
    pub async fn probe(&self) {
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.check()).await {
            Ok(outcome) => self.record(outcome.as_ref().map(|_| ())),
            Err(_) => self.record(Err(&FinalStoreError::Unreachable(format!(
                "{} did not answer within {PROBE_TIMEOUT:?}",
                self.store.describe()
            )))),
        }
    }
}

/// Where an upload will be delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub profile: String,
    pub container: String,
    pub key: String,
}

pub struct Destinations {
    default_profile: String,
    by_name: BTreeMap<String, Destination>,
}

/// Storage kinds a client may name in `store.location`.
pub const KNOWN_LOCATIONS: [&str; 2] = ["s3", "local"];

impl Destinations {
    pub async fn open(config: &StorageConfig, data_dir: &Path) -> anyhow::Result<Self> {
        let mut by_name = BTreeMap::new();
        for (name, profile) in &config.profiles {
            let store: Arc<dyn FinalStore> = match profile.kind {
                ProfileKind::Local => Arc::new(LocalDirStore::open(data_dir.join(&profile.path))?),
                ProfileKind::S3 => Arc::new(
                    S3Store::connect(S3Settings {
                        bucket: profile.bucket.clone(),
                        region: profile.region.clone(),
                        endpoint: profile.endpoint.clone(),
                        force_path_style: profile.force_path_style,
                        access_key_id: profile.access_key_id.clone(),
                        secret_access_key: profile.secret_access_key.clone(),
                        part_size: profile.part_size,
                        concurrency: profile.concurrency,
                    })
                    .await,
                ),
            };
            by_name.insert(
                name.clone(),
                Destination {
                    name: name.clone(),
                    profile: profile.clone(),
                    store,
                    health: RwLock::new(Health::Unknown),
                },
            );
        }
        let destinations = Destinations {
            default_profile: config.default_profile.clone(),
            by_name,
        };
        destinations.probe_all().await;
        Ok(destinations)
    }

    pub async fn probe_all(&self) {
        futures_util::future::join_all(self.by_name.values().map(Destination::probe)).await;
    }

    /// The operator's own store, where uploads naming no container go.
    pub fn default_destination(&self) -> Option<&Destination> {
        self.by_name.get(&self.default_profile)
    }

    pub fn get(&self, profile: &str) -> Option<&Destination> {
        self.by_name.get(profile)
    }

    pub fn all(&self) -> impl Iterator<Item = &Destination> {
        self.by_name.values()
    }

    /// Picks the profile and key for an upload, refusing store options no profile allows.
    pub fn place(
        &self,
        store: &StoreOptions,
        handle: &str,
        filename: &str,
    ) -> Result<Placement, UploadError> {
        store.validate()?;
        if let Some(location) = store.location.as_deref().filter(|l| !l.is_empty()) {
            let location = location.to_ascii_lowercase();
            if !KNOWN_LOCATIONS.contains(&location.as_str()) {
                return Err(UploadError::invalid(
                    "unsupported_location",
                    format!("store location {location:?} is not supported here; use \"s3\""),
                ));
            }
        }
        let destination = match store.container.as_deref().filter(|c| !c.is_empty()) {
            None => self.by_name.get(&self.default_profile).ok_or_else(|| {
                UploadError::forbidden("no_default_storage", "this POP has no default storage profile")
            })?,
            Some(container) => self
                .by_name
                .values()
                .find(|d| d.profile.bucket == container)
                .ok_or_else(|| {
                    UploadError::forbidden(
                        "container_not_allowed",
                        format!(
                            "container {container:?} is not configured on this POP; ask the operator to add a storage profile for it, or omit container to use the default storage"
                        ),
                    )
                })?,
        };
        if let Some(reason) = destination.refusal() {
            return Err(UploadError::forbidden(
                "storage_refused",
                format!(
                    "the final storage for container {:?} refuses requests ({reason}); the operator must fix the storage profile's credentials or bucket",
                    destination.profile.bucket
                ),
            ));
        }
        Ok(Placement {
            profile: destination.name.clone(),
            container: destination.profile.bucket.clone(),
            key: format!(
                "{}{}",
                destination.profile.key_prefix,
                store.object_key(handle, filename)
            ),
        })
    }
}

/// How often final stores are asked whether they accept requests.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Probes every final store periodically.
pub struct ProbeWorker(pub Arc<Destinations>);

#[async_trait::async_trait]
impl Worker for ProbeWorker {
    fn name(&self) -> &'static str {
        "store-probes"
    }

    async fn work(&mut self) -> WorkerState {
        self.0.probe_all().await;
        WorkerState::Idle(PROBE_INTERVAL)
    }
}
