//! HTTP routes. Handlers parse the wire format and call the upload engine.

mod admin;
mod files;
mod health;
mod multipart;
mod openapi;
mod page;
mod store_api;
pub mod tus;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{delete, get, head, options, post, put};
use axum::Router;

use crate::app::SharedState;
use crate::config::Config;
use crate::error::ApiError;

pub fn router(config: &Config) -> Router<SharedState> {
    let routes = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/multipart/start", post(multipart::start))
        .route("/multipart/upload", post(multipart::upload))
        .route("/multipart/commit", post(multipart::commit))
        .route("/multipart/complete", post(multipart::complete))
        .route(
            "/upload/{upload_id}/{part}",
            put(multipart::put_chunk).get(multipart::part_received),
        )
        // The handler limits the body to the file size allowed (axum's default is 2 MiB).
        .route(
            "/api/store/{location}",
            post(store_api::store).layer(DefaultBodyLimit::disable()),
        )
        .route("/files", options(tus::options).post(tus::create))
        .route("/files/", options(tus::options).post(tus::create))
        .route(
            "/files/{id}",
            head(tus::head)
                .patch(tus::patch)
                .delete(tus::terminate)
                .options(tus::options),
        )
        .route("/api/file/{handle}/metadata", get(files::api_metadata))
        .route("/api/files", get(admin::list))
        .route("/api/files/{handle}/replication/retry", post(admin::retry))
        .route(
            "/api/files/{handle}/replication/cancel",
            post(admin::cancel),
        )
        .route(
            "/api/file/{handle}",
            get(files::api_serve).delete(files::delete),
        )
        .route(
            "/internal/files/{handle}/metadata",
            get(files::internal_metadata),
        )
        .route("/internal/files/{handle}", get(files::internal_serve))
        .route(
            "/internal/files/{handle}/manifest",
            delete(files::internal_deleted),
        )
        .route(
            "/internal/files/{handle}/events",
            get(files::internal_events),
        )
        .route("/openapi.json", get(openapi::document))
        .route("/{handle}/metadata", get(files::metadata))
        .route("/{handle}/events", get(files::events))
        .route("/{handle}", get(files::serve))
        // The SDKs' `https://cdn/{apikey}/{handle}`; the static routes above win.
        .route("/{handle}/{file}", get(files::serve_keyed));
    // Off, `/` is no route (a JSON 404) and `/page/...` reads as `/{apikey}/{handle}`.
    let routes = if config.page.enabled {
        routes
            .route("/", get(page::index))
            .route("/page/app.js", get(page::app_js))
            .route("/page/app.css", get(page::app_css))
    } else {
        routes
    };
    routes
        // After every route: it applies to the routes added before it.
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
}

/// No route has this path.
async fn no_route(uri: Uri) -> ApiError {
    route_not_found(uri.path())
}

pub(crate) fn route_not_found(path: &str) -> ApiError {
    ApiError::not_found(
        "route_not_found",
        format!("this POP serves nothing at {path}; /openapi.json lists its API"),
    )
}

/// The path has routes, but not for this method (the `Allow` header lists those).
async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        message: format!(
            "{method} is not allowed on {}; the Allow header lists the methods that are",
            uri.path()
        ),
    }
}
