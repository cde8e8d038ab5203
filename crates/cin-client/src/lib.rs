//! CIN client: uploads files to CIN edge POPs with intelligent ingestion.
//!
//! Files go in parts of 8 MiB, each part in chunks whose size adapts to the link
//! (halving on failures down to 32 KiB, doubling after successes up to the part
//! size or the POP's hint), with retries under exponential backoff and full jitter,
//! per-request timeouts derived from measured throughput, an adaptive number of
//! parts in flight, the nearest POP chosen by round-trip time, and resumable
//! uploads recorded after every acknowledged chunk.
//!
//! The algorithm talks to the world through two traits, [`Transport`] and
//! [`Clock`], so it is unit-tested against a simulated network on a fake clock.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cin_client::ClientError> {
//! use std::sync::Arc;
//! use cin_client::{FileSource, HttpTransport, Quiet, StoreOptions, TokioClock, UploadJob, UploadOptions, Uploader};
//! let uploader = Uploader::new(
//!     Arc::new(HttpTransport::new("APIKEY")?),
//!     Arc::new(TokioClock::new()),
//!     UploadOptions::default(),
//!     Arc::new(Quiet),
//! );
//! let report = uploader
//!     .upload(UploadJob {
//!         source: Arc::new(FileSource::open("video.mp4".as_ref())?),
//!         filename: "video.mp4".into(),
//!         mimetype: "video/mp4".into(),
//!         store: StoreOptions::s3(),
//!         pops: vec!["https://pop.example".into()],
//!         resume: None,
//!     })
//!     .await?;
//! println!("{} {}", report.handle, report.url);
//! # Ok(()) }
//! ```

pub mod adaptive;
pub mod cli;
pub mod clock;
pub mod config;
pub mod download;
pub mod error;
pub mod http;
pub mod policy;
pub mod pop;
pub mod ranges;
pub mod source;
pub mod state;
pub mod transport;
pub mod upload;

#[cfg(test)]
mod sim;

pub use clock::{Clock, TokioClock};
pub use error::{ClientError, TransportError};
pub use http::HttpTransport;
pub use policy::{Security, SignedPolicy};
pub use pop::{rank_pops, PopRtt, ProbePolicy};
pub use source::{ByteSource, FileSource, MemorySource};
pub use state::{Checkpoint, FileIdentity, StateDir, UploadState};
pub use transport::{StoreOptions, Transport};
pub use upload::{
    Observer, Quiet, ResumePlan, SessionInfo, UploadJob, UploadOptions, UploadReport, Uploader,
};
