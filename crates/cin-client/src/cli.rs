//! The `cin` command line. `main` only calls [`main_from`], so tests can run the
//! very same code in a child process.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::adaptive::MIB;
use crate::clock::TokioClock;
use crate::config::ClientConfig;
use crate::error::{ClientError, TransportError};
use crate::http::HttpTransport;
use crate::source::FileSource;
use crate::state::StateDir;
use crate::transport::{StoreOptions, Transport};
use crate::upload::{Observer, ResumePlan, SessionInfo, UploadJob, UploadOptions, Uploader};

/// Exit status when `cin wait` runs out of time.
pub const EXIT_WAIT_TIMEOUT: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "cin",
    version,
    about = "Upload files to CIN edge POPs with intelligent ingestion: adaptive chunks, retries, nearest POP, resumable."
)]
pub struct Cli {
    /// Client config file (TOML with `pops`, `apikey`, `state_dir`).
    /// Default: $XDG_CONFIG_HOME/cin/config.toml when it exists.
    #[arg(long, global = true, env = "CIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// POP base URL, e.g. https://pop.example; repeat it (or list `pops` in the
    /// config) and uploads go to the nearest.
    #[arg(long = "pop", global = true, env = "CIN_POP", value_delimiter = ',')]
    pub pops: Vec<String>,
    /// No progress bar and no chatter: print only each file's filelink.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log retries and decisions to stderr (-vv for more).
    #[arg(long, short, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload files; prints each file's handle, filelink and status.
    Upload(UploadArgs),
    /// Show a file's status (Uploading, InTransit, Stored) and metadata.
    Status { handle: String },
    /// Wait until a file reaches a status.
    Wait {
        handle: String,
        /// Status to wait for; a later one counts too (Uploading < InTransit < Stored).
        #[arg(long, default_value = "Stored")]
        until: String,
        /// Give up after this many seconds (exit status 3).
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// Seconds between polls.
        #[arg(long, default_value_t = 0.5)]
        interval: f64,
    },
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// API key.
    #[arg(long, env = "CIN_APIKEY")]
    pub apikey: Option<String>,
    /// Storage location (Filestack's `store.location`).
    #[arg(long, default_value = "s3")]
    pub location: String,
    /// Bucket to deliver to (a storage profile of the POP); default: the POP's own store.
    #[arg(long)]
    pub container: Option<String>,
    /// Key (or key prefix ending in `/`) in the container.
    #[arg(long)]
    pub path: Option<String>,
    /// MIME type; default: guessed from the file name.
    #[arg(long)]
    pub mimetype: Option<String>,
    /// Continue an interrupted upload of the same file (same path, size and mtime)
    /// without re-sending what the POP acknowledged.
    #[arg(long)]
    pub resume: bool,
    /// Where upload state for --resume is kept. Default: $XDG_CACHE_HOME/cin/uploads.
    #[arg(long, env = "CIN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most parts in flight at once (the number adapts between 1 and this).
    #[arg(long, default_value_t = 6)]
    pub max_parallel: usize,
    /// Seconds a part may keep retrying without progress before the upload gives up.
    #[arg(long, default_value_t = 900)]
    pub retry_deadline: u64,
}

/// Parses `args` (the program name first) and runs the command; returns the exit status.
pub fn main_from<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cin: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run(cli))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "warn,cin_client=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub async fn run(cli: Cli) -> i32 {
    let config = match ClientConfig::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(&cli, &e),
    };
    let pops: Vec<String> = if cli.pops.is_empty() {
        config.pops.clone()
    } else {
        cli.pops.clone()
    };
    let pops: Vec<String> = pops
        .into_iter()
        .map(|p| p.trim().trim_end_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if pops.is_empty() {
        return fail(&cli, &ClientError::NoPop);
    }
    match &cli.command {
        Command::Upload(args) => upload(&cli, args, &config, &pops).await,
        Command::Status { handle } => status(&cli, handle, &pops).await,
        Command::Wait {
            handle,
            until,
            timeout,
            interval,
        } => wait(&cli, handle, until, *timeout, *interval, &pops).await,
    }
}

fn fail(cli: &Cli, error: &ClientError) -> i32 {
    if cli.json {
        println!("{}", json!({ "error": error.to_string() }));
    }
    eprintln!("cin: {error}");
    1
}

async fn upload(cli: &Cli, args: &UploadArgs, config: &ClientConfig, pops: &[String]) -> i32 {
    let apikey = args
        .apikey
        .clone()
        .or_else(|| config.apikey.clone())
        .unwrap_or_default();
    let transport = match HttpTransport::new(apikey) {
        Ok(t) => Arc::new(t),
        Err(e) => return fail(cli, &e),
    };
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.state_dir.clone())
        .or_else(StateDir::default_location)
        .map(StateDir::new);
    if args.resume && state_dir.is_none() {
        return fail(
            cli,
            &ClientError::Invalid(
                "--resume needs a place for upload state: pass --state-dir DIR".into(),
            ),
        );
    }
    let mut options = UploadOptions::default();
    options.concurrency.max = args.max_parallel.max(1);
    options.concurrency.initial = options.concurrency.initial.min(options.concurrency.max);
    options.retry_deadline = Duration::from_secs(args.retry_deadline);
    let store = StoreOptions {
        location: args.location.clone(),
        container: args.container.clone(),
        path: args.path.clone(),
    };
    let show_progress = !cli.quiet && !cli.json && std::io::stderr().is_terminal();
    let mut failures = 0;
    for file in &args.files {
        let bar = progress_bar(file, show_progress);
        let observer = Arc::new(BarObserver { bar: bar.clone() });
        let uploader = Uploader::new(
            transport.clone(),
            Arc::new(TokioClock::new()),
            options.clone(),
            observer,
        );
        let result = upload_one(&uploader, file, args, &store, pops, state_dir.as_ref()).await;
        bar.finish_and_clear();
        match result {
            Ok(report) => {
                if cli.json {
                    let mut value = serde_json::to_value(&report).unwrap_or(Value::Null);
                    value["file"] = json!(file.display().to_string());
                    println!("{value}");
                } else if cli.quiet {
                    println!("{}", report.url);
                } else {
                    println!(
                        "{}\thandle={}\turl={}\tstatus={}",
                        file.display(),
                        report.handle,
                        report.url,
                        report.status
                    );
                }
            }
            Err(e) => {
                failures += 1;
                if cli.json {
                    println!(
                        "{}",
                        json!({ "file": file.display().to_string(), "error": e.to_string() })
                    );
                }
                // I/O errors already name the file.
                if matches!(
                    e,
                    ClientError::Io { .. } | ClientError::SourceChanged { .. }
                ) {
                    eprintln!("cin: {e}");
                } else {
                    eprintln!("cin: {}: {e}", file.display());
                }
            }
        }
        let _ = std::io::stdout().flush();
    }
    i32::from(failures > 0)
}

async fn upload_one(
    uploader: &Uploader,
    file: &Path,
    args: &UploadArgs,
    store: &StoreOptions,
    pops: &[String],
    state_dir: Option<&StateDir>,
) -> Result<crate::upload::UploadReport, ClientError> {
    let source = FileSource::open(file)?;
    let filename = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".into());
    let mimetype = args
        .mimetype
        .clone()
        .unwrap_or_else(|| guess_mimetype(&filename).to_owned());
    let resume = state_dir.map(|dir| ResumePlan {
        dir: dir.clone(),
        identity: source.identity().clone(),
        resume: args.resume,
    });
    uploader
        .upload(UploadJob {
            source: Arc::new(source),
            filename,
            mimetype,
            store: store.clone(),
            pops: pops.to_vec(),
            resume,
        })
        .await
}

fn progress_bar(file: &Path, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {wide_msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}

struct BarObserver {
    bar: ProgressBar,
}

impl Observer for BarObserver {
    fn session(&self, info: &SessionInfo) {
        self.bar.set_length(info.size);
        self.bar.set_position(info.already_acked);
        // Rate and ETA should reflect this run's bytes, not the resumed ones.
        self.bar.reset_eta();
        self.bar.set_message(if info.resumed {
            format!("resuming {} at {}", info.handle, info.pop)
        } else {
            format!("{} at {}", info.handle, info.pop)
        });
    }

    fn acked(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn retrying(&self, part: u32, error: &TransportError, next_chunk: u64, _delay: Duration) {
        let size = if next_chunk >= MIB {
            format!("{} MiB", next_chunk / MIB)
        } else {
            format!("{} KiB", next_chunk / 1024)
        };
        self.bar
            .set_message(format!("part {part}: {error}; retrying with {size} chunks"));
    }
}

/// Metadata from the first POP that knows the handle.
async fn metadata(
    transport: &HttpTransport,
    handle: &str,
    pops: &[String],
) -> Result<Value, ClientError> {
    let mut last = None;
    for pop in pops {
        match transport.metadata(pop, handle).await {
            Ok(meta) => return Ok(meta),
            Err(e) => last = Some((pop.clone(), e)),
        }
    }
    match last {
        Some((pop, source)) => Err(ClientError::Request {
            what: "metadata",
            pop,
            source,
        }),
        None => Err(ClientError::NoPop),
    }
}

async fn status(cli: &Cli, handle: &str, pops: &[String]) -> i32 {
    let transport = match HttpTransport::new("") {
        Ok(t) => t,
        Err(e) => return fail(cli, &e),
    };
    match metadata(&transport, handle, pops).await {
        Ok(meta) => {
            print_status(cli, handle, &meta);
            0
        }
        Err(e) => fail(cli, &e),
    }
}

fn print_status(cli: &Cli, handle: &str, meta: &Value) {
    if cli.json {
        println!("{meta}");
    } else {
        let field = |k: &str| match &meta[k] {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        println!(
            "{handle}\tstatus={}\tsize={}\tfilename={}",
            field("status"),
            field("size"),
            field("filename")
        );
    }
}

/// Position of a status in the life of a file, to accept a later one when waiting.
fn status_rank(status: &str) -> Option<u8> {
    match status.to_ascii_lowercase().as_str() {
        "uploading" => Some(0),
        "intransit" => Some(1),
        "stored" => Some(2),
        _ => None,
    }
}

fn reached(current: &str, wanted: &str) -> bool {
    match (status_rank(current), status_rank(wanted)) {
        (Some(c), Some(w)) => c >= w,
        _ => current.eq_ignore_ascii_case(wanted),
    }
}

async fn wait(
    cli: &Cli,
    handle: &str,
    until: &str,
    timeout: f64,
    interval: f64,
    pops: &[String],
) -> i32 {
    let transport = match HttpTransport::new("") {
        Ok(t) => t,
        Err(e) => return fail(cli, &e),
    };
    let timeout = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::MAX);
    let interval = Duration::try_from_secs_f64(interval)
        .unwrap_or(Duration::from_millis(500))
        .max(Duration::from_millis(10));
    let began = tokio::time::Instant::now();
    let mut last = String::from("unknown");
    loop {
        match metadata(&transport, handle, pops).await {
            Ok(meta) => {
                let status = meta["status"].as_str().unwrap_or_default().to_owned();
                if reached(&status, until) {
                    print_status(cli, handle, &meta);
                    return 0;
                }
                last = status;
            }
            // A POP restarting or a blip: keep polling until the timeout.
            Err(e) => {
                tracing::debug!(error = %e, "status poll failed");
                if let ClientError::Request { source, .. } = &e {
                    if source.status() == Some(404) {
                        return fail(cli, &e);
                    }
                }
            }
        }
        if began.elapsed() >= timeout {
            let e = ClientError::WaitTimedOut {
                handle: handle.to_owned(),
                status: until.to_owned(),
                waited: began.elapsed(),
                last,
            };
            fail(cli, &e);
            return EXIT_WAIT_TIMEOUT;
        }
        tokio::time::sleep(interval).await;
    }
}

/// A few common types; anything else is `application/octet-stream`.
fn guess_mimetype(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "txt" => "text/plain",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_statuses_count_as_reached() {
        assert!(reached("Stored", "InTransit"));
        assert!(reached("InTransit", "intransit"));
        assert!(!reached("Uploading", "Stored"));
        assert!(reached("Weird", "weird"));
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "cin", "upload", "a", "b", "--pop", "http://x", "--pop", "http://y", "--resume",
            "--json",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        assert_eq!(guess_mimetype("A.JPG"), "image/jpeg");
    }
}
