//! `cin-edge admin ...`: asks a running POP about its files and acts on
//! failing replications, through its admin API. It reads the configuration
//! `serve` reads (`--config FILE`, `CIN__*` variables) to find the POP (where it
//! listens, whether it speaks HTTPS) and its admin key; `--pop` and `--key`
//! (or `CIN_ADMIN_KEY`) override them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: AdminCommand,
}

/// Which POP to ask, and how.
#[derive(Debug, clap::Args)]
struct Target {
    /// The POP's TOML configuration, the file `serve` runs with (`CIN__*`
    /// variables apply as for `serve`): where it listens, whether it speaks
    /// HTTPS, and its admin.key.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The POP's URL, e.g. http://127.0.0.1:8080 [default: from server.listen,
    /// 0.0.0.0 and :: asked on loopback, https when server.tls_cert is set].
    #[arg(long, global = true, value_name = "URL")]
    pop: Option<String>,
    /// The admin key [default: admin.key of the configuration].
    #[arg(long, global = true, env = "CIN_ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Trust the CA certificate in this PEM file (e.g. ca.pem from `cin-edge dev-cert`).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not check the POP's TLS certificate (development only).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// List the POP's files in handle order, a page at a time, as a table (or JSON).
    List(ListArgs),
    /// Retry a failing replication now: due at once, no longer given up or cancelled.
    Retry {
        /// The file's handle.
        handle: String,
    },
    /// Cancel a failing replication: no more attempts until a retry; the file
    /// stays InTransit and is served from the POP.
    Cancel {
        /// The file's handle.
        handle: String,
    },
    /// Ask the POP's /healthz: exits 0 when it answers 200, else says why and exits 1.
    Health,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only files with this status: Uploading, InTransit or Stored.
    #[arg(long)]
    status: Option<String>,
    /// Only files of this app (its name or API key).
    #[arg(long)]
    app: Option<String>,
    /// Only files delivered to this container (bucket).
    #[arg(long)]
    container: Option<String>,
    /// Only files whose status last changed at least this many seconds ago.
    #[arg(long, value_name = "SECS")]
    older_than: Option<u64>,
    /// Only files whose replication fails (retrying, given up or cancelled).
    #[arg(long)]
    failing: bool,
    /// Files per page (1 to 1000; the POP's default is 100).
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// Start after this cursor (the `more:` line of a previous page).
    #[arg(long)]
    cursor: Option<String>,
    /// Follow the cursors to the last page.
    #[arg(long)]
    all: bool,
    /// Print the answer as JSON ({"files": [...], "next_cursor": ...}) instead of a table.
    #[arg(long)]
    json: bool,
}

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Config(String),
    #[error("no POP answers at {url}: is `cin-edge serve` running there? Pass --pop URL to ask another ({cause})")]
    Unreachable { url: String, cause: String },
    #[error("the TLS handshake with {url} failed ({cause}): pass --ca FILE with the CA that signed the POP's certificate (ca.pem of `cin-edge dev-cert`), or --insecure for a development POP")]
    Tls { url: String, cause: String },
    #[error("the POP at {url} did not answer within {secs} s: it may be overloaded or stuck; see its log")]
    Timeout { url: String, secs: u64 },
    /// The POP answered with an error.
    #[error("{0}")]
    Refused(String),
    #[error(
        "the answer of {url} is not the POP's JSON ({detail}): is --pop the URL of a cin-edge POP?"
    )]
    BadAnswer { url: String, detail: String },
}

/// How long a health check waits (a container's HEALTHCHECK gives it 5 s).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(4);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: AdminArgs) -> Result<(), AdminError> {
    let AdminArgs { target, command } = args;
    let needs_key = !matches!(command, AdminCommand::Health);
    let timeout = match command {
        AdminCommand::Health => HEALTH_TIMEOUT,
        _ => CALL_TIMEOUT,
    };
    let pop = Pop::connect(&target, needs_key, timeout)?;
    match command {
        AdminCommand::Health => pop.health().await,
        AdminCommand::List(list) => pop.list(&list).await,
        AdminCommand::Retry { handle } => {
            let file = pop.act(&handle, "retry").await?;
            println!(
                "{handle}: replication retried: due now (attempts so far: {})",
                file["replication"]["attempts"]
            );
            Ok(())
        }
        AdminCommand::Cancel { handle } => {
            pop.act(&handle, "cancel").await?;
            println!(
                "{handle}: replication cancelled: no more attempts; the file stays InTransit and is served from the POP. \
                 `cin-edge admin retry {handle}` resumes it"
            );
            Ok(())
        }
    }
}

/// A POP's URL, key and an HTTP client for it.
struct Pop {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
}

/// The configuration `serve` would load, read only when a flag leaves something to it.
fn load_config(target: &Target) -> Result<Config, AdminError> {
    Config::load(target.config.as_deref()).map_err(|e| {
        let source = match &target.config {
            Some(path) => path.display().to_string(),
            None => "the built-in defaults and CIN__ variables".to_owned(),
        };
        AdminError::Config(format!(
            "cannot read the POP's configuration ({source}): {e}; fix it, or pass --pop URL and --key"
        ))
    })
}

/// Where a POP listening on `listen` is reached from this machine.
fn url_of(config: &Config) -> Result<String, AdminError> {
    let listen = config.server.listen;
    if listen.port() == 0 {
        return Err(AdminError::Config(format!(
            "server.listen is {listen}: a POP on port 0 picks its port at start (it logs it); pass --pop URL"
        )));
    }
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if config.server.tls() { "https" } else { "http" };
    Ok(format!("{scheme}://{}", SocketAddr::new(ip, listen.port())))
}

impl Pop {
    fn connect(target: &Target, needs_key: bool, timeout: Duration) -> Result<Pop, AdminError> {
        let key_given = target.key.as_ref().filter(|k| !k.is_empty()).cloned();
        // Only read when a flag leaves something to it.
        let config = if target.pop.is_none() || (needs_key && key_given.is_none()) {
            load_config(target)?
        } else {
            Config::default()
        };
        let base = match &target.pop {
            Some(url) => {
                let url = url.trim_end_matches('/');
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(AdminError::Config(format!(
                        "--pop {url:?} is not a URL: give one such as http://127.0.0.1:8080"
                    )));
                }
                url.to_owned()
            }
            None => url_of(&config)?,
        };
        let key = match key_given {
            Some(key) => Some(key),
            None if needs_key => {
                let configured = config.admin.key;
                if configured.is_empty() {
                    return Err(AdminError::Config(
                        "no admin key: pass --key KEY or set CIN_ADMIN_KEY, or pass --config FILE \
                         with the POP's admin.key (while admin.key is empty the POP's admin API is off)"
                            .into(),
                    ));
                }
                Some(configured)
            }
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("cin-edge-admin/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &target.ca {
            let pem = std::fs::read(ca).map_err(|e| {
                AdminError::Config(format!("cannot read --ca {}: {e}", ca.display()))
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                AdminError::Config(format!(
                    "--ca {} is not a PEM certificate ({e}); give the CA's ca.pem",
                    ca.display()
                ))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        if target.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| AdminError::Config(format!("cannot set up an HTTP client: {e}")))?;
        Ok(Pop {
            base,
            key,
            http,
            timeout,
        })
    }

    /// What a request that got no answer says.
    fn transport_error(&self, error: reqwest::Error) -> AdminError {
        let url = self.base.clone();
        if error.is_timeout() {
            return AdminError::Timeout {
                url,
                secs: self.timeout.as_secs(),
            };
        }
        let cause = crate::error::root_cause(&error);
        let about_tls = cause.to_ascii_lowercase().contains("certificate")
            || cause.contains("UnknownIssuer")
            || cause.to_ascii_lowercase().contains("tls");
        if self.base.starts_with("https://") && about_tls {
            AdminError::Tls { url, cause }
        } else {
            AdminError::Unreachable { url, cause }
        }
    }

    /// Sends `request`; the answer's JSON when it is a success.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, AdminError> {
        let request = match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let answer = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = answer.status();
        let body = answer.text().await.map_err(|e| self.transport_error(e))?;
        if status.is_success() {
            return serde_json::from_str(&body).map_err(|e| AdminError::BadAnswer {
                url: self.base.clone(),
                detail: e.to_string(),
            });
        }
        let error: Option<Value> = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").cloned());
        let code = error
            .as_ref()
            .and_then(|e| e["code"].as_str())
            .unwrap_or("")
            .to_owned();
        let message = error
            .as_ref()
            .and_then(|e| e["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| body.chars().take(300).collect());
        let hint = match (status.as_u16(), code.as_str()) {
            (401, _) | (403, "admin_key_refused") => {
                ": pass the POP's admin key with --key or CIN_ADMIN_KEY, or --config FILE with its admin.key"
            }
            (404, "route_not_found") => ": this POP has no admin API; is --pop the URL of a cin-edge POP?",
            _ => "",
        };
        Err(AdminError::Refused(format!(
            "the POP at {} answered {status} {code}: {message}{hint}",
            self.base
        )))
    }

    async fn health(&self) -> Result<(), AdminError> {
        let url = format!("{}/healthz", self.base);
        let answer = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = answer.status();
        if status == reqwest::StatusCode::OK {
            println!("{url}: ok");
            Ok(())
        } else {
            let body: String = answer
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            Err(AdminError::Refused(format!(
                "{url} answered {status}, not 200 OK: {body}"
            )))
        }
    }

    async fn act(&self, handle: &str, action: &str) -> Result<Value, AdminError> {
        // A handle is letters and digits; anything else could change the path.
        if handle.is_empty() || !handle.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(AdminError::Config(format!(
                "{handle:?} is not a handle: 20 letters and digits, the last segment of a filelink"
            )));
        }
        let url = format!("{}/api/files/{handle}/replication/{action}", self.base);
        self.send(self.http.post(url)).await
    }

    async fn list(&self, args: &ListArgs) -> Result<(), AdminError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        let filters = [
            ("status", args.status.clone()),
            ("app", args.app.clone()),
            ("container", args.container.clone()),
            ("older_than", args.older_than.map(|s| s.to_string())),
            ("replication", args.failing.then(|| "failing".to_owned())),
            ("limit", args.limit.map(|n| n.to_string())),
        ];
        for (name, value) in filters {
            if let Some(value) = value {
                query.push((name, value));
            }
        }
        let mut files = Vec::new();
        let mut cursor = args.cursor.clone();
        loop {
            let mut page_query = query.clone();
            if let Some(cursor) = &cursor {
                page_query.push(("cursor", cursor.clone()));
            }
            let url = format!("{}/api/files", self.base);
            let page = self.send(self.http.get(url).query(&page_query)).await?;
            files.extend(page["files"].as_array().cloned().unwrap_or_default());
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if !args.all || cursor.is_none() {
                break;
            }
        }
        if args.json {
            let answer = serde_json::json!({"files": files, "next_cursor": cursor});
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
        } else {
            print!("{}", table(&files, crate::upload::now_ms()));
            if let Some(cursor) = &cursor {
                eprintln!("more: pass --cursor {cursor}, or --all for every page");
            }
        }
        Ok(())
    }
}

/// The listing for people: one line per file, columns aligned.
fn table(files: &[Value], now_ms: u64) -> String {
    let mut rows = vec![[
        "HANDLE",
        "STATUS",
        "SIZE",
        "APP",
        "CONTAINER",
        "AGE",
        "ATTEMPTS",
        "REPLICATION",
        "FILENAME",
    ]
    .map(str::to_owned)];
    for file in files {
        let text = |name: &str| file[name].as_str().unwrap_or("-").to_owned();
        let replication = &file["replication"];
        let state = match file["status"].as_str() {
            Some("InTransit") if replication["cancelled"] == true => "cancelled",
            Some("InTransit") if replication["given_up"] == true => "given up",
            Some("InTransit") if replication["failing"] == true => "failing",
            Some("InTransit") => "queued",
            Some("Stored") => "stored",
            _ => "-",
        };
        let age = file["updated_at"]
            .as_u64()
            .map(|at| duration(now_ms.saturating_sub(at) / 1000))
            .unwrap_or_else(|| "-".into());
        rows.push([
            text("handle"),
            text("status"),
            file["size"]
                .as_u64()
                .map(size)
                .unwrap_or_else(|| "-".into()),
            text("app"),
            text("container"),
            age,
            replication["attempts"].to_string(),
            state.to_owned(),
            text("filename"),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} file{}\n",
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    ));
    out
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pop_on_every_address_is_asked_on_loopback() {
        let mut config = Config::default();
        config.server.listen = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(url_of(&config).unwrap(), "http://127.0.0.1:8080");
        config.server.listen = "[::]:8443".parse().unwrap();
        config.server.tls_cert = "cert.pem".into();
        config.server.tls_key = "key.pem".into();
        assert_eq!(url_of(&config).unwrap(), "https://[::1]:8443");
        config.server.listen = "10.0.0.2:9000".parse().unwrap();
        assert_eq!(url_of(&config).unwrap(), "https://10.0.0.2:9000");
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        assert!(url_of(&config).unwrap_err().to_string().contains("--pop"));
    }

    #[test]
    fn the_table_shows_one_aligned_line_per_file() {
        let files = vec![
            json!({"handle": "AAAAAAAAAAAAAAAAAAAA", "status": "InTransit", "size": 2048, "app": "acme",
                   "container": "media", "updated_at": 1_000, "filename": "a.bin",
                   "replication": {"attempts": 3, "failing": true, "cancelled": true, "given_up": false}}),
            json!({"handle": "BBBBBBBBBBBBBBBBBBBB", "status": "Stored", "size": 5, "app": null,
                   "container": "default", "updated_at": 61_000, "filename": "b.txt",
                   "replication": {"attempts": 1, "failing": false, "cancelled": false, "given_up": false}}),
        ];
        let text = table(&files, 121_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("HANDLE  "), "{text}");
        assert!(
            lines[1].contains("2.0 KiB")
                && lines[1].contains("cancelled")
                && lines[1].contains("2m"),
            "{text}"
        );
        assert!(
            lines[2].contains("5 B") && lines[2].contains("stored") && lines[2].contains("1m"),
            "{text}"
        );
        assert_eq!(
            lines[1].find("InTransit"),
            lines[2].find("Stored"),
            "{text}"
        );
        assert_eq!(lines[3], "2 files");
    }
}
