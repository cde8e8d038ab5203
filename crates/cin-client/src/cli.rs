//! The `cin` command line. `main` only calls [`main_from`], so tests can run the
//! very same code in a child process.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::adaptive::MIB;
use crate::clock::TokioClock;
use crate::config::ClientConfig;
use crate::download::{DownloadObserver, DownloadReport};
use crate::error::{ClientError, Failure, TransportError};
use crate::http::HttpTransport;
use crate::policy::Security;
use crate::pop::parse_pop_url;
use crate::source::FileSource;
use crate::state::StateDir;
use crate::transport::{StoreOptions, Transport};
use crate::upload::{
    Observer, ResumePlan, SessionInfo, UploadJob, UploadOptions, UploadReport, Uploader,
};

/// Exit status when `cin wait` runs out of time.
pub const EXIT_WAIT_TIMEOUT: i32 = 3;
/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: i32 = 130;

/// JSON progress lines come at most this often (per file).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Parser)]
#[command(
    name = "cin",
    version,
    about = "Upload files to CIN edge POPs with intelligent ingestion: adaptive chunks, retries, nearest POP, resumable.",
    after_help = "POPs come from --pop, else CIN_POP, else `pops` in the client config file \
                  ($XDG_CONFIG_HOME/cin/config.toml, else ~/.config/cin/config.toml). \
                  Exit status: 0 done, 1 failed, 2 bad usage, 3 `wait` timed out, 130 interrupted."
)]
pub struct Cli {
    /// Client config file (TOML with `pops`, `apikey`, `state_dir`, `secret`,
    /// `policy`, `signature`). Default: $XDG_CONFIG_HOME/cin/config.toml
    /// (else ~/.config/cin/config.toml) when it exists.
    #[arg(long, global = true, env = "CIN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// POP base URL with its scheme, e.g. http://127.0.0.1:8080; repeat it (or
    /// list several, comma-separated) and uploads go to the nearest.
    #[arg(
        long = "pop",
        global = true,
        env = "CIN_POP",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub pops: Vec<String>,
    /// API key of the app (uploads, and `delete`, which needs it).
    #[arg(long, global = true, env = "CIN_APIKEY", value_name = "KEY")]
    pub apikey: Option<String>,
    /// A security policy signed elsewhere (base64url JSON), sent with every call;
    /// for apps that require security. Needs --signature.
    #[arg(long, global = true, env = "CIN_POLICY", value_name = "POLICY")]
    pub policy: Option<String>,
    /// The signature of --policy (hex HMAC-SHA256 with the app's secret).
    #[arg(long, global = true, env = "CIN_SIGNATURE", value_name = "HEX")]
    pub signature: Option<String>,
    /// The app's secret: cin signs a short-lived policy for each call itself
    /// (store to upload, stat for status and metadata, read to download,
    /// remove to delete). Ignored when --policy is given.
    #[arg(
        long,
        global = true,
        env = "CIN_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub secret: Option<String>,
    /// No progress bar and no chatter: print only each file's filelink (or path).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Machine-readable output: one JSON object per line on stdout (a result,
    /// or an error with `code` and `message`); progress objects on stderr.
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
    /// Show a file's status (Uploading, InTransit, Stored), size and name.
    Status {
        /// The file's handle, as `cin upload` printed it.
        handle: String,
    },
    /// Wait until a file reaches a status.
    Wait {
        /// The file's handle, as `cin upload` printed it.
        handle: String,
        /// Status to wait for; a later one counts too (Uploading < InTransit < Stored).
        #[arg(long, value_enum, ignore_case = true, default_value = "Stored")]
        until: WaitFor,
        /// Give up after this many seconds (exit status 3).
        #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
        timeout: f64,
        /// Seconds between polls.
        #[arg(long, default_value_t = 0.5, value_name = "SECONDS")]
        interval: f64,
    },
    /// Print the POP's metadata of a file (JSON).
    Metadata {
        /// The file's handle, as `cin upload` printed it.
        handle: String,
    },
    /// Download a file; a partial FILE (an earlier download broke off) is continued.
    Download {
        /// The file's handle, as `cin upload` printed it.
        handle: String,
        /// Where to write it; a partial FILE given here is continued. Default:
        /// the file's name, in the current directory, which must not exist yet.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Delete a file everywhere (its POP and final storage); needs --apikey.
    Delete {
        /// The file's handle, as `cin upload` printed it.
        handle: String,
    },
    /// Print a shell completion script, e.g. `cin completions bash > /etc/bash_completion.d/cin`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// A status `cin wait` can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum WaitFor {
    /// The upload exists; its bytes are arriving.
    #[value(name = "Uploading")]
    Uploading,
    /// Every byte is at the POP; on its way to final storage.
    #[value(name = "InTransit")]
    InTransit,
    /// In final storage.
    #[value(name = "Stored")]
    Stored,
}

impl WaitFor {
    fn name(self) -> &'static str {
        match self {
            WaitFor::Uploading => "Uploading",
            WaitFor::InTransit => "InTransit",
            WaitFor::Stored => "Stored",
        }
    }
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The files to upload, one after the other.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
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
    /// without re-sending what the POP acknowledged; a file whose upload completed
    /// is not uploaded again (its handle is printed).
    #[arg(long)]
    pub resume: bool,
    /// Where upload state for --resume is kept. Default: $XDG_CACHE_HOME/cin/uploads.
    #[arg(long, env = "CIN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most parts in flight at once (the number adapts between 1 and this).
    #[arg(long, default_value_t = 6, value_name = "N")]
    pub max_parallel: usize,
    /// Seconds a part may keep retrying without progress before the upload gives
    /// up; also how long a POP that asks to be tried later (Retry-After) is waited for.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
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

/// What every command that talks to a POP needs, from the options and the config file.
struct Context {
    config: ClientConfig,
    pops: Vec<String>,
    /// The POPs came from --pop or CIN_POP (so a resume command repeats them).
    pops_given: bool,
    apikey: String,
    security: Security,
}

impl Context {
    fn new(cli: &Cli) -> Result<Context, ClientError> {
        let config = ClientConfig::load(cli.config.as_deref())?;
        let pops_given = !cli.pops.is_empty();
        let raw = if pops_given { &cli.pops } else { &config.pops };
        let pops = raw
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| parse_pop_url(p))
            .collect::<Result<Vec<_>, _>>()?;
        if pops.is_empty() {
            return Err(ClientError::NoPop);
        }
        // The command line's policy goes with its own signature, never with the file's.
        let (policy, signature) = if cli.policy.is_some() || cli.signature.is_some() {
            (cli.policy.clone(), cli.signature.clone())
        } else {
            (config.policy.clone(), config.signature.clone())
        };
        let security = Security::from_options(
            policy,
            signature,
            cli.secret.clone().or_else(|| config.secret.clone()),
        )?;
        let apikey = cli
            .apikey
            .clone()
            .or_else(|| config.apikey.clone())
            .unwrap_or_default();
        Ok(Context {
            config,
            pops,
            pops_given,
            apikey,
            security,
        })
    }

    fn transport(&self, security: Security) -> Result<HttpTransport, ClientError> {
        Ok(HttpTransport::new(self.apikey.clone())?.with_security(security))
    }
}

pub async fn run(cli: Cli) -> i32 {
    if let Command::Completions { shell } = &cli.command {
        return completions(*shell);
    }
    let ctx = match Context::new(&cli) {
        Ok(ctx) => ctx,
        Err(e) => return fail(&cli, None, &e),
    };
    match &cli.command {
        Command::Upload(args) => upload(&cli, &ctx, args).await,
        Command::Status { handle } => status(&cli, &ctx, handle).await,
        Command::Wait {
            handle,
            until,
            timeout,
            interval,
        } => wait(&cli, &ctx, handle, *until, *timeout, *interval).await,
        Command::Metadata { handle } => show_metadata(&cli, &ctx, handle).await,
        Command::Download { handle, output } => {
            download(&cli, &ctx, handle, output.as_deref()).await
        }
        Command::Delete { handle } => delete(&cli, &ctx, handle).await,
        Command::Completions { .. } => 0,
    }
}

fn completions(shell: clap_complete::Shell) -> i32 {
    let mut out = std::io::stdout();
    clap_complete::generate(shell, &mut Cli::command(), "cin", &mut out);
    match out.flush() {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The exit status for `error`.
fn exit_status(error: &ClientError) -> i32 {
    match error {
        ClientError::Interrupted { .. } => EXIT_INTERRUPTED,
        ClientError::WaitTimedOut { .. } => EXIT_WAIT_TIMEOUT,
        _ => 1,
    }
}

/// `{"error": {"code", "message"}}` (plus the POP's status and code when a POP
/// refused, and the resume command after Ctrl-C).
fn error_json(file: Option<&Path>, error: &ClientError) -> Value {
    let mut object = json!({ "code": error.code(), "message": error.to_string() });
    if let Some((status, code)) = error.pop_status() {
        object["status"] = json!(status);
        object["pop_code"] = json!(code);
    }
    let mut line = json!({ "error": object });
    if let Some(file) = file {
        line["file"] = json!(file.display().to_string());
    }
    if let ClientError::Interrupted {
        resume: Some(resume),
    } = error
    {
        line["resume"] = json!(resume);
    }
    line
}

/// Reports `error` (on stdout as JSON with --json, else on stderr) and returns the exit status.
fn fail(cli: &Cli, file: Option<&Path>, error: &ClientError) -> i32 {
    if cli.json {
        println!("{}", error_json(file, error));
    } else {
        match file {
            // I/O errors already name the file.
            Some(file)
                if !matches!(
                    error,
                    ClientError::Io { .. } | ClientError::SourceChanged { .. }
                ) =>
            {
                eprintln!("cin: {}: {error}", file.display())
            }
            _ => eprintln!("cin: {error}"),
        }
    }
    let _ = std::io::stdout().flush();
    exit_status(error)
}

/// Ctrl-C, listened for from the moment the command starts.
struct Interrupt {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Interrupt {
    fn listen() -> Interrupt {
        #[cfg(unix)]
        {
            let signal =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
            Interrupt { signal }
        }
        #[cfg(not(unix))]
        Interrupt {}
    }

    async fn received(&mut self) {
        #[cfg(unix)]
        match &mut self.signal {
            Some(signal) => {
                signal.recv().await;
            }
            // No handler: the default one ends the process.
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A word for a POSIX shell: as is when it is safe, else single-quoted.
fn shell_word(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command that continues the upload of `files` after an interruption.
/// Credentials are left out: continuing only talks to the upload's own POP
/// with the grant it handed out.
fn resume_command(ctx: &Context, args: &UploadArgs, files: &[PathBuf]) -> String {
    let mut words = vec!["cin".to_owned()];
    if ctx.pops_given {
        for pop in &ctx.pops {
            words.push("--pop".into());
            words.push(pop.clone());
        }
    }
    words.push("upload".into());
    words.push("--resume".into());
    if let Some(dir) = &args.state_dir {
        words.push("--state-dir".into());
        words.push(dir.display().to_string());
    }
    for (flag, value) in [
        ("--container", &args.container),
        ("--path", &args.path),
        ("--mimetype", &args.mimetype),
    ] {
        if let Some(value) = value {
            words.push(flag.into());
            words.push(value.clone());
        }
    }
    if args.location != "s3" {
        words.push("--location".into());
        words.push(args.location.clone());
    }
    for file in files {
        words.push(file.display().to_string());
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rate_of(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

/// "3.00 MiB in 1.2 s, 2.50 MiB/s"
fn speed_summary(bytes: u64, elapsed: Duration) -> String {
    format!(
        "{} in {:.1} s, {}/s",
        HumanBytes(bytes),
        elapsed.as_secs_f64(),
        HumanBytes(rate_of(bytes, elapsed) as u64)
    )
}

/// How a command shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    /// A progress bar on the terminal (stderr).
    Bar,
    /// JSON progress objects on stderr, at most every [`PROGRESS_EVERY`].
    Json,
    /// Nothing but the occasional notice (stderr is no terminal), or nothing at all (--quiet).
    Notices,
    Nothing,
}

impl Show {
    fn of(cli: &Cli) -> Show {
        if cli.json {
            Show::Json
        } else if cli.quiet {
            Show::Nothing
        } else if std::io::stderr().is_terminal() {
            Show::Bar
        } else {
            Show::Notices
        }
    }
}

/// Limits a kind of line to one per [`PROGRESS_EVERY`].
#[derive(Default)]
struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    /// The moment of the line when one is due (lines then are stamped with it,
    /// so their times are as far apart as the throttle keeps them).
    fn due(&self) -> Option<Instant> {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < PROGRESS_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(now)
    }
}

fn progress_bar(name: &str, visible: bool) -> ProgressBar {
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
    bar.set_prefix(name.to_owned());
    bar
}

fn file_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string())
}

/// What one transfer shows: the bar, or JSON progress lines, or notices.
struct Progress {
    show: Show,
    /// The file as the user named it.
    file: String,
    bar: ProgressBar,
    /// The bar's message while nothing goes wrong; a retry notice replaces it
    /// until bytes move again.
    normal: Mutex<String>,
    troubled: AtomicBool,
    handle: Mutex<String>,
    total: AtomicU64,
    /// Bytes done, earlier runs' included.
    done: AtomicU64,
    /// Bytes done by this run, and since when.
    this_run: AtomicU64,
    began: Mutex<Option<Instant>>,
    lines: Throttle,
    retry_lines: Throttle,
}

impl Progress {
    fn new(file: &Path, show: Show) -> Progress {
        Progress::with_bar(
            file,
            show,
            progress_bar(&file_name(file), show == Show::Bar),
        )
    }

    fn with_bar(file: &Path, show: Show, bar: ProgressBar) -> Progress {
        Progress {
            show,
            file: file.display().to_string(),
            bar,
            normal: Mutex::default(),
            troubled: AtomicBool::new(false),
            handle: Mutex::default(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            this_run: AtomicU64::new(0),
            began: Mutex::new(None),
            lines: Throttle::default(),
            retry_lines: Throttle::default(),
        }
    }

    fn begin(&self, handle: &str, total: u64, done: u64, message: String) {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = handle.to_owned();
        *self.began.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
        self.bar.set_length(total);
        self.bar.set_position(done);
        // Rate and ETA should reflect this run's bytes, not the resumed ones.
        self.bar.reset_eta();
        self.bar.set_message(message.clone());
        *self.normal.lock().unwrap_or_else(|p| p.into_inner()) = message;
        self.line(true);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.this_run.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(bytes);
        // The transfer recovered: the last error is history.
        if self.troubled.swap(false, Ordering::Relaxed) {
            let normal = self
                .normal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            self.bar.set_message(normal);
        }
        self.line(false);
    }

    /// A transient error: on the bar until bytes move again; a JSON line.
    fn trouble(&self, message: String, extra: Value) {
        self.troubled.store(true, Ordering::Relaxed);
        self.bar.set_message(message.clone());
        if self.show == Show::Json && self.retry_lines.due().is_some() {
            let mut line = json!({
                "type": "retrying",
                "file": self.file,
                "message": message,
            });
            merge(&mut line, extra);
            eprintln!("{line}");
        }
    }

    /// A JSON progress line, when one is due (or `force`d).
    fn line(&self, force: bool) {
        if self.show != Show::Json {
            return;
        }
        let Some(now) = self.lines.due().or_else(|| force.then(Instant::now)) else {
            return;
        };
        let began = *self.began.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = began
            .map(|b| now.saturating_duration_since(b))
            .unwrap_or_default();
        let line = json!({
            "type": "progress",
            "file": self.file,
            "handle": *self.handle.lock().unwrap_or_else(|p| p.into_inner()),
            "sent": self.done.load(Ordering::Relaxed),
            "total": self.total.load(Ordering::Relaxed),
            "rate": rate_of(self.this_run.load(Ordering::Relaxed), elapsed).round() as u64,
            "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        });
        eprintln!("{line}");
    }

    /// JSON lines every [`PROGRESS_EVERY`] while the transfer runs, also when no
    /// acknowledgment came (a large chunk on a slow link): the rate then falls.
    fn tick(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.show != Show::Json {
                return;
            }
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if self
                    .began
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    self.line(false);
                }
            }
        })
    }

    fn finish(&self, succeeded: bool) {
        if succeeded
            && self
                .began
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            self.line(true);
        }
        self.bar.finish_and_clear();
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

impl Observer for Progress {
    fn session(&self, info: &SessionInfo) {
        let message = if info.resumed {
            format!("resuming {} at {}", info.handle, info.pop)
        } else {
            format!("{} at {}", info.handle, info.pop)
        };
        self.begin(&info.handle, info.size, info.already_acked, message);
    }

    fn acked(&self, bytes: u64) {
        self.advance(bytes);
    }

    fn retrying(&self, part: u32, error: &TransportError, next_chunk: u64, delay: Duration) {
        let size = if next_chunk >= MIB {
            format!("{} MiB", next_chunk / MIB)
        } else {
            format!("{} KiB", next_chunk / 1024)
        };
        self.trouble(
            format!("part {part}: {error}; retrying with {size} chunks"),
            json!({
                "part": part,
                "code": error.kind(),
                "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            }),
        );
    }

    fn start_retrying(&self, pop: &str, error: &TransportError, delay: Duration) {
        let message = format!(
            "{pop} cannot take the upload now ({error}); trying again in {:.1} s",
            delay.as_secs_f64()
        );
        match self.show {
            Show::Json => {
                let line = json!({
                    "type": "waiting",
                    "file": self.file,
                    "pop": pop,
                    "code": error.kind(),
                    "message": message,
                    "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
                eprintln!("{line}");
            }
            Show::Bar => self.bar.set_message(message),
            Show::Notices => eprintln!("cin: {}: {message}", self.file),
            Show::Nothing => {}
        }
    }
}

impl DownloadObserver for Progress {
    fn begin(&self, path: &Path, from: u64, total: Option<u64>) {
        let message = if from > 0 {
            format!("to {} (continuing at {})", path.display(), HumanBytes(from))
        } else {
            format!("to {}", path.display())
        };
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Progress::begin(self, &handle, total.unwrap_or(0), from, message);
    }

    fn received(&self, bytes: u64) {
        self.advance(bytes);
    }
}

async fn upload(cli: &Cli, ctx: &Context, args: &UploadArgs) -> i32 {
    let transport = match ctx.transport(ctx.security.clone()) {
        Ok(t) => Arc::new(t),
        Err(e) => return fail(cli, None, &e),
    };
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| ctx.config.state_dir.clone())
        .or_else(StateDir::default_location)
        .map(StateDir::new);
    if args.resume && state_dir.is_none() {
        return fail(
            cli,
            None,
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
    let show = Show::of(cli);
    let mut interrupt = Interrupt::listen();
    let mut failures = 0;
    let (mut sent, mut took) = (0u64, Duration::ZERO);
    for (index, file) in args.files.iter().enumerate() {
        let progress = Arc::new(Progress::new(file, show));
        let uploader = Uploader::new(
            transport.clone(),
            Arc::new(TokioClock::new()),
            options.clone(),
            progress.clone(),
        );
        let ticker = progress.clone().tick();
        let result = tokio::select! {
            result = upload_one(&uploader, file, args, &store, &ctx.pops, state_dir.as_ref()) => result,
            () = interrupt.received() => Err(ClientError::Interrupted {
                // Without recorded state nothing can be continued.
                resume: state_dir.as_ref().map(|_| resume_command(ctx, args, &args.files[index..])),
            }),
        };
        ticker.abort();
        progress.finish(result.is_ok());
        match result {
            Ok(report) => {
                let bytes = report.size - report.skipped_bytes.min(report.size);
                sent += bytes;
                took += Duration::from_millis(report.elapsed_ms);
                print_uploaded(cli, file, &report);
            }
            Err(e @ ClientError::Interrupted { .. }) => return fail(cli, Some(file), &e),
            Err(e) => {
                failures += 1;
                fail(cli, Some(file), &e);
            }
        }
        let _ = std::io::stdout().flush();
    }
    if args.files.len() > 1 && !cli.json && !cli.quiet {
        eprintln!(
            "cin: {} of {} files uploaded; {}",
            args.files.len() - failures,
            args.files.len(),
            speed_summary(sent, took)
        );
    }
    i32::from(failures > 0)
}

fn print_uploaded(cli: &Cli, file: &Path, report: &UploadReport) {
    if cli.json {
        let mut value = serde_json::to_value(report).unwrap_or(Value::Null);
        value["file"] = json!(file.display().to_string());
        println!("{value}");
        return;
    }
    if cli.quiet {
        println!("{}", report.url);
        return;
    }
    println!(
        "{}\thandle={}\turl={}\tstatus={}",
        file.display(),
        report.handle,
        report.url,
        report.status
    );
    if report.already_uploaded {
        eprintln!(
            "cin: {} was uploaded already (its upload completed earlier): handle {}, {}; nothing was sent",
            file.display(),
            report.handle,
            report.url
        );
        return;
    }
    let bytes = report.size - report.skipped_bytes.min(report.size);
    let earlier = if report.skipped_bytes > 0 {
        format!(" ({} sent before)", HumanBytes(report.skipped_bytes))
    } else {
        String::new()
    };
    eprintln!(
        "cin: {}: uploaded {}{earlier}",
        file.display(),
        speed_summary(bytes, Duration::from_millis(report.elapsed_ms))
    );
}

async fn upload_one(
    uploader: &Uploader,
    file: &Path,
    args: &UploadArgs,
    store: &StoreOptions,
    pops: &[String],
    state_dir: Option<&StateDir>,
) -> Result<UploadReport, ClientError> {
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

/// Runs `call` at each POP in turn until one answers; a POP that does not know
/// the handle (404), or cannot be reached, passes it to the next.
async fn first_answer<T, F, Fut>(
    pops: &[String],
    what: &'static str,
    mut call: F,
) -> Result<(String, T), ClientError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
{
    let mut last = None;
    for pop in pops {
        match call(pop.clone()).await {
            Ok(answer) => return Ok((pop.clone(), answer)),
            Err(e) => {
                let next = e.status() == Some(404) || e.status().is_none();
                last = Some((pop.clone(), e));
                if !next {
                    break;
                }
            }
        }
    }
    match last {
        Some((pop, source)) => Err(ClientError::Request { what, pop, source }),
        None => Err(ClientError::NoPop),
    }
}

/// Metadata from the first POP that knows the handle.
async fn metadata(
    transport: &HttpTransport,
    handle: &str,
    pops: &[String],
) -> Result<Value, ClientError> {
    first_answer(pops, "metadata", |pop| async move {
        transport.metadata(&pop, handle).await
    })
    .await
    .map(|(_, meta)| meta)
}

async fn status(cli: &Cli, ctx: &Context, handle: &str) -> i32 {
    let transport = match ctx.transport(ctx.security.clone()) {
        Ok(t) => t,
        Err(e) => return fail(cli, None, &e),
    };
    match metadata(&transport, handle, &ctx.pops).await {
        Ok(meta) => {
            print_status(cli, handle, &meta);
            0
        }
        Err(e) => fail(cli, None, &e),
    }
}

async fn show_metadata(cli: &Cli, ctx: &Context, handle: &str) -> i32 {
    let transport = match ctx.transport(ctx.security.clone()) {
        Ok(t) => t,
        Err(e) => return fail(cli, None, &e),
    };
    match metadata(&transport, handle, &ctx.pops).await {
        Ok(meta) => {
            if cli.json {
                println!("{meta}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&meta).unwrap_or_else(|_| meta.to_string())
                );
            }
            0
        }
        Err(e) => fail(cli, None, &e),
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
fn status_rank(status: &str) -> Option<WaitFor> {
    match status.to_ascii_lowercase().as_str() {
        "uploading" => Some(WaitFor::Uploading),
        "intransit" => Some(WaitFor::InTransit),
        "stored" => Some(WaitFor::Stored),
        _ => None,
    }
}

fn reached(current: &str, wanted: WaitFor) -> bool {
    status_rank(current).is_some_and(|c| c >= wanted)
}

async fn wait(
    cli: &Cli,
    ctx: &Context,
    handle: &str,
    until: WaitFor,
    timeout: f64,
    interval: f64,
) -> i32 {
    let timeout = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::MAX);
    // A signed policy must outlive the wait.
    let security = ctx
        .security
        .clone()
        .lasting(timeout.saturating_add(Duration::from_secs(60)));
    let transport = match ctx.transport(security) {
        Ok(t) => t,
        Err(e) => return fail(cli, None, &e),
    };
    let interval = Duration::try_from_secs_f64(interval)
        .unwrap_or(Duration::from_millis(500))
        .max(Duration::from_millis(10));
    let began = tokio::time::Instant::now();
    let mut last = String::from("unknown");
    loop {
        match metadata(&transport, handle, &ctx.pops).await {
            Ok(meta) => {
                let status = meta["status"].as_str().unwrap_or_default().to_owned();
                if reached(&status, until) {
                    print_status(cli, handle, &meta);
                    return 0;
                }
                // Deleted or expired: it will never get there.
                if status_rank(&status).is_none() && !status.is_empty() {
                    return fail(
                        cli,
                        None,
                        &ClientError::Invalid(format!(
                            "{handle} is {status}: it will not reach {}",
                            until.name()
                        )),
                    );
                }
                last = status;
            }
            // A POP restarting or a blip: keep polling until the timeout. An
            // unknown handle, a refusal or a wrong URL will not get better.
            Err(e) => {
                tracing::debug!(error = %e, "status poll failed");
                if let ClientError::Request { source, .. } = &e {
                    if source.classify() == Failure::Fatal {
                        return fail(cli, None, &e);
                    }
                }
            }
        }
        if began.elapsed() >= timeout {
            let e = ClientError::WaitTimedOut {
                handle: handle.to_owned(),
                status: until.name().to_owned(),
                waited: began.elapsed(),
                last,
            };
            return fail(cli, None, &e);
        }
        tokio::time::sleep(interval).await;
    }
}

async fn download(cli: &Cli, ctx: &Context, handle: &str, output: Option<&Path>) -> i32 {
    let transport = match ctx.transport(ctx.security.clone()) {
        Ok(t) => t,
        Err(e) => return fail(cli, None, &e),
    };
    let show = Show::of(cli);
    let progress = Progress::new(output.unwrap_or(Path::new(handle)), show);
    *progress.handle.lock().unwrap_or_else(|p| p.into_inner()) = handle.to_owned();
    let mut interrupt = Interrupt::listen();
    let mut result = Err(ClientError::NoPop);
    for (i, pop) in ctx.pops.iter().enumerate() {
        result = tokio::select! {
            result = crate::download::download(&transport, pop, handle, output, &progress) => result,
            () = interrupt.received() => {
                let mut words = vec!["cin".to_owned()];
                if ctx.pops_given {
                    words.extend(["--pop".to_owned(), pop.clone()]);
                }
                words.extend(["download".to_owned(), handle.to_owned()]);
                if let Some(output) = output {
                    words.extend(["-o".to_owned(), output.display().to_string()]);
                }
                let resume = words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ");
                Err(ClientError::Interrupted { resume: Some(resume) })
            }
        };
        // Another POP may know the handle.
        let unknown_here = matches!(&result, Err(ClientError::Request { source, .. }) if source.status() == Some(404));
        if !(unknown_here && i + 1 < ctx.pops.len()) {
            break;
        }
    }
    progress.finish(result.is_ok());
    match result {
        Ok(report) => {
            print_downloaded(cli, &report);
            0
        }
        Err(e) => fail(cli, None, &e),
    }
}

fn print_downloaded(cli: &Cli, report: &DownloadReport) {
    if cli.json {
        println!("{}", serde_json::to_value(report).unwrap_or(Value::Null));
        return;
    }
    if cli.quiet {
        println!("{}", report.path.display());
        return;
    }
    println!(
        "wrote {} to {} ({} bytes)",
        report.handle,
        report.path.display(),
        report.size
    );
    if report.received == 0 && report.resumed_from == report.size {
        eprintln!("cin: {} was complete already", report.path.display());
    } else {
        let earlier = if report.resumed_from > 0 {
            format!(
                " (continued after the {} it had)",
                HumanBytes(report.resumed_from)
            )
        } else {
            String::new()
        };
        eprintln!(
            "cin: downloaded {}{earlier}",
            speed_summary(report.received, Duration::from_millis(report.elapsed_ms))
        );
    }
}

async fn delete(cli: &Cli, ctx: &Context, handle: &str) -> i32 {
    if ctx.apikey.is_empty() {
        return fail(
            cli,
            None,
            &ClientError::Invalid(
                "deleting a file needs the API key of its app: pass --apikey KEY \
                 (or set CIN_APIKEY, or `apikey` in the client config file)"
                    .into(),
            ),
        );
    }
    let transport = match ctx.transport(ctx.security.clone()) {
        Ok(t) => t,
        Err(e) => return fail(cli, None, &e),
    };
    let transport = &transport;
    let answer = first_answer(&ctx.pops, "delete", |pop| async move {
        transport.delete_file(&pop, handle).await
    })
    .await;
    match answer {
        Ok((_, answer)) => {
            if cli.json {
                println!("{answer}");
            } else if !cli.quiet {
                println!("deleted {handle}");
            }
            0
        }
        Err(e) => fail(cli, None, &e),
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
        assert!(reached("Stored", WaitFor::InTransit));
        assert!(reached("InTransit", WaitFor::InTransit));
        assert!(!reached("Uploading", WaitFor::Stored));
        assert!(!reached("Deleted", WaitFor::Uploading));
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "cin", "upload", "a", "b", "--pop", "http://x", "--pop", "http://y", "--resume",
            "--json",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        assert_eq!(guess_mimetype("A.JPG"), "image/jpeg");
        let until = Cli::try_parse_from(["cin", "wait", "H", "--until", "intransit"]);
        assert!(matches!(
            until.map(|c| c.command),
            Ok(Command::Wait {
                until: WaitFor::InTransit,
                ..
            })
        ));
        let bogus = Cli::try_parse_from(["cin", "wait", "H", "--until", "Bogus"])
            .unwrap_err()
            .to_string();
        assert!(bogus.contains("Uploading, InTransit, Stored"), "{bogus}");
    }

    #[test]
    fn every_argument_and_subcommand_is_described() {
        let command = Cli::command();
        let mut missing = Vec::new();
        for sub in command.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_owned());
            }
            for arg in sub.get_arguments() {
                if arg.get_help().is_none() && arg.get_id() != "help" {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        for arg in command.get_arguments() {
            if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str()) {
                missing.push(arg.get_id().to_string());
            }
        }
        assert!(missing.is_empty(), "undescribed: {missing:?}");
    }

    #[test]
    fn a_resume_command_is_one_a_shell_runs_as_printed() {
        assert_eq!(shell_word("/tmp/a.bin"), "/tmp/a.bin");
        assert_eq!(shell_word("my file's.mp4"), r"'my file'\''s.mp4'");
        let cli = Cli::try_parse_from([
            "cin",
            "--pop",
            "http://p:1",
            "upload",
            "a b.mp4",
            "c.bin",
            "--state-dir",
            "/s",
        ])
        .unwrap();
        let Command::Upload(args) = &cli.command else {
            unreachable!()
        };
        let ctx = Context {
            config: ClientConfig::default(),
            pops: vec!["http://p:1".into()],
            pops_given: true,
            apikey: String::new(),
            security: Security::None,
        };
        assert_eq!(
            resume_command(&ctx, args, &args.files[1..]),
            "cin --pop http://p:1 upload --resume --state-dir /s c.bin"
        );
        assert_eq!(
            resume_command(&ctx, args, &args.files),
            "cin --pop http://p:1 upload --resume --state-dir /s 'a b.mp4' c.bin"
        );
    }

    #[test]
    fn a_retry_notice_leaves_the_bar_once_bytes_move_again() {
        let progress = Progress::with_bar(Path::new("f.bin"), Show::Bar, ProgressBar::hidden());
        Observer::session(
            &progress,
            &SessionInfo {
                pop: "http://p".into(),
                upload_id: "u".into(),
                handle: "H".into(),
                url: "http://p/H".into(),
                size: 100,
                already_acked: 0,
                resumed: false,
                ranking: Vec::new(),
            },
        );
        assert_eq!(progress.bar.message(), "H at http://p");
        progress.retrying(
            1,
            &TransportError::Network("reset".into()),
            MIB,
            Duration::ZERO,
        );
        assert!(progress.bar.message().contains("reset"));
        progress.acked(10);
        assert_eq!(progress.bar.message(), "H at http://p");
    }

    #[test]
    fn errors_in_json_have_a_stable_code() {
        let e = ClientError::Request {
            what: "start",
            pop: "http://p".into(),
            source: TransportError::Status {
                status: 401,
                code: "unauthorized".into(),
                message: "this app requires a security policy: send policy and signature".into(),
                retry_after: None,
            },
        };
        let line = error_json(Some(Path::new("f")), &e);
        assert_eq!(line["error"]["code"], "unauthorized");
        assert_eq!(line["error"]["status"], 401);
        assert!(line["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--secret"));
        assert_eq!(line["file"], "f");
        assert_eq!(
            error_json(None, &ClientError::NoPop)["error"]["code"],
            "no_pop"
        );
    }
}
