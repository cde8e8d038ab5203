//! Choosing the nearest POP: probe each one's `/healthz` a few times in parallel,
//! rank by round-trip time, unreachable POPs last (kept as a last resort).

use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;

use crate::clock::Clock;
use crate::transport::Transport;

#[derive(Debug, Clone, PartialEq)]
pub struct ProbePolicy {
    /// Probes per POP; the fastest counts (later ones reuse the connection, as uploads will).
    pub samples: u32,
    /// A probe slower than this counts as a miss.
    pub timeout: Duration,
}

impl Default for ProbePolicy {
    fn default() -> Self {
        ProbePolicy {
            samples: 3,
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PopRtt {
    pub pop: String,
    /// Best round trip measured; `None` when every probe failed (or none was made).
    pub rtt: Option<Duration>,
}

/// Ranks `pops`, fastest first. A single POP is not probed.
pub async fn rank_pops(
    transport: &dyn Transport,
    clock: &dyn Clock,
    pops: &[String],
    policy: &ProbePolicy,
) -> Vec<PopRtt> {
    if pops.len() < 2 {
        return pops
            .iter()
            .map(|pop| PopRtt {
                pop: pop.clone(),
                rtt: None,
            })
            .collect();
    }
    let probes = pops.iter().map(|pop| async move {
        let mut best: Option<Duration> = None;
        for _ in 0..policy.samples.max(1) {
            let began = clock.now();
            if transport.probe(pop, policy.timeout).await.is_ok() {
                let rtt = clock.now().saturating_sub(began);
                best = Some(best.map_or(rtt, |b| b.min(rtt)));
            }
        }
        PopRtt {
            pop: pop.clone(),
            rtt: best,
        }
    });
    let mut ranked = join_all(probes).await;
    // Stable: unreachable POPs keep the order they were given in.
    ranked.sort_by_key(|p| (p.rtt.is_none(), p.rtt));
    ranked
}

/// The POP an upload's calls go to after `start`: the one its `location_url`
/// (`host[:port]`, Filestack's form) names, reached with the scheme of the POP
/// that answered the start. In a network of POPs that is the upload's origin,
/// wherever DNS or anycast sends the client's next connection.
pub fn origin_pop(started_at: &str, location_url: &str) -> String {
    let location = location_url.trim().trim_end_matches('/');
    if location.is_empty() {
        return started_at.to_owned();
    }
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let scheme = started_at
        .split_once("://")
        .map_or("https", |(scheme, _)| scheme);
    format!("{scheme}://{location}")
}

/// Checks a POP URL as given (`--pop`, `CIN_POP`, the config file) before any
/// request, so a mistake gets a message about the URL rather than one from
/// deep inside the HTTP client; returns it without a trailing slash.
pub fn parse_pop_url(raw: &str) -> Result<String, crate::error::ClientError> {
    let given = raw.trim();
    let bad = |reason: String| crate::error::ClientError::BadPopUrl {
        url: given.to_owned(),
        reason,
    };
    if !given.contains("://") {
        return Err(bad(format!(
            "no scheme: add http:// or https:// (e.g. http://{given})"
        )));
    }
    let url = reqwest::Url::parse(given).map_err(|e| bad(format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {}:// is not spoken by POPs: use http:// or https://",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host: give one, e.g. http://127.0.0.1:8080".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "a POP URL takes no query or fragment: give the POP's base URL".into(),
        ));
    }
    Ok(given.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod url_tests {
    use super::parse_pop_url;

    #[test]
    fn pop_urls_are_checked_up_front() {
        assert_eq!(
            parse_pop_url(" http://127.0.0.1:8080/ ").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            parse_pop_url("https://pop.example/edge").unwrap(),
            "https://pop.example/edge"
        );
        let no_scheme = parse_pop_url("127.0.0.1:8080").unwrap_err().to_string();
        assert!(no_scheme.contains("add http:// or https://"), "{no_scheme}");
        assert!(parse_pop_url("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("use http:// or https://"));
        assert!(parse_pop_url("http://x/?a=1").is_err());
        assert!(parse_pop_url("http://").is_err());
    }
}

#[cfg(test)]
mod origin_tests {
    use super::origin_pop;

    #[test]
    fn calls_after_start_go_where_the_location_url_says() {
        assert_eq!(
            origin_pop("http://anycast:8080", "10.0.0.2:8080"),
            "http://10.0.0.2:8080"
        );
        assert_eq!(
            origin_pop("https://cin.example", "eu.cin.example"),
            "https://eu.cin.example"
        );
        assert_eq!(origin_pop("http://a:1", "http://b:2/"), "http://b:2");
        assert_eq!(origin_pop("http://a:1", ""), "http://a:1");
    }
}
