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
    #[error("HTTP {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    /// The POP answered 2xx with something this client cannot read.
    #[error("unexpected answer: {0}")]
    Protocol(String),
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

    pub fn classify(&self) -> Failure {
        match self {
            // A dead connection says nothing about the chunk size or the load:
            // smaller chunks would only mean more requests to stall.
            TransportError::Stalled(_) => Failure::Retry,
            // A garbled 2xx body is far more likely a cut connection than a broken POP.
            TransportError::Timeout(_)
            | TransportError::Network(_)
            | TransportError::Protocol(_) => Failure::Shrink,
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
    #[error("no POP to talk to: pass --pop URL or list `pops` in the client config file")]
    NoPop,
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
}

impl ClientError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }
}

fn join_errors(errors: &[(String, TransportError)]) -> String {
    errors
        .iter()
        .map(|(pop, e)| format!("{pop}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}
