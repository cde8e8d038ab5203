//! Typed, layered configuration: built-in defaults, then an optional TOML file,
//! then `CIN__SECTION__KEY` environment variables (e.g. `CIN__SERVER__LISTEN`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub uploads: UploadsConfig,
    pub storage: StorageConfig,
    pub replicator: ReplicatorConfig,
    pub disk: DiskConfig,
    pub cache: CacheConfig,
    pub webhooks: WebhooksConfig,
    pub log: LogConfig,
    pub network: NetworkConfig,
    pub page: PageConfig,
    pub admin: AdminConfig,
    /// Apps by name. With none, the POP is open: any API key is accepted.
    pub apps: BTreeMap<String, AppConfig>,
}

/// The operator's admin API (`GET /api/files`, replication retry and cancel),
/// which `cin-edge admin` calls.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Key every admin call sends as `Authorization: Bearer KEY`; at least 32
    /// characters. Empty: the admin API is off (its routes answer 404 saying so).
    pub key: String,
}

/// The network of POPs this one belongs to. Empty: a POP on its own.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Signs POP-to-POP calls (HMAC-SHA256, time-limited); the same at every POP
    /// of the network, at least 32 characters, never given to clients.
    pub secret: String,
    /// Every POP of the network (this one may be listed too).
    pub pops: Vec<NetworkPop>,
}

/// A POP of the network.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPop {
    /// Its `server.pop_id`.
    pub id: String,
    /// The URL other POPs reach it at (its internal address), e.g. `http://10.0.0.2:8080`.
    pub url: String,
}

/// An app: its API key, its secret for security policies, and its limits.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// The public API key clients send (`apikey`, `?key=`).
    pub apikey: String,
    /// Secret that signs the app's security policies (HMAC-SHA256, hex).
    pub secret: String,
    /// Storage profiles this app may deliver to; empty allows all.
    pub allowed_profiles: Vec<String>,
    /// Largest file this app may upload, in bytes; 0 leaves the POP's limit.
    pub max_file_size: u64,
    /// Every upload, metadata query and filelink read needs a signed policy.
    pub require_security: bool,
    /// URLs that receive this app's file status changes as signed JSON POSTs.
    pub webhooks: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of local copies of stored files to keep for serving; the least recently
    /// read are evicted beyond it (0 keeps every copy).
    pub max_bytes: u64,
    /// Seconds between eviction passes (one also runs after each file is stored).
    pub evict_interval_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 100 * 1024 * 1024 * 1024,
            evict_interval_secs: 60,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// First retry delay of a failed delivery, in milliseconds; doubles per attempt.
    pub retry_base_ms: u64,
    /// Longest delay between delivery attempts, in milliseconds.
    pub retry_cap_ms: u64,
    /// Seconds a receiver gets to answer.
    pub timeout_secs: u64,
    /// A `replication_failing` event is sent once a file has failed to replicate for this many seconds.
    pub replication_failing_after_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            retry_base_ms: 1000,
            retry_cap_ms: 300_000,
            timeout_secs: 10,
            replication_failing_after_secs: 600,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Free bytes the data directory's filesystem must keep: below this (counting
    /// room reserved for uploads in progress) new uploads get 507 and readiness fails.
    pub min_free_bytes: u64,
    /// Seconds clients are told to wait (`Retry-After`) when refused for lack of disk.
    pub retry_after_secs: u64,
    /// Seconds an unfinished upload may receive nothing before the room reserved for
    /// its declared size is given back to others; it is taken again (or refused
    /// with 507 when there is no room) when the upload continues.
    pub reservation_idle_secs: u64,
    /// Bytes set aside for the metadata store (`{data_dir}/space-reserve`). When the
    /// disk fills they are given back, so records can still be written and the POP
    /// starts on a full disk; uploads are refused until they can be set aside again.
    /// 0 sets nothing aside.
    pub metadata_reserve_bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            min_free_bytes: 1024 * 1024 * 1024,
            retry_after_secs: 60,
            reservation_idle_secs: 600,
            metadata_reserve_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    pub listen: SocketAddr,
    /// Base URL clients reach this POP at, used in filelinks and upload URLs;
    /// `location_url` is its host and port. Empty: `http://{bound address}`
    /// (`https://` with a TLS certificate).
    pub public_url: String,
    /// Directory for the metadata store, part files and the local origin store.
    pub data_dir: PathBuf,
    /// This POP's id: 2 characters of `[A-Za-z0-9]`, unique in a network of
    /// POPs. Every handle and upload id it mints begins with it, and metadata
    /// reports it, so a handle's origin POP is known anywhere.
    pub pop_id: String,
    /// Seconds that in-flight requests get to finish after SIGTERM/SIGINT; then they are cancelled.
    pub shutdown_grace_secs: u64,
    /// Seconds each background worker (replication, webhooks, housekeeping) gets to stop after that.
    pub worker_stop_secs: u64,
    /// Seconds a request head may take to arrive, from its first byte (or from
    /// the connection's opening); slower connections are closed.
    pub head_timeout_secs: u64,
    /// Seconds a body read may wait for bytes; then the request ends (what was
    /// made durable stays) and a response the client does not read is dropped.
    pub body_idle_secs: u64,
    /// Seconds a keep-alive connection may sit idle between requests.
    pub keep_alive_secs: u64,
    /// Connections served at once (lowered to fit the open-file limit). At the
    /// limit the longest-idle connection is closed for a new one; when none is
    /// idle, new connections get 503 except for /healthz, /readyz and /metrics.
    pub max_connections: usize,
    /// Requests that may write upload bodies at once; more get 503 with Retry-After.
    pub max_body_writers: usize,
    /// PEM certificate chain (the server's certificate first). With `tls_key`,
    /// the listener speaks HTTPS (HTTP/2 or HTTP/1.1 by ALPN); empty: plain HTTP,
    /// e.g. behind a load balancer that ends TLS.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// Seconds between checks of the certificate files: changed files are read
    /// again without a restart (SIGHUP reads them at once).
    pub tls_reload_secs: u64,
}

impl ServerConfig {
    /// Whether the listener speaks HTTPS.
    pub fn tls(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// Largest file accepted, in bytes.
    pub max_file_size: u64,
    /// Seconds a signed part-upload URL stays valid.
    pub upload_url_ttl_secs: u64,
    /// Secret for signing part-upload URLs. Empty: a random secret is generated once
    /// and kept in `{data_dir}/url-signing.key`.
    pub url_signing_secret: String,
    /// Seconds without new bytes after which an unfinished upload expires: its bytes
    /// are removed and its handle answers `expired`.
    pub expire_after_secs: u64,
    /// Seconds between sweeps for expired uploads.
    pub sweep_interval_secs: u64,
    /// Store from URL (`POST /api/store/{location}` with `url=`): address ranges
    /// the POP may fetch from although they are private, loopback or link-local
    /// (CIDRs such as `10.1.0.0/16`); others of those are refused, so the POP is
    /// no way into its own network.
    pub fetch_allow: Vec<String>,
    /// Seconds a fetch from a URL may take in all (connecting, redirects, body).
    pub fetch_timeout_secs: u64,
    /// Seconds a filelink read of a file still uploading waits for new bytes
    /// before its answer ends (the player asks again with a Range).
    pub play_idle_secs: u64,
}

/// The upload page at `/`: a person uploads files from a browser.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageConfig {
    /// Serve the page; off, `/` answers 404 like any unknown route.
    pub enabled: bool,
    /// Credentials the page sends with every upload, for apps that require them
    /// (a URL's `?apikey=&policy=&signature=` overrides them).
    pub apikey: String,
    pub policy: String,
    pub signature: String,
}

impl Default for PageConfig {
    fn default() -> Self {
        PageConfig {
            enabled: true,
            apikey: String::new(),
            policy: String::new(),
            signature: String::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Profile that receives uploads naming no container (the operator's own store).
    pub default_profile: String,
    /// Final storage profiles by name.
    pub profiles: BTreeMap<String, StorageProfile>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    /// A directory on this machine.
    Local,
    /// S3 or an S3-compatible service.
    S3,
}

/// One final-storage destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageProfile {
    /// `local` or `s3`.
    pub kind: ProfileKind,
    /// Bucket name (s3), or the container name reported for a local profile.
    /// Uploads whose `store.container` names this bucket are delivered here.
    pub bucket: String,
    /// Local profiles: directory holding `{bucket}/{key}`; relative to `data_dir`.
    pub path: PathBuf,
    /// Prefix put in front of every key.
    pub key_prefix: String,
    /// S3: region of the bucket.
    pub region: String,
    /// S3: endpoint URL of an S3-compatible service; empty for AWS itself.
    pub endpoint: String,
    /// S3: address buckets as `endpoint/bucket` (most S3-compatible services need this).
    pub force_path_style: bool,
    /// S3: access key; empty uses the standard AWS credential chain
    /// (environment, shared profile, web identity, container or instance role).
    pub access_key_id: String,
    /// S3: secret key belonging to `access_key_id`.
    pub secret_access_key: String,
    /// S3: canned ACL for objects when the upload does not ask for one (`private`,
    /// `public-read`); empty leaves it to the bucket's settings.
    pub acl: String,
    /// S3: multipart part size in bytes (at least 5 MiB); files up to this size go in one PutObject.
    pub part_size: u64,
    /// S3: parts of one file uploaded at the same time.
    pub concurrency: usize,
}

impl Default for StorageProfile {
    fn default() -> Self {
        StorageProfile {
            kind: ProfileKind::Local,
            bucket: "default".into(),
            path: PathBuf::from("origin"),
            key_prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            force_path_style: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            acl: String::new(),
            part_size: 16 * 1024 * 1024,
            concurrency: 4,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// Files replicated at the same time.
    pub workers: usize,
    /// First retry delay after a failure, in milliseconds; doubles per attempt.
    pub retry_base_ms: u64,
    /// Longest delay between retries, in milliseconds; a failing job keeps being retried at this interval.
    pub retry_cap_ms: u64,
    /// Attempts final storage may answer with a definitive mismatch (a size or checksum that cannot be the file's bytes) before the file's replication is given up: it stays InTransit and servable, marked failed; 0 never gives up.
    pub max_mismatch_attempts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `cin_edge=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
    /// One line per request at info (target `cin_edge::access`): method, route,
    /// status, bytes in and out, duration and request id.
    pub access: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: String::new(),
            data_dir: PathBuf::from("./data"),
            pop_id: "00".into(),
            shutdown_grace_secs: 30,
            worker_stop_secs: 5,
            head_timeout_secs: 10,
            body_idle_secs: 30,
            keep_alive_secs: 60,
            max_connections: 10_000,
            max_body_writers: 256,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_reload_secs: 10,
        }
    }
}

impl Default for UploadsConfig {
    fn default() -> Self {
        UploadsConfig {
            max_file_size: 5 * 1024 * 1024 * 1024 * 1024,
            upload_url_ttl_secs: 3600,
            url_signing_secret: String::new(),
            expire_after_secs: 86_400,
            sweep_interval_secs: 300,
            fetch_allow: Vec::new(),
            fetch_timeout_secs: 300,
            play_idle_secs: 30,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        let mut profiles = BTreeMap::new();
        profiles.insert("default".to_owned(), StorageProfile::default());
        StorageConfig {
            default_profile: "default".into(),
            profiles,
        }
    }
}

impl Default for ReplicatorConfig {
    fn default() -> Self {
        ReplicatorConfig {
            workers: 4,
            retry_base_ms: 500,
            retry_cap_ms: 60_000,
            max_mismatch_attempts: 3,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
            access: true,
        }
    }
}

/// Why a configuration could not be loaded: each problem names the setting, where
/// it came from (the file, or the environment variable) and the value given.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> ConfigError {
        ConfigError {
            problems: vec![problem],
        }
    }

    /// Describes each of figment's errors with the setting's name, its source and the
    /// value given, which figment's own messages leave out for values that parsed
    /// as the wrong thing (an address, a URL).
    fn from_figment(figment: &Figment, error: figment::Error) -> ConfigError {
        let problems = error
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                let source = match &e.metadata {
                    Some(m) if m.name.contains("environment") => {
                        format!("environment variable {}", env_var_name(&e.path))
                    }
                    Some(m) => match &m.source {
                        Some(figment::Source::File(path)) => {
                            format!("{}", path.display())
                        }
                        _ => m.name.to_string(),
                    },
                    None => "the configuration".to_owned(),
                };
                let given = figment
                    .find_value(&key)
                    .ok()
                    .map(|v| format!(" = {}", show_value(&v)))
                    .unwrap_or_default();
                let what = match &e.kind {
                    figment::error::Kind::UnknownField(field, known) => {
                        let setting = if e.path.last().is_some_and(|last| last == field) {
                            key.clone()
                        } else if key.is_empty() {
                            field.to_string()
                        } else {
                            format!("{key}.{field}")
                        };
                        return format!(
                            "{source}: unknown setting {setting}; the settings here are {}",
                            known.join(", ")
                        );
                    }
                    kind => kind.to_string(),
                };
                if key.is_empty() {
                    format!("{source}: {what}")
                } else {
                    format!("{key}{given} (from {source}): {what}")
                }
            })
            .collect();
        ConfigError { problems }
    }
}

/// The `CIN__SECTION__KEY` variable that sets the setting at `path`.
pub fn env_var_name(path: &[String]) -> String {
    let keys: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("CIN__{}", keys.join("__"))
}

fn show_value(value: &figment::value::Value) -> String {
    use figment::value::Value;
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{c:?}"),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match n.to_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            Some(f) => f.to_string(),
            None => "a number".to_owned(),
        },
        Value::Empty(..) => "nothing".to_owned(),
        Value::Dict(..) => "a table".to_owned(),
        Value::Array(..) => "a list".to_owned(),
    }
}

/// Settings only an S3 profile uses: a local profile that sets one is
/// half-configured (most likely a forgotten `kind = "s3"`).
const S3_ONLY_SETTINGS: [&str; 8] = [
    "region",
    "endpoint",
    "force_path_style",
    "access_key_id",
    "secret_access_key",
    "acl",
    "part_size",
    "concurrency",
];

/// The name of the profile the POP provides when the configuration keeps it.
pub const BUILT_IN_PROFILE: &str = "default";

impl Config {
    /// Defaults, then `file` if given, then `CIN__*` environment variables.
    ///
    /// The built-in `default` profile (a local directory) exists only while
    /// `storage.default_profile` is `default`: naming another profile leaves it
    /// out. Every other profile must say its `kind`, so a profile that forgot
    /// `kind = "s3"` is refused rather than silently becoming a local directory.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut bare = Config::default();
        bare.storage.profiles.clear();
        let layered = |defaults: Config| {
            let mut figment = Figment::from(Serialized::defaults(defaults));
            if let Some(file) = file {
                figment = figment.merge(Toml::file_exact(file));
            }
            figment.merge(Env::prefixed("CIN__").split("__"))
        };
        let given = layered(bare);
        let default_profile: String = given
            .extract_inner("storage.default_profile")
            .map_err(|e| ConfigError::from_figment(&given, e))?;
        let keeps_built_in = default_profile == BUILT_IN_PROFILE;
        check_profiles_as_given(&given, keeps_built_in)?;
        let figment = if keeps_built_in {
            layered(Config::default())
        } else {
            given
        };
        figment
            .extract()
            .map_err(|e| ConfigError::from_figment(&figment, e))
    }

    /// Loads and validates: what `serve` starts with, or why it would not start.
    pub fn load_checked(file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Config::load(file)?;
        config.validate().map_err(ConfigError::one)?;
        Ok(config)
    }

    /// The configuration as TOML, with every secret replaced by `********`.
    pub fn to_masked_toml(&self) -> Result<String, String> {
        let mut value = toml::Value::try_from(self).map_err(|e| e.to_string())?;
        mask_secrets(&mut value);
        toml::to_string_pretty(&value).map_err(|e| e.to_string())
    }

    /// Checks what the types cannot: every name that must resolve does.
    fn validate_network(&self) -> Result<(), String> {
        let network = &self.network;
        let mut seen = std::collections::BTreeSet::new();
        for (i, pop) in network.pops.iter().enumerate() {
            cin_domain::PopId::parse(&pop.id).map_err(|e| format!("network.pops[{i}].id: {e}"))?;
            if !seen.insert(pop.id.as_str()) {
                return Err(format!(
                    "network.pops lists POP {:?} twice; each POP id names one POP",
                    pop.id
                ));
            }
            if !(pop.url.starts_with("http://") || pop.url.starts_with("https://")) {
                return Err(format!(
                    "network.pops[{i}].url is {:?}; give the URL other POPs reach POP {} at, e.g. http://10.0.0.2:8080",
                    pop.url, pop.id
                ));
            }
        }
        if !network.pops.is_empty() && network.secret.len() < 32 {
            return Err(
                "network.secret must be at least 32 characters when network.pops lists POPs: it signs their calls to one another"
                    .into(),
            );
        }
        Ok(())
    }

    /// This POP's id, checked.
    pub fn pop_id(&self) -> Result<cin_domain::PopId, String> {
        cin_domain::PopId::parse(&self.server.pop_id).map_err(|e| format!("server.pop_id: {e}"))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.pop_id()?;
        self.validate_network()?;
        let server = &self.server;
        for (name, value) in [
            ("server.head_timeout_secs", server.head_timeout_secs),
            ("server.body_idle_secs", server.body_idle_secs),
            ("server.keep_alive_secs", server.keep_alive_secs),
            ("server.max_connections", server.max_connections as u64),
            ("server.max_body_writers", server.max_body_writers as u64),
            ("server.tls_reload_secs", server.tls_reload_secs),
            (
                "uploads.fetch_timeout_secs",
                self.uploads.fetch_timeout_secs,
            ),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        for (i, range) in self.uploads.fetch_allow.iter().enumerate() {
            range.parse::<ipnet::IpNet>().map_err(|_| {
                format!("uploads.fetch_allow[{i}] is {range:?}, not an address range such as 10.1.0.0/16")
            })?;
        }
        if server.tls_cert.as_os_str().is_empty() != server.tls_key.as_os_str().is_empty() {
            return Err(
                "server.tls_cert and server.tls_key go together: set both for HTTPS, or neither for plain HTTP"
                    .into(),
            );
        }
        if !self
            .storage
            .profiles
            .contains_key(&self.storage.default_profile)
        {
            return Err(format!(
                "storage.default_profile names {:?}, which is not in [storage.profiles]",
                self.storage.default_profile
            ));
        }
        for (name, profile) in &self.storage.profiles {
            if profile.bucket.is_empty() {
                return Err(format!("storage.profiles.{name}.bucket must not be empty"));
            }
            if profile.kind == ProfileKind::S3 && profile.part_size < 5 * 1024 * 1024 {
                return Err(format!(
                    "storage.profiles.{name}.part_size is {}; S3 needs parts of at least 5 MiB (5242880)",
                    profile.part_size
                ));
            }
            if profile.access_key_id.is_empty() != profile.secret_access_key.is_empty() {
                return Err(format!(
                    "storage.profiles.{name}: set both access_key_id and secret_access_key, or neither"
                ));
            }
        }
        for (name, app) in &self.apps {
            if app.apikey.is_empty() {
                return Err(format!("apps.{name}.apikey must not be empty"));
            }
            if app.require_security && app.secret.is_empty() {
                return Err(format!(
                    "apps.{name} requires security, so apps.{name}.secret must be set"
                ));
            }
            for profile in &app.allowed_profiles {
                if !self.storage.profiles.contains_key(profile) {
                    return Err(format!("apps.{name}.allowed_profiles names {profile:?}, which is not in [storage.profiles]"));
                }
            }
        }
        if self.replicator.workers == 0 {
            return Err("replicator.workers must be at least 1".into());
        }
        if !self.admin.key.is_empty() && self.admin.key.chars().count() < 32 {
            return Err(format!(
                "admin.key has {} characters; it must have at least 32 (e.g. `openssl rand -hex 32`), or be empty to turn the admin API off",
                self.admin.key.chars().count()
            ));
        }
        Ok(())
    }
}

/// Keys whose values are secrets wherever they appear.
const SECRET_KEYS: [&str; 4] = ["secret", "secret_access_key", "url_signing_secret", "key"];

fn mask_secrets(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, inner) in table.iter_mut() {
                let is_secret = SECRET_KEYS.contains(&key.as_str());
                match inner {
                    toml::Value::String(s) if is_secret && !s.is_empty() => {
                        *s = "********".to_owned()
                    }
                    _ => mask_secrets(inner),
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// Refuses storage profiles the file or environment left half-configured: no
/// `kind`, an S3 profile without its bucket, a local one with S3 settings.
fn check_profiles_as_given(given: &Figment, keeps_built_in: bool) -> Result<(), ConfigError> {
    let Ok(figment::value::Value::Dict(_, profiles)) = given.find_value("storage.profiles") else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (name, profile) in &profiles {
        let Some(settings) = profile.as_dict() else {
            continue;
        };
        let path = |key: &str| {
            vec![
                "storage".into(),
                "profiles".into(),
                name.clone(),
                key.into(),
            ]
        };
        let kind = settings
            .get("kind")
            .and_then(|k| k.as_str())
            .map(str::to_ascii_lowercase);
        let kind = match kind {
            Some(kind) => kind,
            // The built-in profile is local unless the configuration says otherwise.
            None if keeps_built_in && name == BUILT_IN_PROFILE => "local".to_owned(),
            None => {
                problems.push(format!(
                    "storage.profiles.{name} has no kind: add kind = \"s3\" (with bucket, and endpoint for an S3-compatible service) or kind = \"local\" (with path), or set {}",
                    env_var_name(&path("kind"))
                ));
                continue;
            }
        };
        if kind == "s3" && !settings.contains_key("bucket") {
            problems.push(format!(
                "storage.profiles.{name} is an s3 profile without a bucket: add bucket = \"...\" (or set {})",
                env_var_name(&path("bucket"))
            ));
        }
        if kind == "local" {
            // Values equal to the defaults are what config/default.toml spells out.
            let defaults = Figment::from(Serialized::defaults(StorageProfile::default()));
            let stray: Vec<&str> = S3_ONLY_SETTINGS
                .into_iter()
                .filter(|key| {
                    settings.get(*key).is_some_and(|given| {
                        defaults
                            .find_value(key)
                            .map_or(true, |default| show_value(given) != show_value(&default))
                    })
                })
                .collect();
            if !stray.is_empty() {
                problems.push(format!(
                    "storage.profiles.{name} is a local profile but sets {}, which only s3 profiles use: add kind = \"s3\", or remove them",
                    stray.join(", ")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_file_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let from_file: Config = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        let built_in = Config::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&built_in).unwrap()
        );
    }
}
