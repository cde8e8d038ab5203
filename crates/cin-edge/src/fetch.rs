//! Store from URL: the POP fetches a remote file for a client. It must not be a
//! way into the operator's network, so every address it connects to, after
//! each redirect too, is checked: private, loopback, link-local and other
//! non-public ranges are refused unless `uploads.fetch_allow` names them. Names
//! are resolved here and only checked addresses are connected to, so a name
//! cannot resolve to a public address for the check and a private one after.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use crate::config::UploadsConfig;
use crate::error::{root_cause, ApiError};

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;
/// A fetch that sends no byte for this long has failed.
const READ_IDLE: Duration = Duration::from_secs(30);

/// The HTTP client of store-from-URL fetches.
pub struct Fetcher {
    client: reqwest::Client,
    allow: Arc<Vec<IpNet>>,
}

/// Whether the POP may connect to `ip`: public addresses, and those in `allow`.
fn permitted(ip: IpAddr, allow: &[IpNet]) -> bool {
    allow.iter().any(|net| net.contains(&ip)) || is_public(ip)
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)) // NAT64, reaches IPv4 inside
}

/// Resolves names for fetches, keeping only permitted addresses.
struct PermittedOnly {
    allow: Arc<Vec<IpNet>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses this POP does not fetch from (private, loopback or link-local); uploads.fetch_allow lists exceptions")]
struct RefusedDestination {
    host: String,
}

impl Resolve for PermittedOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| permitted(addr.ip(), &allow))
                .collect();
            if permitted.is_empty() {
                return Err(Box::new(RefusedDestination { host }) as Box<_>);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// Why a URL is not fetched before connecting: its scheme, or a literal
/// address (those are connected to without resolving).
fn check_url(url: &reqwest::Url, allow: &[IpNet]) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{url}: only http and https URLs are fetched, not {}",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str() else {
        return Err(format!("{url} names no host"));
    };
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    match literal {
        Some(ip) if !permitted(ip, allow) => Err(format!(
            "{url}: {ip} is an address this POP does not fetch from (private, loopback or link-local); uploads.fetch_allow lists exceptions"
        )),
        _ => Ok(()),
    }
}

impl Fetcher {
    pub fn new(config: &UploadsConfig) -> anyhow::Result<Fetcher> {
        let allow: Arc<Vec<IpNet>> = Arc::new(
            config
                .fetch_allow
                .iter()
                .filter_map(|range| range.parse().ok())
                .collect(),
        );
        let checked = allow.clone();
        let redirects = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match check_url(attempt.url(), &checked) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        });
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(PermittedOnly {
                allow: allow.clone(),
            }))
            .redirect(redirects)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(READ_IDLE)
            .timeout(Duration::from_secs(config.fetch_timeout_secs))
            .no_proxy()
            .build()?;
        Ok(Fetcher { client, allow })
    }

    /// Starts fetching `url`: the answer, its body left to stream.
    pub async fn get(&self, url: &str) -> Result<reqwest::Response, ApiError> {
        let refused = |message: String| ApiError::invalid("url_refused", message);
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| refused(format!("url {url:?} is not a URL: {e}")))?;
        check_url(&parsed, &self.allow).map_err(refused)?;
        let answer = self.client.get(parsed).send().await.map_err(|e| {
            let why = root_cause(&e);
            if why.contains("does not fetch from") || e.is_redirect() {
                refused(format!("{url}: {why}"))
            } else {
                ApiError::invalid("url_unreachable", format!("fetching {url} failed: {why}"))
            }
        })?;
        if !answer.status().is_success() {
            return Err(ApiError::invalid(
                "url_fetch_failed",
                format!(
                    "{url} answered {}; only a 2xx answer is stored",
                    answer.status()
                ),
            ));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_fetched_unless_allowed() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(!permitted(ip, &[]), "{private}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(permitted(public.parse().unwrap(), &[]), "{public}");
        }
        let allow = ["127.0.0.1/32".parse().unwrap()];
        assert!(permitted("127.0.0.1".parse().unwrap(), &allow));
        assert!(!permitted("127.0.0.2".parse().unwrap(), &allow));
    }
}
