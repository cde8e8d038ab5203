//! CIN edge: an ingestion point of presence for file uploads.
//!
//! - `upload`: the upload engine (start, durable chunks, commit, complete);
//! - `routes`: the HTTP API (Filestack-compatible multipart, `/api/store`, filelinks, metadata);
//! - `replicator`: the background worker delivering files to final storage;
//! - `destinations`: storage profiles and how uploads are placed on them;
//! - `network`: the network of POPs (which POP minted a handle, signed POP-to-POP calls);
//! - `config`, `telemetry`, `app`: configuration, logging and wiring.

pub mod admin_cli;
pub mod app;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod destinations;
pub mod disk;
pub mod error;
pub mod events;
pub mod fetch;
pub mod input;
pub mod network;
pub mod observability;
pub mod replicator;
pub mod routes;
pub mod server;
pub mod signing;
pub mod telemetry;
pub mod tls;
pub mod upload;
pub mod webhooks;
pub mod worker;

pub use app::run;
pub use config::Config;
