//! The OpenAPI 3 description of the HTTP API, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use super::{files, health, multipart, store_api, tus};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CIN edge",
        description = "An ingestion point of presence for file uploads: Filestack-compatible multipart uploads, tus 1.0, filelinks and status metadata."
    ),
    paths(
        health::healthz,
        health::readyz,
        health::metrics,
        multipart::start,
        multipart::upload,
        multipart::put_chunk,
        multipart::part_received,
        multipart::commit,
        multipart::complete,
        store_api::store,
        files::metadata,
        files::api_metadata,
        files::serve,
        files::api_serve,
        files::delete,
        files::serve_keyed,
        files::events,
        tus::options,
        tus::create,
        tus::head,
        tus::patch,
        tus::terminate,
        document,
    ),
    components(schemas(
        multipart::StartRequest,
        multipart::UploadRequest,
        multipart::CommitRequest,
        multipart::CompleteRequest
    ))
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
