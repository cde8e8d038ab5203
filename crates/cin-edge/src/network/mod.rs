//! The network of POPs: which POP minted a handle (its first characters), where
//! that POP is, and the signed calls POPs make to one another. A signature
//! covers the method, the path and an expiry, under the network's shared
//! secret; clients never hold it, so they cannot make these calls.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use cin_domain::PopId;
use serde_json::Value;

use crate::config::Config;
use crate::error::{root_cause, ApiError};
use crate::observability::names;
use crate::signing::{now_unix, Signed, UrlSigner};
use futures_util::StreamExt;

pub mod forward;
pub mod manifest;

/// Headers of a POP-to-POP call.
pub const EXPIRES_HEADER: &str = "cin-internal-expires";
pub const SIGNATURE_HEADER: &str = "cin-internal-signature";
/// Names the POP whose answer a forwarded response is.
pub const ANSWERED_BY_HEADER: &str = "cin-pop";
/// The file's status, on an origin's answer to a read: a POP that sees
/// `Stored` reads the file from final storage next time.
pub const FILE_STATUS_HEADER: &str = "cin-file-status";

/// How long a signed call stays valid: long enough for clocks a little apart.
const CALL_TTL_SECS: u64 = 60;
/// A POP that does not answer a call in this long is taken as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// What an unreachable origin's callers are told to wait before trying again.
pub const RETRY_AFTER_SECS: u64 = 5;

/// One POP-to-POP call.
struct InternalCall<'a> {
    method: &'a str,
    path: &'a str,
    expires: u64,
}

impl Signed for InternalCall<'_> {
    fn canonical(&self) -> String {
        // The scope leads, so no upload URL's string can equal a call's.
        format!("internal\n{}\n{}\n{}", self.method, self.path, self.expires)
    }
}

pub struct Network {
    me: PopId,
    /// The other POPs, by id: their internal base URLs.
    others: HashMap<PopId, String>,
    /// `None` on a POP on its own: it makes and accepts no calls.
    signer: Option<UrlSigner>,
    http: reqwest::Client,
    /// How long a forwarded request or a relayed answer may go without a byte.
    idle: Duration,
    /// Manifests of `Stored` files read at this POP.
    pub manifests: manifest::ManifestCache,
}

/// An answer relayed from another POP.
pub struct Relayed {
    pub status: StatusCode,
    pub body: Value,
}

impl Network {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let me = config.pop_id().map_err(anyhow::Error::msg)?;
        let mut others = HashMap::new();
        for pop in &config.network.pops {
            let id = PopId::parse(&pop.id)?;
            if id != me {
                others.insert(id, pop.url.trim_end_matches('/').to_owned());
            }
        }
        let signer = (!config.network.secret.is_empty())
            .then(|| UrlSigner::new(config.network.secret.as_bytes().to_vec()));
        let http = reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .build()?;
        Ok(Network {
            me,
            others,
            signer,
            http,
            idle: Duration::from_secs(config.server.body_idle_secs.max(1)),
            manifests: manifest::ManifestCache::default(),
        })
    }

    /// How long a forwarded request or a relayed answer may go without a byte.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Whether this POP is in a network of POPs.
    pub fn is_networked(&self) -> bool {
        !self.others.is_empty()
    }

    /// The POP that minted a name, when it is another POP of the network.
    pub fn other_origin(&self, origin: &PopId) -> Option<&str> {
        (origin != &self.me)
            .then(|| self.others.get(origin).map(String::as_str))
            .flatten()
    }

    /// Checks that a request is a call from a POP of the network.
    pub fn check_call(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        let refused = |why: &str| {
            ApiError::forbidden(
                "internal_call_refused",
                format!("{path} is for the POPs of a network only: {why}"),
            )
        };
        let Some(signer) = &self.signer else {
            return Err(refused("this POP is in no network"));
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(expires), Some(signature)) = (header(EXPIRES_HEADER), header(SIGNATURE_HEADER))
        else {
            return Err(refused("the call is not signed"));
        };
        let expires: u64 = expires
            .parse()
            .map_err(|_| refused("its expiry is not a number"))?;
        if expires < now_unix() || expires > now_unix() + 2 * CALL_TTL_SECS {
            return Err(refused("its signature has expired or lasts too long"));
        }
        let call = InternalCall {
            method,
            path,
            expires,
        };
        if !signer.verify(&call, signature) {
            return Err(refused("its signature is not the network's"));
        }
        Ok(())
    }

    /// `GET`s `path` (with the client's `query`) from POP `origin`, signed, and
    /// gives its JSON answer whatever its status; only a POP that does not
    /// answer is an error.
    pub async fn get(&self, origin: &PopId, path: &str, query: &str) -> Result<Relayed, ApiError> {
        let resp = self
            .call(
                origin,
                &reqwest::Method::GET,
                path,
                query,
                &HeaderMap::new(),
            )
            .await?;
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let unreadable = |why: String| {
            ApiError::OriginUnreachable {
            origin: origin.to_string(),
            message: format!(
                "POP {origin} sent an answer that could not be read ({why}); try again in a few seconds"
            ),
        }
        };
        let body = tokio::time::timeout(self.idle, resp.json())
            .await
            .map_err(|_| unreadable(format!("no answer body in {} s", self.idle.as_secs())))?
            .map_err(|e| unreadable(root_cause(&e)))?;
        Ok(Relayed { status, body })
    }

    /// Tells every other POP that `handle`'s file was deleted here, so none
    /// serves it from a manifest it read before. Waits for their answers (each
    /// bounded like any call); a POP that does not answer stops believing its
    /// copy of the manifest within a minute anyway.
    pub async fn announce_deletion(&self, handle: &cin_domain::Handle) {
        let path = format!("/internal/files/{handle}/manifest");
        let calls = self.others.keys().map(|pop| {
            let path = path.clone();
            async move {
                let answer = self
                    .call(pop, &reqwest::Method::DELETE, &path, "", &HeaderMap::new())
                    .await;
                (pop, answer)
            }
        });
        for (pop, answer) in futures_util::future::join_all(calls).await {
            match answer {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => {
                    tracing::warn!(%pop, %handle, status = %resp.status(), "a POP refused the news of a deletion")
                }
                Err(e) => {
                    tracing::warn!(%pop, %handle, error = %e, "a POP did not hear of a deletion; it forgets the file's manifest within a minute")
                }
            }
        }
    }

    /// Sends a signed call to POP `origin` with the given request headers; the
    /// answer's body is left to stream. Only a POP that does not answer is an error.
    pub async fn call(
        &self,
        origin: &PopId,
        method: &reqwest::Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
    ) -> Result<reqwest::Response, ApiError> {
        let unreachable = |message: String| ApiError::OriginUnreachable {
            origin: origin.to_string(),
            message,
        };
        let (Some(base), Some(signer)) = (self.other_origin(origin), &self.signer) else {
            return Err(unreachable(format!(
                "POP {origin} is not in this POP's network"
            )));
        };
        let expires = now_unix() + CALL_TTL_SECS;
        let signature = signer.sign(&InternalCall {
            method: method.as_str(),
            path,
            expires,
        });
        let url = match query {
            "" => format!("{base}{path}"),
            q => format!("{base}{path}?{q}"),
        };
        let mut request = self
            .http
            .request(method.clone(), url)
            .header(EXPIRES_HEADER, expires.to_string())
            .header(SIGNATURE_HEADER, signature);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_bytes());
        }
        // Bodies may stream for long: only the answer's head has the deadline.
        tokio::time::timeout(CALL_TIMEOUT, request.send())
            .await
            .map_err(|_| format!("no answer in {} s", CALL_TIMEOUT.as_secs()))
            .and_then(|sent| sent.map_err(|e| root_cause(&e)))
            .map_err(|why| {
                metrics::counter!(names::NETWORK_UNREACHABLE).increment(1);
                unreachable(format!(
                    "POP {origin}, where this file was uploaded, did not answer ({why}); try again in a few seconds"
                ))
            })
    }
}

/// An answer's body from another POP, streamed as it arrives, ended when no
/// byte comes for `idle`: an origin that stalls must not hold the client.
pub fn relayed_body(answer: reqwest::Response, idle: Duration) -> axum::body::Body {
    let counted = answer.bytes_stream().inspect(|piece| {
        if let Ok(bytes) = piece {
            metrics::counter!(names::NETWORK_BYTES, "direction" => "from_origin")
                .increment(bytes.len() as u64);
        }
    });
    let stream = axum::body::Body::from_stream(counted);
    axum::body::Body::new(crate::body::IdleBody::new(stream, idle))
}

/// A request body on its way to another POP, counted.
pub fn counted_to_origin<S>(stream: S) -> impl futures_util::Stream<Item = S::Item> + Send + 'static
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send + 'static,
{
    stream.inspect(|piece| {
        if let Ok(bytes) = piece {
            metrics::counter!(names::NETWORK_BYTES, "direction" => "to_origin")
                .increment(bytes.len() as u64);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(secret: &str) -> Network {
        let mut config = Config::default();
        config.server.pop_id = "aa".into();
        config.network.secret = secret.into();
        Network::new(&config).unwrap()
    }

    fn signed(net: &Network, method: &str, path: &str, expires: u64) -> HeaderMap {
        let signature = net.signer.as_ref().unwrap().sign(&InternalCall {
            method,
            path,
            expires,
        });
        let mut headers = HeaderMap::new();
        headers.insert(EXPIRES_HEADER, expires.to_string().parse().unwrap());
        headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
        headers
    }

    #[test]
    fn only_calls_signed_with_the_network_secret_for_their_path_pass() {
        let net = network("0123456789abcdef0123456789abcdef");
        let path = "/internal/files/aa345678901234567890/metadata";
        let fresh = now_unix() + 30;
        assert!(net
            .check_call("GET", path, &signed(&net, "GET", path, fresh))
            .is_ok());
        let refused = |headers: &HeaderMap, method: &str, path: &str| {
            net.check_call(method, path, headers).is_err()
        };
        assert!(refused(&HeaderMap::new(), "GET", path), "unsigned");
        assert!(
            refused(&signed(&net, "GET", path, fresh), "GET", "/internal/other"),
            "other path"
        );
        assert!(
            refused(&signed(&net, "GET", path, fresh), "PUT", path),
            "other method"
        );
        assert!(
            refused(&signed(&net, "GET", path, now_unix() - 1), "GET", path),
            "expired"
        );
        let other = network("another secret, also 32 characters long");
        assert!(
            refused(&signed(&other, "GET", path, fresh), "GET", path),
            "other network"
        );
        assert!(network("")
            .check_call("GET", path, &HeaderMap::new())
            .is_err());
    }
}
