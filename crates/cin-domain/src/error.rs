use thiserror::Error;

/// Input that breaks a domain rule. Each message tells the caller what to send instead.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DomainError {
    #[error("handle must be 20 characters of [A-Za-z0-9], got {0:?}")]
    InvalidHandle(String),
    #[error("upload_id must be 32 characters of [A-Za-z0-9], got {0:?}")]
    InvalidUploadId(String),
    #[error("a POP id must be 2 characters of [A-Za-z0-9] (e.g. \"eu\" or \"A1\"), got {0:?}")]
    InvalidPopId(String),
    #[error("part number must be between 1 and {max}, got {got}")]
    PartOutOfRange { got: i64, max: u32 },
    #[error(
        "store path {0:?} is not allowed: use '/'-separated names without '..' or empty segments"
    )]
    InvalidStorePath(String),
    #[error("store container {0:?} is not a valid bucket name: 3 to 63 lowercase letters, digits, '-' and '.', not starting with '-' or '.'")]
    InvalidContainer(String),
    #[error("a file that is {from} cannot become {to}")]
    IllegalTransition {
        from: &'static str,
        to: &'static str,
    },
}
