//! `cin download`: a file's bytes from its filelink into a local file. A file
//! that exists partly (an earlier download broke off) is continued with a
//! `Range` request; the result's length is checked against the file's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::error::{ClientError, TransportError};
use crate::http::HttpTransport;

/// A download whose body brings nothing for this long is given up (and can be
/// continued). Generous: a file still uploading arrives as fast as its upload.
const IDLE: Duration = Duration::from_secs(60);

/// What happened, for the user.
pub trait DownloadObserver: Send + Sync {
    /// The transfer begins at byte `from` of `total` (when the POP says it).
    fn begin(&self, _path: &Path, _from: u64, _total: Option<u64>) {}
    fn received(&self, _bytes: u64) {}
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadReport {
    pub handle: String,
    pub path: PathBuf,
    pub size: u64,
    /// Bytes the local file had already: not fetched again.
    pub resumed_from: u64,
    /// Bytes this run fetched.
    pub received: u64,
    pub pop: String,
    pub elapsed_ms: u64,
}

/// Downloads `handle` from `pop` into `out` (default: the file's own name,
/// from the POP's `Content-Disposition`, in the current directory).
pub async fn download(
    transport: &HttpTransport,
    pop: &str,
    handle: &str,
    out: Option<&Path>,
    observer: &dyn DownloadObserver,
) -> Result<DownloadReport, ClientError> {
    let began = Instant::now();
    let request = |e: TransportError| ClientError::Request {
        what: "download",
        pop: pop.to_owned(),
        source: e,
    };
    let existing = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let (path, mut from, mut resp) = match out {
        Some(path) => {
            let from = existing(path);
            let resp = transport
                .get_file(pop, handle, from)
                .await
                .map_err(request)?;
            (path.to_owned(), from, resp)
        }
        None => {
            // The name comes with the answer. A file of that name is left
            // alone: continuing it is asked for with an explicit -o.
            let resp = transport.get_file(pop, handle, 0).await.map_err(request)?;
            let path = PathBuf::from(
                disposition_name(resp.headers()).unwrap_or_else(|| handle.to_owned()),
            );
            if existing(&path) > 0 {
                return Err(ClientError::DownloadTargetExists { path });
            }
            (path, 0, resp)
        }
    };
    let content_range = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let total = match resp.status().as_u16() {
        416 => {
            let total = content_range.as_deref().and_then(range_total);
            return match total {
                // The local file is whole already.
                Some(total) if total == from => Ok(DownloadReport {
                    handle: handle.to_owned(),
                    path,
                    size: total,
                    resumed_from: from,
                    received: 0,
                    pop: pop.to_owned(),
                    elapsed_ms: elapsed_ms(began),
                }),
                Some(total) => Err(ClientError::NotAPartialDownload {
                    path,
                    have: from,
                    total,
                }),
                None => Err(request(TransportError::Protocol(
                    "416 without the file's length".into(),
                ))),
            };
        }
        206 => {
            let (start, total) = content_range
                .as_deref()
                .and_then(parse_content_range)
                .ok_or_else(|| {
                    request(TransportError::Protocol(format!(
                        "206 with Content-Range {content_range:?}"
                    )))
                })?;
            if start != from {
                return Err(request(TransportError::Protocol(format!(
                    "asked for the bytes from {from}, got them from {start}"
                ))));
            }
            Some(total)
        }
        // The whole file (a POP that ignores the range sends it all again).
        _ => {
            from = 0;
            resp.content_length()
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(from > 0)
        .truncate(from == 0)
        .open(&path)
        .await
        .map_err(|e| ClientError::io(&path, e))?;
    observer.begin(&path, from, total);
    let mut got = from;
    // Why the body ended early, if it did: what arrived is kept, and the next
    // run continues there.
    let mut cut: Option<String> = None;
    loop {
        let chunk = match tokio::time::timeout(IDLE, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the download broke off");
                cut = Some(format!("the connection broke off: {e}"));
                break;
            }
            Err(_) => {
                tracing::warn!(idle = ?IDLE, "the download stopped moving");
                cut = Some(format!("nothing arrived for {} s", IDLE.as_secs()));
                break;
            }
        };
        file.write_all(&chunk)
            .await
            .map_err(|e| ClientError::io(&path, e))?;
        got += chunk.len() as u64;
        observer.received(chunk.len() as u64);
    }
    file.flush().await.map_err(|e| ClientError::io(&path, e))?;
    file.sync_data()
        .await
        .map_err(|e| ClientError::io(&path, e))?;
    if cut.is_some() || total.is_some_and(|t| t != got) {
        return Err(ClientError::IncompleteDownload {
            path,
            got,
            total,
            cause: cut,
        });
    }
    Ok(DownloadReport {
        handle: handle.to_owned(),
        path,
        size: got,
        resumed_from: from,
        received: got - from,
        pop: pop.to_owned(),
        elapsed_ms: elapsed_ms(began),
    })
}

fn elapsed_ms(began: Instant) -> u64 {
    u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `bytes START-END/TOTAL` -> (START, TOTAL).
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// `bytes */TOTAL` (a 416's) -> TOTAL.
fn range_total(value: &str) -> Option<u64> {
    value.rsplit_once('/')?.1.trim().parse().ok()
}

/// The file name a `Content-Disposition` gives, reduced to a plain name (no
/// directories: a POP must not choose where the file lands).
fn disposition_name(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let value = headers
        .get(reqwest::header::CONTENT_DISPOSITION)?
        .to_str()
        .ok()?;
    let mut plain = None;
    let mut extended = None;
    for param in value.split(';').map(str::trim) {
        if let Some(v) = param.strip_prefix("filename*=") {
            extended = v
                .strip_prefix("UTF-8''")
                .or_else(|| v.strip_prefix("utf-8''"))
                .and_then(percent_decode);
        } else if let Some(v) = param.strip_prefix("filename=") {
            plain = Some(v.trim_matches('"').to_owned());
        }
    }
    let name = extended.or(plain)?;
    let name = Path::new(&name).file_name()?.to_str()?.to_owned();
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

fn percent_decode(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_names_are_read() {
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 100)));
        assert_eq!(range_total("bytes */100"), Some(100));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_DISPOSITION,
            "inline; filename=\"a_b.txt\"; filename*=UTF-8''a%C3%A9b.txt"
                .parse()
                .unwrap(),
        );
        assert_eq!(disposition_name(&headers).as_deref(), Some("aéb.txt"));
        headers.insert(
            reqwest::header::CONTENT_DISPOSITION,
            "inline; filename=\"../../etc/passwd\"".parse().unwrap(),
        );
        assert_eq!(disposition_name(&headers).as_deref(), Some("passwd"));
        headers.insert(
            reqwest::header::CONTENT_DISPOSITION,
            "inline; filename=\"..\"".parse().unwrap(),
        );
        assert_eq!(disposition_name(&headers), None);
    }

    struct Quiet;
    impl DownloadObserver for Quiet {}

    /// A body that breaks off is no success, even when no length was announced.
    #[tokio::test]
    async fn a_body_cut_short_without_a_length_is_incomplete() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pop = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 4096];
            let _ = conn.read(&mut head).await;
            // Chunked (so no Content-Length), and closed before the last chunk.
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await;
        });
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cut.bin");
        let transport = HttpTransport::new("k").unwrap();
        let err = download(&transport, &pop, "HANDLE", Some(&out), &Quiet)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::IncompleteDownload {
                    got: 5,
                    total: None,
                    cause: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("broke off"), "{err}");
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"hello",
            "what arrived is kept"
        );
    }
}
