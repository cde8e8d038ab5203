//! HTTP routes. Handlers parse the wire format and call the upload engine.

mod files;
mod health;
mod multipart;
mod openapi;
mod store_api;
pub mod tus;

use axum::routing::{get, head, options, post, put};
use axum::Router;

use crate::app::SharedState;

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/multipart/start", post(multipart::start))
        .route("/multipart/upload", post(multipart::upload))
        .route("/multipart/commit", post(multipart::commit))
        .route("/multipart/complete", post(multipart::complete))
        .route("/upload/{upload_id}/{part}", put(multipart::put_chunk))
        .route("/api/store/{location}", post(store_api::store))
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
        .route("/openapi.json", get(openapi::document))
        .route("/{handle}/metadata", get(files::metadata))
        .route("/{handle}/events", get(files::events))
        .route("/{handle}", get(files::serve))
}
