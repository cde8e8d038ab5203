//! Wiring: open the stores, build the router, run the server and the replicator
//! until a shutdown future resolves, then stop in order.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::Request;
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use cin_storage::{MetadataStore, PartStore, SegmentLog, SledMetadataStore};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower_http::cors::{Any, CorsLayer};

use crate::auth::Apps;
use crate::cache::{EvictionWorker, LocalCache};
use crate::config::Config;
use crate::destinations::{Destinations, ProbeWorker};
use crate::disk::{Disk, DiskWatch};
use crate::events::StatusEvents;
use crate::network::Network;
use crate::observability;
use crate::replicator::Replicator;
use crate::routes;
use crate::server;
use crate::signing::UrlSigner;
use crate::tls::{CertificateWatch, Certificates};
use crate::upload::{Lifecycle, Services, SweepWorker, UploadLimits, Uploads};
use crate::webhooks::Webhooks;
use crate::worker::Workers;

/// Everything request handlers share.
pub struct AppState {
    pub config: Config,
    /// Base URL of this POP without a trailing slash, e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
    /// `host[:port]` of this POP, as Filestack's `location_url`.
    pub location_url: String,
    /// The stores and registries the engine and the handlers share.
    pub services: Arc<Services>,
    pub uploads: Uploads,
    pub signer: UrlSigner,
    pub cache: Arc<LocalCache>,
    pub network: Network,
    /// Fetches the remote files of store-from-URL requests.
    pub fetcher: crate::fetch::Fetcher,
}

pub type SharedState = Arc<AppState>;

/// A running POP's background parts, built before the listener serves.
struct Node {
    state: SharedState,
    meta: Arc<dyn MetadataStore>,
    replicator: Arc<Replicator>,
    webhooks: Arc<Webhooks>,
    /// The certificate served, when the listener speaks HTTPS.
    certificates: Option<Arc<Certificates>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Opens the stores and builds the state request handlers share, without a
/// listener: router-level tests drive `router(state)` with `oneshot`. Filelinks
/// use `server.public_url`, or `http://127.0.0.1:80` when it is empty.
pub async fn open_state(config: Config) -> anyhow::Result<SharedState> {
    let unbound = SocketAddr::from(([127, 0, 0, 1], 80));
    Ok(open_node(config, unbound).await?.state)
}

async fn open_node(config: Config, bound: SocketAddr) -> anyhow::Result<Node> {
    config.validate().map_err(anyhow::Error::msg)?;
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    // Before the metadata store opens: on a full disk, the space set aside for it
    // is given back so it can open, and the POP serves what it holds.
    let disk = Arc::new(Disk::open(data_dir.clone(), &config.disk));
    let meta: Arc<dyn MetadataStore> = Arc::new(
        SledMetadataStore::open(&data_dir.join("metadata"))
            .with_context(|| format!("opening the metadata store in {}", data_dir.display()))?,
    );
    let parts = PartStore::open(data_dir.join("parts"))?;
    let small_files = Arc::new(SegmentLog::open(&data_dir.join("parts"))?);
    let destinations = Arc::new(Destinations::open(&config.storage, &data_dir).await?);
    // Before anything writes: bytes a crash left without an owner are collected.
    crate::upload::reconcile(meta.as_ref(), &parts, &small_files, &config).await?;
    let wakeup = Arc::new(Notify::new());
    // Read before anything else starts: a bad certificate stops the POP here.
    let certificates = if config.server.tls() {
        Some(Certificates::load(
            &config.server.tls_cert,
            &config.server.tls_key,
        )?)
    } else {
        None
    };
    let tls = certificates
        .as_ref()
        .map(Certificates::acceptor)
        .transpose()?;
    let public_url = if config.server.public_url.is_empty() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{bound}")
    } else {
        config.server.public_url.trim_end_matches('/').to_owned()
    };
    let location_url = public_url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(&public_url)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let signer = UrlSigner::new(signing_secret(&config, &data_dir)?);
    let events = Arc::new(StatusEvents::default());
    let apps = Arc::new(Apps::new(config.apps.clone()));
    if apps.is_open() {
        tracing::warn!("no [apps] configured: this POP accepts uploads with any API key");
    }
    let webhooks = Arc::new(Webhooks::new(
        meta.clone(),
        apps.clone(),
        public_url.clone(),
        config.server.pop_id.clone(),
        config.webhooks.clone(),
    ));
    let services = Arc::new(Services {
        meta: meta.clone(),
        parts: parts.clone(),
        small_files: small_files.clone(),
        destinations: destinations.clone(),
        disk,
        events: events.clone(),
        apps,
        webhooks: webhooks.clone(),
        replication_wakeup: wakeup.clone(),
        pop: config.pop_id().map_err(anyhow::Error::msg)?,
    });
    let lifecycle = Arc::new(Lifecycle::open(
        meta.clone(),
        parts.clone(),
        small_files,
        webhooks.clone(),
        events,
    )?);
    let uploads = Uploads::new(
        services.clone(),
        lifecycle.clone(),
        UploadLimits {
            max_file_size: config.uploads.max_file_size,
            expire_after: Duration::from_secs(config.uploads.expire_after_secs),
            lock_wait: Duration::from_secs(config.server.body_idle_secs),
            max_body_writers: config.server.max_body_writers,
            play_idle: Duration::from_secs(config.uploads.play_idle_secs),
        },
    );
    uploads.restore_reservations()?;
    uploads.complete_ready_finals().await?;
    let network = Network::new(&config)?;
    let fetcher = crate::fetch::Fetcher::new(&config.uploads)?;
    let replicator = Arc::new(
        Replicator::new(
            meta.clone(),
            parts,
            destinations,
            wakeup,
            config.replicator.clone(),
            lifecycle.clone(),
            webhooks.clone(),
        )
        .writing_manifests(network.is_networked()),
    );
    let cache = Arc::new(LocalCache::new(
        meta.clone(),
        lifecycle,
        config.cache.max_bytes,
    ));
    let state = Arc::new(AppState {
        config,
        public_url,
        location_url,
        services,
        uploads,
        signer,
        cache,
        network,
        fetcher,
    });
    Ok(Node {
        state,
        meta,
        replicator,
        webhooks,
        certificates,
        tls,
    })
}

/// `X-HTTP-Method-Override` on a POST (for clients that cannot send PATCH or DELETE).
/// A value that is not a method token is refused rather than ignored: the client
/// asked for something other than a POST.
async fn method_override(mut request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        if let Some(value) = request.headers().get("x-http-method-override") {
            match Method::from_bytes(value.as_bytes()) {
                Ok(method) => *request.method_mut() = method,
                Err(_) => {
                    let shown = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    return crate::error::ApiError::invalid(
                        "invalid_method_override",
                        format!(
                            "X-HTTP-Method-Override is {shown:?}, not an HTTP method; send e.g. PATCH or DELETE"
                        ),
                    )
                    .into_response();
                }
            }
        }
    }
    next.run(request).await
}

/// The configured secret, or one generated on first start and kept in the data directory
/// so signed URLs stay valid across restarts.
fn signing_secret(config: &Config, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if !config.uploads.url_signing_secret.is_empty() {
        return Ok(config.uploads.url_signing_secret.as_bytes().to_vec());
    }
    let path = data_dir.join("url-signing.key");
    match std::fs::read(&path) {
        Ok(secret) if !secret.is_empty() => Ok(secret),
        _ => {
            let secret = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
            write_secret(&path, &secret)?;
            Ok(secret)
        }
    }
}

/// Writes a secret readable by the POP's user only, durably: a temporary file
/// (mode 0600) synced, renamed into place, and its directory synced.
fn write_secret(path: &Path, secret: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(secret)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    cin_storage::parts::sync_dir(dir)?;
    Ok(())
}

fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(Any)
        .expose_headers(
            [
                "etag",
                "content-range",
                "content-length",
                "location",
                "cin-handle",
                "cin-chunk-size-hint",
            ]
            .into_iter()
            .chain(routes::tus::EXPOSED_HEADERS)
            .map(HeaderName::from_static)
            .collect::<Vec<_>>(),
        )
}

pub fn router(state: SharedState) -> Router {
    let disk = state.services.disk.clone();
    let access_log = state.config.log.access;
    routes::router(&state.config)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::network::forward::uploads_stay_with_their_origin,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |request, next| {
            retry_after_when_full(disk.clone(), request, next)
        }))
        .layer(axum::middleware::from_fn(move |request, next| {
            observability::track_request(access_log, request, next)
        }))
}

/// Every 507 tells the client when to try again, whichever write ran out of
/// space (the error mapping cannot see the configured delay).
async fn retry_after_when_full(disk: Arc<Disk>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if response.status() == axum::http::StatusCode::INSUFFICIENT_STORAGE
        && !response
            .headers()
            .contains_key(axum::http::header::RETRY_AFTER)
    {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(disk.retry_after_secs()),
        );
    }
    response
}

/// The whole HTTP service: `X-HTTP-Method-Override`, CORS, then the routes.
fn service(
    state: SharedState,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send>
       + Clone
       + Send {
    let plain = router(state);
    let with_cors = plain.clone().layer(cors());
    let routed = tower::service_fn(move |request: Request| {
        // The CORS layer answers every OPTIONS as a preflight; tus's own OPTIONS
        // (no Access-Control-Request-Method) must reach its handler.
        let service = if request.method() == Method::OPTIONS
            && !request
                .headers()
                .contains_key("access-control-request-method")
        {
            plain.clone()
        } else {
            with_cors.clone()
        };
        tower::ServiceExt::oneshot(service, request)
    });
    // The override must act before routing, so it wraps the router rather than being one of its layers.
    tower::Layer::layer(&axum::middleware::from_fn(method_override), routed)
}

/// Starts the background workers, in the order they stop: replication first
/// (its deliveries journal their progress), then webhooks, then housekeeping.
fn start_workers(node: &Node) -> Workers {
    let state = &node.state;
    let deadline = Duration::from_secs(state.config.server.worker_stop_secs);
    let mut workers = Workers::default();
    workers.spawn(node.replicator.clone().worker(), deadline);
    workers.spawn(node.webhooks.clone().worker(), deadline);
    workers.spawn(
        EvictionWorker::new(
            state.cache.clone(),
            &state.services.events,
            Duration::from_secs(state.config.cache.evict_interval_secs),
        ),
        deadline,
    );
    workers.spawn(
        SweepWorker {
            state: state.clone(),
        },
        deadline,
    );
    workers.spawn(ProbeWorker(state.services.destinations.clone()), deadline);
    workers.spawn(DiskWatch(state.services.disk.clone()), deadline);
    if let Some(certificates) = &node.certificates {
        let interval = Duration::from_secs(state.config.server.tls_reload_secs);
        workers.spawn(
            CertificateWatch::new(certificates.clone(), interval),
            deadline,
        );
    }
    workers
}

/// What a person starting the POP wants to know, in one message: where it
/// listens, where its data is, where files go and how each store is doing, and
/// what is switched on.
fn start_summary(state: &AppState, listening: &str) -> String {
    let config = &state.config;
    let public = &state.public_url;
    let data_dir = std::path::absolute(&config.server.data_dir)
        .unwrap_or_else(|_| config.server.data_dir.clone());
    let mut lines = vec![
        format!(
            "cin-edge {} (POP {}) listening on {listening} (public URL {public})",
            env!("CARGO_PKG_VERSION"),
            config.server.pop_id
        ),
        format!("  data directory: {}", data_dir.display()),
    ];
    let destinations = &state.services.destinations;
    for d in destinations.all() {
        let health = d.health();
        let default = if Some(d.name.as_str())
            == destinations.default_destination().map(|d| d.name.as_str())
        {
            ", the default"
        } else {
            ""
        };
        let state = match health.message() {
            Some(message) => format!("{}: {message}", health.label()),
            None => health.label().to_owned(),
        };
        lines.push(format!(
            "  storage profile {:?}{default}: {} ({state})",
            d.name,
            d.store.describe()
        ));
    }
    lines.push(format!(
        "  uploads: Filestack API at {public}/multipart/* and {public}/api/store/*, tus at {public}/files/"
    ));
    let page = if config.page.enabled {
        format!("{public}/")
    } else {
        "off".to_owned()
    };
    let apps = if config.apps.is_empty() {
        "none configured: the POP is open to any API key".to_owned()
    } else {
        let names: Vec<&str> = config.apps.keys().map(String::as_str).collect();
        names.join(", ")
    };
    let network = if config.network.pops.is_empty() {
        "none (a POP on its own)".to_owned()
    } else {
        format!("{} POPs", config.network.pops.len())
    };
    lines.push(format!(
        "  upload page: {page}; apps: {apps}; network: {network}"
    ));
    let admin = if config.admin.key.is_empty() {
        "off (set admin.key to list files and retry or cancel replication)".to_owned()
    } else {
        format!("{public}/api/files")
    };
    lines.push(format!(
        "  HTTPS: {}; admin API: {admin}; metrics at {public}/metrics, readiness at {public}/readyz",
        if config.server.tls() { "on" } else { "off" }
    ));
    lines.join("\n")
}

/// Serves on `listener` until `shutdown` resolves; then drains requests (up to the
/// configured grace period, then cancels them), stops the workers and flushes the
/// metadata store.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bound = listener.local_addr()?;
    observability::metrics_handle();
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let node = open_node(config, bound).await?;
    let scheme = if node.tls.is_some() { "https" } else { "http" };
    tracing::info!(
        listening = %format!("{scheme}://{bound}"),
        public_url = %node.state.public_url,
        data_dir = %node.state.config.server.data_dir.display(),
        "{}",
        start_summary(&node.state, &format!("{scheme}://{bound}"))
    );

    let workers = start_workers(&node);
    let (signal_tx, draining) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal_tx.send(true);
    });
    let mut signalled = draining.clone();
    let server_config = &node.state.config.server;
    let limits = server::ServerLimits {
        head_timeout: Duration::from_secs(server_config.head_timeout_secs),
        body_idle: Duration::from_secs(server_config.body_idle_secs),
        keep_alive: Duration::from_secs(server_config.keep_alive_secs),
        max_connections: server_config.max_connections,
    }
    .fitted_to_descriptors();
    let connections = server::serve(
        listener,
        service(node.state.clone()),
        limits,
        node.tls.clone(),
        draining,
    )
    .await;

    // Ordered shutdown: no new connections; requests in flight get the grace
    // period, then are cancelled; workers stop, each within its deadline; the
    // metadata store makes everything durable.
    let _ = signalled.wait_for(|s| *s).await;
    tracing::info!("shutting down: no new connections, draining requests for up to {grace:?}");
    let cancelled = connections.drain(grace).await;
    if cancelled > 0 {
        tracing::warn!(
            cancelled,
            "requests still running after {grace:?} were cancelled"
        );
    }
    let overran = workers.stop().await;
    if !overran.is_empty() {
        tracing::warn!(?overran, "background workers cancelled at their deadline");
    }
    node.meta.flush().await?;
    tracing::info!("stopped");
    Ok(())
}
