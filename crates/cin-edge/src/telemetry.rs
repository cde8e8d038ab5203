use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The target of the per-request access lines, so a filter can keep or drop them
/// on their own (e.g. `info,cin_edge::access=off`).
pub const ACCESS_TARGET: &str = "cin_edge::access";

/// Installs the global log subscriber. `RUST_LOG` overrides the configured level.
pub fn init(config: &LogConfig) {
    // The AWS SDK warns with debug dumps while it looks for credentials; the
    // POP reports a profile without them in words (readiness, metadata, its log).
    let level = if config.level.contains("aws_config") {
        config.level.clone()
    } else {
        format!("{},aws_config=error", config.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are noise in files, pipes and the journal.
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A subscriber installed earlier (tests) stays in place.
    let _ = result;
}
