//! The upload page at `/`: plain HTML, CSS and JavaScript compiled into the
//! binary, so a POP serves it with nothing to install beside it. The page
//! uploads over tus (`/files/`) and follows `/{handle}/events`; the `[page]`
//! credentials are written into it for apps that require them.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::app::SharedState;
use crate::config::PageConfig;

const INDEX_HTML: &str = include_str!("../../assets/page/index.html");
const APP_JS: &str = include_str!("../../assets/page/app.js");
const APP_CSS: &str = include_str!("../../assets/page/app.css");
/// Where index.html takes the page's configuration (inside a JSON script block).
const CONFIG_SLOT: &str = "{{CIN_CONFIG}}";

/// The upload page, with this POP's `[page]` credentials.
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200, description = "The upload page: pick or drop files, follow their progress and status, copy their filelinks", content_type = "text/html"), (status = 404, description = "The page is turned off (`[page] enabled = false`)")))]
pub async fn index(State(state): State<SharedState>) -> Response {
    let html = render_index(&state.config.page);
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The credentials may be in the page's URL: they stay on this origin.
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(&state.public_url)) {
        headers.insert(CONTENT_SECURITY_POLICY, policy);
    }
    (headers, html).into_response()
}

/// The page's script.
#[utoipa::path(get, path = "/page/app.js", tag = "page", params(("If-None-Match" = Option<String>, Header, description = "The ETag of a copy the client has")), responses((status = 200, description = "The upload page's JavaScript", content_type = "text/javascript"), (status = 304, description = "If-None-Match matched: the client's copy is current"), (status = 404, description = "The page is turned off (`[page] enabled = false`)")))]
pub async fn app_js(headers: HeaderMap) -> Response {
    static ETAG_VALUE: LazyLock<String> = LazyLock::new(|| etag_of(APP_JS));
    asset(
        &headers,
        APP_JS,
        "text/javascript; charset=utf-8",
        &ETAG_VALUE,
    )
}

/// The page's style sheet.
#[utoipa::path(get, path = "/page/app.css", tag = "page", params(("If-None-Match" = Option<String>, Header, description = "The ETag of a copy the client has")), responses((status = 200, description = "The upload page's style sheet", content_type = "text/css"), (status = 304, description = "If-None-Match matched: the client's copy is current"), (status = 404, description = "The page is turned off (`[page] enabled = false`)")))]
pub async fn app_css(headers: HeaderMap) -> Response {
    static ETAG_VALUE: LazyLock<String> = LazyLock::new(|| etag_of(APP_CSS));
    asset(&headers, APP_CSS, "text/css; charset=utf-8", &ETAG_VALUE)
}

/// index.html with `page`'s credentials in its configuration block.
pub fn render_index(page: &PageConfig) -> String {
    let config = json!({
        "apikey": page.apikey,
        "policy": page.policy,
        "signature": page.signature,
    })
    .to_string();
    INDEX_HTML.replacen(CONFIG_SLOT, &script_safe(&config), 1)
}

/// JSON that cannot end or alter the `<script>` block it sits in: `</script>`
/// or `<!--` in a value would; JSON's `\u` escapes say the same characters.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// Scripts and styles from this POP only; uploads, event streams and previews
/// go to this origin or to the POP's public URL (where upload URLs and
/// filelinks point).
fn content_security_policy(public_url: &str) -> String {
    // Only a plain origin goes into the header; anything else could add directives.
    let plain = public_url
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":/.-[]".contains(c));
    let public = if plain { public_url } else { "" };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; \
         connect-src 'self' {public}; img-src 'self' {public} data: blob:; \
         media-src 'self' {public} blob:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

fn etag_of(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    format!("\"{}\"", hex::encode(&digest[..12]))
}

/// A static file: revalidated at every use (`no-cache`), a 304 when unchanged.
fn asset(
    request: &HeaderMap,
    body: &'static str,
    content_type: &'static str,
    etag: &str,
) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(ETAG, value);
    }
    let unchanged = request
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
        });
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_cannot_break_out_of_the_script_block() {
        let page = PageConfig {
            enabled: true,
            apikey: "</script><script>alert(1)</script>".into(),
            policy: "<!--".into(),
            signature: "a&b".into(),
        };
        let html = render_index(&page);
        let block = html
            .split_once(r#"<script type="application/json" id="cin-config">"#)
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(block, _)| block)
            .expect("the config block");
        assert!(!block.contains('<') && !block.contains('>') && !block.contains('&'));
        let parsed: serde_json::Value = serde_json::from_str(block).expect("JSON");
        assert_eq!(parsed["apikey"], page.apikey);
        assert_eq!(parsed["policy"], page.policy);
        assert_eq!(parsed["signature"], page.signature);
        assert!(!html.contains(CONFIG_SLOT));
    }

    #[test]
    fn the_policy_takes_only_a_plain_origin() {
        assert!(content_security_policy("https://cin.example:8443")
            .contains("connect-src 'self' https://cin.example:8443;"));
        let hostile = content_security_policy("https://x; script-src *");
        assert!(!hostile.contains("script-src *"));
    }
}
