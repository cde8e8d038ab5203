//! Apps, API keys and Filestack-style security policies.
//!
//! With no app configured the POP is open (any key is accepted), which suits a
//! single-tenant deployment and local use. Once apps are configured, every upload
//! must name a known key, and apps that require security must also send a policy
//! (base64url JSON) with its signature (hex HMAC-SHA256 of the policy string with
//! the app's secret).

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::AppConfig;
use crate::error::ApiError;
use crate::signing::now_unix;

/// What a request is about to do, in Filestack's policy vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Upload a file (start, `/api/store`, tus creation).
    Store,
    /// Read a file's bytes through its filelink.
    Read,
    /// Read a file's metadata.
    Stat,
    /// Delete a file.
    Remove,
}

impl Call {
    fn names(self) -> &'static [&'static str] {
        match self {
            // Filestack clients ask for "pick" and "store" when uploading.
            Call::Store => &["store", "pick", "write"],
            Call::Read => &["read"],
            Call::Stat => &["stat"],
            Call::Remove => &["remove"],
        }
    }
}

/// The policy and signature a request carried.
#[derive(Clone, Debug, Default)]
pub struct Credentials<'a> {
    pub apikey: Option<&'a str>,
    pub policy: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// What the request targets, for the policy's limits.
#[derive(Clone, Debug, Default)]
pub struct Target<'a> {
    pub handle: Option<&'a str>,
    pub path: Option<&'a str>,
    pub container: Option<&'a str>,
    pub size: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Policy {
    expiry: u64,
    #[serde(default)]
    call: Option<Vec<String>>,
    #[serde(default)]
    handle: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    max_size: Option<u64>,
    #[serde(default)]
    min_size: Option<u64>,
}

pub struct Apps {
    apps: BTreeMap<String, AppConfig>,
}

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::forbidden("policy_refused", message)
}

impl Apps {
    pub fn new(apps: BTreeMap<String, AppConfig>) -> Self {
        Apps { apps }
    }

    pub fn is_open(&self) -> bool {
        self.apps.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&AppConfig> {
        self.apps.get(name)
    }

    /// The app uploading: checks the key, and the policy when the app requires one
    /// (or when one is sent). Returns the app's name (None on an open POP).
    pub fn authorize_upload(
        &self,
        creds: &Credentials<'_>,
        target: &Target<'_>,
    ) -> Result<Option<String>, ApiError> {
        if self.is_open() {
            return Ok(None);
        }
        let key = creds
            .apikey
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized {
                message: "an API key is required: send apikey (or ?key=)".into(),
            })?;
        let (name, app) = self
            .apps
            .iter()
            .find(|(_, app)| bool::from(app.apikey.as_bytes().ct_eq(key.as_bytes())))
            .ok_or_else(|| {
                ApiError::forbidden("unknown_apikey", "this API key is not known to this POP")
            })?;
        if app.require_security || creds.policy.is_some() {
            check_policy(app, creds, Call::Store, target)?;
        }
        if app.max_file_size > 0 {
            if let Some(size) = target.size.filter(|&s| s > app.max_file_size) {
                return Err(ApiError::TooLarge {
                    message: format!(
                        "the file is {size} bytes; this app accepts files up to {} bytes",
                        app.max_file_size
                    ),
                });
            }
        }
        Ok(Some(name.clone()))
    }

    /// Reading a file (bytes or metadata) of `app`: needs a policy when the app requires security.
    pub fn authorize_access(
        &self,
        app: Option<&str>,
        creds: &Credentials<'_>,
        call: Call,
        handle: &str,
    ) -> Result<(), ApiError> {
        let Some(app) = app.and_then(|name| self.apps.get(name)) else {
            return Ok(());
        };
        if !app.require_security {
            return Ok(());
        }
        let target = Target {
            handle: Some(handle),
            ..Default::default()
        };
        check_policy(app, creds, call, &target)
    }

    /// Deleting a file of `app`: needs an API key, the app's own when the file
    /// has one, and a policy allowing `remove` when the app requires security.
    pub fn authorize_removal(
        &self,
        app: Option<&str>,
        creds: &Credentials<'_>,
        handle: &str,
    ) -> Result<(), ApiError> {
        let key = creds
            .apikey
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized {
                message: "deleting a file needs the API key of its app: send ?key=".into(),
            })?;
        let Some(app) = app.and_then(|name| self.apps.get(name)) else {
            return Ok(());
        };
        if !bool::from(app.apikey.as_bytes().ct_eq(key.as_bytes())) {
            return Err(ApiError::forbidden(
                "apikey_mismatch",
                "this file belongs to another app: delete it with that app's API key",
            ));
        }
        if app.require_security {
            let target = Target {
                handle: Some(handle),
                ..Default::default()
            };
            check_policy(app, creds, Call::Remove, &target)?;
        }
        Ok(())
    }

    /// Whether `app` may deliver to storage profile `profile`.
    pub fn allows_profile(&self, app: Option<&str>, profile: &str) -> bool {
        match app.and_then(|name| self.apps.get(name)) {
            Some(app) => {
                app.allowed_profiles.is_empty() || app.allowed_profiles.iter().any(|p| p == profile)
            }
            None => true,
        }
    }
}

/// Signs a policy as clients must (for tests and tools).
pub fn sign_policy(secret: &str, policy: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(policy.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn check_policy(
    app: &AppConfig,
    creds: &Credentials<'_>,
    call: Call,
    target: &Target<'_>,
) -> Result<(), ApiError> {
    let (Some(policy_text), Some(signature)) = (creds.policy, creds.signature) else {
        return Err(ApiError::Unauthorized {
            message: "this app requires a security policy: send policy and signature".into(),
        });
    };
    let expected = sign_policy(&app.secret, policy_text);
    if !bool::from(
        expected
            .as_bytes()
            .ct_eq(signature.trim().to_ascii_lowercase().as_bytes()),
    ) {
        return Err(refused("the signature does not match the policy (tampered policy, or signed with another secret)"));
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(policy_text.trim().trim_end_matches('='))
        .map_err(|_| refused("the policy is not base64url"))?;
    let policy: Policy = serde_json::from_slice(&raw)
        .map_err(|e| refused(format!("the policy is not valid JSON with an expiry: {e}")))?;
    if policy.expiry <= now_unix() {
        return Err(refused(format!(
            "the policy expired at {} (unix time)",
            policy.expiry
        )));
    }
    if let Some(calls) = &policy.call {
        if !calls.iter().any(|c| call.names().contains(&c.as_str())) {
            return Err(refused(format!(
                "the policy allows calls {calls:?}, not {:?}",
                call.names()[0]
            )));
        }
    }
    if let (Some(allowed), Some(handle)) = (&policy.handle, target.handle) {
        if allowed != handle {
            return Err(refused(format!(
                "the policy is for handle {allowed}, not {handle}"
            )));
        }
    }
    if let Some(pattern) = &policy.path {
        let path = target.path.unwrap_or("");
        if !full_match(pattern, path)? {
            return Err(refused(format!(
                "the policy's path pattern {pattern:?} does not allow path {path:?}"
            )));
        }
    }
    if let Some(pattern) = &policy.container {
        let container = target.container.unwrap_or("");
        if !full_match(pattern, container)? {
            return Err(refused(format!(
                "the policy's container pattern {pattern:?} does not allow container {container:?}"
            )));
        }
    }
    if let Some(size) = target.size {
        if policy.max_size.is_some_and(|max| size > max) {
            return Err(refused(format!(
                "the file is {size} bytes, above the policy's maxSize"
            )));
        }
        if policy.min_size.is_some_and(|min| size < min) {
            return Err(refused(format!(
                "the file is {size} bytes, below the policy's minSize"
            )));
        }
    }
    Ok(())
}

fn full_match(pattern: &str, value: &str) -> Result<bool, ApiError> {
    let re = regex_lite::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        refused(format!(
            "the policy's pattern {pattern:?} is not a valid regex: {e}"
        ))
    })?;
    Ok(re.is_match(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(require: bool) -> Apps {
        let mut apps = BTreeMap::new();
        apps.insert(
            "acme".to_owned(),
            AppConfig {
                apikey: "AKEY".into(),
                secret: "s3cret".into(),
                require_security: require,
                ..Default::default()
            },
        );
        Apps::new(apps)
    }

    fn policy(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn policies_are_checked() {
        let apps = app(true);
        let future = now_unix() + 600;
        let good = policy(&format!(
            r#"{{"expiry":{future},"call":["store"],"path":"uploads/.*","maxSize":100}}"#
        ));
        let sig = sign_policy("s3cret", &good);
        let creds = Credentials {
            apikey: Some("AKEY"),
            policy: Some(&good),
            signature: Some(&sig),
        };
        let target = Target {
            path: Some("uploads/a.txt"),
            size: Some(10),
            ..Default::default()
        };
        assert_eq!(
            apps.authorize_upload(&creds, &target).unwrap().as_deref(),
            Some("acme")
        );

        let too_big = Target {
            size: Some(101),
            ..target.clone()
        };
        assert!(apps
            .authorize_upload(&creds, &too_big)
            .unwrap_err()
            .to_string()
            .contains("maxSize"));
        let elsewhere = Target {
            path: Some("other/a.txt"),
            ..target.clone()
        };
        assert!(apps
            .authorize_upload(&creds, &elsewhere)
            .unwrap_err()
            .to_string()
            .contains("path"));

        let tampered = policy(&format!(
            r#"{{"expiry":{future},"call":["store"],"maxSize":1000000}}"#
        ));
        let creds_t = Credentials {
            policy: Some(&tampered),
            ..creds.clone()
        };
        assert!(apps
            .authorize_upload(&creds_t, &target)
            .unwrap_err()
            .to_string()
            .contains("signature"));

        let old = policy(r#"{"expiry":1000}"#);
        let old_sig = sign_policy("s3cret", &old);
        let creds_o = Credentials {
            apikey: Some("AKEY"),
            policy: Some(&old),
            signature: Some(&old_sig),
        };
        assert!(apps
            .authorize_upload(&creds_o, &target)
            .unwrap_err()
            .to_string()
            .contains("expired"));

        let read_only = policy(&format!(r#"{{"expiry":{future},"call":["read"]}}"#));
        let ro_sig = sign_policy("s3cret", &read_only);
        let creds_r = Credentials {
            apikey: Some("AKEY"),
            policy: Some(&read_only),
            signature: Some(&ro_sig),
        };
        assert!(apps
            .authorize_upload(&creds_r, &target)
            .unwrap_err()
            .to_string()
            .contains("calls"));

        let no_policy = Credentials {
            apikey: Some("AKEY"),
            ..Default::default()
        };
        assert!(matches!(
            apps.authorize_upload(&no_policy, &target),
            Err(ApiError::Unauthorized { .. })
        ));
        let unknown = Credentials {
            apikey: Some("NOPE"),
            ..Default::default()
        };
        assert!(matches!(
            apps.authorize_upload(&unknown, &target),
            Err(ApiError::Forbidden {
                code: "unknown_apikey",
                ..
            })
        ));
    }
}
