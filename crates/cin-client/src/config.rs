//! The client's config file (TOML), for settings one would otherwise repeat on
//! every command:
//!
//! ```toml
//! pops = ["https://pop-eu.example", "https://pop-us.example"]
//! apikey = "..."
//! state_dir = "/var/tmp/cin"
//! # For apps that require security: the app's secret (cin signs a policy for
//! # each call), or a policy signed elsewhere with its signature.
//! secret = "..."
//! policy = "..."
//! signature = "..."
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
    /// A security policy (base64url JSON), sent with every call.
    pub policy: Option<String>,
    /// The policy's signature (hex HMAC-SHA256 with the app's secret).
    pub signature: Option<String>,
    /// The app's secret: cin signs a policy for each call itself.
    pub secret: Option<String>,
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
        let secure: ClientConfig =
            toml::from_str("secret = \"s\"\npolicy = \"p\"\nsignature = \"g\"").unwrap_or_default();
        assert_eq!(secure.secret.as_deref(), Some("s"));
        assert_eq!(secure.policy.as_deref(), Some("p"));
        assert_eq!(secure.signature.as_deref(), Some("g"));
    }
}
