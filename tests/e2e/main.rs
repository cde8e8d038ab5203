//! End-to-end tests: each starts a real POP on port 0 with its own data directory
//! and drives it over HTTP, with plain HTTP calls and with real client SDKs.

mod bad_input;
mod client;
mod delete;
mod disk_full;
mod error_shape;
mod fault_proxy;
mod filelink;
mod final_store;
mod fsync_trace;
mod hostile_clients;
mod lifecycle;
mod lossy_fs;
mod multipart;
mod netns;
mod network;
mod openapi;
mod operations;
mod play_while_uploading;
mod power_cut;
mod reconcile;
mod restart;
mod router;
mod s3;
mod sdk;
mod seaweedfs;
mod security;
mod shutdown;
mod store_api;
mod store_url;
mod support;
mod tls;
mod tus;
mod upload_page;
mod webhooks;
