//! The client's config file (TOML), for settings one would otherwise repeat on
//! every command:
//!
//! ```toml
//! pops = ["https://pop-eu.example", "https://pop-us.example"]
//! apikey = "..."
//! state_dir = "/var/tmp/cin"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ClientError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// POP base URLs; uploads go to the nearest that accepts them.
    pub pops: Vec<String>,
    /// API key sent with every upload.
    pub apikey: Option<String>,
    /// Where resumable upload state is kept.
    pub state_dir: Option<PathBuf>,
}

impl ClientConfig {
    /// `$XDG_CONFIG_HOME/cin/config.toml`, else `~/.config/cin/config.toml`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("cin").join("config.toml"))
    }

    /// Reads `explicit` (which must exist), else the default file if there is one.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ClientError> {
        let (path, required) = match explicit {
            Some(path) => (path.to_owned(), true),
            None => match Self::default_path() {
                Some(path) => (path, false),
                None => return Ok(ClientConfig::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClientConfig::default())
            }
            Err(e) => return Err(ClientError::io(path, e)),
        };
        toml::from_str(&text).map_err(|e| ClientError::Config {
            path,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let config: ClientConfig =
            toml::from_str("pops = [\"http://a\", \"http://b\"]\napikey = \"k\"")
                .unwrap_or_default();
        assert_eq!(config.pops, ["http://a", "http://b"]);
        assert_eq!(config.apikey.as_deref(), Some("k"));
        assert!(toml::from_str::<ClientConfig>("pop = \"x\"").is_err());
    }
}
