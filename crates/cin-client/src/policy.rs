//! Filestack-style security policies, for apps that require them: a policy is
//! the base64url of a JSON object (`expiry` in Unix seconds, and optionally the
//! `call`s it allows and the one `handle` it is for), its signature the hex
//! HMAC-SHA256 of that base64 string with the app's secret. The POP checks
//! `store` (or `pick`/`write`) to upload, `stat` for metadata, `read` for the
//! bytes and `remove` to delete.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::error::ClientError;

/// A call a policy may allow, in the POP's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Store,
    Stat,
    Read,
    Remove,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Store => "store",
            Call::Stat => "stat",
            Call::Read => "read",
            Call::Remove => "remove",
        }
    }
}

/// How long a policy signed here stays valid.
pub const SIGNED_POLICY_TTL: Duration = Duration::from_secs(3600);

/// A policy and its signature, as sent to the POP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    pub policy: String,
    pub signature: String,
}

/// What this client sends for apps that require security.
#[derive(Debug, Clone, Default)]
pub enum Security {
    /// Nothing: the app requires no policy.
    #[default]
    None,
    /// A policy signed elsewhere, sent as is with every call.
    Given(SignedPolicy),
    /// The app's secret: every call gets a policy of its own, signed here,
    /// allowing only that call (and only its handle, where it has one).
    Secret { secret: String, ttl: Duration },
}

impl Security {
    /// From the options: a policy needs its signature; a secret signs its own.
    pub fn from_options(
        policy: Option<String>,
        signature: Option<String>,
        secret: Option<String>,
    ) -> Result<Security, ClientError> {
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        match (nonempty(policy), nonempty(signature), nonempty(secret)) {
            (Some(policy), Some(signature), _) => Ok(Security::Given(SignedPolicy {
                policy: policy.trim().to_owned(),
                signature: signature.trim().to_owned(),
            })),
            (Some(_), None, _) => Err(ClientError::Invalid(
                "--policy needs its --signature (or CIN_SIGNATURE); or pass --secret to sign a policy here".into(),
            )),
            (None, Some(_), _) => Err(ClientError::Invalid(
                "--signature needs the --policy it signs (or CIN_POLICY)".into(),
            )),
            (None, None, Some(secret)) => Ok(Security::Secret {
                secret,
                ttl: SIGNED_POLICY_TTL,
            }),
            (None, None, None) => Ok(Security::None),
        }
    }

    /// With a secret, policies stay valid at least `ttl` (a long `cin wait`).
    pub fn lasting(self, at_least: Duration) -> Security {
        match self {
            Security::Secret { secret, ttl } => Security::Secret {
                secret,
                ttl: ttl.max(at_least),
            },
            other => other,
        }
    }

    /// The policy to send with `call` (on `handle`, when the call has one).
    pub fn for_call(&self, call: Call, handle: Option<&str>) -> Option<SignedPolicy> {
        match self {
            Security::None => None,
            Security::Given(signed) => Some(signed.clone()),
            Security::Secret { secret, ttl } => {
                let expiry = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(*ttl)
                    .as_secs();
                let policy = encode_policy(expiry, &[call], handle);
                let signature = sign(secret, &policy);
                Some(SignedPolicy { policy, signature })
            }
        }
    }
}

/// The base64url (unpadded) of the policy JSON.
pub fn encode_policy(expiry: u64, calls: &[Call], handle: Option<&str>) -> String {
    let mut policy = json!({ "expiry": expiry });
    if !calls.is_empty() {
        policy["call"] = json!(calls.iter().map(|c| c.name()).collect::<Vec<_>>());
    }
    if let Some(handle) = handle {
        policy["handle"] = json!(handle);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(policy.to_string())
}

/// Hex HMAC-SHA256 of the policy string with the app's secret.
pub fn sign(secret: &str, policy: &str) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(policy.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_policy_allows_one_call_on_one_handle() {
        let security = Security::from_options(None, None, Some("s3cret".into())).unwrap();
        let signed = security.for_call(Call::Read, Some("H")).unwrap();
        assert_eq!(signed.signature, sign("s3cret", &signed.policy));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&signed.policy)
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(json["call"], json!(["read"]));
        assert_eq!(json["handle"], "H");
        assert!(json["expiry"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn known_signature() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            sign("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_policy_needs_its_signature() {
        assert!(Security::from_options(Some("p".into()), None, None).is_err());
        assert!(Security::from_options(None, Some("s".into()), None).is_err());
        assert!(matches!(
            Security::from_options(Some("p".into()), Some("s".into()), Some("x".into())),
            Ok(Security::Given(_))
        ));
        assert!(matches!(
            Security::from_options(None, None, Some(" ".into())),
            Ok(Security::None)
        ));
    }
}
