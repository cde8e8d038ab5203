//! Uploads stay with the POP that started them. A request about an upload
//! minted by another POP of the network (DNS or anycast moved the client), or
//! the deletion of a file it minted, is passed to that POP whole, its body streaming through, and its answer comes
//! back as the origin gave it, so the client sees what it would have seen there.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cin_domain::{Handle, PopId, UploadId};
use serde_json::Value;

use super::{Network, ANSWERED_BY_HEADER};
use crate::app::SharedState;
use crate::body::Progress;
use crate::error::ApiError;

/// Control calls name their upload in a small body (JSON or a form).
const CONTROL_PATHS: [&str; 3] = [
    "/multipart/upload",
    "/multipart/commit",
    "/multipart/complete",
];
/// Read whole to find the upload id; a control body is far smaller.
const MAX_PEEKED_BODY: usize = 1 << 20;

/// Headers that belong to one connection, not to the request or answer.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
    )
}

/// Middleware: runs the request here, or at the upload's origin POP.
pub async fn uploads_stay_with_their_origin(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let (origin, request) = match origin_of(&state.network, request).await {
        Ok(found) => found,
        Err(error) => return error.into_response(),
    };
    match origin {
        Some(origin) => state
            .network
            .forward(&origin, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(request).await,
    }
}

/// The other POP of the network that minted the request's upload, if any,
/// and the request (rebuilt when its body had to be read).
async fn origin_of(
    network: &Network,
    request: Request,
) -> Result<(Option<PopId>, Request), ApiError> {
    let path = request.uri().path();
    // A file is deleted where it was uploaded: its origin holds its record.
    if request.method() == axum::http::Method::DELETE {
        if let Some(handle) = path.strip_prefix("/api/file/") {
            let origin = Handle::parse(handle)
                .ok()
                .map(|h| h.pop())
                .filter(|pop| network.other_origin(pop).is_some());
            return Ok((origin, request));
        }
    }
    let in_path = path
        .strip_prefix("/upload/")
        .or_else(|| path.strip_prefix("/files/"))
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned);
    let upload = match in_path {
        Some(id) => id,
        None if CONTROL_PATHS.contains(&path) => {
            let (parts, body) = request.into_parts();
            let bytes = axum::body::to_bytes(body, MAX_PEEKED_BODY)
                .await
                .map_err(|_| ApiError::BodyTooLarge {
                    message: format!(
                        "the request body is over {} KiB; a control call needs far less",
                        MAX_PEEKED_BODY / 1024
                    ),
                })?;
            let upload = upload_id_in_body(&bytes);
            let request = Request::from_parts(parts, Body::from(bytes));
            match upload {
                Some(id) => return Ok((other_origin(network, &id), request)),
                None => return Ok((None, request)),
            }
        }
        None => return Ok((None, request)),
    };
    Ok((other_origin(network, &upload), request))
}

fn other_origin(network: &Network, upload: &str) -> Option<PopId> {
    let origin = UploadId::parse(upload).ok()?.pop();
    network.other_origin(&origin)?;
    Some(origin)
}

/// `upload_id` of a JSON or form body.
fn upload_id_in_body(body: &Bytes) -> Option<String> {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return value["upload_id"].as_str().map(str::to_owned);
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == "upload_id")
        .map(|(_, value)| value)
}

impl Network {
    /// Passes `request` to POP `origin` and gives its answer, both streaming.
    pub async fn forward(&self, origin: &PopId, request: Request) -> Result<Response, ApiError> {
        let unreachable = |why: String| {
            metrics::counter!(crate::observability::names::NETWORK_UNREACHABLE).increment(1);
            ApiError::OriginUnreachable {
            origin: origin.to_string(),
            message: format!(
                "POP {origin}, where this upload was started, did not answer ({why}); try again in a few seconds"
            ),
        }
        };
        let Some(base) = self.other_origin(origin) else {
            return Err(unreachable("it is not in this POP's network".into()));
        };
        let (parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut forwarded = self
            .http
            .request(parts.method.clone(), format!("{base}{path}"));
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) {
                forwarded = forwarded.header(name.as_str(), value.as_bytes());
            }
        }
        // A chunk's body may take long to pass: the origin has as long to
        // answer as the body keeps moving, and the idle time once it stops.
        let progress = Progress::default();
        let sent = forwarded
            .body(reqwest::Body::wrap_stream(
                progress.track(super::counted_to_origin(body.into_data_stream())),
            ))
            .send();
        let answer = tokio::select! {
            answer = sent => answer.map_err(|e| unreachable(crate::error::root_cause(&e)))?,
            () = progress.stalled(self.idle) => {
                return Err(unreachable(format!(
                    "it took no request bytes and sent no answer for {} s",
                    self.idle.as_secs()
                )))
            }
        };
        let status = axum::http::StatusCode::from_u16(answer.status().as_u16())
            .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
        let mut headers = axum::http::HeaderMap::new();
        for (name, value) in answer.headers() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) else {
                continue;
            };
            if !hop_by_hop(&name) {
                headers.append(name, value);
            }
        }
        if let Ok(pop) = HeaderValue::from_str(origin.as_str()) {
            headers.insert(ANSWERED_BY_HEADER, pop);
        }
        let mut response = (status, super::relayed_body(answer, self.idle)).into_response();
        *response.headers_mut() = headers;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upload_id_is_found_in_json_and_form_bodies() {
        let id = "aa345678901234567890123456789012";
        let json = Bytes::from(format!(r#"{{"apikey":"k","upload_id":"{id}","part":1}}"#));
        assert_eq!(upload_id_in_body(&json).as_deref(), Some(id));
        let form = Bytes::from(format!("apikey=k&upload_id={id}&part=1"));
        assert_eq!(upload_id_in_body(&form).as_deref(), Some(id));
        assert_eq!(upload_id_in_body(&Bytes::from_static(b"apikey=k")), None);
    }
}
