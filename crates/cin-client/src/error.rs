//! Errors of the client, per layer: what one HTTP exchange can do wrong
//! ([`TransportError`]) and what an upload or a command can do wrong ([`ClientError`]).

use std::path::PathBuf;
use std::time::Duration;

/// One exchange with a POP failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// No complete answer within the request's deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The request made no progress for this long (a dead connection that
    /// neither resets nor answers); it was abandoned.
    #[error("no progress for {0:?}; the connection was abandoned")]
    Stalled(Duration),
    /// The connection could not be made, or broke (reset, closed early).
    #[error("network error: {0}")]
    Network(String),
    /// The POP answered with an error status; `code` is the machine-readable reason.
    #[error("HTTP {status} {code}: {message}{}", hint(*.status, message))]
    Status {
        status: u16,
        code: String,
        message: String,
        /// The answer's `Retry-After`: the POP expects the call to succeed later.
        retry_after: Option<Duration>,
    },
    /// The POP answered 2xx with something this client cannot read.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// An `https://` URL reached a server that speaks plain HTTP.
    #[error(
        "the POP answered plain HTTP to an https:// request at {url}: use http:// in the POP URL"
    )]
    PlainHttp { url: String },
    /// A 404 that is no answer of the POP's API: the URL names no POP route.
    #[error("the POP answered 404 at {url}: is the POP URL's path right? Give the POP's base URL, e.g. http://host:8080")]
    WrongPath { url: String },
}

/// What to do about a refusal, where the POP's own message does not say it in
/// terms of this client's options.
fn hint(status: u16, message: &str) -> &'static str {
    let about_policy = message.contains("policy") || message.contains("signature");
    match status {
        401 if about_policy => " (pass --secret SECRET, or CIN_SECRET, to sign a policy with the app's secret; or --policy and --signature)",
        401 => " (pass --apikey KEY, or set CIN_APIKEY)",
        403 if about_policy => " (check --policy and --signature, or --secret: they must be the app's)",
        _ => "",
    }
}

/// What the upload loop should do after a failed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The link struggled (reset, timeout, 5xx): retry with a smaller chunk.
    Shrink,
    /// Worth retrying as is (rate limited, expired URL).
    Retry,
    /// Retrying cannot help; the error goes to the user.
    Fatal,
}

impl TransportError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TransportError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            TransportError::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long the POP asked the client to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TransportError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A stable name for the kind of failure, for machine-readable output.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "timeout",
            TransportError::Stalled(_) => "stalled",
            TransportError::Network(_) => "network",
            TransportError::Protocol(_) => "protocol",
            TransportError::PlainHttp { .. } => "plain_http",
            TransportError::WrongPath { .. } => "wrong_path",
            TransportError::Status { status, .. } => match status {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                413 => "too_large",
                507 => "insufficient_storage",
                400..=499 => "refused",
                _ => "pop_error",
            },
        }
    }

    pub fn classify(&self) -> Failure {
        match self {
            // A dead connection says nothing about the chunk size or the load:
            // smaller chunks would only mean more requests to stall.
            TransportError::Stalled(_) => Failure::Retry,
            // A garbled 2xx body is far more likely a cut connection than a broken POP.
            TransportError::Timeout(_)
            | TransportError::Network(_)
            | TransportError::Protocol(_) => Failure::Shrink,
            TransportError::PlainHttp { .. } | TransportError::WrongPath { .. } => Failure::Fatal,
            // The POP said when to come back (a full disk, overload): nothing
            // about the link, so the chunk keeps its size.
            TransportError::Status {
                retry_after: Some(_),
                ..
            } => Failure::Retry,
            TransportError::Status { status, code, .. } => match *status {
                500..=599 => Failure::Shrink,
                // 423: another request is writing the part (this client's own stalled one, most likely).
                408 | 423 | 429 => Failure::Retry,
                409 if code == "superseded" => Failure::Retry,
                403 if code == "url_expired" => Failure::Retry,
                _ => Failure::Fatal,
            },
        }
    }
}

/// An upload or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no POP to talk to: {}", no_pop_help())]
    NoPop,
    #[error("POP URL {url:?}: {reason}")]
    BadPopUrl { url: String, reason: String },
    #[error("no POP accepted the upload: {}", join_errors(.0))]
    AllPopsFailed(Vec<(String, TransportError)>),
    #[error("{what} failed at {pop}: {source}")]
    Request {
        what: &'static str,
        pop: String,
        #[source]
        source: TransportError,
    },
    #[error(
        "part {part} made no progress for {stalled:?} ({attempts} attempts, last error: {last}); \
         the link may be down: run the same command with --resume to continue later"
    )]
    GaveUp {
        part: u32,
        attempts: u32,
        stalled: Duration,
        last: TransportError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed while it was being uploaded (it was {expected} bytes, now {actual}); upload it again")]
    SourceChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "upload state file {path} is unreadable ({reason}); delete it to start the upload afresh"
    )]
    BadState { path: PathBuf, reason: String },
    #[error("client config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{handle} did not reach {status} within {waited:?} (last status: {last})")]
    WaitTimedOut {
        handle: String,
        status: String,
        waited: Duration,
        last: String,
    },
    /// Ctrl-C; `resume` is the command that continues where this run stopped.
    #[error("interrupted{}", match .resume { Some(r) => format!("; to continue where it stopped, run:\n    {r}"), None => String::new() })]
    Interrupted { resume: Option<String> },
    #[error("{path} is {have} bytes, more than the file's {total}: it is no partial download of it; remove it or choose another -o")]
    NotAPartialDownload {
        path: PathBuf,
        have: u64,
        total: u64,
    },
    /// The body ended short of the file's length, or broke off (`cause`).
    #[error("the download into {path} ended at {got}{} bytes{}; run the same command with -o {path} to continue it",
        match .total { Some(t) => format!(" of {t}"), None => String::new() },
        match .cause { Some(c) => format!(" ({c})"), None => String::new() })]
    IncompleteDownload {
        path: PathBuf,
        got: u64,
        total: Option<u64>,
        cause: Option<String>,
    },
    /// Without `-o`, an existing file of the default name is not touched.
    #[error("{path} exists; pass -o {path} to continue it, or another -o")]
    DownloadTargetExists { path: PathBuf },
}

impl ClientError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }

    /// A stable name for the kind of error, for machine-readable output
    /// (`{"error": {"code": ..., "message": ...}}`).
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::NoPop => "no_pop",
            ClientError::BadPopUrl { .. } => "bad_pop_url",
            ClientError::AllPopsFailed(errors) => {
                let mut kinds = errors.iter().map(|(_, e)| e.kind());
                match kinds.next() {
                    Some(first) if kinds.all(|k| k == first) => first,
                    _ => "no_pop_accepted",
                }
            }
            ClientError::Request { source, .. } => source.kind(),
            ClientError::GaveUp { .. } => "gave_up",
            ClientError::Io { .. } => "io",
            ClientError::SourceChanged { .. } => "source_changed",
            ClientError::BadState { .. } => "bad_state",
            ClientError::Config { .. } => "config",
            ClientError::Invalid(_) => "invalid",
            ClientError::WaitTimedOut { .. } => "wait_timeout",
            ClientError::Interrupted { .. } => "interrupted",
            ClientError::NotAPartialDownload { .. } => "not_a_partial_download",
            ClientError::IncompleteDownload { .. } => "incomplete_download",
            ClientError::DownloadTargetExists { .. } => "download_target_exists",
        }
    }

    /// The POP's answer behind this error, when one refused: (HTTP status, its code).
    pub fn pop_status(&self) -> Option<(u16, &str)> {
        let source = match self {
            ClientError::Request { source, .. } => source,
            ClientError::AllPopsFailed(errors) => &errors.last()?.1,
            _ => return None,
        };
        Some((source.status()?, source.code()?))
    }
}

/// Every way to name a POP, with the config file this user would have.
fn no_pop_help() -> String {
    let path = crate::config::ClientConfig::default_path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "$XDG_CONFIG_HOME/cin/config.toml".into());
    format!(
        "pass --pop URL (e.g. --pop http://127.0.0.1:8080), set CIN_POP=URL (several: comma-separated), \
         or list them in the client config file {path}: pops = [\"https://pop.example\"]"
    )
}

fn join_errors(errors: &[(String, TransportError)]) -> String {
    errors
        .iter()
        .map(|(pop, e)| format!("{pop}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}
